"""GPU diagnosis (issue 15): where the block-sparse kernel's time goes, beside every GPU alternative.

    python tools/gpu_diagnosis.py [--out DIR] [--rep-ms 5] [--budget-s 210] [--workers 14] [--skip-ncu]
    python tools/gpu_diagnosis.py --compile-only      # fill Triton's cache (e.g. while the GPU tests run)
    python tools/gpu_diagnosis.py --no-compile ...    # the cache is already full
    python tools/gpu_diagnosis.py --smoke --out DIR   # CPU: a tiny problem under Triton's interpreter, no timing

fp16, 32x32 blocks, the four BERT-base shapes (768x768, 2304x768, 3072x768, 768x3072) at M = 2048
and 8192, random layouts and data (`nn_blocksparse.layouts`, seed 0: the densities' layouts are
nested). Every variant is checked against a float64 product of the same weight before it is
timed (relative Frobenius error, output poisoned with NaN first), then timed as CUDA-graph replays
(`benchmarks.common.time_ms(cuda_graph=True)`, `do_bench_cudagraph`, median; L2 is not flushed,
the same for every variant). What each family isolates is in docs/gpu_diagnosis.md:

- `ours_table`: `block_sparse_linear` with the shipped table's config, densities 1.0 / 0.5 / 0.36;
- `ours_rows`: density 1.0, one config per row-group width R = 1, 2, 4, 8 (tiles 128x32 .. 64x256,
  K step 32) and R = 1 stepping 2 and 4 blocks (K step 64, 128);
- `ours_dense_walk`: the same configs with the kernel's `dense_walk` flag (no index loads);
- `ours_knobs`: R = 1 with GROUP_M = 1 (no grouped launch order) and with 2 / 4 pipeline stages;
- `triton_same_tile`: a tutorial-style Triton dense matmul on ours' tiles at K steps 32/64/128;
- `triton_sweep` / `triton_best`: the same kernel on big tiles, and the fastest of them;
- `cublas` (`F.linear`; also on the weights with zero blocks), `torch_bsr` (`F.linear` on a
  `sparse_bsr` weight), `semi_structured` (2:4, `torch.sparse.to_sparse_semi_structured`, element
  density 0.5, cuSPARSELt and CUTLASS), `cusparse` (BSR and Blocked-ELL SpMM through
  `benchmarks.cusparse_spmm`, in a child process: neither torch nor CuPy reaches it in fp16).

`ncu` (if it can read counters here: `ncu --query-metrics`, tried first, answers) profiles ours
(table config) and cuBLAS on 3072x768, M = 8192, density 1.0, after the timing: L2 and DRAM
throughput, tensor-pipe activity and warp stall reasons. The kernels torch's BSR and 2:4 paths
really launch are recorded too.

Writes, under --out (default benchmarks/results): `gpu_diagnosis_<device>.csv` (`COLUMNS`),
`gpu_diagnosis_ncu_<device>.csv`, `gpu_diagnosis_dispatch_<device>.csv` and three plots, each CSV
with the environment record; `--smoke` adds `_quick` to the names. The main CSV is rewritten after
every problem, so a run stopped at its time limit keeps what it measured; `--budget-s` makes the
run itself skip (and say so) what would not fit.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # Triton reads this once, when its kernels are decorated: before any import
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from functools import lru_cache  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.bench_kernel import BERT_BASE_SHAPES  # noqa: E402
from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix  # noqa: E402
from nn_blocksparse.dtypes import DTYPE_NAMES  # noqa: E402
from nn_blocksparse.functional import block_sparse_linear, launch_config  # noqa: E402
from nn_blocksparse.kernels.block_sparse_linear import block_sparse_linear as launch_kernel  # noqa: E402
from nn_blocksparse.kernels.configs import KernelConfig  # noqa: E402
from nn_blocksparse.layouts import random_block_sparse_weight, two_to_four_mask  # noqa: E402
from nn_blocksparse.timing import synchronize  # noqa: E402

COLUMNS = ["shape", "n", "k", "m", "density", "nnz_blocks", "variant", "family", "config", "tile", "time_ms", "tflops",
           "stored_tflops_over_cublas", "speedup_vs_cublas", "rel_error", "timing", "note"]
NCU_COLUMNS = ["target", "kernel", "metric", "value", "unit"]
DISPATCH_COLUMNS = ["api", "dtype", "kernels", "note"]

BLOCK_SIZE = 32
DTYPE = torch.float16
DENSITIES = (1.0, 0.5, 0.36)
M_VALUES = (2048, 8192)
# Shape by shape (largest first), both M each: if the time budget runs out, whole shapes are missing, never one M.
PROBLEMS = tuple((n, k, m) for n, k in sorted(BERT_BASE_SHAPES, key=lambda shape: -shape[0] * shape[1])
                 for m in M_VALUES)
SMOKE_PROBLEMS = ((256, 128, 16),)
NCU_PROBLEM = (3072, 768, 8192)
MAX_REL_ERROR = common.FP16_RELATIVE_TOLERANCE
DEFAULT_REP_MS = 5.0
DEFAULT_BUDGET_S = 180.0
CUSPARSE_TIMEOUT_S = 35
NCU_TIMEOUT_S = 45
FINISH_S = 20.0  # the dispatch probe (it compiles torch's fp32 BSR kernel), plots and files after the last child

# Ours at density 1.0 (launchable_configs lists them, so the AOT check and the every-config test cover
# them; the knobs' GROUP_M / stage variants are measurement-only): the widest spill-free tile per R.
ROW_CONFIGS = {
    "ours R=1": KernelConfig(128, 8, 1, 4, 3, 1),
    "ours R=2": KernelConfig(128, 8, 1, 4, 3, 2),
    "ours R=4": KernelConfig(128, 8, 1, 8, 3, 4),
    "ours R=8": KernelConfig(64, 8, 1, 8, 3, 8),
    "ours R=1 K64": KernelConfig(128, 8, 1, 8, 3, 1, 2),
    "ours R=1 K128": KernelConfig(32, 8, 1, 4, 3, 1, 4),
}
KNOB_CONFIGS = {
    "ours R=1 GROUP_M=1": KernelConfig(128, 1, 1, 4, 3, 1),
    "ours R=1 stages=2": KernelConfig(128, 8, 1, 4, 2, 1),
    "ours R=1 stages=4": KernelConfig(128, 8, 1, 4, 4, 1),
}
DENSE_WALK_OF = {"ours R=1": "dense walk R=1", "ours R=2": "dense walk R=2", "ours R=4": "dense walk R=4",
                 "ours R=8": "dense walk R=8", "ours R=1 K64": "dense walk R=1 K64"}
# Ours' tiles (BLOCK_M, BLOCK_N, warps) for R = 1, 2, 4, 8, each at K steps 32, 64, 128, 3 stages.
SAME_TILES = ((128, 32, 4), (128, 64, 4), (128, 128, 8), (64, 256, 8))
SAME_TILE_K_STEPS = (32, 64, 128)
# Big-tile candidates for "Triton's best" on Hopper: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages).
SWEEP_TILES = ((128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
               (64, 256, 64, 4, 4), (128, 128, 32, 4, 4))
LAUNCH_ORDER_TILE = (128, 128, 64, 8, 3)


# ---------------------------------------------------------------------------------- Triton dense matmul
@triton.jit
def _dense_matmul_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """`y = x @ W^T`, x `[M, K]` and W `[N, K]` row-major, N and K multiples of the tile (the launcher
    checks): the plain tiled GEMM of Triton's matmul tutorial, the yardstick for ours at equal tiles."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = N // BLOCK_N
    programs_per_band = GROUP_M * num_pid_n
    first_pid_m = (pid // programs_per_band) * GROUP_M
    band_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % programs_per_band) % band_rows
    pid_n = (pid % programs_per_band) // band_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows past M wrap around instead of being masked, so the loop's loads carry no mask; the store masks.
    x_ptrs = x_ptr + (offs_m % M)[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # the [BLOCK_K, BLOCK_N] tile of W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K // BLOCK_K):
        acc = tl.dot(tl.load(x_ptrs), tl.load(w_ptrs), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None])


def dense_matmul(x: torch.Tensor, weight: torch.Tensor, block_m: int, block_n: int, block_k: int, num_warps: int,
                 num_stages: int, group_m: int = 8) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    if n % block_n or k % block_k or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(f"tile {block_n}x{block_k} must divide the weight {n}x{k}, unit inner strides")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) * (n // block_n),)
    _dense_matmul_kernel[grid](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
                               BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
                               num_warps=num_warps, num_stages=num_stages)
    return out


# ---------------------------------------------------------------------------------- problems and variants
@dataclass
class Problem:
    n: int
    k: int
    m: int
    device: torch.device
    x: torch.Tensor = field(init=False)
    weights: dict = field(init=False)  # density -> fp16 [n, k]; the "2:4" key holds the semi-structured weight
    _matrices: dict = field(default_factory=dict, init=False)
    _references: dict = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.weights = {d: random_block_sparse_weight(self.n, self.k, BLOCK_SIZE, d, seed=0, dtype=DTYPE,
                                                      device=self.device) for d in DENSITIES}
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(self.m, self.k, generator=generator).to(device=self.device, dtype=DTYPE)
        keep = two_to_four_mask(self.n, self.k, generator=generator)  # element density 0.5
        self.weights["2:4"] = self.weights[1.0] * keep.to(device=self.device, dtype=DTYPE)

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"

    def matrix(self, density: float) -> BlockSparseMatrix:
        if density not in self._matrices:
            self._matrices[density] = BlockSparseMatrix.from_dense(self.weights[density], BLOCK_SIZE)
        return self._matrices[density]

    def reference(self, key) -> torch.Tensor:
        """The float64 product with weight `key`, computed once (on the GPU where there is one)."""
        if key not in self._references:
            self._references[key] = self.x.double() @ self.weights[key].double().T
        return self._references[key]


@dataclass
class Prepared:
    run: Callable[[], torch.Tensor]
    config: str = ""
    tile: str = ""
    note: str = ""


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    weight_key: object  # a density, or "2:4"
    prepare: Callable[[Problem], Prepared]
    compiles: bool = True  # launches Triton kernels that the compile phase should warm

    def stored_flop(self, problem: Problem) -> float:
        """FLOPs of the weight this variant multiplies: its stored blocks, all of them for cuBLAS, half for 2:4."""
        if self.family == "cublas":
            return 2.0 * problem.m * problem.n * problem.k
        if self.weight_key == "2:4":
            return problem.m * problem.n * problem.k  # 2 * M * N * K * 0.5
        return 2.0 * problem.m * problem.matrix(self.weight_key).nnz_blocks * BLOCK_SIZE ** 2


def _config_text(config: KernelConfig) -> str:
    return "/".join(map(str, config.as_list()))


def _tile_text(config: KernelConfig) -> str:
    return f"{config.block_m}x{config.rows_per_program * BLOCK_SIZE}xK{config.k_blocks * BLOCK_SIZE}"


def _ours_table(density: float) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        matrix = problem.matrix(density)
        config = launch_config(matrix, DTYPE, problem.m, problem.device)
        return Prepared(lambda: block_sparse_linear(problem.x, matrix, backend="triton"), _config_text(config),
                        _tile_text(config))
    return prepare


def _ours_config(config: KernelConfig, dense_walk: bool = False) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        matrix = problem.matrix(1.0)
        groups = matrix.row_groups(config.rows_per_program) if config.rows_per_program > 1 else None
        args = (problem.x, matrix.values, matrix.row_offsets, matrix.col_indices, matrix.row_order, problem.n,
                None, None, config, groups)
        return Prepared(lambda: launch_kernel(*args, dense_walk=dense_walk), _config_text(config), _tile_text(config))
    return prepare


def _triton_dense(block_m, block_n, block_k, warps, stages, group_m=8) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        weight = problem.weights[1.0]
        return Prepared(lambda: dense_matmul(problem.x, weight, block_m, block_n, block_k, warps, stages, group_m),
                        f"warps={warps} stages={stages} GROUP_M={group_m}", f"{block_m}x{block_n}xK{block_k}")
    return prepare


def _cublas(density: float) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        weight = problem.weights[density]
        return Prepared(lambda: F.linear(problem.x, weight))
    return prepare


def _torch_bsr(density: float) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        bsr = _bsr_operand(problem.weights[density])
        return Prepared(lambda: F.linear(problem.x, bsr))
    return prepare


def _semi_structured(backend: str) -> Callable[[Problem], Prepared]:
    def prepare(problem: Problem) -> Prepared:
        weight = problem.weights["2:4"]
        if backend == "cutlass":
            from torch.sparse import SparseSemiStructuredTensorCUTLASS

            sparse = SparseSemiStructuredTensorCUTLASS.from_dense(weight)
        else:
            sparse = torch.sparse.to_sparse_semi_structured(weight)  # cuSPARSELt where torch has it
        return Prepared(lambda: F.linear(problem.x, sparse), note=f"{type(sparse).__name__}")
    return prepare


@lru_cache(maxsize=1)
def all_variants() -> tuple[Variant, ...]:
    """Every variant, in timing order (cuBLAS first: the others are compared with it)."""
    variants = [Variant("cublas", "cublas", 1.0, _cublas(1.0), compiles=False)]
    variants += [Variant(f"cublas zero blocks d={d:.2f}", "cublas", d, _cublas(d), compiles=False) for d in DENSITIES[1:]]
    variants += [Variant(f"ours table d={d:.2f}", "ours_table", d, _ours_table(d)) for d in DENSITIES]
    variants += [Variant(name, "ours_rows", 1.0, _ours_config(c)) for name, c in ROW_CONFIGS.items()]
    variants += [Variant(DENSE_WALK_OF[name], "ours_dense_walk", 1.0, _ours_config(ROW_CONFIGS[name], True))
                 for name in DENSE_WALK_OF]
    variants += [Variant(name, "ours_knobs", 1.0, _ours_config(c)) for name, c in KNOB_CONFIGS.items()]
    variants += [Variant(f"triton {bm}x{bn}xK{bk}", "triton_same_tile", 1.0, _triton_dense(bm, bn, bk, warps, 3))
                 for bm, bn, warps in SAME_TILES for bk in SAME_TILE_K_STEPS]
    variants += [Variant(f"triton sweep {bm}x{bn}xK{bk} w{w} s{s}", "triton_sweep", 1.0, _triton_dense(bm, bn, bk, w, s))
                 for bm, bn, bk, w, s in SWEEP_TILES]
    bm, bn, bk, w, s = LAUNCH_ORDER_TILE
    variants += [Variant(f"triton {bm}x{bn}xK{bk} GROUP_M=1", "triton_knobs", 1.0, _triton_dense(bm, bn, bk, w, s, 1))]
    variants += [Variant(f"torch_bsr d={d:.2f}", "torch_bsr", d, _torch_bsr(d)) for d in DENSITIES]
    variants += [Variant(f"2:4 {backend}", "semi_structured", "2:4", _semi_structured(backend), compiles=False)
                 for backend in ("default", "cutlass")]
    return tuple(variants)


def variant_named(name: str) -> Variant:
    return next(v for v in all_variants() if v.name == name)


# ---------------------------------------------------------------------------------- checking and timing
def poison_allocator(problem: Problem) -> None:
    """Hand the caching allocator a NaN-filled block the size of the output, so an output the variant
    does not fully write fails the check instead of passing on stale zeros."""
    if problem.device.type == "cuda":
        torch.full((problem.m, problem.n), float("nan"), dtype=DTYPE, device=problem.device)


def measure(fn: Callable[[], object], device: torch.device, rep_ms: float, smoke: bool) -> tuple[float, str]:
    """(median ms, how it was timed): CUDA-graph replays, else eager do_bench where capture fails."""
    if smoke:
        return float("nan"), "skipped (smoke)"
    try:
        return common.time_ms(fn, device, cuda_graph=True, cuda_rep_ms=rep_ms), "cudagraph"
    except Exception as failure:  # noqa: BLE001 - some library calls cannot be captured
        torch.cuda.synchronize(device)
        why = " ".join(str(failure).split())[:120]
        return common.time_ms(fn, device, cuda_warmup_ms=rep_ms / 4, cuda_rep_ms=rep_ms), f"eager (no capture: {why})"


def run_variant(variant: Variant, problem: Problem, rep_ms: float, smoke: bool) -> dict:
    row = {"shape": problem.shape, "n": problem.n, "k": problem.k, "m": problem.m,
           "density": 0.5 if variant.weight_key == "2:4" else problem.matrix(variant.weight_key).density,
           "nnz_blocks": "" if variant.weight_key == "2:4" else problem.matrix(variant.weight_key).nnz_blocks,
           "variant": variant.name, "family": variant.family, "time_ms": float("nan"), "rel_error": float("nan"),
           "timing": "", "note": ""}
    try:
        prepared = variant.prepare(problem)
        row.update(config=prepared.config, tile=prepared.tile, note=prepared.note)
        poison_allocator(problem)
        output = prepared.run()
        synchronize(problem.device)
        row["rel_error"] = common.relative_error(output, problem.reference(variant.weight_key))
        if not row["rel_error"] <= MAX_REL_ERROR:
            row["note"] = f"wrong result (relative error {row['rel_error']:.3g} > {MAX_REL_ERROR}): not timed"
        else:
            row["time_ms"], row["timing"] = measure(prepared.run, problem.device, rep_ms, smoke)
    except Exception as failure:  # noqa: BLE001 - a failing variant is a row that says why
        row["note"] = common.error_note(failure, limit=200)
    row["tflops"] = variant.stored_flop(problem) / (row["time_ms"] * 1e-3) / 1e12
    return row


def add_ratios(rows: list[dict]) -> None:
    """`stored_tflops_over_cublas` and `speedup_vs_cublas` against the problem's cuBLAS row (dense weight)."""
    baseline = {}
    for row in rows:
        if row["variant"] == "cublas":
            baseline[(row["shape"], row["m"])] = row
    for row in rows:
        base = baseline.get((row["shape"], row["m"]))
        if base is None:
            continue
        row["stored_tflops_over_cublas"] = row["tflops"] / base["tflops"]
        row["speedup_vs_cublas"] = base["time_ms"] / row["time_ms"]


def best_triton_rows(rows: list[dict]) -> list[dict]:
    """Per problem, the fastest `triton_sweep` row again as `triton best` (its tile in `tile`)."""
    best = {}
    for row in rows:
        if row["family"] == "triton_sweep" and row["time_ms"] == row["time_ms"]:
            key = (row["shape"], row["m"])
            if key not in best or row["time_ms"] < best[key]["time_ms"]:
                best[key] = row
    return [{**row, "variant": "triton best", "family": "triton_best", "note": f"fastest of {len(SWEEP_TILES)} tiles"}
            for row in best.values()]


# ---------------------------------------------------------------------------------- compile phase
@lru_cache(maxsize=None)
def _problem(n: int, k: int, m: int, device: str) -> Problem:
    return Problem(n, k, m, torch.device(device))


def warm_variant(name: str, problems, device: str = "cuda") -> tuple[str, str]:
    """Run one variant once on every problem (in a worker): Triton's disk cache then holds its kernels."""
    errors = []
    for n, k, m in problems:
        try:
            with torch.inference_mode():
                variant_named(name).prepare(_problem(n, k, m, device)).run()
            synchronize(torch.device(device))
        except Exception as failure:  # noqa: BLE001 - reported; the timed run records it per problem
            errors.append(f"{n}x{k} M={m}: {common.error_note(failure, limit=200)}")
    return name, "; ".join(errors)[:400]


def compile_all(problems, workers: int) -> None:
    names = [v.name for v in all_variants() if v.compiles]
    start = time.perf_counter()
    print(f"compiling: {len(names)} variants x {len(problems)} problems on {workers} workers", flush=True)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        for done in as_completed([pool.submit(warm_variant, name, problems) for name in names]):
            name, error = done.result()
            if error:
                print(f"  {name}: {error}", flush=True)
    print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)


# ---------------------------------------------------------------------------------- ncu
NCU_SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis", "WarpStateStats", "Occupancy",
                "LaunchStats")
# Asked for by name where this ncu knows them (`--query-metrics`): time, DRAM and L2 bytes and throughput,
# the x / weight reads L2 serves to the SMs, and the tensor pipes (HMMA: mma.sync; GMMA: Hopper's wgmma).
NCU_METRICS = ("gpu__time_duration.sum", "dram__bytes_read.sum", "dram__bytes_write.sum",
               "dram__throughput.avg.pct_of_peak_sustained_elapsed", "lts__t_bytes.sum",
               "lts__t_sectors_srcunit_tex_op_read.sum", "lts__throughput.avg.pct_of_peak_sustained_elapsed",
               "lts__t_sector_hit_rate.pct", "sm__throughput.avg.pct_of_peak_sustained_elapsed",
               "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",
               "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
               "sm__inst_executed_pipe_tensor_op_hmma.sum", "sm__inst_executed_pipe_tensor_op_gmma.sum",
               "sm__warps_active.avg.pct_of_peak_sustained_active")


def ncu_child() -> int:
    """Under ncu: ours (table config) and cuBLAS once each on NCU_PROBLEM, inside cudaProfilerStart/Stop."""
    problem = Problem(*NCU_PROBLEM, torch.device("cuda"))
    ours = variant_named("ours table d=1.00").prepare(problem).run
    with torch.inference_mode():
        for fn in (ours, lambda: F.linear(problem.x, problem.weights[1.0])):
            fn()
            fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        ours()
        F.linear(problem.x, problem.weights[1.0])
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return 0


def known_ncu_metrics(ncu: str) -> set[str] | str:
    """Base metric names this ncu can collect on this GPU, or why it cannot (the cheap first try)."""
    try:
        result = subprocess.run([ncu, "--query-metrics"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as failure:
        return f"ncu --query-metrics failed: {failure}"
    names = {line.split()[0] for line in result.stdout.splitlines() if line.strip() and "__" in line.split()[0]}
    if result.returncode != 0 or not names:
        return f"ncu --query-metrics exit {result.returncode}: {' '.join((result.stderr + result.stdout).split())[-200:]}"
    return names


def find_ncu() -> tuple[str | None, set[str] | str]:
    """(ncu's path, the metrics it knows here) or (None, why not): the cheap check made first."""
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        return None, "skipped: no ncu on this machine"
    known = known_ncu_metrics(str(ncu))
    return (None, f"skipped: {known}") if isinstance(known, str) else (str(ncu), known)


def run_ncu(ncu: str, known: set[str], out_dir: Path, tag: str) -> tuple[list[dict], str]:
    """(rows for NCU_COLUMNS, status)."""
    metrics = [m for m in NCU_METRICS if m.split(".")[0] in known]
    report = out_dir / f"gpu_diagnosis_{tag}.ncu-rep"
    command = [str(ncu), "--clock-control", "none", "--profile-from-start", "off", "--target-processes", "all",
               *[arg for section in NCU_SECTIONS for arg in ("--section", section)], "--metrics", ",".join(metrics),
               "--export", str(report), "--force-overwrite", sys.executable, str(Path(__file__).resolve()),
               "--ncu-child"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=NCU_TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return [], f"failed: ncu took over {NCU_TIMEOUT_S} s"
    if result.returncode != 0 or not report.exists():
        return [], f"failed: exit {result.returncode}: {' '.join((result.stderr + result.stdout).split())[-300:]}"
    raw = subprocess.run([str(ncu), "--import", str(report), "--csv", "--page", "raw"], capture_output=True,
                         text=True, timeout=60)
    return parse_ncu_raw(raw.stdout), f"ok ({len(metrics)} named metrics, sections {','.join(NCU_SECTIONS)})"


def parse_ncu_raw(text: str) -> list[dict]:
    """`ncu --csv --page raw` (a header of metric names, a row of units, a row per kernel) as NCU_COLUMNS rows."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    if len(lines) < 3:
        return []
    table = list(csv.reader(io.StringIO("\n".join(lines))))
    header, units, kernels = table[0], table[1], table[2:]
    name_column = header.index("Kernel Name") if "Kernel Name" in header else None
    rows = []
    for index, values in enumerate(kernels):
        kernel = values[name_column] if name_column is not None else f"kernel {index}"
        target = "ours" if "block_sparse" in kernel else "cublas"
        for metric, unit, value in zip(header, units, values):
            if "__" not in metric:
                continue
            try:
                number = float(value.replace(",", ""))
            except ValueError:
                continue
            rows.append({"target": target, "kernel": kernel[:120], "metric": metric, "value": number, "unit": unit})
    return rows


def ncu_summary(rows: list[dict]) -> list[str]:
    """Lines for the printed summary: the named metrics and each target's top stall reasons."""
    lines = []
    for target in ("ours", "cublas"):
        mine = {r["metric"]: r for r in rows if r["target"] == target}
        if not mine:
            continue
        wanted = [m for m in NCU_METRICS if m in mine] + [m for m in mine if "pipe_tensor" in m and m not in NCU_METRICS]
        lines.append(f"ncu {target}: " + "; ".join(f"{m} = {mine[m]['value']:.4g} {mine[m]['unit']}" for m in wanted))
        stalls = sorted(((r["value"], m) for m, r in mine.items() if "issue_stalled" in m and "per_issue_active" in m),
                        reverse=True)[:6]
        if stalls:
            lines.append(f"ncu {target} top stalls (warps per issue): "
                         + ", ".join(f"{re.sub(r'.*issue_stalled_|_per_issue_active.*', '', m)} {v:.3g}"
                                     for v, m in stalls))
    return lines


# ---------------------------------------------------------------------------------- what torch really launches
def dispatch_rows(device: torch.device) -> list[dict]:
    """The CUDA kernels torch's BSR `F.linear` (fp16, fp32, fp64) and 2:4 path launch, on 768x768, M = 2048,
    density 0.5 (the fp16 BSR case is one the compile phase warmed)."""
    if device.type != "cuda":
        return [{"api": "F.linear(x, bsr)", "dtype": "all", "kernels": "", "note": "skipped: no CUDA"}]
    from torch.profiler import ProfilerActivity, profile

    weight = random_block_sparse_weight(768, 768, BLOCK_SIZE, 0.5, seed=0, dtype=DTYPE, device=device)
    x = torch.randn(2048, 768, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=DTYPE)
    rows = []
    for api, dtype, make in [("F.linear(x, bsr)", d, lambda d=d: _bsr_operand(weight.to(d))) for d in
                             (torch.float16, torch.float32, torch.float64)] + [
            ("F.linear(x, to_sparse_semi_structured(w))", torch.float16,
             lambda: torch.sparse.to_sparse_semi_structured(weight * two_to_four_mask(768, 768).to(weight)))]:
        try:
            operand, operand_x = make(), x.to(dtype)
            with torch.inference_mode():
                F.linear(operand_x, operand)  # compiles / plans outside the profile
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as trace:
                    F.linear(operand_x, operand)
                    torch.cuda.synchronize()
            names = sorted({event.name for event in trace.events() if event.device_type.name == "CUDA"})
            rows.append({"api": api, "dtype": DTYPE_NAMES.get(dtype, str(dtype)), "kernels": "; ".join(names)[:600],
                         "note": type(operand).__name__})
        except Exception as failure:  # noqa: BLE001 - recorded
            rows.append({"api": api, "dtype": str(dtype), "kernels": "", "note": common.error_note(failure, limit=200)})
    return rows


def _bsr_operand(weight: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return weight.to_sparse_bsr((BLOCK_SIZE, BLOCK_SIZE))


# ---------------------------------------------------------------------------------- cuSPARSE (child process)
def cusparse_rows(problems, device: torch.device, rep_ms: float, smoke: bool) -> list[dict]:
    """cuSPARSE BSR / Blocked-ELL rows from `benchmarks.cusparse_spmm` in a child (a ctypes crash stays there)."""
    from benchmarks.cusparse_spmm import FORMATS

    expected = {(f"{n}x{k}", m, d, name): None for n, k, m in problems for d in DENSITIES for name in FORMATS}
    reason = ""
    if smoke or device.type != "cuda":
        reason = "needs CUDA (cuSPARSE)"
    else:
        shapes = ",".join(dict.fromkeys(f"{n}x{k}" for n, k, _ in problems))
        ms = ",".join(str(m) for m in dict.fromkeys(m for _, _, m in problems))
        command = [sys.executable, "-m", "benchmarks.cusparse_spmm", "--shapes", shapes, "--m", ms, "--densities",
                   ",".join(map(str, DENSITIES)), "--rep-ms", str(rep_ms)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=CUSPARSE_TIMEOUT_S, cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            stdout, status = result.stdout, f"exit {result.returncode}: {' '.join(result.stderr.split())[-160:]}"
        except subprocess.TimeoutExpired as timeout:
            stdout = timeout.stdout.decode() if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
            status = f"timed out after {CUSPARSE_TIMEOUT_S} s"
        for line in stdout.splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                key = (row["shape"], row["m"], row["density"], row["format"])
                if key in expected:
                    expected[key] = row
        reason = f"no result from the cuSPARSE child ({status})"
    rows = []
    for (shape, m, density, name), result in expected.items():
        n, k = common.parse_shape(shape)
        nnz = round(density * (n // BLOCK_SIZE) * (k // BLOCK_SIZE))
        row = {"shape": shape, "n": n, "k": k, "m": m, "density": density, "nnz_blocks": nnz,
               "variant": f"cusparse {name} d={density:.2f}", "family": "cusparse", "time_ms": float("nan"),
               "rel_error": float("nan"), "timing": "", "note": reason}
        if result is not None:
            row["note"] = result.get("error", "")
            row["rel_error"] = result.get("relative_error", float("nan"))
            if "time_ms" in result:
                row.update(time_ms=result["time_ms"], timing="cudagraph",
                           note=f"{result.get('padded_blocks', nnz)} blocks multiplied (Blocked-ELL pads rows)")
        row["tflops"] = 2.0 * m * nnz * BLOCK_SIZE ** 2 / (row["time_ms"] * 1e-3) / 1e12
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------- outputs
def write_plots(rows: list[dict], path_for: Callable[[str], Path], title: str) -> list[Path]:
    problems = list(dict.fromkeys(f"{r['shape']} M{r['m']}" for r in rows))

    def series(names: list[str], column: str) -> dict:
        by_key = {(f"{r['shape']} M{r['m']}", r["variant"]): r.get(column, float("nan")) for r in rows}
        return {name: [float(by_key.get((p, name), float("nan")) or float("nan")) for p in problems] for name in names}

    density1 = ["ours R=1", "ours R=4", "ours R=8", "dense walk R=4", "triton 128x32xK32", "triton 128x128xK32",
                "triton best", "ours table d=1.00"]
    alternatives = ["ours table d=0.50", "torch_bsr d=0.50", "2:4 default", "cusparse bsr d=0.50",
                    "cusparse blocked_ell d=0.50", "ours table d=0.36", "torch_bsr d=0.36"]
    paths = [
        common.grouped_bars(problems, series(density1, "stored_tflops_over_cublas"), path_for("density1"),
                            f"density 1.0: TFLOP/s over cuBLAS's ({title})", "TFLOP/s / cuBLAS",
                            {"cuBLAS": 1.0}),
        common.grouped_bars(problems, series(alternatives, "speedup_vs_cublas"), path_for("alternatives"),
                            f"sparse alternatives: speedup over cuBLAS ({title})", "speedup vs cuBLAS",
                            {"cuBLAS": 1.0}),
    ]
    panels = {}
    for problem in problems:
        lines = {}
        for bm, bn, _ in SAME_TILES:
            points = [(bk, float(next((r["stored_tflops_over_cublas"] for r in rows
                                       if f"{r['shape']} M{r['m']}" == problem and r["variant"] == f"triton {bm}x{bn}xK{bk}"),
                                      float("nan")) or float("nan"))) for bk in SAME_TILE_K_STEPS]
            lines[f"{bm}x{bn}"] = ([p[0] for p in points], [p[1] for p in points])
        panels[problem] = lines
    paths.append(common.line_panels(panels, path_for("ksteps"), f"Triton dense on ours' tiles by K step ({title})",
                                    "K step", "TFLOP/s / cuBLAS"))
    return paths


def print_summary(rows: list[dict], extra: list[str]) -> None:
    by = {(r["shape"], r["m"], r["variant"]): r for r in rows}
    columns = ["cublas", "ours table d=1.00", "ours R=1", "ours R=4", "ours R=8", "dense walk R=4",
               "triton 128x32xK32", "triton 128x128xK32", "triton best"]
    print("\nTFLOP/s over cuBLAS's at density 1.0 (cuBLAS: its TFLOP/s)")
    print(f"{'problem':>16} " + " ".join(f"{c[-14:]:>14}" for c in columns))
    for shape, m in dict.fromkeys((r["shape"], r["m"]) for r in rows):
        cells = []
        for c in columns:
            row = by.get((shape, m, c), {})
            value = row.get("tflops" if c == "cublas" else "stored_tflops_over_cublas", float("nan"))
            cells.append(f"{float(value if value != '' else 'nan'):>14.3f}")
        print(f"{shape + ' M' + str(m):>16} " + " ".join(cells))
    columns = ["ours table d=0.50", "torch_bsr d=0.50", "2:4 default", "2:4 cutlass", "cusparse bsr d=0.50",
               "cusparse blocked_ell d=0.50", "ours table d=0.36"]
    print("\nspeedup over cuBLAS")
    print(f"{'problem':>16} " + " ".join(f"{c[-14:]:>14}" for c in columns))
    for shape, m in dict.fromkeys((r["shape"], r["m"]) for r in rows):
        cells = [f"{float(by.get((shape, m, c), {}).get('speedup_vs_cublas', float('nan')) or 'nan'):>14.3f}"
                 for c in columns]
        print(f"{shape + ' M' + str(m):>16} " + " ".join(cells))
    failed = [r for r in rows if r["time_ms"] != r["time_ms"]]
    if failed:
        print(f"\n{len(failed)} rows without a time, e.g.: "
              + " | ".join(f"{r['variant']} {r['shape']} M{r['m']}: {r['note'][:90]}" for r in failed[:6]))
    for line in extra:
        print(line)


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="CPU: one tiny problem under the interpreter, no timing")
    parser.add_argument("--compile-only", action="store_true", help="fill Triton's cache and stop")
    parser.add_argument("--no-compile", action="store_true", help="skip the parallel compile phase (cache is warm)")
    parser.add_argument("--skip-ncu", action="store_true")
    parser.add_argument("--rep-ms", type=float, default=DEFAULT_REP_MS, help="do_bench_cudagraph's rep per variant")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="wall-clock budget: timing stops (rows say so) to leave the last steps their time")
    parser.add_argument("--workers", type=int, default=max(1, common.available_cores() - 2))
    parser.add_argument("--ncu-child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ncu_child:
        return ncu_child()
    start = time.monotonic()
    device = torch.device("cpu" if args.smoke else "cuda")
    if common.cuda_missing(device, "gpu_diagnosis"):
        return 2
    problems = SMOKE_PROBLEMS if args.smoke else PROBLEMS
    if not args.smoke and not args.no_compile:
        compile_all(problems, args.workers)
    if args.compile_only:
        return 0
    tag = common.device_tag(device) + ("_quick" if args.smoke else "")
    args.out.mkdir(parents=True, exist_ok=True)
    ncu, known = (None, "skipped") if (args.smoke or args.skip_ncu) else find_ncu()
    print(f"ncu: {'found, profiles after the timing' if ncu else known}", flush=True)
    environment = {**common.environment_record(device), "timing": "skipped (smoke)" if args.smoke else "cudagraph",
                   "rep_ms": str(args.rep_ms), "dtype": "fp16", "block_size": str(BLOCK_SIZE),
                   "cupy": common.package_version("cupy"), "cusparselt": _cusparselt_version()}

    def path(stem: str, suffix: str = ".csv") -> Path:
        return common.results_path(args.out, stem, device, args.smoke, suffix)

    rows: list[dict] = []
    # The timing loop stops where the children after it (at their time limits) and the files would not fit.
    deadline = start + args.budget_s - CUSPARSE_TIMEOUT_S - (NCU_TIMEOUT_S if ncu else 0) - FINISH_S
    with torch.inference_mode():
        for n, k, m in problems:
            problem = Problem(n, k, m, device)
            for variant in all_variants():
                if time.monotonic() > deadline:
                    rows.append({"shape": problem.shape, "n": n, "k": k, "m": m, "variant": variant.name,
                                 "family": variant.family, "time_ms": float("nan"), "tflops": float("nan"),
                                 "note": "skipped: time budget"})
                    continue
                rows.append(run_variant(variant, problem, args.rep_ms, args.smoke))
            print(f"{problem.shape} M={m}: {len([r for r in rows if r['m'] == m and r['shape'] == problem.shape])} "
                  f"variants, {time.monotonic() - start:.0f} s", flush=True)
            del problem
            add_ratios(rows)
            common.write_csv(path("gpu_diagnosis"), rows, COLUMNS, environment)
        rows += cusparse_rows(problems, device, args.rep_ms, args.smoke)
        rows += best_triton_rows(rows)
        add_ratios(rows)
        ncu_rows, ncu_status = run_ncu(ncu, known, args.out, tag) if ncu else ([], known)
        print(f"ncu: {ncu_status}", flush=True)
        environment["ncu"] = ncu_status
        dispatch = dispatch_rows(device)
    written = [common.write_csv(path("gpu_diagnosis"), rows, COLUMNS, environment),
               common.write_csv(path("gpu_diagnosis_ncu"), ncu_rows, NCU_COLUMNS, environment),
               common.write_csv(path("gpu_diagnosis_dispatch"), dispatch, DISPATCH_COLUMNS, environment)]
    written += write_plots(rows, lambda stem: path(f"gpu_diagnosis_{stem}", ".png"),
                           f"{common.device_name(device)}, fp16, 32x32 blocks")
    extra = ncu_summary(ncu_rows) + [f"dispatch {r['api']} {r['dtype']}: {r['kernels'][:150] or r['note']}"
                                     for r in dispatch]
    print_summary(rows, extra)
    print(f"\ngpu_diagnosis: {time.monotonic() - start:.0f} s; wrote", *written, sep="\n  ")
    return 0


def _cusparselt_version() -> str:
    backend = getattr(torch.backends, "cusparselt", None)
    try:
        return str(backend.version()) if backend is not None and backend.is_available() else "not available"
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
