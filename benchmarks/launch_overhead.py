"""Host-side cost of one call (issue to return, the GPU not waited for), layer by layer. GPU only.

    python -m benchmarks.launch_overhead [--out DIR] [--shape 768x768] [--m 128] [--density 0.5] [--calls 2000]

At BERT sizes a kernel runs for a few microseconds, so an eager caller waits on the host: the
time Python, torch and Triton take to issue the launch. This script issues `--calls` calls
back to back and divides the host time by their number, for

- `dense`:        `F.linear` (torch's C++ dispatch to cuBLAS), the baseline;
- `module`:       `BlockSparseLinear.forward` (the whole user-facing path);
- `functional`:   `block_sparse_linear(x, matrix, backend="triton")` (checks, config look-up);
- `launcher`:     `nn_blocksparse.kernels.block_sparse_linear` (output allocation + Triton's
                  launch, no checks);
- `gpu_graph`:    the kernel's own GPU time (CUDA-graph replays, `do_bench_cudagraph`), for scale.

and profiles the `module` calls with cProfile (the top entries go to the log). Writes
`launch_overhead_<device>.csv`.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch
import torch.nn.functional as F

from nn_blocksparse.layouts import random_block_sparse_weight

from . import common

COLUMNS = ["shape", "m", "density", "dtype", "path", "host_us_per_call", "note"]


def host_us_per_call(fn, calls: int) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main(argv=None) -> int:
    parser = common.base_parser("host-side microseconds per call of each layer of the block-sparse path")
    parser.add_argument("--shape", default="768x768")
    parser.add_argument("--m", type=int, default=128)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_overhead: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench_cudagraph

    from nn_blocksparse import BlockSparseLinear, BlockSparseMatrix, block_sparse_linear
    from nn_blocksparse.kernels import block_sparse_linear as launch
    from nn_blocksparse.functional import launch_config

    device, dtype = torch.device("cuda"), torch.float16
    n, k = common.parse_shape(args.shape)
    weight = random_block_sparse_weight(n, k, 32, args.density, seed=0, dtype=dtype, device=device)
    x = torch.randn(args.m, k, device=device, dtype=dtype)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    module = BlockSparseLinear.from_dense(weight, None, 32, backend="triton")
    config = launch_config(matrix, dtype, args.m, device)  # the one the module's calls use
    row_groups = matrix.row_groups(config.rows_per_program) if config.rows_per_program > 1 else None
    paths = {
        "dense": lambda: F.linear(x, weight),
        "module": lambda: module(x),
        "functional": lambda: block_sparse_linear(x, matrix, backend="triton"),
        "launcher": lambda: launch(x, matrix.values, matrix.row_offsets, matrix.col_indices, matrix.row_order, n,
                                   None, None, config, row_groups),
    }
    rows = []
    with torch.inference_mode():
        for name, fn in paths.items():
            rows.append({"path": name, "host_us_per_call": host_us_per_call(fn, args.calls), "note": ""})
        gpu_us = do_bench_cudagraph(paths["launcher"], rep=20, return_mode="median") * 1e3
        rows.append({"path": "gpu_graph", "host_us_per_call": gpu_us, "note": "GPU time of the kernel itself"})
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            module(x)
        profiler.disable()
        torch.cuda.synchronize()
    for row in rows:
        row.update(shape=args.shape, m=args.m, density=args.density, dtype="fp16")
        print(f"{row['path']:<11} {row['host_us_per_call']:8.1f} us  {row['note']}")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
    print(text.getvalue())
    environment = {**common.environment_record(device), "config": "/".join(map(str, config.as_list()))}
    path = common.write_csv(common.results_path(args.out, "launch_overhead", device, False), rows, COLUMNS,
                            environment)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
