"""Tune the kernel's launch configuration per problem on this GPU and write a tuned table. GPU only.

    python -m benchmarks.tune_kernel [--out FILE] [--quick] [--dtypes fp16,bf16] [--block-sizes 16,32,64]
        [--shapes 768x768,...] [--m 16,32,...] [--densities 0.05,0.1,...] [--resume] [--fresh]
        [--warmup-ms 5] [--rep-ms 20] [--log CSV] [--stages 2,3,4] [--cuda-graph] [--kernels triton|all|...]

For each (dtype, block size, BERT-base shape N x K, M bucket 16..8192, block density) it builds a
random seeded layout with that density, then times every candidate `KernelConfig`
(`BLOCK_M_CHOICES` x `SPLIT_K_CHOICES` x `ROWS_PER_PROGRAM_CHOICES` x num_warps {4, 8} x num_stages
{2, 3, 4}, group_m 8) with `triton.testing.do_bench` (median; `--cuda-graph`: CUDA-graph replays,
the kernels' own GPU time, which is what the table should rank where eager launch overhead
swamps microsecond kernels). `--kernels all` (or a list) also times the other kernels a config can
name (`KernelConfig.kernel`: the swapped Triton kernel, and on an sm90 GPU the Gluon member-MMA and
wide-MMA kernels, software-pipelined or warp-specialised) at their candidate configs
(`configs.variant_candidate_configs`), so a tuned entry picks one where it wins; the log gets a
best-time column per kernel. Candidates that cannot help are
skipped: BLOCK_M above the M bucket, SPLIT_K above the longest block-row, row groups together
with split-K or with tiles past the spill limit. A candidate that fails to compile or launch (e.g. out
of shared memory) or gives a wrong result is dropped. The fastest is stored under
`table_key(dtype, bs, n, k, m, density)` for the device's arch (`sm{major}{minor}`), in the format
`nn_blocksparse.kernels.configs` reads: `{"configs": {arch: {key: [block_m, group_m, split_k,
num_warps, num_stages, rows_per_program]}}, "device": ..., "versions": ...}`.

The table goes to `--out`, by default `benchmarks/results/tuned_configs_<device>[_quick].json`,
never into the installed package unless `--out` names the package's own table (the GPU session
script does, to update the bundled `nn_blocksparse/kernels/tuned_configs.json`). To use a table:
`NN_BLOCKSPARSE_TUNED_CONFIGS=<file>` lays its entries over the bundled ones (same architecture
and key: the file's entry wins), read at the first launch and checked like the bundled table.

The output file is merged, not overwritten: other architectures and keys stay; a re-measured key
is replaced (`--fresh` drops this arch's old entries, `--resume` skips keys already there). It is
rewritten after every shape, so an interrupted run loses little. A CSV log (`--log`) lists per key
the best and the heuristic's config and time. After tuning, run
`NN_BLOCKSPARSE_TUNED_CONFIGS=<file> python -m nn_blocksparse.aot` to check that no chosen
configuration spills registers.

Full grid: fp16/bf16 x bs 16/32/64 x 4 shapes x 10 M buckets x 11 densities, a few hours on an
H100. `--quick`: fp16, bs 32, 768x768 and 3072x768, M 128 and 2048, density 0.35 and 1.0, num_stages 3
only (a few minutes). Without CUDA it exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F

from nn_blocksparse.dtypes import DTYPE_NAMES, dtype_from_name
from nn_blocksparse.kernels.configs import TUNED_CONFIGS_ENV, read_tuned_table
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse.timing import synchronize

from . import common
from .bench_kernel import BERT_BASE_SHAPES

M_BUCKETS = tuple(2 ** p for p in range(4, 14))  # 16 .. 8192
DENSITY_GRID = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # on the table's 0.05 steps
NUM_WARPS_CHOICES = (4, 8)
NUM_STAGES_CHOICES = (2, 3, 4)
FULL_DTYPES = ("fp16", "bf16")
FULL_BLOCK_SIZES = (16, 32, 64)

QUICK_DTYPES = ("fp16",)
QUICK_BLOCK_SIZES = (32,)
QUICK_SHAPES = ((768, 768), (3072, 768))
QUICK_M = (128, 2048)
QUICK_DENSITIES = (0.35, 1.0)
QUICK_STAGES = (3,)  # a third of the candidates: --quick must fit a short GPU session
# The kernels besides the default Triton one that a config can name (`configs.KERNEL_CHOICES`).
VARIANT_KERNELS = ("triton_swapped", "gluon_member", "gluon_member_ws", "gluon_wide", "gluon_wide_ws")

# The log's per-family columns: the Triton kernel with one block-row per program stepping one block
# or several blocks at a time (`k_blocks`), with row groups; then each other kernel (`--kernels`).
FAMILIES = {"best_one_block_ms": lambda c: c.kernel == "triton" and c.rows_per_program == 1 and c.k_blocks == 1,
            "best_k_blocks_ms": lambda c: c.kernel == "triton" and c.k_blocks > 1,
            "best_row_groups_ms": lambda c: c.kernel == "triton" and c.rows_per_program > 1,
            **{f"best_{name}_ms": (lambda c, name=name: c.kernel == name) for name in VARIANT_KERNELS}}
LOG_COLUMNS = ["key", "dtype", "block_size", "n", "k", "m", "density", "best_config", "best_ms", "heuristic_config",
               "heuristic_ms", "speedup_vs_heuristic", "dense_ms", "configs_timed", "configs_failed", *FAMILIES]


def candidate_configs(dtype, block_size: int, m: int, longest_block_row: int, stages=NUM_STAGES_CHOICES,
                      kernels=("triton",), arch: str | None = None):
    """Configs to time: the Triton kernel's grid below, then the other `kernels`' candidates
    (`configs.variant_candidate_configs`; the Gluon ones only where `arch` is "sm90") with tiles no taller than M."""
    from nn_blocksparse.kernels.configs import m_bucket, variant_candidate_configs

    if "triton" in kernels:
        yield from _triton_candidates(dtype, block_size, m, longest_block_row, stages)
    for config in variant_candidate_configs(dtype, block_size, arch):
        if config.kernel in kernels and config.block_m <= max(m_bucket(m), 64):
            yield config


def _triton_candidates(dtype, block_size: int, m: int, longest_block_row: int, stages):
    from nn_blocksparse.kernels.configs import (BLOCK_M_CHOICES, K_BLOCKS_CHOICES, MAX_STEP_DEPTH,
                                                MAX_X_TILE_BY_WARPS, ROWS_PER_PROGRAM_CHOICES, SPLIT_K_CHOICES,
                                                KernelConfig, launch_tile_limit, m_bucket)

    for block_m, split_k, rows, num_warps, num_stages in product(BLOCK_M_CHOICES, SPLIT_K_CHOICES,
                                                                 ROWS_PER_PROGRAM_CHOICES, NUM_WARPS_CHOICES,
                                                                 stages):
        if block_m > m_bucket(m) or split_k > max(1, longest_block_row):
            continue
        # Row groups widen tiles for large M, split-K fills the GPU for small M: not both at once;
        # tiles past the limit the AOT check found spill.
        if rows > 1 and (split_k > 1 or block_m > launch_tile_limit(dtype, block_size, rows)):
            continue
        # 4 warps spill tiles past 128x64 (the AOT check: 128x128 spills on sm80 and sm90).
        if num_warps == 4 and block_m * rows * block_size > 128 * 64:
            continue
        for k_blocks in K_BLOCKS_CHOICES if rows == 1 else (1,):
            # Deeper steps need at least one full step per split.
            if k_blocks > 1 and (k_blocks * block_size > MAX_STEP_DEPTH or k_blocks * split_k > longest_block_row):
                continue
            # The gathered x tile (BLOCK_M x step depth) spills past a size per warp count.
            if k_blocks > 1 and block_m * k_blocks * block_size > MAX_X_TILE_BY_WARPS[num_warps]:
                continue
            yield KernelConfig(block_m=block_m, group_m=8, split_k=split_k, num_warps=num_warps,
                               num_stages=num_stages, rows_per_program=rows, k_blocks=k_blocks)


def tune_problem(dtype, block_size, n, k, m, density, device, warmup_ms, rep_ms, seed=0,
                 stages=NUM_STAGES_CHOICES, cuda_graph=False, kernels=("triton",)) -> dict:
    """Time every candidate on one problem; returns the log row (with `best` / `key` for the table)."""
    from nn_blocksparse import BlockSparseMatrix, block_sparse_linear
    from nn_blocksparse.kernels.configs import DEFAULT_SM_COUNT, device_arch, heuristic_config, table_key

    weight = random_block_sparse_weight(n, k, block_size, density, seed=seed, dtype=dtype, device=device)
    matrix = BlockSparseMatrix.from_dense(weight, block_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    reference = F.linear(x.float(), weight.float())
    tolerance = common.KERNEL_TOLERANCE[dtype] * max(reference.abs().max().item(), 1.0)
    counts = matrix.row_offsets[1:] - matrix.row_offsets[:-1]
    longest_row = int(counts.max().item()) if counts.numel() else 0

    def measure(config) -> float:
        def run():
            return block_sparse_linear(x, matrix, config=config, backend="triton")

        try:
            error = common.max_abs_diff(run(), reference)
            synchronize(device)
        except Exception as failure:  # noqa: BLE001 - compile errors, out of resources, launch failures
            print(f"    {config.as_list()} failed: {type(failure).__name__}: {str(failure)[:120]}", file=sys.stderr)
            return float("nan")
        if not error <= tolerance:
            print(f"    {config.as_list()} wrong result (max |diff| {error:.3g})", file=sys.stderr)
            return float("nan")
        return common.time_ms(run, device, warmup=1, repeats=3, cuda_warmup_ms=warmup_ms, cuda_rep_ms=rep_ms,
                              cuda_graph=cuda_graph)

    with torch.inference_mode():
        candidates = candidate_configs(dtype, block_size, m, longest_row, stages, kernels, device_arch(device))
        times = {tuple(c.as_list()): (c, measure(c)) for c in candidates}
        sm_count = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                    else DEFAULT_SM_COUNT)
        heuristic = heuristic_config(dtype, block_size, m, matrix.block_rows, matrix.nnz_blocks, sm_count,
                                     matrix.grouping_inflation())
        if tuple(heuristic.as_list()) not in times:
            times[tuple(heuristic.as_list())] = (heuristic, measure(heuristic))
        dense_ms = common.time_ms(lambda: F.linear(x, weight), device, warmup=1, repeats=3,
                                  cuda_warmup_ms=warmup_ms, cuda_rep_ms=rep_ms, cuda_graph=cuda_graph)
    valid = [(ms, config) for config, ms in times.values() if ms == ms]
    best_ms, best = min(valid, key=lambda item: item[0]) if valid else (float("nan"), None)
    heuristic_ms = times[tuple(heuristic.as_list())][1]
    return {
        "key": table_key(dtype, block_size, n, k, m, matrix.density), "best": best,
        "dtype": DTYPE_NAMES[dtype], "block_size": block_size, "n": n, "k": k, "m": m,
        "density": matrix.density, "best_config": best.as_list() if best else "", "best_ms": best_ms,
        "heuristic_config": heuristic.as_list(), "heuristic_ms": heuristic_ms,
        "speedup_vs_heuristic": heuristic_ms / best_ms, "dense_ms": dense_ms,
        "configs_timed": len(valid), "configs_failed": len(times) - len(valid),
        **{column: min((ms for ms, config in valid if in_family(config)), default=float("nan"))
           for column, in_family in FAMILIES.items()},
    }


# ---------------------------------------------------------------------------------- table file
def load_table(path: Path) -> dict:
    """The table at `path` to merge into (checked like the library checks it, so a damaged file is
    refused before hours of tuning, not overwritten), or an empty one."""
    if not path.exists():
        return {"configs": {}}
    read_tuned_table(path)
    table = json.loads(path.read_text())
    table.setdefault("configs", {})
    return table


def output_path(out: Path | None, device: torch.device, quick: bool) -> Path:
    """`--out`, else `benchmarks/results/tuned_configs_<device>[_quick].json`: never the package's table."""
    return Path(out) if out else common.results_path(common.DEFAULT_RESULTS_DIR, "tuned_configs", device, quick, ".json")


def save_table(table: dict, path: Path) -> None:
    """Atomic rewrite, keys sorted so diffs of the committed table stay readable.

    Sorts a copy: the caller keeps adding to the very dicts it holds in `table`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    configs = {arch: dict(sorted(entries.items())) for arch, entries in sorted(table["configs"].items())}
    temporary = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps({**table, "configs": configs}, indent=1)
    # one line per entry: "key": [block_m, group_m, split_k, num_warps, num_stages, rows_per_program(, k_blocks,
    # "kernel")]
    text = re.sub(r"\[\s+([-\d.,\s]*?(?:\"[a-z_]+\")?)\s+\]",
                  lambda match: "[" + ", ".join(v.strip() for v in match.group(1).split(",")) + "]", text)
    temporary.write_text(text + "\n")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="tune the block-sparse kernel's launch configurations on this GPU",
        epilog=f"Use the table: {TUNED_CONFIGS_ENV}=FILE python ... lays its entries over the package's bundled "
        "table (same GPU architecture and key: FILE's entry wins), read at the first launch and checked like the "
        f"bundled one; {TUNED_CONFIGS_ENV}=FILE python -m nn_blocksparse.aot checks that none of its "
        "configurations spills. To update the bundled table itself: --out nn_blocksparse/kernels/tuned_configs.json.")
    parser.add_argument("--out", type=Path, help="tuned table to write, merged into if it exists (default: "
                        "benchmarks/results/tuned_configs_<device>[_quick].json; never the installed package's "
                        "table unless named here)")
    parser.add_argument("--quick", action="store_true", help="a few problems only (minutes)")
    parser.add_argument("--dtypes", help="default fp16,bf16 (fp32 also possible)")
    parser.add_argument("--block-sizes", help="default 16,32,64")
    parser.add_argument("--shapes", help="N x K list (default: BERT-base shapes)")
    parser.add_argument("--m", help=f"M values, bucketed to powers of two (default {M_BUCKETS[0]}..{M_BUCKETS[-1]})")
    parser.add_argument("--densities", help=f"block densities (default {','.join(map(str, DENSITY_GRID))})")
    parser.add_argument("--resume", action="store_true", help="skip keys already in the output table")
    parser.add_argument("--fresh", action="store_true", help="drop this arch's existing entries first")
    parser.add_argument("--warmup-ms", type=float, default=5.0, help="do_bench warmup per candidate")
    parser.add_argument("--rep-ms", type=float, default=20.0, help="do_bench measuring time per candidate")
    parser.add_argument("--log", type=Path, help="CSV log (default: benchmarks/results/tune_<device>[_quick].csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", help="num_stages candidates (default 2,3,4; --quick: 3)")
    parser.add_argument("--kernels", default="triton",
                        help="kernels whose configs to time: 'triton' (the default kernel, the default), 'all' (every "
                        f"kernel this GPU runs: {', '.join(VARIANT_KERNELS)}; the gluon_* ones on sm90 only), or a list")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time CUDA-graph replays (the kernels' GPU time) instead of eager calls, whose "
                        "launch overhead dominates microsecond problems")
    # Tests only: "cpu" runs the kernels in Triton's interpreter (needs TRITON_INTERPRET=1), timings meaningless.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.stages = tuple(common.parse_list(args.stages, int)) if args.stages else (QUICK_STAGES if quick else NUM_STAGES_CHOICES)
    args.dtypes = common.parse_list(args.dtypes) if args.dtypes else list(QUICK_DTYPES if quick else FULL_DTYPES)
    for name in args.dtypes:
        if name not in DTYPE_NAMES.values():
            parser.error(f"unknown dtype {name!r}; choose from {tuple(DTYPE_NAMES.values())}")
    args.block_sizes = common.parse_list(args.block_sizes, int) if args.block_sizes else \
        list(QUICK_BLOCK_SIZES if quick else FULL_BLOCK_SIZES)
    args.shapes = [common.parse_shape(s) for s in common.parse_list(args.shapes)] if args.shapes else \
        list(QUICK_SHAPES if quick else BERT_BASE_SHAPES)
    args.m = common.parse_list(args.m, int) if args.m else list(QUICK_M if quick else M_BUCKETS)
    args.densities = common.parse_list(args.densities, float) if args.densities else \
        list(QUICK_DENSITIES if quick else DENSITY_GRID)
    args.kernels = ("triton", *VARIANT_KERNELS) if args.kernels == "all" else tuple(common.parse_list(args.kernels))
    for name in args.kernels:
        if name not in ("triton", *VARIANT_KERNELS):
            parser.error(f"unknown kernel {name!r}; choose from triton, {', '.join(VARIANT_KERNELS)} or all")
    if args.resume and args.fresh:
        parser.error("--resume and --fresh contradict each other")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tune_kernel: needs a CUDA GPU (it times compiled Triton kernels); nothing to tune here",
              file=sys.stderr)
        return 2
    from nn_blocksparse.kernels.block_sparse_linear import interpreter_enabled
    from nn_blocksparse.kernels.configs import device_arch, table_key

    if device.type != "cuda" and not interpreter_enabled():
        print("tune_kernel: --device cpu needs TRITON_INTERPRET=1 (test mode)", file=sys.stderr)
        return 2
    if device.type == "cuda" and interpreter_enabled():
        print("tune_kernel: unset TRITON_INTERPRET to tune on the GPU", file=sys.stderr)
        return 2
    arch = device_arch(device)
    out = output_path(args.out, device, args.quick)
    log_path = args.log or common.results_path(common.DEFAULT_RESULTS_DIR, "tune", device, args.quick)
    table = load_table(out)
    if args.fresh:
        table["configs"].pop(arch, None)
    entries = table["configs"].setdefault(arch, {})
    environment = common.environment_record(device)
    table["device"] = environment["device_name"]
    table["versions"] = {name: environment[name] for name in ("torch", "triton", "cuda")}
    table["date"] = environment["date"]
    table["timing"] = common.timing_name(args.cuda_graph)
    environment["timing"] = table["timing"]

    log_rows = []
    print(f"tuning on {table['device']} ({arch}) into {out}", flush=True)
    for dtype_name, block_size, (n, k) in product(args.dtypes, args.block_sizes, args.shapes):
        dtype = dtype_from_name(dtype_name)
        for m, density in product(args.m, args.densities):
            key = table_key(dtype, block_size, n, k, m, density)
            if args.resume and key in entries:
                continue
            row = tune_problem(dtype, block_size, n, k, m, density, device, args.warmup_ms, args.rep_ms, args.seed,
                               args.stages, args.cuda_graph and device.type == "cuda", args.kernels)
            best = row.pop("best")
            if best is not None:
                entries[row["key"]] = best.as_list()
            log_rows.append(row)
            print(f"{row['key']}: best {row['best_config']} {row['best_ms']:.4f} ms, heuristic "
                  f"{row['heuristic_config']} {row['heuristic_ms']:.4f} ms ({row['speedup_vs_heuristic']:.2f}x), "
                  f"dense {row['dense_ms']:.4f} ms, {row['configs_timed']} timed / {row['configs_failed']} failed",
                  flush=True)
        save_table(table, out)
        common.write_csv(log_path, log_rows, LOG_COLUMNS, environment)
    save_table(table, out)
    common.write_csv(log_path, log_rows, LOG_COLUMNS, environment)
    print(f"\nwrote {out} ({len(entries)} entries for {arch}) and {log_path}")
    print(f"next: {TUNED_CONFIGS_ENV}={out} python -m nn_blocksparse.aot  (checks that no tuned configuration "
          f"spills); the same {TUNED_CONFIGS_ENV}={out} makes the library launch with it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
