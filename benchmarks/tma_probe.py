"""TMA probe: the tensor-descriptor kernel variant against the shipped pointer kernel, one run.

    python -m benchmarks.tma_probe [--out DIR] [--shapes 768x768,...] [--m 128,512,2048,8192]
        [--densities 1.0,0.5,0.1] [--rep-ms 2] [--workers 14] [--quick]

For each problem (fp16, 32x32 blocks, random layout) it times, as CUDA-graph replays: dense
`F.linear` (cuBLAS), our pointer kernel with the configuration the library picks
(`select_config`: the tuned table, else the heuristic), and every candidate of
`nn_blocksparse.kernels.block_sparse_linear_tma` (`tma_candidates`), each checked against the
dense result first. Writes `tma_probe_<device>.csv` (one row per problem: the times, the best TMA
configuration, speedups over dense and over the pointer kernel) and a plot of both kernels'
speedup over dense. The candidates are compiled first, from `--workers` processes at once.
`--quick` runs one small problem under Triton's interpreter on CPU (a smoke run).
"""

from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from multiprocessing import get_context

import torch
import torch.nn.functional as F

from . import common

COLUMNS = ["shape", "n", "k", "m", "density", "dense_ms", "pointer_ms", "pointer_config", "tma_ms", "tma_config",
           "tma_vs_dense", "pointer_vs_dense", "tma_vs_pointer", "tma_configs_timed", "max_rel_diff"]
SHAPES = "768x768,2304x768,3072x768,768x3072"
TOLERANCE = 5e-3  # relative to max |reference| (fp16 output rounding; fp32 accumulation)


def tma_candidates(m: int):
    """(block_m, k_blocks, split_k, num_warps) to try at M rows: small tiles and split-K for
    small M, 64-128-row tiles for large M."""
    from nn_blocksparse.kernels.configs import KernelConfig

    if m <= 512:
        shapes = product((32, 64), (1, 2, 4), (1, 2, 4), (4,))
    else:
        shapes = product((64, 128), (1, 2, 4), (1,), (4, 8))
    return [KernelConfig(block_m=bm, split_k=sk, num_warps=w, num_stages=3, k_blocks=kb) for bm, kb, sk, w in shapes]


def _problem(n, k, m, density, device, seed=0):
    from nn_blocksparse import BlockSparseMatrix

    weight = common.random_block_sparse_weight(n, k, 32, density, seed=seed, dtype=torch.float16, device=device)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=torch.float16)
    return weight, matrix, x


def _run_tma(x, matrix, config):
    from nn_blocksparse.kernels.block_sparse_linear_tma import block_sparse_linear_tma

    return block_sparse_linear_tma(x, matrix.values, matrix.row_offsets, matrix.col_indices, matrix.row_order,
                                   matrix.shape[0], None, None, config)


def _compile_one(job) -> str:
    """Launch one candidate once on a small problem of the real problem's strides (a worker)."""
    m, config_list, device = job
    from nn_blocksparse.kernels.configs import KernelConfig

    try:
        _, matrix, x = _problem(256, 768, m, 0.5, torch.device(device))
        _run_tma(x, matrix, KernelConfig.from_list(config_list))
        common.synchronize(torch.device(device))
        return ""
    except Exception as failure:  # noqa: BLE001 - reported, the timed run skips it too
        return f"{config_list}: {type(failure).__name__}: {str(failure)[:120]}"


def warm(ms, device: str, workers: int) -> None:
    jobs = list(dict.fromkeys((128 if m <= 512 else 2048, tuple(c.as_list()), device)
                              for m in ms for c in tma_candidates(m)))
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        failures = [f for f in pool.map(_compile_one, jobs) if f]
    print(f"tma_probe: compiled {len(jobs)} candidates, {len(failures)} failed", *failures, sep="\n  ", flush=True)


def probe(n, k, m, density, device, rep_ms, cuda_graph=True) -> dict:
    from nn_blocksparse import block_sparse_linear
    from nn_blocksparse.functional import launch_config

    weight, matrix, x = _problem(n, k, m, density, device)
    reference = F.linear(x.float(), weight.float())
    scale = max(reference.abs().max().item(), 1.0)

    def timed(fn):
        return common.time_ms(fn, device, warmup=1, repeats=3, cuda_warmup_ms=1, cuda_rep_ms=rep_ms,
                              cuda_graph=cuda_graph)

    with torch.inference_mode():
        dense_ms = timed(lambda: F.linear(x, weight))
        pointer_config = launch_config(matrix, x.dtype, m, x.device)
        pointer = lambda: block_sparse_linear(x, matrix, backend="triton")  # noqa: E731
        worst = common.max_abs_diff(pointer(), reference) / scale
        pointer_ms = timed(pointer)
        times = []
        for config in tma_candidates(m):
            try:
                diff = common.max_abs_diff(_run_tma(x, matrix, config), reference) / scale
            except Exception as failure:  # noqa: BLE001 - a candidate that cannot launch is skipped
                print(f"    {config.as_list()} failed: {type(failure).__name__}: {str(failure)[:120]}", file=sys.stderr)
                continue
            if not diff <= TOLERANCE:
                print(f"    {config.as_list()} wrong result (relative max |diff| {diff:.3g})", file=sys.stderr)
                continue
            worst = max(worst, diff)
            times.append((timed(lambda: _run_tma(x, matrix, config)), config))
    tma_ms, tma_config = min(times, key=lambda t: t[0]) if times else (float("nan"), None)
    return {"shape": f"{n}x{k}", "n": n, "k": k, "m": m, "density": matrix.density, "dense_ms": dense_ms,
            "pointer_ms": pointer_ms, "pointer_config": pointer_config.as_list(), "tma_ms": tma_ms,
            "tma_config": tma_config.as_list() if tma_config else "", "tma_vs_dense": dense_ms / tma_ms,
            "pointer_vs_dense": dense_ms / pointer_ms, "tma_vs_pointer": pointer_ms / tma_ms,
            "tma_configs_timed": len(times), "max_rel_diff": worst}


def main(argv=None) -> int:
    parser = common.base_parser("TMA kernel variant vs the shipped pointer kernel vs cuBLAS")
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--m", default="128,512,2048,8192")
    parser.add_argument("--densities", default="1.0,0.5,0.1")
    parser.add_argument("--rep-ms", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=14)
    args = parser.parse_args(argv)
    if args.quick:
        device, shapes, ms, densities = torch.device("cpu"), [(64, 96)], [40], [0.5]
    else:
        device = torch.device("cuda")
        shapes = [common.parse_shape(s) for s in common.parse_list(args.shapes)]
        ms = [int(m) for m in common.parse_list(args.m)]
        densities = [float(d) for d in common.parse_list(args.densities)]
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tma_probe: no CUDA GPU here; run with --quick (interpreter smoke run)", file=sys.stderr)
        return 2
    if args.quick:
        from nn_blocksparse.kernels.block_sparse_linear import interpreter_enabled

        if not interpreter_enabled():
            print("tma_probe --quick: start the process with TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    else:
        warm(ms, "cuda", args.workers)
    environment = {**common.environment_record(device), "timing": common.timing_name(device.type == "cuda")}
    csv_path = common.results_path(args.out, "tma_probe", device, args.quick)
    rows = []
    for (n, k), m, density in product(shapes, ms, densities):
        row = probe(n, k, m, density, device, args.rep_ms, cuda_graph=device.type == "cuda")
        rows.append(row)
        print(f"{n}x{k} M={m} d={row['density']:.2f}: dense {row['dense_ms']:.4f} ms, pointer {row['pointer_ms']:.4f} "
              f"{row['pointer_config']}, tma {row['tma_ms']:.4f} {row['tma_config']} "
              f"({row['tma_vs_pointer']:.2f}x over pointer, {row['tma_vs_dense']:.2f}x of dense)", flush=True)
        common.write_csv(csv_path, rows, COLUMNS, environment)  # after every problem: a time limit keeps the rest
    categories = [f"{r['shape']} M={r['m']} d={r['density']:.2f}" for r in rows]
    series = {"pointer kernel": [r["pointer_vs_dense"] for r in rows], "TMA kernel": [r["tma_vs_dense"] for r in rows]}
    plot_path = common.grouped_bars(categories, series, common.results_path(args.out, "tma_probe", device, args.quick,
                                                                            ".png"),
                                    f"block-sparse kernels vs cuBLAS on {common.device_name(device)}, fp16, 32x32",
                                    "speedup vs dense (x)", {"dense": 1.0})
    print("\nwrote", csv_path, plot_path, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
