#!/usr/bin/env bash
# The GPU work of this project, sized for a lent GPU machine: about 15 minutes of device time in
# all, the machine's start included, and at most 10 minutes per command. So the main work is one
# call (`all`), and a second, optional one can follow on the still-warm machine:
#
#   tools/gpu_session.sh kernel  install, versions; GPU tests in parallel with compiling every
#                                     kernel variant the timed runs need; tune the package table
#                                     (CUDA-graph timing); kernel benchmark against cuBLAS / torch
#                                     BSR / resize as CUDA-graph replays; the graph-timing
#                                     cross-check. Step limits add up to 6.4 min.
#   tools/gpu_session.sh serve   install; compile; BERT-base end to end as CUDA-graph replays and
#                                     eagerly; the graph check with its kernel profile; the eager
#                                     kernel benchmark (limits: 5.1 min)
#   tools/gpu_session.sh all     kernel, then end to end and launch overhead (not the eager
#                                     kernel benchmark): step limits add up to 8.8 min, give the
#                                     call timeout_s=600
#   tools/gpu_session.sh retune  after a kernel change: compile the tuning candidates, tune,
#                                     then run the GPU tests (which cover the new table), the graph-
#                                     timed kernel grid and end to end, and the graph check with a
#                                     kernel profile (limits: 8.7 min; about 5 on an H200)
#   tools/gpu_session.sh short   install, GPU tests, end to end, launch overhead, the graph-
#                                     timing cross-check (~3 min): for a session with little device
#                                     time
#   tools/gpu_session.sh extra   bf16 and block sizes 16 / 64 in the kernel benchmark (~1 min)
#   tools/gpu_session.sh align   the resized FFN padding sweep (bench_ffn_alignment, graph-timed
#                                     and eager), and the heuristic timed against a fresh M = 512
#                                     tuning into a scratch table (limits: 4.5 min; took 2 on an H200)
#   tools/gpu_session.sh compile torch.compile on the GPU: the GPU twins of the op and compile
#                                     tests, then BERT-base compiled dense / resize / hybrid graph-timed,
#                                     beside reduce-overhead and CudaGraphForward serving (limits:
#                                     6.9 min; not yet run on a GPU)
#   tools/gpu_session.sh diagnose  issues 15 and 16 in one call: install; the kernel GPU tests
#                                     while tools/gpu_diagnosis.py (and tools/gpu_kernels_probe.py,
#                                     where it has --compile-only) compile in the background; the
#                                     diagnosis (every variant beside cuBLAS, torch BSR, 2:4, cuSPARSE;
#                                     ncu where it reads counters); then the new kernels' probe, if
#                                     that script is there. Step limits add up to 8 min: give the call
#                                     timeout_s=600 (docs/gpu.md)
#   tools/gpu_session.sh layouts  bench_kernel on random, head-structured and nn_pruning-like
#                                     layouts beside torch BSR, 2:4 and cuSPARSE (graph-timed, ~3 min)
#
# Then copy the tuned table back into nn_blocksparse/kernels/tuned_configs.json and run
# ./run.sh aot to check its entries for spills.
#
# Every step has its own time limit, so a slow step cannot eat the others' time, and results are
# packed into $OUT/gpu_results.tar.gz after every step (the device tool brings back at most 8
# files), beside the logs. Without $OUT (the device tool's output folder) all goes to
# benchmarks/results/gpu_session/. Unpack and copy the CSVs and plots into benchmarks/results/<device>/ (e.g. nvidia-h200/).
# Needs only what the GPU machine has (torch, triton, transformers, pytest, matplotlib;
# pytest-xdist if there): the tests that need the bundled MiniLM weights are not run here, the
# end-to-end benchmark uses a random-weight BERT-base.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_session}
WORK=${WORK:-/tmp/nn_blocksparse_gpu_results}
mkdir -p "$OUT" "$WORK"
PYTHON=${PYTHON:-python3}
LOG="$OUT/session_${1:-none}.log"
export PYTHONUNBUFFERED=1
failures=0

step() {  # step SECONDS command...: run with a time limit, log it, count failures, go on
    local limit=$1
    shift
    echo "=== [limit ${limit}s] $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local status=${PIPESTATUS[0]}
    echo "=== exit $status after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$status" -eq 0 ] || failures=$((failures + 1))
    pack
}

pack() {  # everything measured so far, as one file in $OUT
    cp -f nn_blocksparse/kernels/tuned_configs.json "$WORK/" 2>/dev/null
    tar -czf "$OUT/gpu_results.tar.gz.tmp" -C "$WORK" . && mv -f "$OUT/gpu_results.tar.gz.tmp" "$OUT/gpu_results.tar.gz"
}

versions() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__, \
'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
}

gpu_tests() {  # the compiled kernel against the float64 reference: every dtype, block size, epilogue,
               # split-K and row-group variant, every launchable config on a BERT-sized problem, the
               # measured hybrid choice; spread over 12 processes when pytest-xdist is there
    local parallel=()
    "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 12)
    step 120 "$PYTHON" -m pytest -q "${parallel[@]}" -p no:cacheprovider tests/test_kernel.py tests/test_linear.py \
        tests/test_row_groups.py tests/test_configs.py tests/test_selection.py \
        "tests/test_graph_capture.py::test_graph_forward_replays_new_inputs_like_the_eager_model"
}

e2e_eager() {  # e2e_eager SECONDS: pruned BERT-base end to end, eager forwards
    step "$1" "$PYTHON" -m benchmarks.bench_e2e --out "$WORK" --model bert-base --sizes 1x128,8x384,32x384
}

e2e_graph() {  # pruned BERT-base end to end as CUDA-graph replays
    step 60 "$PYTHON" -m benchmarks.bench_e2e --out "$WORK" --model bert-base --sizes 1x128,8x384,32x384 \
        --cuda-graph --rep-ms 100
}

end_to_end() {  # pruned BERT-base, eager and as CUDA-graph replays; the host cost of one call
    e2e_eager 50
    e2e_graph
    step 30 "$PYTHON" -m benchmarks.launch_overhead --out "$WORK"
}

SHAPES=768x768,2304x768,3072x768,768x3072
BENCH_M=128,512,2048,8192
BENCH_DENSITIES=1.0,0.75,0.5,0.36,0.1

install() {
    step 30 "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
    versions 2>&1 | tee -a "$LOG" "$WORK/versions.txt"
}

tune() {  # the package table on the benchmark grid's shapes (fp16, 32x32 blocks, M 128, 512, 2048),
         # timing CUDA-graph replays: the kernels' own GPU time ranks them (eagerly, microsecond
         # kernels all time as the host's launch cost). The log keeps the best of each kernel family.
    step 130 "$PYTHON" -m benchmarks.tune_kernel --dtypes fp16 --block-sizes 32 --shapes "$SHAPES" \
        --m 128,512,2048 --densities 0.1,0.36,0.5,0.75,1.0 --stages 3 --warmup-ms 1 --rep-ms 2 --cuda-graph --fresh \
        --out nn_blocksparse/kernels/tuned_configs.json --log "$WORK/tune_cudagraph.csv"
}

CLASSIC_METHODS=dense,torch_bsr,resize,ours  # what the timed grids compared before 2:4 and cuSPARSE joined

kernel_grid() {  # the issue-6 grid: BERT-base shapes, fp16, 32x32 blocks, dense cuBLAS / torch BSR /
                 # resize / ours (the package's tuned table), as CUDA-graph replays
    step 60 "$PYTHON" -m benchmarks.bench_kernel --out "$WORK" --dtypes fp16 --block-sizes 32 --shapes "$SHAPES" \
        --m "$BENCH_M" --densities "$BENCH_DENSITIES" --methods "$CLASSIC_METHODS" --rep-ms 5 --cuda-graph
}

DIAGNOSIS_LIMIT=180  # tools/gpu_diagnosis.py keeps to its --budget-s, a little under this
PROBE=tools/gpu_kernels_probe.py

diagnose_part() {  # after install: 90 + 180 + 180 s of step limits (with install's 30: 8 min)
    # Compiling is CPU work: the diagnosis's variants (and the probe's kernels, where it can) compile in
    # the background while the GPU tests run. A background job ignores SIGINT, so it gets TERM at its limit.
    echo "=== [limit 90s, in the background, log in diag_compile.log] gpu_diagnosis --compile-only" | tee -a "$LOG"
    timeout --kill-after=5 90 "$PYTHON" tools/gpu_diagnosis.py --compile-only --workers 10 \
        > "$OUT/diag_compile.log" 2>&1 &
    local compile=$!
    local probe_compile=
    if [ -f "$PROBE" ] && grep -q -- "--compile-only" "$PROBE"; then
        timeout --kill-after=5 90 "$PYTHON" "$PROBE" --compile-only > "$OUT/probe_compile.log" 2>&1 &
        probe_compile=$!
    fi
    local parallel=()
    "$PYTHON" -c "import xdist" 2>/dev/null && parallel=(-n 8)
    step 80 "$PYTHON" -m pytest -q "${parallel[@]}" -p no:cacheprovider tests/test_kernel.py tests/test_row_groups.py \
        -k "not bert_shape"
    wait "$compile"
    echo "=== diagnosis compile exit $?: $(tail -n 1 "$OUT/diag_compile.log")" | tee -a "$LOG"
    [ -n "$probe_compile" ] && { wait "$probe_compile"; echo "=== probe compile exit $?" | tee -a "$LOG"; }
    step "$DIAGNOSIS_LIMIT" "$PYTHON" tools/gpu_diagnosis.py --no-compile --out "$WORK" --budget-s $((DIAGNOSIS_LIMIT - 10))
    if [ -f "$PROBE" ]; then
        step 180 "$PYTHON" "$PROBE" --out "$WORK"
    else
        echo "=== $PROBE is not in this checkout: skipped" | tee -a "$LOG"
    fi
}

kernel_part() {  # tests, tuning and the kernel benchmark (~5 min on an H200)
    # CPU-bound compiling, all at once on the machine's cores, before anything is timed: the tuning
    # candidates and the timed runs' kernels in the background, beside the tests' own compiling (a
    # background job ignores SIGINT, so it gets TERM at its limit; timeout signals its whole
    # process group, the pool's workers too).
    echo "=== [limit 110s, in the background, log in warm_cache.log] warm_triton_cache" | tee -a "$LOG"
    timeout --kill-after=5 110 "$PYTHON" -m benchmarks.warm_triton_cache --workers 6 \
        --shapes "$SHAPES" --m "$BENCH_M" --densities "$BENCH_DENSITIES" > "$OUT/warm_cache.log" 2>&1 &
    local warm=$!
    gpu_tests
    wait "$warm"
    echo "=== warm_triton_cache exit $?: $(tail -n 1 "$OUT/warm_cache.log")" | tee -a "$LOG"
    tune
    kernel_grid
    # Eager vs captured forward, captured with and without skip_absent_attention_mask (README).
    step 45 "$PYTHON" -m benchmarks.graph_check --out "$WORK"
}

serve_part() {  # BERT-base end to end (graph-timed first), the graph check, the eager kernel grid (~4 min)
    step 60 "$PYTHON" -m benchmarks.warm_triton_cache --sets bench,e2e --workers 14
    e2e_graph
    step 50 "$PYTHON" -m benchmarks.graph_check --out "$WORK" --profile
    e2e_eager 45
    step 60 "$PYTHON" -m benchmarks.bench_kernel --out "$WORK" --dtypes fp16 --block-sizes 32 --shapes "$SHAPES" \
        --m "$BENCH_M" --densities "$BENCH_DENSITIES" --methods "$CLASSIC_METHODS" --rep-ms 50
}

case "${1:-}" in
    all)
        install
        kernel_part
        end_to_end
        ;;
    kernel)
        install
        kernel_part
        ;;
    serve)
        install
        serve_part
        ;;
    retune)  # after a kernel change: compile, tune, then test what was tuned, re-time (~5 min)
        install
        step 90 "$PYTHON" -m benchmarks.warm_triton_cache --sets tune,bench,e2e --workers 14
        tune
        gpu_tests
        kernel_grid
        e2e_graph
        step 40 "$PYTHON" -m benchmarks.graph_check --out "$WORK" --sizes 32x384 --profile
        ;;
    short)
        install
        gpu_tests
        end_to_end
        # Eager vs captured forward, captured with and without skip_absent_attention_mask (README).
        step 45 "$PYTHON" -m benchmarks.graph_check --out "$WORK"
        ;;
    extra)
        step 60 "$PYTHON" -m benchmarks.warm_triton_cache --sets bench,torch_bsr --dtypes fp16,bf16 \
            --block-sizes 16,32,64 --shapes 768x768,3072x768 --m 2048 --densities 1.0,0.5,0.36 --workers 14
        step 100 "$PYTHON" -m benchmarks.bench_kernel --out "$WORK/extra" --dtypes bf16,fp16 --block-sizes 16,32,64 \
            --shapes 768x768,3072x768 --m 2048 --densities 1.0,0.5,0.36 --methods dense,torch_bsr,ours --rep-ms 50
        ;;
    diagnose)
        install
        diagnose_part
        ;;
    layouts)  # issue 16.4: the layouts a permutation helps, beside every sparse alternative
        install
        step 60 "$PYTHON" -m benchmarks.warm_triton_cache --sets bench,torch_bsr --shapes "$SHAPES" --m 2048,8192 \
            --densities 1.0,0.75,0.5,0.36 --workers 14
        step 120 "$PYTHON" -m benchmarks.bench_kernel --out "$WORK/layouts" --dtypes fp16 --block-sizes 32 \
            --shapes "$SHAPES" --m 2048,8192 --densities 1.0,0.75,0.5,0.36 \
            --layouts random,head_structured,nn_pruning_like --rep-ms 5 --cuda-graph
        ;;
    align)
        install
        step 60 "$PYTHON" -m benchmarks.warm_triton_cache --sets tune,e2e --workers 14
        step 60 "$PYTHON" -m benchmarks.bench_ffn_alignment --out "$WORK" --cuda-graph
        step 45 "$PYTHON" -m benchmarks.bench_ffn_alignment --out "$WORK"
        # The package table stays as it is: the log's heuristic_ms column is what this is for.
        step 75 "$PYTHON" -m benchmarks.tune_kernel --dtypes fp16 --block-sizes 32 --shapes "$SHAPES" \
            --m 512 --densities 0.1,0.36,0.5,0.75,1.0 --stages 3 --warmup-ms 1 --rep-ms 2 --cuda-graph --fresh \
            --out "$WORK/tuned_m512_scratch.json" --log "$WORK/tune_m512_heuristic.csv"
        ;;
    compile)
        install
        step 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_compile.py -k "not minilm"
        step 240 "$PYTHON" -m benchmarks.bench_compile --device cuda --out "$WORK" --rep-ms 100
        ;;
    *)
        echo "usage: tools/gpu_session.sh {all|kernel|serve|retune|short|extra|align|compile|diagnose|layouts}" >&2
        exit 2
        ;;
esac
echo "gpu_session ${1:-}: $failures step(s) failed; results in $OUT" | tee -a "$LOG"
exit $((failures > 0))
