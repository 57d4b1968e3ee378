"""Block layouts: which `bs x bs` blocks of a weight are stored, and seeded random weights on them.

A layout is a bool tensor `[N / bs, K / bs]`, True where the block is stored. Its **density** is
the fraction of the block grid that is stored: stored blocks / (block_rows * block_cols), which is
`BlockSparseMatrix.density` of a weight built on it (block density, not element density: a stored
block's values are all nonzero here).

Generators (every one deterministic for a seed or a `torch.Generator`, CPU tensors):

- `random_layout`: exactly `round(density * blocks)` blocks (at least one when density > 0, none
  at 0), drawn uniformly: a prefix of one seeded permutation of the grid, so at equal seeds a
  sparser layout's blocks are a subset of a denser one's.
- `head_structured_layout`: structured pruning. The block-rows of each head (`rows_per_head`
  consecutive block-rows, e.g. the 64 rows of one BERT-base attention head with 32x32 blocks) share
  one random pattern of `round(density * block_cols)` block-columns, so every block-row has
  exactly that many blocks and grouping the rows of one head pads nothing.
- `nn_pruning_like_layout`: what `bert.pruning.prune_like_nn_pruning` leaves in a Q, K or V
  weight (heads on its rows; transpose it for the attention output, whose columns are the heads):
  whole heads removed (a third of them, as in nn_pruning's hybrid BERT-base, but never so many
  that `density` becomes unreachable), then exactly `round(density * blocks)` blocks drawn
  uniformly among the kept heads' blocks (the pruner ranks blocks by a noisy norm, which on
  random weights is a uniform draw).

`two_to_four_mask` is the element-level pattern of 2:4 semi-structured sparsity (the other thing
a GPU user can pick at density 0.5): in every group of 4 consecutive elements of a row, 2 kept.

`LAYOUTS` maps these names to `make_layout`'s choices. `block_sparse_weight` puts seeded random
values (scaled by 1/sqrt(K), so outputs are O(1)) on a layout, `random_block_sparse_weight` does
both for a random layout, and `block_layout` reads the layout of a dense weight back.

Nothing here knows about kernels, modules or BERT; tests and benchmarks take their layouts from
here, so that "density" means one thing everywhere.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# Heads nn_pruning's hybrid BERT-base SQuAD model removes: 48 of 144.
NN_PRUNING_HEADS_REMOVED_FRACTION = 48 / 144


def _generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(seed)


def _check(block_rows: int, block_cols: int, density: float) -> None:
    if block_rows < 0 or block_cols < 0:
        raise ValueError(f"the block grid must have non-negative sides, got {block_rows} x {block_cols}")
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")


def stored_block_count(total: int, density: float) -> int:
    """Blocks a layout of `total` grid blocks keeps at `density`: round(density * total), at least one if density > 0."""
    count = round(density * total)
    return min(total, max(count, 1) if density > 0 else 0)


def random_layout(block_rows: int, block_cols: int, density: float, seed: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Exactly `stored_block_count(block_rows * block_cols, density)` blocks, uniformly drawn (see the module docstring)."""
    _check(block_rows, block_cols, density)
    total = block_rows * block_cols
    order = torch.randperm(total, generator=_generator(seed, generator))
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order[:stored_block_count(total, density)]] = True
    return keep.view(block_rows, block_cols)


def head_structured_layout(block_rows: int, block_cols: int, density: float, rows_per_head: int = 2, seed: int = 0,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Each head's `rows_per_head` block-rows share `stored_block_count(block_cols, density)` random block-columns."""
    _check(block_rows, block_cols, density)
    if rows_per_head < 1:
        raise ValueError(f"rows_per_head must be at least 1, got {rows_per_head}")
    generator = _generator(seed, generator)
    per_row = stored_block_count(block_cols, density)
    heads = math.ceil(block_rows / rows_per_head)
    patterns = torch.zeros(heads, block_cols, dtype=torch.bool)
    for head in range(heads):
        patterns[head, torch.randperm(block_cols, generator=generator)[:per_row]] = True
    return patterns.repeat_interleave(rows_per_head, dim=0)[:block_rows].contiguous()


def nn_pruning_like_layout(block_rows: int, block_cols: int, density: float, rows_per_head: int = 2, seed: int = 0,
                           generator: torch.Generator | None = None,
                           heads_removed_fraction: float = NN_PRUNING_HEADS_REMOVED_FRACTION) -> torch.Tensor:
    """Whole heads removed, then random blocks among the kept heads' (see the module docstring).

    `round(heads_removed_fraction * heads)` heads go, fewer where the kept heads could not hold
    `round(density * blocks)` blocks, so the density is exact (a dense layout at density 1.0).
    """
    _check(block_rows, block_cols, density)
    if rows_per_head < 1 or block_rows % rows_per_head:
        raise ValueError(f"rows_per_head ({rows_per_head}) must divide the block-rows ({block_rows})")
    if not 0.0 <= heads_removed_fraction < 1.0:
        raise ValueError(f"heads_removed_fraction must be in [0, 1), got {heads_removed_fraction}")
    generator = _generator(seed, generator)
    heads = block_rows // rows_per_head
    count = stored_block_count(block_rows * block_cols, density)
    per_head = rows_per_head * block_cols
    removed = min(round(heads_removed_fraction * heads), heads - math.ceil(count / per_head) if per_head else 0)
    kept_heads = torch.ones(heads, dtype=torch.bool)
    kept_heads[torch.randperm(heads, generator=generator)[:max(removed, 0)]] = False
    candidates = kept_heads.repeat_interleave(rows_per_head)[:, None].expand(block_rows, block_cols).reshape(-1)
    candidate_index = candidates.nonzero().flatten()
    keep = torch.zeros(block_rows * block_cols, dtype=torch.bool)
    keep[candidate_index[torch.randperm(candidate_index.numel(), generator=generator)[:count]]] = True
    return keep.view(block_rows, block_cols)


LAYOUTS: dict[str, Callable[..., torch.Tensor]] = {
    "random": random_layout,
    "head_structured": head_structured_layout,
    "nn_pruning_like": nn_pruning_like_layout,
}


def make_layout(name: str, block_rows: int, block_cols: int, density: float, seed: int = 0,
                rows_per_head: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """The layout `name` (a key of `LAYOUTS`); `rows_per_head` is ignored by the random layout."""
    if name not in LAYOUTS:
        raise ValueError(f"unknown layout {name!r}; choose from {tuple(LAYOUTS)}")
    if name == "random":
        return random_layout(block_rows, block_cols, density, seed, generator)
    return LAYOUTS[name](block_rows, block_cols, density, rows_per_head, seed, generator)


def block_sparse_weight(layout: torch.Tensor, block_size: int, seed: int = 0, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Dense `[rows * bs, cols * bs]` weight: seeded N(0, 1/K) values in the stored blocks, exact zeros elsewhere."""
    if layout.dim() != 2 or layout.dtype != torch.bool:
        raise ValueError(f"layout must be a 2-D bool tensor, got {layout.dtype} of shape {tuple(layout.shape)}")
    n, k = layout.shape[0] * block_size, layout.shape[1] * block_size
    mask = layout.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    weight = torch.randn(n, k, generator=_generator(seed, generator)) / math.sqrt(max(k, 1))
    return (weight * mask).to(device=device, dtype=dtype)


def random_block_sparse_weight(n: int, k: int, block_size: int, density: float, seed: int = 0,
                               dtype: torch.dtype = torch.float32, device="cpu", empty_block_rows=()) -> torch.Tensor:
    """`block_sparse_weight` on a `random_layout` of the `[n, k]` weight's block grid (one generator, seeded
    once, draws the layout and then the values), with the blocks of `empty_block_rows` dropped afterwards."""
    if n % block_size or k % block_size:
        raise ValueError(f"block_size {block_size} must divide both sides of the weight, got {n} x {k}")
    generator = torch.Generator().manual_seed(seed)
    layout = random_layout(n // block_size, k // block_size, density, generator=generator)
    layout[list(empty_block_rows)] = False
    return block_sparse_weight(layout, block_size, generator=generator, dtype=dtype, device=device)


def two_to_four_mask(rows: int, cols: int, seed: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool `[rows, cols]`: 2 random elements kept in every group of 4 consecutive ones of a row (density 0.5)."""
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs a multiple of 4 columns, got {cols}")
    scores = torch.rand(rows, cols // 4, 4, generator=_generator(seed, generator))
    return (scores.argsort(dim=-1).argsort(dim=-1) < 2).reshape(rows, cols)


def block_layout(weight: torch.Tensor, block_size: int, pad_edges: bool = False) -> torch.Tensor:
    """The layout of a dense `[N, K]` weight: True for every block holding a nonzero (NaN counts).

    `pad_edges`: a weight the block size does not divide gets `ceil` blocks, its edge blocks padded
    with zeros (for pictures of any matrix); otherwise that is a `ValueError`.
    """
    n, k = weight.shape
    if (n % block_size or k % block_size) and not pad_edges:
        raise ValueError(f"block_size {block_size} must divide both sides of the weight, got {n} x {k}")
    rows, cols = -(-n // block_size), -(-k // block_size)
    weight = weight.detach()
    if (rows * block_size, cols * block_size) != (n, k):
        padded = weight.new_zeros(rows * block_size, cols * block_size)
        padded[:n, :k] = weight
        weight = padded
    blocks = weight.reshape(rows, block_size, cols, block_size)
    return (blocks != 0).any(dim=3).any(dim=1).cpu()


def block_density(weight: torch.Tensor, block_size: int) -> float:
    """Blocks holding a nonzero over grid blocks, as `BlockSparseMatrix.density` counts them (a matrix
    with no blocks, `0 x K`, counts as dense)."""
    layout = block_layout(weight, block_size)
    return layout.float().mean().item() if layout.numel() else 1.0
