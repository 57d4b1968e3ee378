"""`BlockSparseMatrix`: a weight `[N, K]` stored as its nonzero `bs x bs` blocks.

The layout is torch's BSR layout read by block-rows of W (one block-row = `bs` output
features), which is exactly what the kernel walks:

- `values`       `[nnz, bs, bs]`  the nonzero blocks, block-row major, each block row-major;
- `row_offsets`  `[N/bs + 1]`     int32, block-row r owns `values[row_offsets[r]:row_offsets[r+1]]`;
- `col_indices`  `[nnz]`          int32, block-column of each block, ascending within a row;
- `row_order`    `[N/bs]`         int32, block-rows sorted by descending nonzero count: the
                                  kernel launches the heaviest rows first so that the long
                                  programs do not end up alone in the last wave.

`row_groups(R)` derives (and caches) the index tables that let one kernel program walk R
block-rows at once (`row_groups.py`).

Nothing here knows about Triton, `nn.Module` or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .row_groups import INFLATION_ROWS_PER_GROUP, RowGroups, group_block_rows

SUPPORTED_BLOCK_SIZES = (16, 32, 64)
INDEX_DTYPE = torch.int32


def _check_block_size(block_size: int) -> None:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size}")


def _check_divisible(shape: tuple[int, int], block_size: int) -> None:
    n, k = shape
    if n % block_size or k % block_size:
        raise ValueError(
            f"block_size {block_size} must divide both dimensions of the weight, got shape {tuple(shape)}"
        )


def heaviest_rows_first(row_offsets: torch.Tensor) -> torch.Tensor:
    """Block-row indices sorted by descending nonzero count (stable, so ties keep their order)."""
    counts = (row_offsets[1:] - row_offsets[:-1]).to(torch.int64)
    order = torch.sort(counts, descending=True, stable=True).indices
    return order.to(INDEX_DTYPE)


def block_row_indices(row_offsets: torch.Tensor) -> torch.Tensor:
    """Block-row of every stored block (int64), i.e. the COO row index."""
    counts = (row_offsets[1:] - row_offsets[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_offsets.device), counts)


def bsr_to_dense(values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """The dense `[N, K]` matrix of raw BSR tensors (blocks `[nnz, bs, bs]`, zeros elsewhere)."""
    bs = values.shape[-1]
    n, k = shape
    blocks = torch.zeros(n // bs, k // bs, bs, bs, dtype=values.dtype, device=values.device)
    blocks[block_row_indices(row_offsets), col_indices.to(torch.int64)] = values
    return blocks.transpose(1, 2).reshape(n, k)


@dataclass
class BlockSparseMatrix:
    """A `[N, K]` matrix kept as its nonzero square blocks (see the module docstring)."""

    values: torch.Tensor
    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    row_order: torch.Tensor
    shape: tuple[int, int]
    block_size: int
    # Derived index tables by rows per group; they depend on the indices only, which are never
    # modified in place (a new matrix is made instead).
    _row_groups: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        _check_block_size(self.block_size)
        _check_divisible(self.shape, self.block_size)
        bs = self.block_size
        n_block_rows = self.shape[0] // bs
        if self.values.dim() != 3 or tuple(self.values.shape[1:]) != (bs, bs):
            raise ValueError(f"values must be [nnz, {bs}, {bs}], got {tuple(self.values.shape)}")
        if tuple(self.row_offsets.shape) != (n_block_rows + 1,):
            raise ValueError(
                f"row_offsets must have N/block_size + 1 = {n_block_rows + 1} entries, "
                f"got {tuple(self.row_offsets.shape)}"
            )
        if tuple(self.col_indices.shape) != (self.values.shape[0],):
            raise ValueError(
                f"col_indices must have one entry per block ({self.values.shape[0]}), "
                f"got {tuple(self.col_indices.shape)}"
            )
        if tuple(self.row_order.shape) != (n_block_rows,):
            raise ValueError(f"row_order must have {n_block_rows} entries, got {tuple(self.row_order.shape)}")
        for name in ("row_offsets", "col_indices", "row_order"):
            if getattr(self, name).dtype != INDEX_DTYPE:
                raise TypeError(f"{name} must be {INDEX_DTYPE}, got {getattr(self, name).dtype}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, block_size: int = 32) -> "BlockSparseMatrix":
        """Keep every `block_size x block_size` block that has at least one nonzero value.

        A block is dropped only if all its values are exactly zero (NaN is not zero, so a
        block holding a NaN is kept and the NaN propagates like in a dense matmul).
        """
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor, got {getattr(weight, 'shape', type(weight))}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating point tensor, got {weight.dtype}")
        _check_block_size(block_size)
        _check_divisible(tuple(weight.shape), block_size)
        n, k = weight.shape
        bs = block_size
        blocks = weight.detach().reshape(n // bs, bs, k // bs, bs).transpose(1, 2)  # [Nb, Kb, bs, bs]
        keep = (blocks != 0).any(dim=-1).any(dim=-1)  # [Nb, Kb]
        block_rows, block_cols = keep.nonzero(as_tuple=True)  # row-major, so cols ascend per row
        values = blocks[block_rows, block_cols].contiguous()
        counts = keep.sum(dim=1)
        row_offsets = torch.zeros(n // bs + 1, dtype=torch.int64, device=weight.device)
        row_offsets[1:] = torch.cumsum(counts, dim=0)
        row_offsets = row_offsets.to(INDEX_DTYPE)
        return cls(
            values=values,
            row_offsets=row_offsets,
            col_indices=block_cols.to(INDEX_DTYPE),
            row_order=heaviest_rows_first(row_offsets),
            shape=(n, k),
            block_size=bs,
        )

    @classmethod
    def from_bsr(cls, bsr: torch.Tensor) -> "BlockSparseMatrix":
        """From a torch `sparse_bsr` tensor with square blocks (explicit zero blocks are kept)."""
        if not isinstance(bsr, torch.Tensor) or bsr.layout != torch.sparse_bsr:
            raise ValueError(f"expected a torch.sparse_bsr tensor, got layout {getattr(bsr, 'layout', type(bsr))}")
        values = bsr.values()
        if values.dim() != 3 or values.shape[1] != values.shape[2]:
            raise ValueError(f"only 2-D BSR tensors with square blocks are supported, got values {tuple(values.shape)}")
        row_offsets = bsr.crow_indices().to(INDEX_DTYPE)
        return cls(
            values=values.contiguous(),
            row_offsets=row_offsets,
            col_indices=bsr.col_indices().to(INDEX_DTYPE),
            row_order=heaviest_rows_first(row_offsets),
            shape=tuple(bsr.shape),
            block_size=int(values.shape[1]),
        )

    # ------------------------------------------------------------------ views
    @property
    def block_rows(self) -> int:
        return self.shape[0] // self.block_size

    @property
    def block_cols(self) -> int:
        return self.shape[1] // self.block_size

    @property
    def nnz_blocks(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        """Fraction of blocks stored (1.0 = dense). An empty `0 x K` matrix counts as dense."""
        total = self.block_rows * self.block_cols
        return self.nnz_blocks / total if total else 1.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def block_row_indices(self) -> torch.Tensor:
        """Block-row of every stored block (int64), i.e. the COO row index."""
        return block_row_indices(self.row_offsets)

    def row_groups(self, rows_per_group: int) -> RowGroups:
        """Block-rows grouped `rows_per_group` at a time for wide kernel tiles (computed once)."""
        groups = self._row_groups.get(rows_per_group)
        if groups is None:
            groups = group_block_rows(self.row_offsets, self.col_indices, rows_per_group)
            self._row_groups[rows_per_group] = groups
        return groups

    def grouping_inflation(self, rows_per_group=INFLATION_ROWS_PER_GROUP) -> tuple[tuple[int, float], ...]:
        """`((R, inflation), ...)` for each R of `rows_per_group`: the padded work grouping R block-rows costs."""
        return tuple((r, self.row_groups(r).inflation) for r in rows_per_group)

    def to_dense(self) -> torch.Tensor:
        return bsr_to_dense(self.values, self.row_offsets, self.col_indices, self.shape)

    def to_bsr(self) -> torch.Tensor:
        return torch.sparse_bsr_tensor(
            self.row_offsets.to(torch.int64),
            self.col_indices.to(torch.int64),
            self.values,
            size=self.shape,
        )

    def to(self, device=None, dtype=None) -> "BlockSparseMatrix":
        """Move to a device and/or cast the values; the indices stay int32."""
        return BlockSparseMatrix(
            values=self.values.to(device=device, dtype=dtype),
            row_offsets=self.row_offsets.to(device=device),
            col_indices=self.col_indices.to(device=device),
            row_order=self.row_order.to(device=device),
            shape=self.shape,
            block_size=self.block_size,
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseMatrix(shape={self.shape}, block_size={self.block_size}, "
            f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})"
        )
