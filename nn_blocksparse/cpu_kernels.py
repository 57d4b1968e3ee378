"""CPU fast path for a block-sparse linear layer `y = x @ W^T + b`: a native kernel, else pure torch.

W (`[N, K]`) arrives in torch's BSR layout with square `bs x bs` blocks (`values`, `row_offsets`,
`col_indices`, see `block_sparse_matrix.py`).  torch's own BSR matmul on CPU is 14-50x slower than
the dense GEMM, so `build_cpu_plan` re-lays the weight out once and `cpu_block_sparse_linear`
runs it with one of four strategies:

- ``"native"``: the AVX-512 kernel of `kernels/cpu_block_sparse_linear.cpp` (block sizes
  16/32/64), which reads x where it lies and walks only the stored blocks: no gathers, no
  transposes.  The first choice wherever it builds (`native_status()` says why not).  fp32 and fp16
  plans compute in fp32, at about twice the speed of MKL's dense GEMM per FLOP on the AMD CPU this
  was tuned on (MKL takes its AVX2 path there), so it is chosen at every density.  bf16 plans
  compute in bf16 (fp32 accumulation) where the CPU has AVX512_BF16, else in fp32; against
  oneDNN's fast bf16 dense GEMM the cost model keeps dense near density 1.  The strategies below
  are the portable fallback.

The two pure-torch sparse strategies work on *units*: one block-row of W, or several block-rows whose nonzero
block-columns are identical (structured pruning: whole block-columns or heads empty).  A unit
only needs the P block-columns of x it touches; they are gathered into a contiguous buffer and
multiplied by the unit's P blocks, packed as one `[P*bs, G*bs]` matrix (G = block-rows of the
unit).  Units of the same G are padded to a common P (buckets chosen by a small dynamic program)
so that each bucket is ONE batched GEMM: the Python cost is a few calls per bucket, never per
block.  Outputs land in slot order (bucket by bucket); one `index_select` over block-rows puts
them back in feature order.

- ``"gather_bmm"``: works on x^T (one transposed copy per tile of rows), so that gathering a
  block-column is copying one contiguous `[bs, rows]` row-block and the GEMM is `W_unit @ x^T`,
  run by MKL's batched GEMM with one unit per thread; y^T is transposed back at the end.  Best for
  many narrow units (G*bs = 32: random layouts) at small M, where MKL's narrow-output kernels lose
  more than the two transposes cost.
- ``"gather_mm"``: works on x as is (gathering `bs`-element runs of each row) and writes
  `x_unit @ W_unit^T` straight into the output; one multi-threaded GEMM per wide unit.  Best when
  the work sits in wide units (whole block-rows or block-columns pruned), where the GEMMs are
  efficient anyway, and for long rows of x or large M, where the transposes would cost most.
- ``"dense"``: at high block density the gathers and the narrower GEMMs cost more than they save,
  so the plan keeps the re-densified weight and calls `F.linear`.

The choice is made by a deterministic cost model (no timing): native, dense or pure-torch sparse
once, when the plan is built (`plan.strategy`, at M = 256 rows of x); between the two pure-torch
sparse strategies per call, from the number of rows M (`plan.strategy_for(M)`).
Passing `strategy=` to `build_cpu_plan` forces one strategy for every call.  Inference only: the
kernels write into preallocated buffers (`out=`), which autograd cannot track.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_sparse_matrix import bsr_to_dense
from .kernels.cpu_block_sparse_linear import (
    NATIVE_BLOCK_SIZES,
    native_available,
    native_block_sparse_linear,
    native_dtypes,
    native_status,
    pack_blocks,
)

STRATEGY_DENSE = "dense"
STRATEGY_GATHER_BMM = "gather_bmm"
STRATEGY_GATHER_MM = "gather_mm"
STRATEGY_NATIVE = "native"
STRATEGIES = (STRATEGY_DENSE, STRATEGY_GATHER_BMM, STRATEGY_GATHER_MM, STRATEGY_NATIVE)
_TORCH_SPARSE_STRATEGIES = (STRATEGY_GATHER_BMM, STRATEGY_GATHER_MM)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --- Cost model -----------------------------------------------------------------------------
# Seconds predicted for one call, calibrated on the 2-core AVX-512 machine this was tuned on
# (torch 2.13 + MKL).  Only ratios matter for the choices.  Dense-versus-sparse is decided at a
# fixed reference M, so that it does not depend on the first call.
_REFERENCE_TOKENS = 256


@dataclass(frozen=True)
class _GemmProfile:
    """Dense GEMM speed of a compute dtype, and the efficiency of the sparse strategies' GEMMs.

    A unit's GEMM output is only G*bs features wide.  Efficiencies are relative to one wide dense
    GEMM, by output width (measured in the full pipeline, M=256): narrow outputs re-pack the
    gathered x for few FMAs per element.  "gather_bmm": MKL's batched GEMM, one unit per thread;
    "gather_mm": one GEMM per unit split over both cores (narrow units pay a sync per unit, below).
    """

    dense_flops_per_s: float
    element_size: int
    bmm_efficiency_by_width: tuple[tuple[int, float], ...]
    mm_efficiency_by_width: tuple[tuple[int, float], ...]


# "gather_bmm" efficiencies re-measured once chunks became multiples of the thread count (an odd
# chunk left a core idle at its end, which the old 0.84 at width 32 had absorbed): with them the
# model picks the faster strategy (or one within noise of it) at all 16 BERT-base points of density
# 0.6 and 0.36, M 128 and 512.
_FP32_PROFILE = _GemmProfile(
    210e9, 4, ((16, 0.79), (32, 0.91), (64, 0.96), (128, 0.99)), ((16, 0.70), (32, 0.88), (64, 0.92), (128, 0.95))
)
# bf16 dense GEMMs run ~4x faster than fp32 here (oneDNN, AVX512-BF16) while the narrow batched ones
# gain much less (torch.bmm, M=256: width 16 / 32 / 64 -> 0.25 / 0.66 / 0.84 of dense), so the
# fixed costs weigh ~4x more: bf16 plans go sparse only at low density.
_BF16_PROFILE = _GemmProfile(
    900e9, 2, ((16, 0.25), (32, 0.6), (64, 0.8), (128, 0.9)), ((16, 0.25), (32, 0.6), (64, 0.8), (128, 0.9))
)


def _gemm_profile(compute_dtype: torch.dtype) -> _GemmProfile:
    return _BF16_PROFILE if compute_dtype == torch.bfloat16 else _FP32_PROFILE

_GATHER_BYTES_PER_S = 200e9  # index_select of whole [bs, rows] row-blocks, read + write
_DIRECT_GATHER_BYTES_PER_S = 130e9  # index_select of bs-element runs of x's rows, read + write (122e9 at M=512)
_TRANSPOSE_BYTES_PER_S = 20e9  # torch's 2-D transposed copy (single-threaded), read + write
_SECONDS_PER_CHUNK = 15e-6  # one gather + one batched GEMM issued from Python
# "gather_mm": torch loops over a chunk's units in C++, and MKL forks/joins both cores per unit;
# this fixed cost is what makes "gather_mm" lose to "gather_bmm" on narrow units at M ~ 128.
# Below a few rows MKL keeps such tiny GEMMs on one thread and the cost disappears (M=1:
# "gather_mm" 32us vs "gather_bmm" 122us at 768x768, 24 units).
_SECONDS_PER_LOOPED_UNIT = 3e-6
_ROWS_FOR_THREADED_UNIT_GEMM = 8
# An earlier measurement saw that per-unit fork/join collapse next to a busy process (random
# 768x768 at density 0.6: "gather_mm" 0.64x of dense, "gather_bmm" 0.99x), and "gather_mm" was then
# kept to plans without narrow-unit loops.  Re-measured with three kinds of neighbour (a spinning
# Python loop, 1- and 2-thread torch GEMM loops) on BERT-base shapes at densities 0.6 and 0.36:
# "gather_mm" was never behind "gather_bmm" by more than noise, and ahead by 10-17% where x is long
# or M = 512 (no transposes), so the cost model now chooses between them freely (that was before
# "gather_bmm" chunks were thread-balanced; since then it wins some M = 512 points too).
_SECONDS_PER_SPARSE_CALL = 30e-6  # argument checks, recipe lookup, bias permutation, output alloc
_SECONDS_PER_DENSE_CALL = 10e-6
# "native": rate per stored-block FLOP in the whole call (2 cores, M = 128-512, random layouts of
# 768x768 .. 3072x768 at densities 0.36-1.0).  fp32: 420-480 GFLOPS at bs 32 and 64, against ~210
# for MKL's dense GEMM; at bs 16 a block row is one vector, so the x broadcasts outnumber the FMAs'
# vector loads and the kernel is load-bound (250-340).  bf16 (vdpbf16ps): 870-1000 at bs 32 and 64,
# 400-500 at bs 16, against 600-980 for oneDNN's bf16 dense GEMM.
_NATIVE_FLOPS_PER_S = {
    torch.float32: {16: 260e9, 32: 440e9, 64: 450e9},
    torch.bfloat16: {16: 450e9, 32: 930e9, 64: 930e9},
}
_SECONDS_PER_NATIVE_CALL = 8e-6  # ctypes call, output allocation, OpenMP fork/join
# Stay dense unless the sparse path is predicted at least this much cheaper: the model is coarse,
# and "never slower than dense at high density" matters more than a few percent near the crossover.
_SPARSE_ADVANTAGE_REQUIRED = 0.95

# Upper bound on the gathered-x buffer of one batched GEMM: small enough to stay in the caches
# between the gather that writes it and the GEMM that reads it, large enough that the per-chunk
# Python cost stays small (2-16 MiB measured within noise of each other at M=128..512; 4 MiB was
# never worse and 16 MiB lost ~7% on long rows).
_GATHER_CHUNK_BYTES = 4 << 20
# x is processed in tiles of rows, so that the gathered [P*bs, rows] operand of one unit stays
# within a core's L2 (2 MiB here) while MKL streams the unit's weights over it: 256 rows when the
# units are short, 128 when they are long (measured, fp32 bs=32, P=35: 171 -> 187 GFLOPS).
_TILE_ROWS_CHOICES = (256, 128)
_UNIT_OPERAND_BYTES = 768 << 10
# Units at least this many features wide run one GEMM each: MKL's batched GEMM gives each unit to
# one thread, so a handful of wide units would leave a core idle; a single GEMM uses both.
_SOLO_UNIT_WIDTH = 128


def _gemm_efficiency(output_width: int, table: tuple[tuple[int, float], ...]) -> float:
    efficiency = table[0][1]
    for width, value in table:
        if output_width >= width:
            efficiency = value
    return efficiency


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # torch's CPU fp16 GEMMs run at ~6 GFLOPS in bmm (and ~50 in F.linear) on CPUs without native
    # fp16 FMA, versus ~200 in fp32: compute fp16 in fp32 and round once at the end.  bf16 has fast
    # oneDNN kernels (fp32 accumulation) and stays bf16.
    return torch.float32 if dtype == torch.float16 else dtype


@dataclass(frozen=True)
class GatherBucket:
    """Units of identical shape run as one batched GEMM.

    Every unit covers `rows_per_unit` (G) block-rows that share one list of block-columns, padded to
    `blocks_per_unit` (P) entries.  Its output lands in slots `first_slot + u*G ... + G - 1`.
    """

    rows_per_unit: int
    blocks_per_unit: int
    unit_count: int
    first_slot: int
    # [U * P] int64 block-columns of x to gather, or None when the bucket is a single unit reading a
    # contiguous range of block-columns (a view of x is then enough: no copy at all).
    gather_index: torch.Tensor | None
    first_block_column: int
    # [U, P*bs, G*bs]: the unit's blocks transposed, so that gathered_x [M, P*bs] @ this = y slice.
    packed_weight_t: torch.Tensor


_plan_tokens = itertools.count()


class CpuBlockSparsePlan:
    """Precomputed CPU layout of one block-sparse weight (see the module docstring).

    Inspect `strategy` (dense or sparse, decided at `_REFERENCE_TOKENS` rows of x),
    `strategy_for(M)` (the sparse strategy a call with M rows runs), `estimated_seconds` /
    `estimate_seconds(M)` (the cost model) and `buckets`; `describe()` summarises them.
    """

    def __init__(
        self,
        *,
        out_features: int,
        in_features: int,
        block_size: int,
        nnz_blocks: int,
        strategy: str,
        estimated_seconds: dict[str, float],
        buckets: tuple[GatherBucket, ...],
        slot_of_block_row: torch.Tensor,
        block_row_of_slot: torch.Tensor,
        nonempty_slot_count: int,
        dense_weight: torch.Tensor | None,
        strategy_forced: bool,
        weight_dtype: torch.dtype,
        bucket_shapes: list[tuple[int, int, int, bool]],
        native_weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        native_dtype: torch.dtype | None = None,
    ) -> None:
        self.out_features = out_features
        self.in_features = in_features
        self.block_size = block_size
        self.nnz_blocks = nnz_blocks
        self.strategy = strategy
        self.estimated_seconds = estimated_seconds
        self.buckets = buckets
        self.slot_of_block_row = slot_of_block_row
        self.block_row_of_slot = block_row_of_slot
        self.nonempty_slot_count = nonempty_slot_count
        self.dense_weight = dense_weight
        # "native" plans: (blocks in the kernel's layout, `pack_blocks`; row_offsets, col_indices int64).
        self.native_weight = native_weight
        # What "native" computes in for this plan (None: it cannot run "native").
        self.native_dtype = native_dtype
        # A forced strategy is used for every M; a chosen sparse one may switch orientation per M.
        self.strategy_forced = strategy_forced
        self.weight_dtype = weight_dtype  # dtype the weights are kept in (and the cost model assumes)
        self._strategy_by_rows: dict[int, str] = {}
        self._bucket_shapes = bucket_shapes  # (G, P, units, gathers) per bucket, kept for the cost model
        # Slot order equal to feature order lets the buckets write the final output directly.
        self.slots_in_feature_order = bool(
            torch.equal(slot_of_block_row, torch.arange(slot_of_block_row.numel()))
        )
        gathered_units = [b for b in buckets if b.gather_index is not None]
        unit_count = sum(b.unit_count for b in gathered_units)
        mean_unit_k = (
            sum(b.unit_count * b.blocks_per_unit for b in gathered_units) * block_size / unit_count
            if unit_count
            else 0
        )
        self.tile_rows = next(
            (rows for rows in _TILE_ROWS_CHOICES if mean_unit_k * rows * 4 <= _UNIT_OPERAND_BYTES),
            _TILE_ROWS_CHOICES[-1],
        )
        # Weights by compute dtype; other dtypes (e.g. an fp32 plan called with bf16 x) are converted
        # on first use and kept.
        self._converted: dict[torch.dtype, tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]] = {
            weight_dtype: (dense_weight, tuple(b.packed_weight_t for b in buckets))
        }
        self._token = next(_plan_tokens)  # identifies the plan in per-thread call recipes

    def estimate_seconds(self, rows_of_x: int) -> dict[str, float]:
        """The cost model's prediction of every strategy for `rows_of_x` rows of x."""
        return _modelled_seconds(
            self.out_features,
            self.in_features,
            self.block_size,
            self._bucket_shapes,
            self.slots_in_feature_order,
            rows_of_x,
            _gemm_profile(self.weight_dtype),
            self.nnz_blocks,
            self.native_dtype,
        )

    def strategy_for(self, rows_of_x: int) -> str:
        """Strategy a call with `rows_of_x` rows runs.

        Dense-versus-sparse is decided once, at the reference M (a dense plan does not keep the
        blocks, a sparse one does not keep a dense weight).  Between the two sparse strategies the
        cheaper one for this M by the cost model is used: "gather_bmm" for many narrow units at small
        M (e.g. 3072 outputs at M = 128), "gather_mm" for wide units, long rows of x or large M.
        """
        if self.strategy_forced or self.strategy in (STRATEGY_DENSE, STRATEGY_NATIVE):
            return self.strategy
        strategy = self._strategy_by_rows.get(rows_of_x)
        if strategy is None:
            strategy = _cheapest(self.estimate_seconds(rows_of_x), _TORCH_SPARSE_STRATEGIES)
            if len(self._strategy_by_rows) < _MAX_RECIPES_PER_THREAD:
                self._strategy_by_rows[rows_of_x] = strategy
        return strategy

    @property
    def density(self) -> float:
        total = (self.out_features // self.block_size) * (self.in_features // self.block_size)
        return self.nnz_blocks / total if total else 0.0

    def describe(self) -> str:
        shapes = ", ".join(
            f"{b.unit_count}x(G={b.rows_per_unit},P={b.blocks_per_unit}"
            f"{'' if b.gather_index is not None else ',no-gather'})"
            for b in self.buckets
        )
        costs = ", ".join(f"{k}={v * 1e3:.3f}ms" for k, v in self.estimated_seconds.items())
        return (
            f"CpuBlockSparsePlan({self.out_features}x{self.in_features}, bs={self.block_size}, "
            f"density={self.density:.3f}, strategy={self.strategy}, est@M={_REFERENCE_TOKENS}: {costs}; "
            f"buckets: {shapes or 'none'})"
        )

    __repr__ = describe

    def _weights_for(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]:
        """(dense weight, per-bucket packed weights) in `dtype`, converted once and kept."""
        weights = self._converted.get(dtype)
        if weights is None:
            dense = None if self.dense_weight is None else self.dense_weight.to(dtype)
            weights = self._converted[dtype] = (dense, tuple(b.packed_weight_t.to(dtype) for b in self.buckets))
        return weights


# --- Plan building --------------------------------------------------------------------------


@dataclass
class _Unit:
    block_rows: list[int]
    block_columns: list[int]  # ascending, shared by all block_rows


def _gemm_and_gather_seconds(rows_per_unit: int, blocks: int, units: int, block_size: int, gathers: bool,
                             tokens: int, profile: _GemmProfile, efficiency_by_width, gather_bytes_per_s: float) -> float:
    """Modelled time of a bucket's GEMMs (narrow outputs run below dense efficiency) and x gathers."""
    width = rows_per_unit * block_size
    flops = 2 * units * blocks * block_size * width * tokens
    seconds = flops / (profile.dense_flops_per_s * _gemm_efficiency(width, efficiency_by_width))
    if gathers:
        seconds += 2 * units * blocks * block_size * tokens * profile.element_size / gather_bytes_per_s
    return seconds


def _bucket_seconds(
    rows_per_unit: int,
    blocks: int,
    units: int,
    block_size: int,
    gathers: bool,
    tokens: int = _REFERENCE_TOKENS,
    profile: _GemmProfile = _FP32_PROFILE,
) -> float:
    """Modelled "gather_bmm" time of one bucket: its GEMMs, its gathers and its chunks' calls."""
    seconds = _gemm_and_gather_seconds(rows_per_unit, blocks, units, block_size, gathers, tokens, profile,
                                       profile.bmm_efficiency_by_width, _GATHER_BYTES_PER_S)
    tile_rows = min(tokens, _TILE_ROWS_CHOICES[0])
    units_per_chunk = _units_per_chunk(rows_per_unit, blocks, block_size, tile_rows, profile.element_size)
    return seconds + _SECONDS_PER_CHUNK * -(-units // units_per_chunk) * -(-tokens // tile_rows)


def _units_per_chunk(rows_per_unit: int, blocks: int, block_size: int, rows_of_x: int, element_size: int) -> int:
    if rows_per_unit * block_size >= _SOLO_UNIT_WIDTH:
        return 1
    return max(1, _GATHER_CHUNK_BYTES // (blocks * block_size * rows_of_x * element_size))


def _direct_bucket_seconds(
    rows_per_unit: int,
    blocks: int,
    units: int,
    block_size: int,
    gathers: bool,
    tokens: int = _REFERENCE_TOKENS,
    profile: _GemmProfile = _FP32_PROFILE,
) -> float:
    """`_bucket_seconds` for "gather_mm"."""
    seconds = _gemm_and_gather_seconds(rows_per_unit, blocks, units, block_size, gathers, tokens, profile,
                                       profile.mm_efficiency_by_width, _DIRECT_GATHER_BYTES_PER_S)
    chunks = -(-units // _units_per_chunk(rows_per_unit, blocks, block_size, tokens, profile.element_size))
    looped = chunks < units and tokens >= _ROWS_FOR_THREADED_UNIT_GEMM
    return seconds + _SECONDS_PER_CHUNK * chunks + _SECONDS_PER_LOOPED_UNIT * (units if looped else 0)


def _cheapest(estimate: dict[str, float], candidates: tuple[str, ...]) -> str:
    return min((s for s in candidates if s in estimate), key=estimate.__getitem__)


def _native_usable(block_size: int) -> bool:
    """Whether a plan can run "native" (any weight dtype: see `_native_dtype`)."""
    return block_size in NATIVE_BLOCK_SIZES and native_available()


def _native_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """What "native" computes in: bf16 plans in bf16 where the CPU has AVX512_BF16, else fp32."""
    return torch.bfloat16 if weight_dtype == torch.bfloat16 and torch.bfloat16 in native_dtypes() else torch.float32


def _modelled_seconds(
    n: int,
    k: int,
    block_size: int,
    buckets: list[tuple[int, int, int, bool]],
    in_feature_order: bool,
    tokens: int,
    profile: _GemmProfile,
    nnz_blocks: int = 0,
    native_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Predicted time of every strategy for `tokens` rows of x; buckets are (G, P, units, gathers).

    "native" is predicted only for a plan that can run it, computing in `native_dtype`.
    """
    element_size = profile.element_size
    reorder = 0.0 if in_feature_order else 2 * n * tokens * element_size / _GATHER_BYTES_PER_S
    # "gather_bmm" pays two transposed copies: x^T in, y^T out.
    transposes = 2 * (n + k) * tokens * element_size / _TRANSPOSE_BYTES_PER_S
    seconds = {
        STRATEGY_DENSE: _SECONDS_PER_DENSE_CALL + 2 * n * k * tokens / profile.dense_flops_per_s,
        STRATEGY_GATHER_BMM: _SECONDS_PER_SPARSE_CALL
        + transposes
        + reorder
        + sum(_bucket_seconds(g, p, u, block_size, gathers, tokens, profile) for g, p, u, gathers in buckets),
        STRATEGY_GATHER_MM: _SECONDS_PER_SPARSE_CALL
        + reorder
        + sum(_direct_bucket_seconds(g, p, u, block_size, gathers, tokens, profile) for g, p, u, gathers in buckets),
    }
    if native_dtype is not None:
        flops = 2 * nnz_blocks * block_size * block_size * tokens
        seconds[STRATEGY_NATIVE] = _SECONDS_PER_NATIVE_CALL + flops / _NATIVE_FLOPS_PER_S[native_dtype][block_size]
    return seconds


def _split_into_buckets(units: list[_Unit], rows_per_unit: int, block_size: int) -> tuple[list[list[_Unit]], float]:
    """Partition same-G units (sorted by block count) into buckets minimising the modelled time.

    Returns the buckets and their modelled "gather_bmm" seconds (`_bucket_seconds` summed).

    Padding every unit of a bucket to its longest wastes GEMM work; every extra bucket costs a call.
    Units with equal block counts always share a bucket, so the DP runs over distinct counts only.
    """
    units = sorted(units, key=lambda u: (len(u.block_columns), u.block_rows[0]))
    counts = sorted({len(u.block_columns) for u in units})
    units_with_count = [sum(1 for u in units if len(u.block_columns) == c) for c in counts]
    best = [0.0] + [math.inf] * len(counts)
    cut = [0] * (len(counts) + 1)
    for end in range(1, len(counts) + 1):
        members = 0
        for start in range(end - 1, -1, -1):
            members += units_with_count[start]
            cost = best[start] + _bucket_seconds(rows_per_unit, counts[end - 1], members, block_size, True)
            if cost < best[end]:
                best[end], cut[end] = cost, start
    boundaries = []
    end = len(counts)
    while end > 0:
        boundaries.append((cut[end], end))
        end = cut[end]
    buckets, first = [], 0
    for start, end in reversed(boundaries):
        size = sum(units_with_count[start:end])
        buckets.append(units[first : first + size])
        first += size
    return buckets, best[-1]


def _bucketed(units: list[_Unit], block_size: int) -> tuple[list[list[_Unit]], float]:
    """Units split into buckets (by rows per unit, then `_split_into_buckets`) and their modelled seconds."""
    by_rows_per_unit: dict[int, list[_Unit]] = {}
    for unit in units:
        by_rows_per_unit.setdefault(len(unit.block_rows), []).append(unit)
    buckets, seconds = [], 0.0
    for rows_per_unit in sorted(by_rows_per_unit):
        split, split_seconds = _split_into_buckets(by_rows_per_unit[rows_per_unit], rows_per_unit, block_size)
        buckets += split
        seconds += split_seconds
    return buckets, seconds


def _group_block_rows(col_lists: list[list[int]], block_size: int) -> list[list[_Unit]]:
    """Buckets of units: block-rows with one column pattern share a unit where that is cheaper.

    Sharing saves the repeated gathers and widens the GEMM; each distinct unit width costs buckets
    of its own. Judged per pattern, a lone shared unit rarely pays for its bucket, but many (the
    block-rows of every head sharing a pattern, say) fill common buckets: so the whole plan is
    modelled both ways (shared where the unit itself is cheaper, and every row alone) and the
    cheaper one is kept.
    """
    by_pattern: dict[tuple[int, ...], list[int]] = {}
    for row, cols in enumerate(col_lists):
        if cols:
            by_pattern.setdefault(tuple(cols), []).append(row)
    shared, separate = [], []
    for pattern, rows in by_pattern.items():
        singles = [_Unit([row], list(pattern)) for row in rows]
        separate.extend(singles)
        blocks = len(pattern)
        # Bucket call costs left out on both sides: they depend on what the unit shares a bucket with.
        unit_seconds = _bucket_seconds(len(rows), blocks, 1, block_size, True) - _SECONDS_PER_CHUNK
        singles_seconds = len(rows) * (_bucket_seconds(1, blocks, 1, block_size, True) - _SECONDS_PER_CHUNK)
        if len(rows) > 1 and unit_seconds <= singles_seconds:
            shared.append(_Unit(rows, list(pattern)))
        else:
            shared.extend(singles)
    candidates = [_bucketed(separate, block_size)]
    if len(shared) < len(separate):
        candidates.append(_bucketed(shared, block_size))
    return min(candidates, key=lambda candidate: candidate[1])[0]


def _reads_contiguous_columns(units: list[_Unit]) -> bool:
    """A lone unit over a contiguous range of block-columns reads a view of x: no gather."""
    cols = units[0].block_columns
    return len(units) == 1 and cols == list(range(cols[0], cols[0] + len(cols)))


def _pack_bucket(
    units: list[_Unit], first_slot: int, values: torch.Tensor, row_starts: list[int], block_size: int
) -> GatherBucket:
    bs = block_size
    rows_per_unit = len(units[0].block_rows)
    blocks = max(len(u.block_columns) for u in units)
    packed = values.new_zeros(len(units), blocks, bs, rows_per_unit, bs)
    gather_index = torch.empty(len(units), blocks, dtype=torch.int64)
    for u, unit in enumerate(units):
        cols = unit.block_columns
        # Padding re-reads the unit's own last block-column against zero weights: a non-finite x
        # value can then only reach outputs that this unit already reads it into.
        gather_index[u] = torch.tensor(cols + [cols[-1]] * (blocks - len(cols)), dtype=torch.int64)
        for g, row in enumerate(unit.block_rows):
            start = row_starts[row]
            # values[i] is W[r-block, c-block] = [bs_out, bs_in]; the GEMM wants [bs_in, bs_out].
            packed[u, : len(cols), :, g, :] = values[start : start + len(cols)].transpose(1, 2)
    packed_t = packed.reshape(len(units), blocks * bs, rows_per_unit * bs).contiguous()
    first_col = units[0].block_columns[0]
    return GatherBucket(
        rows_per_unit=rows_per_unit,
        blocks_per_unit=blocks,
        unit_count=len(units),
        first_slot=first_slot,
        gather_index=None if _reads_contiguous_columns(units) else gather_index.reshape(-1),
        first_block_column=first_col,
        packed_weight_t=packed_t,
    )


def build_cpu_plan(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    in_features: int,
    block_size: int,
    *,
    strategy: str | None = None,
    native: bool = True,
) -> CpuBlockSparsePlan:
    """Lay a BSR weight out for `cpu_block_sparse_linear`.

    `strategy=None` lets the cost model choose; pass one of `STRATEGIES` to force it (tests,
    benchmarks).  `native=False` keeps the choice to the pure-torch strategies (to compare).
    The weight is copied: later changes to `values` are not seen by the plan.
    """
    n, k, bs = int(out_features), int(in_features), int(block_size)
    if bs <= 0 or n % bs or k % bs:
        raise ValueError(f"block_size {bs} must divide out_features {n} and in_features {k}")
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    block_rows, block_cols = n // bs, k // bs
    if tuple(row_offsets.shape) != (block_rows + 1,):
        raise ValueError(f"row_offsets must have {block_rows + 1} entries, got {tuple(row_offsets.shape)}")
    nnz = int(col_indices.numel())
    if values.dim() != 3 or tuple(values.shape) != (nnz, bs, bs):
        raise ValueError(f"values must be [nnz={nnz}, {bs}, {bs}], got {tuple(values.shape)}")
    if values.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"values dtype must be one of {SUPPORTED_DTYPES}, got {values.dtype}")

    weight_dtype = _compute_dtype(values.dtype)
    values = values.detach().to(device="cpu", dtype=weight_dtype)
    row_starts = [int(v) for v in row_offsets.tolist()]
    cols_flat = [int(v) for v in col_indices.tolist()]
    if row_starts[0] != 0 or row_starts[-1] != nnz or any(a > b for a, b in zip(row_starts, row_starts[1:])):
        raise ValueError("row_offsets must start at 0, end at nnz and be non-decreasing")
    col_lists = [cols_flat[row_starts[r] : row_starts[r + 1]] for r in range(block_rows)]
    for cols in col_lists:
        if any(not 0 <= c < block_cols for c in cols) or any(a >= b for a, b in zip(cols, cols[1:])):
            raise ValueError("col_indices must be in range and strictly ascending within each block-row")

    bucket_units = _group_block_rows(col_lists, bs)

    first_slots, slot_rows = [], []
    for members in bucket_units:
        first_slots.append(len(slot_rows))
        for unit in members:
            slot_rows.extend(unit.block_rows)
    nonempty_slots = len(slot_rows)
    slot_rows.extend(r for r in range(block_rows) if not col_lists[r])
    block_row_of_slot = torch.tensor(slot_rows, dtype=torch.int64)
    slot_of_block_row = torch.empty(block_rows, dtype=torch.int64)
    slot_of_block_row[block_row_of_slot] = torch.arange(block_rows, dtype=torch.int64)

    in_feature_order = bool(torch.equal(slot_of_block_row, torch.arange(block_rows)))
    bucket_shapes = [
        (len(members[0].block_rows), max(len(u.block_columns) for u in members), len(members),
         not _reads_contiguous_columns(members))
        for members in bucket_units
    ]
    profile = _gemm_profile(weight_dtype)
    native_usable = _native_usable(bs)
    if strategy == STRATEGY_NATIVE and not native_usable:
        why = f"it runs block sizes {NATIVE_BLOCK_SIZES}, not {bs}" if native_available() else native_status()
        raise ValueError(f"strategy 'native' cannot run this plan: {why}")
    # What "native" would compute in; None where it is not usable or not asked for.
    native_dtype = _native_dtype(weight_dtype) if native_usable and (native or strategy == STRATEGY_NATIVE) else None
    estimated = _modelled_seconds(n, k, bs, bucket_shapes, in_feature_order, _REFERENCE_TOKENS, profile, nnz,
                                  native_dtype)
    forced = strategy is not None
    if strategy is None:
        sparse = _cheapest(estimated, tuple(s for s in STRATEGIES if s != STRATEGY_DENSE))
        sparse_wins = estimated[sparse] < _SPARSE_ADVANTAGE_REQUIRED * estimated[STRATEGY_DENSE]
        strategy = sparse if sparse_wins else STRATEGY_DENSE

    # Each plan keeps only the weights its strategy reads.
    dense_weight, native_weight, buckets = None, None, []
    if strategy == STRATEGY_DENSE:
        dense_weight = bsr_to_dense(values, row_offsets.cpu(), col_indices.cpu(), (n, k))
    elif strategy == STRATEGY_NATIVE:
        native_weight = (
            pack_blocks(values, native_dtype),
            torch.as_tensor(row_starts, dtype=torch.int64),
            torch.as_tensor(cols_flat, dtype=torch.int64),
        )
    else:
        buckets = [
            _pack_bucket(members, first_slot, values, row_starts, bs)
            for members, first_slot in zip(bucket_units, first_slots)
        ]
    return CpuBlockSparsePlan(
        out_features=n,
        in_features=k,
        block_size=bs,
        nnz_blocks=nnz,
        strategy=strategy,
        estimated_seconds=estimated,
        buckets=tuple(buckets),
        slot_of_block_row=slot_of_block_row,
        block_row_of_slot=block_row_of_slot,
        nonempty_slot_count=nonempty_slots,
        dense_weight=dense_weight,
        strategy_forced=forced,
        weight_dtype=weight_dtype,
        bucket_shapes=bucket_shapes,
        native_weight=native_weight,
        native_dtype=native_dtype,
    )


# --- Execution ------------------------------------------------------------------------------


class _ThreadWorkspace(threading.local):
    """Scratch buffers and per-shape call recipes of the calling thread.

    Buffers are shared by every plan (layers run one after another), so the scratch memory is
    that of the largest layer, not the sum.  Reuse matters: fresh multi-MiB buffers come from
    mmap and pay a page fault per 4 KiB on every call.  A recipe holds the views of one
    (plan, M, dtype) call so that a call only issues the torch ops themselves; growing a buffer
    drops every recipe, since their views point into the old one.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        # (plan token, M, dtype, strategy) -> _TransposedRecipe | _DirectRecipe
        self.recipes: dict[tuple[int, int, torch.dtype, str], object] = {}


_workspace = _ThreadWorkspace()
_MAX_RECIPES_PER_THREAD = 256


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    buffer = _workspace.buffers.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        _workspace.recipes.clear()
        # Created outside inference mode so that a buffer first made under torch.inference_mode()
        # can still be written by a later call made without it.
        with torch.inference_mode(False):
            buffer = torch.empty(max(numel, 1), dtype=dtype)
        _workspace.buffers[(name, dtype)] = buffer
    return buffer[:numel]


def _scratch_views(sizes: dict[str, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`_scratch` for several buffers at once: all are grown first, since growing one drops the
    recipes (and so the views) made so far."""
    for name, numel in sizes.items():
        _scratch(name, numel, dtype)
    return {name: _scratch(name, numel, dtype) for name, numel in sizes.items()}


def _fill_empty_slots(empty_slots: torch.Tensor, empty_bias: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Outputs of block-rows without blocks: the bias (already in slot order in `empty_bias`), or 0."""
    if bias is None:
        empty_slots.zero_()
    else:
        empty_slots.copy_(empty_bias.expand_as(empty_slots))


def _chunks(plan: CpuBlockSparsePlan, rows_of_x: int, element_size: int,
            threads: int | None = None) -> list[list[tuple[int, int]]]:
    """Per bucket, the (first unit, unit count) of each batched GEMM.

    A batched GEMM gives each unit to one thread, so a chunk whose count is not a multiple of the
    thread count leaves threads idle at its end (on 2 threads, 5 units take as long as 6).
    Chunks are therefore multiples of `threads` (default: torch's thread count), and the units
    left over run one by one, as single GEMMs split over every thread.
    """
    threads = max(1, threads or torch.get_num_threads())
    out = []
    for bucket in plan.buckets:
        per_chunk = _units_per_chunk(
            bucket.rows_per_unit, bucket.blocks_per_unit, plan.block_size, rows_of_x, element_size
        )
        bucket_chunks, first = [], 0
        while first < bucket.unit_count:
            count = min(per_chunk, bucket.unit_count - first)
            if count > 1 and count % threads:
                count = max(count - count % threads, 1)
            bucket_chunks.append((first, count))
            first += count
        out.append(bucket_chunks)
    return out


def _gather_numel(plan: CpuBlockSparsePlan, chunks: list[list[tuple[int, int]]], rows_of_x: int) -> int:
    return max(
        (count * b.blocks_per_unit * plan.block_size * rows_of_x
         for b, bucket_chunks in zip(plan.buckets, chunks) if b.gather_index is not None
         for _, count in bucket_chunks),
        default=0,
    )


@dataclass
class _TileRecipe:
    """"gather_bmm" views for one tile of rows of x."""

    first_row: int
    end_row: int
    x_t: torch.Tensor  # [K, mt] scratch receiving x[first_row:end_row]^T
    x_t_blocks: torch.Tensor  # the same, [K/bs, bs*mt]: one row per block-column of x
    slots_t: torch.Tensor  # [slots, bs, mt] slot-ordered y^T of the tile
    empty_slots_t: torch.Tensor  # [empty, bs, mt] view of slots_t
    feature_rows_t: torch.Tensor | None  # [N/bs, bs*mt] y^T back in feature order (None: slots already are)
    # Per chunk: (gather index | None, gather out [n*P, bs*mt], B [n, P*bs, mt], A [n, G*bs, P*bs],
    # out [n, G*bs, mt], bias [n, G*bs, 1]).
    steps: list[tuple]


@dataclass
class _TransposedRecipe:
    tiles: list[_TileRecipe]
    bias_slots: torch.Tensor  # [slots, bs]
    empty_bias: torch.Tensor  # [empty, bs, 1] view of bias_slots


@dataclass
class _DirectRecipe:
    """"gather_mm" views for one M."""

    slots: torch.Tensor  # [M, slots, bs] slot-ordered y
    empty_slots: torch.Tensor  # [M, empty, bs] view of slots
    bias_slots: torch.Tensor  # [slots, bs]
    empty_bias: torch.Tensor  # [1, empty, bs] view of bias_slots
    # (gather index | None, gather out [M, n*P, bs] | first feature of x, A, W, out, bias); A, W, out
    # and bias are 2-D for single-unit chunks (one multi-threaded GEMM) and 3-D otherwise.
    steps: list[tuple]


def _tile_bounds(m: int, tile_rows: int) -> list[tuple[int, int]]:
    count = max(1, -(-m // tile_rows))
    bounds = [m * i // count for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _build_transposed_recipe(
    plan: CpuBlockSparsePlan, m: int, dtype: torch.dtype, packed: tuple[torch.Tensor, ...]
) -> _TransposedRecipe:
    bs, n, k = plan.block_size, plan.out_features, plan.in_features
    slots = n // bs
    tiles = _tile_bounds(m, plan.tile_rows)
    widest = max(end - start for start, end in tiles)
    chunks = _chunks(plan, widest, torch.empty((), dtype=dtype).element_size())

    buffer = _scratch_views({
        "x_t": k * widest,
        "slots_t": slots * bs * widest,
        "feature_rows_t": 0 if plan.slots_in_feature_order else n * widest,
        "gather": _gather_numel(plan, chunks, widest),
        "bias": slots * bs,
    }, dtype)
    bias_slots = buffer["bias"].view(slots, bs)
    empty = plan.nonempty_slot_count

    tile_recipes = []
    for first_row, end_row in tiles:
        mt = end_row - first_row
        x_t = buffer["x_t"][: k * mt].view(k, mt)
        slots_t = buffer["slots_t"][: slots * bs * mt].view(slots, bs, mt)
        feature_rows_t = None
        if not plan.slots_in_feature_order:
            feature_rows_t = buffer["feature_rows_t"][: n * mt].view(slots, bs * mt)
        steps = []
        for bucket, weight_t, bucket_chunks in zip(plan.buckets, packed, chunks):
            rows, blocks = bucket.rows_per_unit, bucket.blocks_per_unit
            for first, count in bucket_chunks:
                slot = bucket.first_slot + first * rows
                # The weights are stored [P*bs, G*bs]; their transposed view is what MKL's batched
                # GEMM wants as A (it accepts transposed items without a copy).
                weight = weight_t[first : first + count].transpose(1, 2)
                out = slots_t[slot : slot + count * rows].view(count, rows * bs, mt)
                bias = bias_slots[slot : slot + count * rows].view(count, rows * bs, 1)
                if bucket.gather_index is None:
                    start = bucket.first_block_column * bs
                    steps.append((None, None, x_t[start : start + blocks * bs].unsqueeze(0), weight, out, bias))
                else:
                    index = bucket.gather_index[first * blocks : (first + count) * blocks]
                    flat = buffer["gather"][: count * blocks * bs * mt].view(count * blocks, bs * mt)
                    steps.append((index, flat, flat.view(count, blocks * bs, mt), weight, out, bias))
        tile_recipes.append(
            _TileRecipe(
                first_row, end_row, x_t, x_t.view(k // bs, bs * mt), slots_t, slots_t[empty:], feature_rows_t, steps
            )
        )
    return _TransposedRecipe(tile_recipes, bias_slots, bias_slots[empty:].unsqueeze(-1))


def _build_direct_recipe(
    plan: CpuBlockSparsePlan, m: int, dtype: torch.dtype, packed: tuple[torch.Tensor, ...]
) -> _DirectRecipe:
    bs, n = plan.block_size, plan.out_features
    slots = n // bs
    chunks = _chunks(plan, m, torch.empty((), dtype=dtype).element_size())
    buffer = _scratch_views({"slots": m * n, "gather": _gather_numel(plan, chunks, m), "bias": n}, dtype)
    out_slots = buffer["slots"].view(m, slots, bs)
    bias_slots = buffer["bias"].view(slots, bs)
    empty = plan.nonempty_slot_count

    steps = []
    for bucket, weight_t, bucket_chunks in zip(plan.buckets, packed, chunks):
        rows, blocks = bucket.rows_per_unit, bucket.blocks_per_unit
        for first, count in bucket_chunks:
            slot = bucket.first_slot + first * rows
            out = out_slots[:, slot : slot + count * rows].view(m, count, rows * bs).transpose(0, 1)
            weight = weight_t[first : first + count]
            bias = bias_slots[slot : slot + count * rows].view(count, 1, rows * bs)
            if bucket.gather_index is None:
                gathered = None
                source = bucket.first_block_column * bs  # the unit reads x[:, source : source + P*bs]
                index = None
            else:
                index = bucket.gather_index[first * blocks : (first + count) * blocks]
                source = buffer["gather"][: m * count * blocks * bs].view(m, count * blocks, bs)
                # [n, M, P*bs]: per unit a row-major matrix with leading dimension n*P*bs.
                gathered = source.view(m, count, blocks * bs).transpose(0, 1)
            if count == 1:
                # A lone unit: a plain 2-D GEMM, which MKL splits over both cores.
                out, weight, bias = out[0], weight[0], bias[0]
                gathered = None if gathered is None else gathered[0]
            steps.append((index, source, gathered, weight, out, bias, blocks * bs))
    return _DirectRecipe(out_slots, out_slots[:, empty:], bias_slots, bias_slots[empty:].unsqueeze(0), steps)


def _recipe_for(plan: CpuBlockSparsePlan, m: int, dtype: torch.dtype, packed: tuple[torch.Tensor, ...], strategy: str):
    key = (plan._token, m, dtype, strategy, torch.get_num_threads())  # chunks follow the thread count
    recipe = _workspace.recipes.get(key)
    if recipe is None:
        if len(_workspace.recipes) >= _MAX_RECIPES_PER_THREAD:
            _workspace.recipes.clear()
        build = _build_direct_recipe if strategy == STRATEGY_GATHER_MM else _build_transposed_recipe
        recipe = build(plan, m, dtype, packed)
        _workspace.recipes[key] = recipe
    return recipe


def _run_gather_bmm(
    x2d: torch.Tensor, plan: CpuBlockSparsePlan, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    """y^T = W x^T, tile by tile of `plan.tile_rows` rows of x (see the module docstring)."""
    m = x2d.shape[0]
    bs = plan.block_size
    _, packed = plan._weights_for(compute_dtype)
    recipe = _recipe_for(plan, m, compute_dtype, packed, STRATEGY_GATHER_BMM)
    if bias is not None:
        torch.index_select(bias.view(-1, bs), 0, plan.block_row_of_slot, out=recipe.bias_slots)
    has_empty = plan.nonempty_slot_count < plan.out_features // bs
    y = torch.empty(m, plan.out_features, dtype=x2d.dtype)
    for tile in recipe.tiles:
        # x^T once per tile, so that gathering a block-column of x is copying one contiguous
        # [bs, mt] row-block (converting fp16 to fp32 in the same pass).
        tile.x_t.copy_(x2d[tile.first_row : tile.end_row].t())
        if has_empty:
            _fill_empty_slots(tile.empty_slots_t, recipe.empty_bias, bias)
        x_t_blocks = tile.x_t_blocks
        for index, gathered_flat, gathered, weight, out, bias_view in tile.steps:
            if index is not None:
                torch.index_select(x_t_blocks, 0, index, out=gathered_flat)
            # One batched GEMM per chunk of same-shape units; MKL gives each unit to one thread,
            # which beats splitting every narrow GEMM across the two cores.
            if bias is None:
                torch.bmm(weight, gathered, out=out)
            else:
                torch.baddbmm(bias_view, weight, gathered, out=out)
        feature_rows_t = tile.feature_rows_t
        if feature_rows_t is None:
            feature_rows_t = tile.slots_t.view(-1, tile.slots_t.shape[-1])
        else:
            # Slots back into feature order: whole [bs, mt] rows, a plain memcpy each.
            slot_rows_t = tile.slots_t.view(tile.slots_t.shape[0], -1)
            torch.index_select(slot_rows_t, 0, plan.slot_of_block_row, out=feature_rows_t)
        # y^T -> y: a 2-D transposed copy, which torch runs as a cache-blocked transpose.
        y[tile.first_row : tile.end_row].copy_(feature_rows_t.view(plan.out_features, -1).t())
    return y


def _run_gather_mm(
    x2d: torch.Tensor, plan: CpuBlockSparsePlan, bias: torch.Tensor | None, compute_dtype: torch.dtype
) -> torch.Tensor:
    """y = x W^T unit by unit on x as it is (see the module docstring)."""
    m = x2d.shape[0]
    bs = plan.block_size
    _, packed = plan._weights_for(compute_dtype)
    recipe = _recipe_for(plan, m, compute_dtype, packed, STRATEGY_GATHER_MM)
    x = x2d.to(compute_dtype)
    # [M, K/bs, bs]: a view whenever x's rows are unit-stride; gathering along dim 1 then copies
    # bs-element runs.
    x_blocks = x.reshape(m, plan.in_features // bs, bs)
    if bias is not None:
        torch.index_select(bias.view(-1, bs), 0, plan.block_row_of_slot, out=recipe.bias_slots)
    if plan.nonempty_slot_count < plan.out_features // bs:
        _fill_empty_slots(recipe.empty_slots, recipe.empty_bias, bias)
    for index, source, gathered, weight, out, bias_view, width in recipe.steps:
        if index is None:
            gathered = x[:, source : source + width]
            if out.dim() == 3:
                gathered = gathered.unsqueeze(0)
        else:
            torch.index_select(x_blocks, 1, index, out=source)
        if out.dim() == 2:
            if bias is None:
                torch.mm(gathered, weight, out=out)
            else:
                torch.addmm(bias_view, gathered, weight, out=out)
        elif bias is None:
            torch.bmm(gathered, weight, out=out)
        else:
            torch.baddbmm(bias_view, gathered, weight, out=out)
    # Slots back into feature order: bs-element runs of each row (also the copy out of scratch).
    y = torch.index_select(recipe.slots, 1, plan.slot_of_block_row).view(m, plan.out_features)
    return y if y.dtype == x2d.dtype else y.to(x2d.dtype)


def cpu_block_sparse_linear(
    x2d: torch.Tensor, plan: CpuBlockSparsePlan, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`x2d [M, K] @ W^T + bias` -> `[M, N]` (contiguous, dtype of x2d), W as laid out in `plan`.

    fp32 and bf16 compute in their own dtype (bf16 with fp32 accumulation inside oneDNN); fp16 is
    computed in fp32 and rounded once.  Inference only: raises if autograd would need a graph.
    """
    if x2d.dim() != 2 or x2d.shape[1] != plan.in_features:
        raise ValueError(f"x2d must be [M, {plan.in_features}], got {tuple(x2d.shape)}")
    if x2d.device.type != "cpu":
        raise ValueError(f"cpu_block_sparse_linear runs on CPU tensors, got {x2d.device}")
    if x2d.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x2d dtype must be one of {SUPPORTED_DTYPES}, got {x2d.dtype}")
    if bias is not None and tuple(bias.shape) != (plan.out_features,):
        raise ValueError(f"bias must be [{plan.out_features}], got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and (x2d.requires_grad or (bias is not None and bias.requires_grad)):
        raise RuntimeError(
            "cpu_block_sparse_linear is inference-only (it writes into out= buffers); "
            "call it under torch.no_grad() or torch.inference_mode()"
        )
    if x2d.shape[0] == 0:
        return x2d.new_empty(0, plan.out_features)

    strategy = plan.strategy_for(x2d.shape[0])
    if strategy == STRATEGY_NATIVE:
        # In the plan's native dtype whatever x's (fp16 x: fp32; fp32 x on a bf16 plan: bf16).
        blocks, native_row_offsets, native_col_indices = plan.native_weight
        y = native_block_sparse_linear(
            x2d.to(plan.native_dtype), blocks, native_row_offsets, native_col_indices,
            None if bias is None else bias.to(device="cpu", dtype=torch.float32).contiguous(), plan.out_features,
        )
        return y.to(x2d.dtype)
    compute_dtype = _compute_dtype(x2d.dtype)
    if bias is not None:
        bias = bias.to(device="cpu", dtype=compute_dtype)
    if strategy == STRATEGY_DENSE:
        dense_weight, _ = plan._weights_for(compute_dtype)
        return F.linear(x2d.to(compute_dtype), dense_weight, bias).to(x2d.dtype)
    if strategy == STRATEGY_GATHER_MM:
        return _run_gather_mm(x2d, plan, bias, compute_dtype)
    return _run_gather_bmm(x2d, plan, bias, compute_dtype)
