"""Run every benchmark this machine can run, results into `benchmarks/results/`.

    python -m benchmarks.run_all [--out DIR] [--threads N] [--dry-run]

With CUDA: `bench_kernel` and `bench_e2e` in full on the GPU, each timed eagerly and again as
CUDA-graph replays (files named after the GPU, e.g. `kernel_nvidia-h100-80gb-hbm3.csv` and
`kernel_cudagraph_nvidia-h100-80gb-hbm3.csv`), `bench_ffn_alignment` as graph replays,
`launch_overhead`, `bench_compile` on the GPU, and `bench_cpu` in full on the host CPU. Without
CUDA: `bench_cpu` and `bench_compile` in full, and `bench_kernel`, `bench_e2e` and
`bench_ffn_alignment` with `--quick` (CPU smoke runs, `_quick` files).
`tune_kernel` is not part of it: it takes hours, and its table is for the GPU it ran on.
A failing benchmark does not stop the others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import traceback
from pathlib import Path

import torch

from . import common


def plan(has_cuda: bool, out: Path, threads: int | None = None) -> list[tuple[str, list[str]]]:
    """`[(benchmark module name, argv), ...]` in the order they run."""
    cpu_args = ["--out", str(out)] + (["--threads", str(threads)] if threads else [])
    if has_cuda:
        gpu = [(name, ["--out", str(out), *graph]) for name in ("bench_kernel", "bench_e2e")
               for graph in ([], ["--cuda-graph"])]
        return [*gpu, ("bench_ffn_alignment", ["--out", str(out), "--cuda-graph"]),
                ("launch_overhead", ["--out", str(out)]), ("bench_compile", ["--out", str(out), "--device", "cuda"]),
                ("bench_cpu", cpu_args)]
    return [("bench_cpu", cpu_args), ("bench_compile", cpu_args), ("bench_kernel", ["--quick", "--out", str(out)]),
            ("bench_e2e", ["--quick", "--out", str(out)]), ("bench_ffn_alignment", ["--quick", "--out", str(out)])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="run every benchmark this machine can run")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--threads", type=int, help="threads for bench_cpu and CPU bench_compile (default: all "
                        "available cores)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = parser.parse_args(argv)
    steps = plan(torch.cuda.is_available(), args.out, args.threads)
    if args.dry_run:
        print("\n".join(f"python -m benchmarks.{name} {' '.join(step_argv)}" for name, step_argv in steps))
        return 0
    failed = []
    for name, step_argv in steps:
        print(f"\n=== python -m benchmarks.{name} {' '.join(step_argv)}", flush=True)
        try:
            status = importlib.import_module(f"benchmarks.{name}").main(step_argv)
        except Exception:  # noqa: BLE001 - report and go on with the other benchmarks
            traceback.print_exc()
            status = 1
        if status:
            failed.append(name)
    print(f"\nrun_all: {len(steps) - len(failed)}/{len(steps)} benchmarks ok" +
          (f", failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
