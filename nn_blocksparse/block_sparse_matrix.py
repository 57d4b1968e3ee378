"""`BlockSparseMatrix`: a weight `[N, K]` stored as its nonzero `bs x bs` blocks.

The layout is torch's BSR layout read by block-rows of W (one block-row = `bs` output
features), which is exactly what the kernel walks:

- `values`       `[nnz, bs, bs]`  the nonzero blocks, block-row major, each block row-major;
- `row_offsets`  `[N/bs + 1]`     int32, block-row r owns `values[row_offsets[r]:row_offsets[r+1]]`;
- `col_indices`  `[nnz]`          int32, block-column of each block, ascending within a row;
- `row_order`    `[N/bs]`         int32, block-rows sorted by descending nonzero count: the
                                  kernel launches the heaviest rows first so that the long
                                  programs do not end up alone in the last wave.

`check_block_sparse_matrix` is the format's one validator: every `BlockSparseMatrix` passes it
when built, so the kernels and every table derived from a matrix (row groups, launch tables)
may trust its indices. `row_groups(R)` derives (and caches) the index tables that let one kernel
program walk R block-rows at once (`row_groups.py`).

Nothing here knows about Triton, `nn.Module` or transformers.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch

from .row_groups import INFLATION_ROWS_PER_GROUP, RowGroups, group_block_rows

SUPPORTED_BLOCK_SIZES = (16, 32, 64)
INDEX_DTYPE = torch.int32
# The kernels address values, x and the output with 32-bit offsets.
MAX_KERNEL_ELEMENTS = 2**31 - 1
_FIELDS = ("values", "row_offsets", "col_indices", "row_order")


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")


def _check_shape(shape) -> tuple[int, int]:
    """`shape` as two Python ints in `[0, MAX_KERNEL_ELEMENTS]`."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"shape must be (out_features, in_features), got {shape!r}")
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"shape must hold two ints, got {shape!r}")
        if not 0 <= dim <= MAX_KERNEL_ELEMENTS:
            raise ValueError(f"shape {tuple(shape)} is outside [0, 2**31 - 1], the kernels' 32-bit offsets")
    return int(shape[0]), int(shape[1])


def _check_divisible(shape: tuple[int, int], block_size: int) -> None:
    n, k = shape
    if n % block_size or k % block_size:
        raise ValueError(
            f"block_size {block_size} must divide both dimensions of the weight, got shape {tuple(shape)}"
        )


def _checks_data(tensor: torch.Tensor) -> bool:
    """Whether the values of `tensor` can be read: not on the meta device, not a fake tensor."""
    from torch._subclasses.fake_tensor import is_fake

    return tensor.device.type != "meta" and not is_fake(tensor)


def _first(mask: torch.Tensor) -> int | None:
    """Index of the first True in a 1-D bool tensor, or None."""
    hits = mask.nonzero()
    return int(hits[0, 0]) if hits.numel() else None


def check_block_sparse_matrix(values, row_offsets, col_indices, row_order, shape, block_size) -> None:
    """Raise `TypeError`/`ValueError` naming the field unless the tensors are a valid block-sparse matrix.

    The one validator of the format. `BlockSparseMatrix` runs it whenever one is built (directly,
    `from_dense`, `from_bsr`, `.to()`, or by `BlockSparseLinear` at construction, load and
    `.to()`), so code given a `BlockSparseMatrix` may rely on what it guarantees. When it returns:

    - `block_size` is one of `SUPPORTED_BLOCK_SIZES`; `shape` is two ints `(N, K)` in
      `[0, 2**31 - 1]`, both multiples of `block_size`; let `Nb = N / bs`, `Kb = K / bs`;
    - the four are dense (strided), contiguous `torch.Tensor`s on one device;
    - `values` is floating point, shaped `[nnz, bs, bs]`, with at most `2**31 - 1` elements (so
      every offset `block * bs * bs + i` the kernels form fits in int32);
    - `row_offsets`, `col_indices`, `row_order` are int32 and 1-D, of `Nb + 1`, `nnz` and `Nb`
      entries;
    - `row_offsets[0] == 0`, `row_offsets` is non-decreasing and `row_offsets[Nb] == nnz`: block-row
      r owns the blocks `row_offsets[r] <= i < row_offsets[r + 1]`, all inside `values`;
    - every `col_indices[i]` is in `[0, Kb)`, strictly ascending within each block-row (so no block
      is stored twice, and `nnz <= Nb * Kb`);
    - `row_order` is a permutation of `range(Nb)`: each block-row is launched exactly once.

    Together: a kernel that walks the block-rows in `row_order` and their blocks by `row_offsets`
    reads `values`, x's columns `col * bs + j < K` and writes outputs `r * bs + i < N` only in bounds.

    Not checked: the values themselves (NaN and inf are legal and propagate), that `row_order` is
    heaviest first (a speed choice), and data on the meta device or in fake tensors (only the
    structure; such tensors never run a kernel). Validation runs once, not per call: tensors
    modified in place afterwards are re-validated by `BlockSparseMatrix.check_unchanged()`
    (version counters; `block_sparse_linear` calls it in eager mode).
    """
    _check_block_size(block_size)
    n, k = _check_shape(shape)
    _check_divisible((n, k), block_size)
    bs, n_block_rows, n_block_cols = block_size, n // block_size, k // block_size
    tensors = dict(zip(_FIELDS, (values, row_offsets, col_indices, row_order)))
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}")
    devices = {name: tensor.device for name, tensor in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"values, row_offsets, col_indices and row_order must be on one device, got {devices}")
    if not values.is_floating_point():
        raise TypeError(f"values must be a floating point tensor, got {values.dtype}")
    for name in _FIELDS[1:]:
        if tensors[name].dtype != INDEX_DTYPE:
            raise TypeError(f"{name} must be {INDEX_DTYPE}, got {tensors[name].dtype}")
    if values.dim() != 3 or tuple(values.shape[1:]) != (bs, bs):
        raise ValueError(f"values must be [nnz, {bs}, {bs}], got {tuple(values.shape)}")
    nnz = int(values.shape[0])
    if values.numel() > MAX_KERNEL_ELEMENTS:
        raise ValueError(f"values holds {values.numel()} elements, more than the kernels' 32-bit offsets "
                         "address (2**31 - 1)")
    expected = {"row_offsets": n_block_rows + 1, "col_indices": nnz, "row_order": n_block_rows}
    what = {"row_offsets": "N / block_size + 1", "col_indices": "one per block of values",
            "row_order": "N / block_size"}
    for name, length in expected.items():
        if tuple(tensors[name].shape) != (length,):
            raise ValueError(f"{name} must be 1-D with {length} entries ({what[name]}), "
                             f"got shape {tuple(tensors[name].shape)}")
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels index it as a flat array)")
    if not all(_checks_data(tensor) for tensor in tensors.values()):
        return
    _check_index_data(row_offsets, col_indices, row_order, nnz, n_block_rows, n_block_cols)


def _check_index_data(row_offsets: torch.Tensor, col_indices: torch.Tensor, row_order: torch.Tensor, nnz: int,
                      n_block_rows: int, n_block_cols: int) -> None:
    """The checks of `check_block_sparse_matrix` that read the indices (on a CPU int64 copy)."""
    offsets = row_offsets.detach().to("cpu", torch.int64)
    if int(offsets[0]) != 0:
        raise ValueError(f"row_offsets[0] must be 0, got {int(offsets[0])}")
    if int(offsets[-1]) != nnz:
        raise ValueError(f"row_offsets[-1] must equal the number of stored blocks (values.shape[0] = {nnz}), "
                         f"got {int(offsets[-1])}")
    counts = offsets[1:] - offsets[:-1]
    row = _first(counts < 0)
    if row is not None:
        raise ValueError(f"row_offsets must be non-decreasing, got row_offsets[{row}] = {int(offsets[row])} > "
                         f"row_offsets[{row + 1}] = {int(offsets[row + 1])}")
    cols = col_indices.detach().to("cpu", torch.int64)
    i = _first((cols < 0) | (cols >= n_block_cols))
    if i is not None:
        raise ValueError(f"col_indices[{i}] = {int(cols[i])} is outside [0, {n_block_cols}) (K / block_size)")
    if nnz > 1:
        rows = torch.repeat_interleave(torch.arange(n_block_rows), counts)
        i = _first((rows[1:] == rows[:-1]) & (cols[1:] <= cols[:-1]))
        if i is not None:
            raise ValueError(f"col_indices must be strictly ascending within each block-row: block-row "
                             f"{int(rows[i + 1])} has col_indices[{i + 1}] = {int(cols[i + 1])} after "
                             f"col_indices[{i}] = {int(cols[i])}")
    order = row_order.detach().to("cpu", torch.int64)
    i = _first((order < 0) | (order >= n_block_rows))
    if i is not None:
        raise ValueError(f"row_order[{i}] = {int(order[i])} is outside [0, {n_block_rows}) (the block-rows)")
    if n_block_rows:
        repeated = _first(torch.bincount(order, minlength=n_block_rows) > 1)
        if repeated is not None:
            raise ValueError(f"row_order must be a permutation of the {n_block_rows} block-rows, but block-row "
                             f"{repeated} appears more than once")


def _to_index_dtype(indices: torch.Tensor, name: str) -> torch.Tensor:
    """`indices` as int32, refusing values a cast would wrap around."""
    if indices.numel() and _checks_data(indices):
        low, high = int(indices.min()), int(indices.max())
        if low < torch.iinfo(INDEX_DTYPE).min or high > torch.iinfo(INDEX_DTYPE).max:
            raise ValueError(f"{name} holds values in [{low}, {high}], outside the int32 range of the format")
    return indices.to(INDEX_DTYPE)


def _index_versions(tensors) -> tuple:
    """(version counter, address) of tensors (None for an inference tensor's counter, which it does not
    keep): an in-place write bumps the first, new storage put under the same tensor (`.data = ...`,
    which bumps no counter) changes the second."""
    versions = []
    for t in tensors:  # (a loop: a generator costs more on every forward's check)
        versions.append((None if t.is_inference() else t._version, t.data_ptr()))
    return tuple(versions)


def heaviest_rows_first(row_offsets: torch.Tensor) -> torch.Tensor:
    """Block-row indices sorted by descending nonzero count (stable, so ties keep their order)."""
    counts = (row_offsets[1:] - row_offsets[:-1]).to(torch.int64)
    order = torch.sort(counts, descending=True, stable=True).indices
    return order.to(INDEX_DTYPE)


def block_row_indices(row_offsets: torch.Tensor) -> torch.Tensor:
    """Block-row of every stored block (int64), i.e. the COO row index."""
    counts = (row_offsets[1:] - row_offsets[:-1]).to(torch.int64)
    return torch.repeat_interleave(torch.arange(counts.numel(), device=row_offsets.device), counts)


def stored(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """`tensor` with its values in memory: a view whose negative or conjugate bit is set (its memory
    holds -x or conj(x)) materialized, anything else as it is. What every kernel entry point hands a
    kernel, which reads memory (validation reads values: an index view with the negative bit passes it)."""
    if tensor is None or not (tensor.is_neg() or tensor.is_conj()):
        return tensor
    return tensor.resolve_neg().resolve_conj()


def bsr_to_dense(values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
                 shape: tuple[int, int]) -> torch.Tensor:
    """The dense `[N, K]` matrix of raw BSR tensors (blocks `[nnz, bs, bs]`, zeros elsewhere)."""
    bs = values.shape[-1]
    n, k = shape
    blocks = torch.zeros(n // bs, k // bs, bs, bs, dtype=values.dtype, device=values.device)
    blocks[block_row_indices(row_offsets), col_indices.to(torch.int64)] = values
    return blocks.transpose(1, 2).reshape(n, k)


@dataclass(frozen=True)
class BlockSparseMatrix:
    """A `[N, K]` matrix kept as its nonzero square blocks (see the module docstring).

    Every instance has passed `check_block_sparse_matrix` (run by the constructor); the fields
    cannot be rebound afterwards.
    """

    values: torch.Tensor
    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    row_order: torch.Tensor
    shape: tuple[int, int]
    block_size: int
    # Derived index tables by rows per group, built from the validated indices; dropped when
    # `check_unchanged` finds the indices modified in place.
    _row_groups: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # Version counters of the index tensors when they were validated.
    _validated: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_block_sparse_matrix(self.values, self.row_offsets, self.col_indices, self.row_order, self.shape,
                                  self.block_size)
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "block_size", int(self.block_size))
        self._validated[:] = _index_versions(self._indices())

    def _indices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.row_offsets, self.col_indices, self.row_order

    def check_unchanged(self) -> bool:
        """Whether an index tensor was modified in place, or given new storage through `.data`, since
        it was validated (its version counter and address); if so, validate it again (raising if it
        is no longer valid) and drop the row groups derived from the old indices. Tables derived
        elsewhere must be dropped by the caller. Inference tensors keep no version counter: their
        in-place changes are not seen."""
        versions = _index_versions(self._indices())
        if versions == tuple(self._validated):
            return False
        check_block_sparse_matrix(self.values, self.row_offsets, self.col_indices, self.row_order, self.shape,
                                  self.block_size)
        self._row_groups.clear()
        self._validated[:] = versions
        return True

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
    def empty(cls, shape: tuple[int, int], block_size: int = 32, dtype: torch.dtype = torch.float32,
              device=None) -> "BlockSparseMatrix":
        """The all-zero `shape` matrix: no stored block (nothing dense is allocated)."""
        _check_block_size(block_size)
        n, k = _check_shape(shape)
        _check_divisible((n, k), block_size)
        n_block_rows = n // block_size
        return cls(
            values=torch.empty(0, block_size, block_size, dtype=dtype, device=device),
            row_offsets=torch.zeros(n_block_rows + 1, dtype=INDEX_DTYPE, device=device),
            col_indices=torch.empty(0, dtype=INDEX_DTYPE, device=device),
            row_order=torch.arange(n_block_rows, dtype=INDEX_DTYPE, device=device),
            shape=(n, k),
            block_size=block_size,
        )

    @classmethod
    def from_bsr(cls, bsr: torch.Tensor) -> "BlockSparseMatrix":
        """From a torch `sparse_bsr` tensor with square blocks (explicit zero blocks are kept)."""
        if not isinstance(bsr, torch.Tensor) or bsr.layout != torch.sparse_bsr:
            raise ValueError(f"expected a torch.sparse_bsr tensor, got layout {getattr(bsr, 'layout', type(bsr))}")
        values = bsr.values()
        if values.dim() != 3 or values.shape[1] != values.shape[2]:
            raise ValueError(f"only 2-D BSR tensors with square blocks are supported, got values {tuple(values.shape)}")
        row_offsets = _to_index_dtype(bsr.crow_indices(), "crow_indices")
        return cls(
            values=values.contiguous(),
            row_offsets=row_offsets,
            col_indices=_to_index_dtype(bsr.col_indices(), "col_indices"),
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
        self.check_unchanged()
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
            check_invariants=False,  # what torch would check, check_block_sparse_matrix did
        )

    def to(self, device=None, dtype=None) -> "BlockSparseMatrix":
        """Move to a device and/or cast the values; the indices stay int32 (the result is validated again)."""
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
