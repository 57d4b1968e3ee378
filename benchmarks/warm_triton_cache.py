"""Compile, in parallel, the Triton kernels a GPU benchmark or tuning run will launch. GPU only.

    python -m benchmarks.warm_triton_cache [--sets tune,bench,e2e,torch_bsr] [--dtypes fp16]
        [--block-sizes 32] [--stages 3] [--shapes 768x768,...] [--m 128,...] [--densities 1.0,...]
        [--workers N]

Timed runs launch one kernel variant after another, so every first launch compiles one kernel
on one core (a second or more each, with ptxas) while the GPU waits. On a lent GPU machine those
minutes are the scarce ones. This script launches each variant once, from `--workers` processes
at a time: Triton's on-disk cache (`~/.triton/cache` or `TRITON_CACHE_DIR`) then already holds
the compiled kernels when the timed runs ask for them.

The sets, for each dtype and block size given:
- `tune`:      every candidate `benchmarks.tune_kernel` times (no bias, no activation);
- `bench`:     every configuration the library may pick (`launchable_configs`, tuned entries
               included), as `benchmarks.bench_kernel` launches it (no bias, no activation);
- `e2e`:       the same configurations with bias, with and without GELU, as patched BERT layers
               launch them;
- `torch_bsr`: torch's own Triton BSR kernels, on `bench_kernel`'s cases (`--shapes`, `--m`,
               `--densities`; their defaults are that script's full grid).
Our kernel does not specialise on M or the number of row groups, and the tiny problem's strides
are multiples of 16 like a real one's, so those compilations are the very ones the real shapes
look up; torch's kernels are warmed on the real cases. A variant that fails here fails in the
timed run too: it is reported, not fatal.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from itertools import product
from multiprocessing import get_context

import torch

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name
from nn_blocksparse.timing import synchronize

from . import common

SETS = ("tune", "bench", "e2e", "torch_bsr")
TUNE_LONGEST_ROW = 96  # 3072 / 32: lets every split-K candidate through


def variants(sets, dtype_names, block_sizes, stages, bench_cases=()) -> list[tuple]:
    """Unique jobs: ("ours", dtype name, block size, has_bias, activation, config tuple) and
    ("torch_bsr", dtype name, block size, n, k, m, density) for each (n, k, m, density) of `bench_cases`."""
    from nn_blocksparse.kernels.configs import launchable_configs

    from .tune_kernel import M_BUCKETS, candidate_configs

    jobs = []
    for dtype_name in dtype_names:
        dtype = dtype_from_name(dtype_name)
        for block_size in block_sizes:
            library = [tuple(c.as_list()) for c in launchable_configs(dtype, block_size)]
            if "tune" in sets:
                jobs += [("ours", dtype_name, block_size, False, None, tuple(c.as_list())) for m in M_BUCKETS
                         for c in candidate_configs(dtype, block_size, m, TUNE_LONGEST_ROW, stages)]
            if "bench" in sets:
                jobs += [("ours", dtype_name, block_size, False, None, c) for c in library]
            if "e2e" in sets:
                jobs += [("ours", dtype_name, block_size, True, activation, c)
                         for c in library for activation in (None, "gelu")]
            if "torch_bsr" in sets:
                jobs += [("torch_bsr", dtype_name, block_size, *case) for case in bench_cases]
    return list(dict.fromkeys(jobs))


def compile_variant(job: tuple, device: str = "cuda") -> tuple[tuple, str]:
    """Run one job (in a worker process); returns (job, error or '').

    `device="cpu"` runs our kernel under Triton's interpreter (tests)."""
    device = torch.device(device)
    try:
        with torch.inference_mode():
            if job[0] == "ours":
                _launch_ours(*job[1:], device)
            else:
                _launch_torch_bsr(*job[1:], device)
        synchronize(device)
    except Exception as failure:  # noqa: BLE001 - out of resources, compile errors: reported, not fatal
        return job, f"{type(failure).__name__}: {str(failure)[:160]}"
    return job, ""


def _launch_ours(dtype_name, block_size, has_bias, activation, config_values, device) -> None:
    from nn_blocksparse import BlockSparseMatrix, block_sparse_linear
    from nn_blocksparse.kernels.configs import KernelConfig

    dtype = dtype_from_name(dtype_name)
    # 8 block-rows (two full groups of 4) x 4 block-columns, all stored: every R has whole groups.
    weight = torch.randn(8 * block_size, 4 * block_size, device=device).to(dtype)
    x = torch.randn(16, 4 * block_size, device=device).to(dtype)
    bias = torch.randn(weight.shape[0], device=device).to(dtype) if has_bias else None
    block_sparse_linear(x, BlockSparseMatrix.from_dense(weight, block_size), bias, activation, backend="triton",
                        config=KernelConfig.from_list(config_values))


def _launch_torch_bsr(dtype_name, block_size, n, k, m, density, device) -> None:
    from .bench_kernel import KernelCase, case_inputs, prepare_torch_bsr

    case = KernelCase(n, k, m, density, block_size, dtype_from_name(dtype_name))
    x, weight = case_inputs(case, device)
    method = prepare_torch_bsr(x, weight, block_size)  # launches once; unsupported cases are no error
    if method.run is not None:
        method.run()


def parse_args(argv=None):
    from .bench_kernel import BERT_BASE_SHAPES, FULL_DENSITIES, FULL_M

    parser = argparse.ArgumentParser(description="compile the Triton kernels of a GPU run in parallel")
    parser.add_argument("--sets", default=",".join(SETS), help=f"subset of {','.join(SETS)}")
    parser.add_argument("--dtypes", default="fp16")
    parser.add_argument("--block-sizes", default="32")
    parser.add_argument("--stages", default="3", help="num_stages of the tuning candidates (as tune_kernel --stages)")
    parser.add_argument("--shapes", help="torch_bsr: N x K list (default: BERT-base shapes)")
    parser.add_argument("--m", help="torch_bsr: rows of x (default: bench_kernel's)")
    parser.add_argument("--densities", help="torch_bsr: block densities (default: bench_kernel's)")
    parser.add_argument("--workers", type=int, default=max(1, common.available_cores() - 2))
    args = parser.parse_args(argv)
    args.sets = common.parse_list(args.sets)
    for name in args.sets:
        if name not in SETS:
            parser.error(f"unknown set {name!r}; choose from {SETS}")
    args.dtypes = common.parse_list(args.dtypes)
    for name in args.dtypes:
        if name not in DTYPE_NAMES.values():
            parser.error(f"unknown dtype {name!r}; choose from {tuple(DTYPE_NAMES.values())}")
    args.block_sizes = common.parse_list(args.block_sizes, int)
    args.stages = tuple(common.parse_list(args.stages, int))
    shapes = [common.parse_shape(s) for s in common.parse_list(args.shapes)] if args.shapes else BERT_BASE_SHAPES
    ms = common.parse_list(args.m, int) if args.m else FULL_M
    densities = common.parse_list(args.densities, float) if args.densities else FULL_DENSITIES
    args.bench_cases = [(n, k, m, density) for (n, k), m, density in product(shapes, ms, densities)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("warm_triton_cache: needs a CUDA GPU (it fills the cache of compiled GPU kernels)", file=sys.stderr)
        return 2
    jobs = variants(args.sets, args.dtypes, args.block_sizes, args.stages, args.bench_cases)
    print(f"running {len(jobs)} jobs with {args.workers} workers", flush=True)
    start = time.perf_counter()
    failed = 0
    # CUDA cannot be used in forked children: spawn fresh interpreters.
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        for done in as_completed([pool.submit(compile_variant, job) for job in jobs]):
            job, error = done.result()
            if error:
                failed += 1
                print(f"  failed {job}: {error}", flush=True)
    print(f"warm_triton_cache: {len(jobs) - failed} of {len(jobs)} jobs ran in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
