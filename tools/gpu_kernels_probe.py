"""GPU probe of the block-sparse kernels (issue 16): every kernel variant against cuBLAS, in one short run.

    python tools/gpu_kernels_probe.py [--out DIR] [--budget-s 150] [--rep-ms 5] [--workers 14]
        [--dtypes fp16,bf16] [--shapes 768x768,...] [--m 2048,8192,512,128] [--densities 1.0,0.5,0.75,0.36]
        [--layouts random,heads] [--variants all|NAME,...]
    python tools/gpu_kernels_probe.py --compile-only        # step 1 alone (e.g. beside other GPU work)
    python tools/gpu_kernels_probe.py --smoke --out DIR     # CPU: tiny shapes, interpreter, no timings

What it measures, per problem (dtype, BERT-base shape N x K, M tokens, block density, layout:
`random` blocks or `heads`, 2 block-rows of 32 per 64-wide head sharing one column pattern):
- `cublas`: `F.linear(x, W)` on the dense matrix, the baseline;
- `today`: the default Triton kernel with the configuration the library picks (tuned table, else heuristic);
- each new kernel at its candidate configurations (`PROBE_CONFIGS`, a subset of
  `configs.variant_candidate_configs`, so the AOT check compiles all of them): the Gluon
  member-MMA and wide-MMA kernels, software-pipelined and warp-specialised (sm90 only), and the
  swapped Triton kernel.
Columns: time (median of `do_bench_cudagraph` replays: the kernels' GPU time), stored-block TFLOP/s
(2 * M * nnz * bs^2 / time), cuBLAS's dense TFLOP/s, `stored_tflops_over_cublas` (the first over the
second: 1.0 means stored blocks run as fast as cuBLAS runs the dense matrix), speedup over cuBLAS
and over today's kernel, the row-group padding (`inflation`) of the config's R, and the error
against a float64 reference.

Order of work, sized for a short lent session (under 3 minutes on an H200 at the default budget, so
that it fits `tools/gpu_session.sh diagnose`'s 180-second step):
1. compile and check: every variant and dtype runs once in a pool of worker processes (so the
   compiles run in parallel and land in Triton's on-disk cache, and a variant that hangs or
   fails there is dropped before any timing), on a small problem with a partial M-tile, empty
   block-rows and a padded last group, with and without the bias + GELU epilogue, against float64;
2. time problems in priority order (fp16 first, M = 2048 and 8192 first, densities 1.0 and 0.5
   first), each variant checked against the float64 reference right before it is timed; the CSV
   is rewritten after every problem, and timing stops at `--budget-s` (what was skipped is
   printed and recorded in the CSV header); an interrupt (the session step's time limit sends
   SIGINT) also stops it, and what was measured is still written, plotted and summarised.
`--compile-only` runs step 1 and exits: run beforehand (or beside other GPU work), the compiles are
in Triton's cache when the timed run repeats step 1.
Outputs (`common.results_path`): `gpu_kernels_probe_<device>.csv`, one PNG per layout of
stored-TFLOP/s over cuBLAS against density (best config per kernel, M = 2048), and a short table
on stdout.

`--smoke` (the test suite runs it): CPU tensors under Triton's interpreter, tiny shapes, no
timings; the Gluon variants run their Triton twin (the row-group kernel, same tables and epilogue).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass
from itertools import product
from multiprocessing import get_context
from pathlib import Path

if "--smoke" in sys.argv:  # Triton reads it once, when the kernels are decorated: before any import
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_kernel import BERT_BASE_SHAPES  # noqa: E402
from nn_blocksparse.dtypes import dtype_from_name  # noqa: E402
from nn_blocksparse.layouts import block_sparse_weight, head_structured_layout, random_block_sparse_weight  # noqa: E402
from nn_blocksparse.timing import synchronize  # noqa: E402

COLUMNS = ["shape", "n", "k", "m", "layout", "target_density", "density", "nnz_blocks", "dtype", "method", "variant",
           "config", "time_ms", "stored_tflops", "cublas_tflops", "stored_tflops_over_cublas", "speedup_vs_cublas",
           "speedup_vs_today", "inflation", "max_rel_err", "note"]
BLOCK_SIZE = 32
FULL_M = (2048, 8192, 512, 128)  # priority order
FULL_DENSITIES = (1.0, 0.5, 0.75, 0.36)
FULL_LAYOUTS = ("random", "heads")
FULL_DTYPES = ("fp16", "bf16")
SMOKE_SHAPES = ((256, 128),)
SMOKE_M = (40,)
SMOKE_DENSITIES = (0.5,)
ROWS_PER_HEAD = 2  # a 64-wide attention head in 32-row blocks
PLOT_M = 2048


def _config(kernel, block_m, num_warps, num_stages, rows):
    from nn_blocksparse.kernels.configs import KernelConfig

    return KernelConfig(block_m, 8, 1, num_warps, num_stages, rows, kernel=kernel)


def probe_configs() -> list:
    """The candidate configs timed per problem: for each kernel, its 4-warp R = 4 tile on 128 and 64
    rows and its 8-warp R = 8 tile (the swapped kernel: pairs on 128 and 256 tokens, R = 4 on 128)."""
    configs = []
    for kernel in ("gluon_member", "gluon_member_ws", "gluon_wide", "gluon_wide_ws"):
        configs += [_config(kernel, 128, 4, 4, 4), _config(kernel, 64, 4, 4, 4), _config(kernel, 128, 8, 4, 8)]
    configs += [_config("triton_swapped", 128, 4, 3, 2), _config("triton_swapped", 256, 8, 3, 2),
                _config("triton_swapped", 128, 8, 3, 4)]
    return configs


def variant_name(config) -> str:
    return f"{config.kernel}/R{config.rows_per_program}/BM{config.block_m}/W{config.num_warps}/S{config.num_stages}"


@dataclass(frozen=True)
class Problem:
    dtype: str
    n: int
    k: int
    m: int
    density: float
    layout: str

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"


def make_weight(problem: Problem, device, seed: int = 0) -> torch.Tensor:
    dtype = dtype_from_name(problem.dtype)
    if problem.layout == "heads":
        layout = head_structured_layout(problem.n // BLOCK_SIZE, problem.k // BLOCK_SIZE, problem.density,
                                        ROWS_PER_HEAD, seed)
        return block_sparse_weight(layout, BLOCK_SIZE, seed, dtype=dtype, device=device)
    return random_block_sparse_weight(problem.n, problem.k, BLOCK_SIZE, problem.density, seed, dtype, device)


def twin_of(config):
    """On CPU a Gluon config runs its Triton twin: the row-group kernel over the same tables (R <= 4)."""
    from nn_blocksparse.kernels.configs import KernelConfig

    if not config.is_gluon:
        return config
    return KernelConfig(32, config.group_m, 1, 4, 2, min(config.rows_per_program, 4))


def scaled_max_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    scale = max(reference.abs().max().item(), 1.0)
    return (y.double() - reference).abs().max().item() / scale


# ---------------------------------------------------------------------------------- step 1: compile and check
def check_variant(job) -> tuple:
    """In a worker: run one (dtype, config) with and without bias + GELU on a small awkward problem."""
    dtype_name, config_values, device_name = job
    from nn_blocksparse import BlockSparseMatrix, block_sparse_linear
    from nn_blocksparse.kernels.configs import KernelConfig

    try:
        device = torch.device(device_name)
        dtype = dtype_from_name(dtype_name)
        config = KernelConfig.from_list(config_values)
        if device.type == "cpu":
            config = twin_of(config)
        # 11 block-rows (a padded last group for R = 2, 4, 8), one of them empty; 200 rows (a partial tile).
        weight = random_block_sparse_weight(11 * BLOCK_SIZE, 8 * BLOCK_SIZE, BLOCK_SIZE, 0.6, seed=5,
                                                   dtype=dtype)
        weight[3 * BLOCK_SIZE:4 * BLOCK_SIZE] = 0
        weight = weight.to(device)
        generator = torch.Generator().manual_seed(6)
        x = torch.randn(200 if device.type == "cuda" else 20, weight.shape[1], generator=generator).to(dtype).to(device)
        bias = torch.randn(weight.shape[0], generator=generator).to(dtype).to(device)
        matrix = BlockSparseMatrix.from_dense(weight, BLOCK_SIZE)
        errors = []
        with torch.inference_mode():
            for b, activation in ((None, None), (bias, "gelu")):
                reference = x.double() @ weight.double().T
                if b is not None:
                    reference = F.gelu(reference + b.double())
                y = block_sparse_linear(x, matrix, b, activation, backend="triton", config=config)
                synchronize(device)
                errors.append(scaled_max_error(y, reference))
        error = max(errors)
        if not error <= common.KERNEL_TOLERANCE[dtype]:
            return job, error, f"wrong result: relative error {error:.3g}"
        return job, error, ""
    except Exception as failure:  # noqa: BLE001 - reported, the variant is dropped
        return job, math.nan, common.error_note(failure, limit=200)


def compile_and_check(jobs, device, workers: int, timeout_s: float) -> dict:
    """{job: (error, note)} for every job; spread over spawned workers on a GPU (compiles in parallel)."""
    results = {}
    if device.type != "cuda" or workers <= 1:
        for job in jobs:
            job, error, note = check_variant(job)
            results[job] = (error, note)
        return results
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"))
    futures = {pool.submit(check_variant, job): job for job in jobs}
    try:
        for done in as_completed(futures, timeout=timeout_s):
            job, error, note = done.result()
            results[job] = (error, note)
    except FuturesTimeout:
        for future, job in futures.items():
            if job not in results:
                results[job] = (math.nan, f"no answer within {timeout_s:.0f} s (hung or still compiling): dropped")
        for process in list(getattr(pool, "_processes", {}).values()):  # a hung kernel never returns: kill it
            process.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    return results


# ---------------------------------------------------------------------------------- step 2: time
def time_problem(problem: Problem, variants: list, device, rep_ms: float, smoke: bool) -> list[dict]:
    from nn_blocksparse import BlockSparseMatrix, block_sparse_linear
    from nn_blocksparse.functional import launch_config

    dtype = dtype_from_name(problem.dtype)
    weight = make_weight(problem, device)
    matrix = BlockSparseMatrix.from_dense(weight, BLOCK_SIZE)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(problem.m, problem.k, generator=generator).to(dtype).to(device)
    reference = x.double() @ weight.double().T
    stored_flop = 2.0 * problem.m * matrix.nnz_blocks * BLOCK_SIZE ** 2
    dense_flop = 2.0 * problem.m * problem.n * problem.k
    base = {"shape": problem.shape, "n": problem.n, "k": problem.k, "m": problem.m, "layout": problem.layout,
            "target_density": problem.density, "density": matrix.density, "nnz_blocks": matrix.nnz_blocks,
            "dtype": problem.dtype}

    def measure(fn):
        if smoke:
            return math.nan
        return float(common.time_ms(fn, device, cuda_rep_ms=rep_ms, cuda_graph=True))

    rows = []
    with torch.inference_mode():
        cublas_ms = measure(lambda: F.linear(x, weight))
        cublas_tflops = dense_flop / (cublas_ms * 1e-3) / 1e12
        today = launch_config(matrix, dtype, problem.m, device)
        entries = [("cublas", "cublas", None), ("today", "today", today)]
        entries += [(config.kernel, variant_name(config), config) for config in variants]
        today_ms = math.nan
        for method, name, config in entries:
            note, error, ms = "", math.nan, math.nan
            try:
                if method == "cublas":
                    run = lambda: F.linear(x, weight)  # noqa: E731
                else:
                    launched = twin_of(config) if device.type == "cpu" else config
                    if launched is not config:
                        note = f"Triton twin {'/'.join(map(str, launched.as_list()))} (no Hopper GPU)"
                    run = lambda c=launched: block_sparse_linear(x, matrix, backend="triton", config=c)  # noqa: E731
                y = run()
                synchronize(device)
                error = scaled_max_error(y, reference)
                if not error <= common.KERNEL_TOLERANCE[dtype]:
                    note = f"wrong result (relative error {error:.3g}): not timed"
                else:
                    ms = measure(run)
            except Exception as failure:  # noqa: BLE001 - recorded, the other variants still run
                note = common.error_note(failure, "failed")
            if method == "today":
                today_ms = ms
            stored_tflops = stored_flop / (ms * 1e-3) / 1e12
            rows.append({**base, "method": method, "variant": name,
                         "config": "" if config is None else "/".join(map(str, config.as_list())),
                         "time_ms": ms, "stored_tflops": stored_tflops if method != "cublas" else dense_flop / (
                             ms * 1e-3) / 1e12,
                         "cublas_tflops": cublas_tflops,
                         "stored_tflops_over_cublas": (stored_tflops if method != "cublas" else cublas_tflops)
                         / cublas_tflops,
                         "speedup_vs_cublas": cublas_ms / ms, "speedup_vs_today": today_ms / ms,
                         "inflation": (matrix.row_groups(config.rows_per_program).inflation
                                       if config is not None and config.rows_per_program > 1 else 1.0),
                         "max_rel_err": error, "note": note})
    return rows


def problems_in_priority_order(args) -> list[Problem]:
    problems = [Problem(dtype, n, k, m, density, layout)
                for dtype, m, density, layout, (n, k) in product(args.dtypes, args.m, args.densities, args.layouts,
                                                                  args.shapes)]
    # fp16 before bf16, then M, density and layout in the order given (most informative first).
    return sorted(problems, key=lambda p: (args.dtypes.index(p.dtype), args.m.index(p.m) // 2,
                                           args.densities.index(p.density) // 2, args.layouts.index(p.layout),
                                           args.m.index(p.m), args.densities.index(p.density)))


# ---------------------------------------------------------------------------------- summary
def best_per_method(rows: list[dict]) -> dict:
    """{(dtype, layout, shape, m, target_density, method): best row}."""
    best = {}
    for row in rows:
        key = (row["dtype"], row["layout"], row["shape"], int(row["m"]), float(row["target_density"]), row["method"])
        value = float(row["stored_tflops_over_cublas"])
        if value == value and (key not in best or value > float(best[key]["stored_tflops_over_cublas"])):
            best[key] = row
    return best


def print_summary(rows: list[dict]) -> None:
    if all(row["time_ms"] != row["time_ms"] for row in rows):  # smoke: no timings, show the checks
        print("\nno timings (smoke run); largest relative error per variant:")
        for name in dict.fromkeys(row["variant"] for row in rows):
            errors = [row["max_rel_err"] for row in rows if row["variant"] == name]
            print(f"  {name:<32} {max(errors):.2e}")
        return
    best = best_per_method(rows)
    problems = sorted({key[:5] for key in best})
    print("\nstored-block TFLOP/s over cuBLAS (best config per kernel); cuBLAS dense TFLOP/s")
    print(f"{'dtype':>5} {'layout':>6} {'shape':>9} {'M':>5} {'dens':>5} {'cuBLAS':>7} {'today':>6}  best new kernel")
    for problem in problems:
        today = best.get((*problem, "today"))
        others = [row for key, row in best.items() if key[:5] == problem and key[5] not in ("cublas", "today")]
        top = max(others, key=lambda r: float(r["stored_tflops_over_cublas"]), default=None)
        cublas = float((today or top or {}).get("cublas_tflops", math.nan))
        print(f"{problem[0]:>5} {problem[1]:>6} {problem[2]:>9} {problem[3]:>5} {problem[4]:>5.2f} {cublas:>7.0f} "
              f"{float(today['stored_tflops_over_cublas']) if today else math.nan:>6.2f}  "
              + (f"{float(top['stored_tflops_over_cublas']):.2f} {top['variant']}" if top else "-"))


def plot(rows: list[dict], path_for_layout, title: str) -> list:
    best = best_per_method(rows)
    dtype = "fp16" if any(key[0] == "fp16" for key in best) else next(iter(best), ("",))[0]
    m_values = sorted({key[3] for key in best if key[0] == dtype})
    if not m_values:
        return []
    plot_m = PLOT_M if PLOT_M in m_values else m_values[-1]
    paths = []
    for layout in sorted({key[1] for key in best}):
        panels = {}
        for shape in sorted({key[2] for key in best if key[1] == layout}):
            lines = {}
            for method in sorted({key[5] for key in best if key[5] != "cublas"}):
                points = sorted((key[4], float(row["stored_tflops_over_cublas"])) for key, row in best.items()
                                if key[:4] == (dtype, layout, shape, plot_m) and key[5] == method)
                if points:
                    lines[method] = ([p[0] for p in points], [p[1] for p in points])
            panels[f"{shape}, M={plot_m}"] = lines
        paths.append(common.line_panels(panels, path_for_layout(layout), f"{title}, {dtype}, {layout} layout",
                                        "block density", "stored TFLOP/s / cuBLAS TFLOP/s"))
    return paths


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: interpreter, tiny shapes, no timings")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop timing new problems after this long")
    parser.add_argument("--compile-only", action="store_true",
                        help="only compile and check every variant (fills Triton's cache), then exit")
    parser.add_argument("--compile-timeout-s", type=float, default=90.0, help="compile-and-check phase limit")
    parser.add_argument("--rep-ms", type=float, default=5.0, help="do_bench_cudagraph's replay time per timing")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
    parser.add_argument("--dtypes", help=f"default {','.join(FULL_DTYPES)}")
    parser.add_argument("--shapes", help="N x K list (default: the four BERT-base shapes)")
    parser.add_argument("--m", help=f"default {','.join(map(str, FULL_M))} (in priority order)")
    parser.add_argument("--densities", help=f"default {','.join(map(str, FULL_DENSITIES))} (in priority order)")
    parser.add_argument("--layouts", help=f"default {','.join(FULL_LAYOUTS)}")
    parser.add_argument("--variants", default="all", help="'all' or a list of names (kernel/R/BM/W/S) to time")
    args = parser.parse_args(argv)
    smoke = args.smoke
    args.dtypes = common.parse_list(args.dtypes) if args.dtypes else (["fp16"] if smoke else list(FULL_DTYPES))
    for name in args.dtypes:
        if name not in ("fp16", "bf16"):
            parser.error(f"dtype {name!r}: the probe times fp16 and bf16 (fp32 stays on the Triton kernel)")
    args.shapes = [common.parse_shape(s) for s in common.parse_list(args.shapes)] if args.shapes else \
        list(SMOKE_SHAPES if smoke else BERT_BASE_SHAPES)
    args.m = common.parse_list(args.m, int) if args.m else list(SMOKE_M if smoke else FULL_M)
    args.densities = common.parse_list(args.densities, float) if args.densities else \
        list(SMOKE_DENSITIES if smoke else FULL_DENSITIES)
    args.layouts = common.parse_list(args.layouts) if args.layouts else list(FULL_LAYOUTS)
    for layout in args.layouts:
        if layout not in FULL_LAYOUTS:
            parser.error(f"unknown layout {layout!r}; choose from {FULL_LAYOUTS}")
    names = {variant_name(c): c for c in probe_configs()}
    if args.variants == "all":
        args.variants = list(names.values())
        if smoke:  # one config per kernel: the smoke run checks the script, not the configs
            args.variants = list({c.kernel: c for c in reversed(args.variants)}.values())[::-1]
    else:
        unknown = [v for v in common.parse_list(args.variants) if v not in names]
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(names)}")
        args.variants = [names[v] for v in common.parse_list(args.variants)]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if common.cuda_missing(device, "gpu_kernels_probe"):
        return 2
    from nn_blocksparse.kernels.gluon_common import gluon_unavailable_reason

    start = time.perf_counter()
    variants = list(args.variants)
    dropped = {}
    if device.type == "cuda":
        reason = gluon_unavailable_reason(device)
        if reason:
            dropped.update({variant_name(c): reason for c in variants if c.is_gluon})
            variants = [c for c in variants if not c.is_gluon]
    environment = {**common.environment_record(device), "timing": "none (smoke)" if args.smoke else "cudagraph"}

    # Step 1: every (dtype, variant) once, in parallel; today's configs too (they compile as well).
    problems = problems_in_priority_order(args)
    jobs = [(dtype, tuple(c.as_list()), device.type) for dtype, c in product(args.dtypes, variants)]
    checks = compile_and_check(jobs, device, args.workers, args.compile_timeout_s)
    for (dtype, values, _), (error, note) in checks.items():
        if note:
            from nn_blocksparse.kernels.configs import KernelConfig

            dropped[f"{dtype}:{variant_name(KernelConfig.from_list(values))}"] = note
    bad = {(dtype, values) for (dtype, values, _), (error, note) in checks.items() if note}
    print(f"compile and check: {len(jobs) - len(bad)} of {len(jobs)} variants passed in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    for name, note in dropped.items():
        print(f"  dropped {name}: {note}", flush=True)

    if args.compile_only:
        return 1 if bad else 0

    path = common.results_path(args.out, "gpu_kernels_probe", device, args.smoke)
    rows, skipped = [], 0
    for index, problem in enumerate(problems):
        if time.perf_counter() - start > args.budget_s:
            skipped = len(problems) - index
            print(f"budget of {args.budget_s:.0f} s reached: {skipped} problems not timed", flush=True)
            break
        usable = [c for c in variants if (problem.dtype, tuple(c.as_list())) not in bad]
        try:
            problem_rows = time_problem(problem, usable, device, args.rep_ms, args.smoke)
        except KeyboardInterrupt:  # the session's time limit: keep what was measured
            skipped = len(problems) - index
            print(f"interrupted: {skipped} problems not timed", flush=True)
            break
        rows.extend(problem_rows)
        best = max((r for r in problem_rows if r["method"] not in ("cublas", "today")),
                   key=lambda r: r["stored_tflops_over_cublas"] if r["stored_tflops_over_cublas"] == r[
                       "stored_tflops_over_cublas"] else -1, default=None)
        today = next(r for r in problem_rows if r["method"] == "today")
        print(f"[{index + 1}/{len(problems)}] {problem.dtype} {problem.layout} {problem.shape} M={problem.m} "
              f"d={problem.density}: today {today['stored_tflops_over_cublas']:.2f}, best "
              f"{best['stored_tflops_over_cublas'] if best else math.nan:.2f} "
              f"{best['variant'] if best else ''} ({time.perf_counter() - start:.0f} s)", flush=True)
        record = {**environment, "problems_timed": str(index + 1), "problems_skipped": "0",
                  "dropped_variants": "; ".join(f"{k}: {v}" for k, v in dropped.items()) or "none"}
        common.write_csv(path, rows, COLUMNS, record)
    record = {**environment, "problems_timed": str(len(problems) - skipped), "problems_skipped": str(skipped),
              "dropped_variants": "; ".join(f"{k}: {v}" for k, v in dropped.items()) or "none"}
    common.write_csv(path, rows, COLUMNS, record)
    plots = [] if args.smoke else plot(rows, lambda layout: common.results_path(
        args.out, f"gpu_kernels_probe_{layout}", device, False, ".png"), common.device_name(device))
    print_summary(rows)
    print("\nwrote", path, *plots, sep="\n  ")
    print(f"gpu_kernels_probe: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
