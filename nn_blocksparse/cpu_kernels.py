"""Pure-torch CPU fast path for a block-sparse linear layer `y = x @ W^T + b`.

W (`[N, K]`) arrives in torch's BSR layout with square `bs x bs` blocks (`values`, `row_offsets`,
`col_indices`, see `block_sparse_matrix.py`).  torch's own BSR matmul on CPU is 14-50x slower than
the dense GEMM, so this module re-lays the weight out once (`build_cpu_plan`) into a form that a
handful of large dense BLAS calls can consume, and `cpu_block_sparse_linear` runs it.

Two strategies, chosen at plan-build time by a deterministic cost model (`plan.strategy`):

- ``"gather_bmm"``: block-rows of W are grouped into *units* (one block-row, or several block-rows
  whose nonzero block-columns are identical, e.g. a pruned layout where whole block-columns are
  empty).  A unit needs only the P block-columns of x it touches: they are gathered into a
  contiguous buffer and multiplied by the unit's P blocks stored as one `[P*bs, G*bs]` matrix.
  Units with the same shape are padded to the same P (bucketing chosen by a small dynamic program)
  and run as ONE `torch.baddbmm`, so the Python cost is a few calls per bucket, never per block.
  Each bucket writes its result straight into a slot-ordered output (a strided `out=` view), and
  one final `index_select` over block-columns puts the slots back into feature order.
- ``"dense"``: at high block density the gathers and the narrower GEMMs cost more than they save,
  so the plan keeps the re-densified weight and calls `F.linear`.

Inference only: the kernels write into preallocated buffers (`out=`), which autograd cannot track.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STRATEGY_DENSE = "dense"
STRATEGY_GATHER_BMM = "gather_bmm"
STRATEGIES = (STRATEGY_DENSE, STRATEGY_GATHER_BMM)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --- Cost model -----------------------------------------------------------------------------
# Calibrated on a 2-core AVX-512 machine with fp32 (torch 2.13, MKL).  Only the ratios between the
# terms matter for the choice, and they hold for any M large enough for the GEMMs to dominate; the
# model is evaluated at a fixed reference M so that the choice does not depend on the first call.
_REFERENCE_TOKENS = 256
_GEMM_FLOPS_PER_S = 200e9
# A unit's GEMM output is only G*bs columns wide; MKL's efficiency relative to a wide dense GEMM
# (measured with torch.bmm, M=256): narrow outputs cannot amortise the packing of the gathered x.
_GEMM_EFFICIENCY_BY_OUTPUT_WIDTH = ((16, 0.50), (32, 0.75), (64, 0.92), (128, 1.0))
_COPY_BYTES_PER_S = 60e9  # index_select of 64-256 byte runs, read + write
_SECONDS_PER_CALL = 8e-6  # Python + dispatch + thread fork/join of one torch call
# Stay dense unless the sparse path is predicted at least this much cheaper: the model is coarse,
# and "never slower than dense at high density" matters more than a few percent near the crossover.
_SPARSE_ADVANTAGE_REQUIRED = 0.92

# Upper bound on the gathered-x buffer of one bmm call.  Above this the buffer no longer stays in
# the (shared, 32 MiB) L3 between the gather and the GEMM that reads it; below it the per-call cost
# grows.  Measured at M=512: 2 MiB chunks were ~20% slower than 8-32 MiB ones.
_GATHER_CHUNK_BYTES = 16 << 20


def _gemm_efficiency(output_width: int) -> float:
    efficiency = _GEMM_EFFICIENCY_BY_OUTPUT_WIDTH[0][1]
    for width, value in _GEMM_EFFICIENCY_BY_OUTPUT_WIDTH:
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


class CpuBlockSparsePlan:
    """Precomputed CPU layout of one block-sparse weight (see the module docstring).

    Inspect `strategy`, `estimated_seconds` (cost model at `_REFERENCE_TOKENS` rows of x) and
    `buckets`; `describe()` summarises them.
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
        # Slot order equal to feature order lets the buckets write the final output directly.
        self.slots_in_feature_order = bool(
            torch.equal(slot_of_block_row, torch.arange(slot_of_block_row.numel()))
        )
        # Weights converted for another compute dtype (e.g. fp32 plan called with bf16 x), by dtype.
        self._converted: dict[torch.dtype, tuple[torch.Tensor | None, tuple[torch.Tensor, ...]]] = {}

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
        packed = tuple(b.packed_weight_t for b in self.buckets)
        reference = self.dense_weight if self.dense_weight is not None else (packed[0] if packed else None)
        if reference is None or reference.dtype == dtype:
            return self.dense_weight, packed
        if dtype not in self._converted:
            dense = None if self.dense_weight is None else self.dense_weight.to(dtype)
            self._converted[dtype] = (dense, tuple(p.to(dtype) for p in packed))
        return self._converted[dtype]


# --- Plan building --------------------------------------------------------------------------


@dataclass
class _Unit:
    block_rows: list[int]
    block_columns: list[int]  # ascending, shared by all block_rows
    value_positions: list[list[int]]  # per block-row: positions in `values`, aligned with block_columns


def _bucket_seconds(rows_per_unit: int, blocks: int, units: int, block_size: int, gathers: bool) -> float:
    macs = units * blocks * block_size * block_size * rows_per_unit * _REFERENCE_TOKENS
    seconds = _SECONDS_PER_CALL + 2 * macs / (_GEMM_FLOPS_PER_S * _gemm_efficiency(rows_per_unit * block_size))
    if gathers:
        gathered_bytes = units * blocks * block_size * _REFERENCE_TOKENS * 4
        seconds += 2 * gathered_bytes / _COPY_BYTES_PER_S
    return seconds


def _split_into_buckets(units: list[_Unit], rows_per_unit: int, block_size: int) -> list[list[_Unit]]:
    """Partition same-G units (sorted by block count) into buckets minimising the modelled time.

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
    return buckets


def _group_block_rows(col_lists: list[list[int]], block_size: int) -> list[_Unit]:
    """One unit per distinct nonempty column pattern, split back into single rows when sharing does not pay."""
    by_pattern: dict[tuple[int, ...], list[int]] = {}
    for row, cols in enumerate(col_lists):
        if cols:
            by_pattern.setdefault(tuple(cols), []).append(row)
    units = []
    for pattern, rows in by_pattern.items():
        blocks = len(pattern)
        shared = _bucket_seconds(len(rows), blocks, 1, block_size, True)
        separate = len(rows) * (_bucket_seconds(1, blocks, 1, block_size, True) - _SECONDS_PER_CALL)
        # Sharing saves the repeated gathers and widens the GEMM; it costs a bucket of its own
        # (a call) unless it merges with others, so demand at least one call's worth of saving.
        if len(rows) > 1 and shared + _SECONDS_PER_CALL <= separate:
            units.append(_Unit(rows, list(pattern), []))
        else:
            units.extend(_Unit([row], list(pattern), []) for row in rows)
    return units


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
    contiguous = len(units) == 1 and units[0].block_columns == list(range(first_col, first_col + blocks))
    return GatherBucket(
        rows_per_unit=rows_per_unit,
        blocks_per_unit=blocks,
        unit_count=len(units),
        first_slot=first_slot,
        gather_index=None if contiguous else gather_index.reshape(-1),
        first_block_column=first_col,
        packed_weight_t=packed_t,
    )


def _densify(values: torch.Tensor, col_lists: list[list[int]], row_starts: list[int], n: int, k: int, bs: int) -> torch.Tensor:
    dense = values.new_zeros(n // bs, bs, k // bs, bs)
    for row, cols in enumerate(col_lists):
        if cols:
            start = row_starts[row]
            blocks = values[start : start + len(cols)].transpose(0, 1)  # [bs_out, P, bs_in]
            dense[row].index_copy_(1, torch.tensor(cols, dtype=torch.int64), blocks)
    return dense.reshape(n, k)


def build_cpu_plan(
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    out_features: int,
    in_features: int,
    block_size: int,
    *,
    strategy: str | None = None,
) -> CpuBlockSparsePlan:
    """Lay a BSR weight out for `cpu_block_sparse_linear`.

    `strategy=None` lets the cost model choose; pass one of `STRATEGIES` to force it (tests,
    benchmarks).  The weight is copied: later changes to `values` are not seen by the plan.
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

    units = _group_block_rows(col_lists, bs)
    by_rows_per_unit: dict[int, list[_Unit]] = {}
    for unit in units:
        by_rows_per_unit.setdefault(len(unit.block_rows), []).append(unit)
    bucket_units = [
        bucket
        for rows_per_unit in sorted(by_rows_per_unit)
        for bucket in _split_into_buckets(by_rows_per_unit[rows_per_unit], rows_per_unit, bs)
    ]

    buckets, slot_rows, next_slot = [], [], 0
    for members in bucket_units:
        buckets.append(_pack_bucket(members, next_slot, values, row_starts, bs))
        for unit in members:
            slot_rows.extend(unit.block_rows)
        next_slot += sum(len(unit.block_rows) for unit in members)
    nonempty_slots = next_slot
    slot_rows.extend(r for r in range(block_rows) if not col_lists[r])
    block_row_of_slot = torch.tensor(slot_rows, dtype=torch.int64)
    slot_of_block_row = torch.empty(block_rows, dtype=torch.int64)
    slot_of_block_row[block_row_of_slot] = torch.arange(block_rows, dtype=torch.int64)

    reference_macs = n * k * _REFERENCE_TOKENS
    permute_seconds = 2 * n * _REFERENCE_TOKENS * 4 / _COPY_BYTES_PER_S
    estimated = {
        STRATEGY_DENSE: _SECONDS_PER_CALL + 2 * reference_macs / _GEMM_FLOPS_PER_S,
        STRATEGY_GATHER_BMM: permute_seconds
        + sum(
            _bucket_seconds(b.rows_per_unit, b.blocks_per_unit, b.unit_count, bs, b.gather_index is not None)
            for b in buckets
        ),
    }
    if strategy is None:
        sparse_wins = estimated[STRATEGY_GATHER_BMM] < _SPARSE_ADVANTAGE_REQUIRED * estimated[STRATEGY_DENSE]
        strategy = STRATEGY_GATHER_BMM if sparse_wins else STRATEGY_DENSE

    dense_weight = None
    if strategy == STRATEGY_DENSE:
        dense_weight = _densify(values, col_lists, row_starts, n, k, bs)
        buckets = []  # the dense weight is all a dense plan needs; do not keep two copies
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
    )


# --- Execution ------------------------------------------------------------------------------

# Scratch buffers shared by every plan called from one thread (layers run one after another, so
# one gather buffer and one slot-ordered output are enough).  Reusing them matters: fresh
# multi-MiB buffers come from mmap and pay a page fault per 4 KiB on every call.
_workspace = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    buffer = buffers.get((name, dtype))
    if buffer is None or buffer.numel() < numel:
        # Created outside inference mode so a buffer first made under torch.inference_mode() can
        # still be written by a later call made without it.
        with torch.inference_mode(False):
            buffer = torch.empty(numel, dtype=dtype)
        buffers[(name, dtype)] = buffer
    return buffer[:numel]


def _run_gather_bmm(x: torch.Tensor, plan: CpuBlockSparsePlan, bias: torch.Tensor | None, packed: tuple[torch.Tensor, ...]) -> torch.Tensor:
    m = x.shape[0]
    bs, n = plan.block_size, plan.out_features
    block_rows = n // bs
    slots = block_rows
    # [M, K/bs, bs]: a view whenever x rows are unit-stride; index_select along dim 1 then copies
    # bs-element runs, and the gathered [M, n*P, bs] buffer is, per unit, a row-major [M, P*bs]
    # matrix (leading dimension n*P*bs) that bmm consumes without another copy.
    x_blocks = x.reshape(m, plan.in_features // bs, bs)
    if plan.slots_in_feature_order:
        out_slots = x.new_empty(m, slots, bs)
    else:
        out_slots = _scratch("slots", m * slots * bs, x.dtype).view(m, slots, bs)
    bias_slots = None
    if bias is not None:
        bias_slots = bias.view(block_rows, bs)
        if not plan.slots_in_feature_order:
            bias_slots = bias_slots.index_select(0, plan.block_row_of_slot)
    empty = plan.nonempty_slot_count
    if empty < slots:
        if bias_slots is None:
            out_slots[:, empty:].zero_()
        else:
            out_slots[:, empty:].copy_(bias_slots[empty:].unsqueeze(0).expand(m, slots - empty, bs))

    bytes_per_block = m * bs * x.element_size()
    for bucket, weight_t in zip(plan.buckets, packed):
        rows, blocks, count = bucket.rows_per_unit, bucket.blocks_per_unit, bucket.unit_count
        units_per_chunk = max(1, _GATHER_CHUNK_BYTES // (blocks * bytes_per_block))
        for first in range(0, count, units_per_chunk):
            chunk = min(units_per_chunk, count - first)
            if bucket.gather_index is None:
                start = bucket.first_block_column * bs
                gathered = x[:, start : start + blocks * bs].unsqueeze(0)
            else:
                buffer = _scratch("gather", m * chunk * blocks * bs, x.dtype).view(m, chunk * blocks, bs)
                index = bucket.gather_index[first * blocks : (first + chunk) * blocks]
                torch.index_select(x_blocks, 1, index, out=buffer)
                gathered = buffer.view(m, chunk, blocks * bs).transpose(0, 1)
            slot = bucket.first_slot + first * rows
            # Strided view of this chunk's output slots: [chunk, M, G*bs], leading dimension slots*bs.
            out = out_slots[:, slot : slot + chunk * rows].view(m, chunk, rows * bs).transpose(0, 1)
            weights = weight_t[first : first + chunk]
            if bias_slots is None:
                torch.bmm(gathered, weights, out=out)
            else:
                torch.baddbmm(bias_slots[slot : slot + chunk * rows].view(chunk, 1, rows * bs), gathered, weights, out=out)

    if plan.slots_in_feature_order:
        return out_slots.view(m, n)
    # One pass puts the block-columns back into feature order (contiguous bs-element runs).
    return torch.index_select(out_slots, 1, plan.slot_of_block_row).view(m, n)


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
    m = x2d.shape[0]
    if m == 0:
        return x2d.new_empty(0, plan.out_features)

    compute_dtype = _compute_dtype(x2d.dtype)
    x = x2d.to(compute_dtype)
    if bias is not None:
        bias = bias.to(device="cpu", dtype=compute_dtype)
    dense_weight, packed = plan._weights_for(compute_dtype)
    if plan.strategy == STRATEGY_DENSE:
        y = F.linear(x, dense_weight, bias)
    else:
        y = _run_gather_bmm(x, plan, bias, packed)
    return y.to(x2d.dtype)
