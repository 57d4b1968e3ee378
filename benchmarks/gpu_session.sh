#!/usr/bin/env bash
# The GPU work of this project, sized for a lent GPU machine (about 15 minutes of device time in all,
# at most 10 minutes per command), in two calls that each stay well inside one command's limit:
#
#   benchmarks/gpu_session.sh check   install, versions, GPU kernel tests, kernel and end-to-end
#                                     benchmarks side by side with cuBLAS / torch BSR / resize (~6 min,
#                                     its step limits add up to 9.5 min: give the call timeout_s=600)
#   benchmarks/gpu_session.sh tune    tune_kernel --quick into $OUT (~5 min); to adopt its entries, merge them
#                                     into nn_blocksparse/kernels/tuned_configs.json and run ./run.sh aot
#
# Every step has its own time limit, so a slow step cannot eat the others' time, and every result is
# written as soon as it exists. Results and a log go to $OUT (the device tool's output folder) or to
# benchmarks/results/gpu_session/; copy the CSVs and plots into benchmarks/results/ and commit them.
# Needs only what the GPU machine has (torch, triton, transformers, pytest, matplotlib): the tests
# that need the bundled MiniLM weights are not run here, the end-to-end benchmark uses BERT-base.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
LOG="$OUT/session_${1:-none}.log"
failures=0

step() {  # step SECONDS command...: run with a time limit, log it, count failures, go on
    local limit=$1
    shift
    echo "=== [limit ${limit}s] $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "=== exit $status after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$status" -eq 0 ] || failures=$((failures + 1))
}

versions() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
    "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, \
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
}

case "${1:-}" in
    check)
        step 60 "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
        versions 2>&1 | tee -a "$LOG"
        # Correctness first: the compiled kernel against the float64 reference, every dtype, block
        # size, epilogue, split-K and row-group variant (the BERT-shape sweep of every config last).
        step 150 "$PYTHON" -m pytest -q -x tests/test_kernel.py tests/test_linear.py tests/test_row_groups.py \
            tests/test_configs.py -k "not bert_shape_on_gpu"
        # The issue-6 grid: BERT-base shapes, fp16, 32x32 blocks, M = 128 (batch 1) and 2048,
        # density 1.0 .. 0.1, dense cuBLAS / torch BSR / resize / ours in one run.
        step 210 "$PYTHON" -m benchmarks.bench_kernel --out "$OUT" --dtypes fp16 --block-sizes 32 --m 128,2048 \
            --densities 1.0,0.75,0.5,0.36,0.1
        step 90 "$PYTHON" -m benchmarks.bench_e2e --out "$OUT" --model bert-base --sizes 1x128,8x384,32x384
        step 45 "$PYTHON" -m pytest -q tests/test_kernel.py -k bert_shape_on_gpu
        ;;
    tune)
        step 30 "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
        # Writes the table after every shape: an interrupted run keeps what it measured.
        step 300 "$PYTHON" -m benchmarks.tune_kernel --quick --out "$OUT/tuned_configs_quick.json" \
            --log "$OUT/tune_quick.csv"
        ;;
    *)
        echo "usage: benchmarks/gpu_session.sh {check|tune}" >&2
        exit 2
        ;;
esac
echo "gpu_session ${1:-}: $failures step(s) failed; results in $OUT" | tee -a "$LOG"
exit $((failures > 0))
