"""Row groups: several block-rows of a BSR weight walked by one kernel program, for wider output tiles.

With one block-row per program the kernel's output tile is only `bs` (32) features wide, so every
x tile it loads feeds just `bs` outputs. Grouping R block-rows gives `[BLOCK_M, R*bs]` tiles: the
x tile is loaded once per step for R times the FLOPs, as in a dense GEMM with wide N tiles.

The group walks the *union* of its members' block-columns ("steps"). At a step where a member has
no block, the kernel loads zeros for it (the block index is -1): no memory traffic, but tensor-core
work. `RowGroups.inflation` is that cost: multiply-adds done / multiply-adds needed (1.0 = free).
To keep it low, block-rows with the same (or similar) column patterns are grouped together; for
structured pruning (identical patterns inside a head, dense layers) it is exactly 1.0.

This module only rearranges indices; it knows nothing of Triton or modules. The values are not
copied: groups point into the `values` of the BSR weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROWS_PER_GROUP_CHOICES = (1, 2, 4, 8)
# The widths `BlockSparseMatrix.grouping_inflation` reports unless asked for others: those the
# launch heuristic weighs (8 is grouped on request, for explicit configs and measurements).
INFLATION_ROWS_PER_GROUP = (2, 4)


@dataclass(frozen=True)
class RowGroups:
    """Index tables of a BSR weight grouped `rows_per_group` block-rows at a time.

    - `group_rows`   `[G * R]` int32: block-row of each member of each group, -1 pads the last group;
    - `step_offsets` `[G + 1]` int32: group g walks steps `step_offsets[g] : step_offsets[g + 1]`;
    - `step_cols`    `[S]`     int32: block-column of x read at each step (ascending within a group);
    - `step_blocks`  `[S * R]` int32: index into `values` of each member's block at each step, or -1;
    - `group_order`  `[G]`     int32: groups by descending step count (heaviest launched first).

    (int32: the index dtype of the BSR weight they are derived from.)
    """

    rows_per_group: int
    group_rows: torch.Tensor
    step_offsets: torch.Tensor
    step_cols: torch.Tensor
    step_blocks: torch.Tensor
    group_order: torch.Tensor
    nnz_blocks: int

    @property
    def group_count(self) -> int:
        return int(self.group_order.numel())

    @property
    def step_count(self) -> int:
        return int(self.step_cols.numel())

    @property
    def inflation(self) -> float:
        """Block products computed (zeros included) per stored block; 1.0 when nothing is padded."""
        return self.step_count * self.rows_per_group / self.nnz_blocks if self.nnz_blocks else 1.0


def _column_lists(row_offsets: torch.Tensor, col_indices: torch.Tensor) -> list[list[int]]:
    offsets = row_offsets.tolist()
    cols = col_indices.tolist()
    return [cols[offsets[r] : offsets[r + 1]] for r in range(len(offsets) - 1)]


def _padded_steps(order: list[int], col_lists: list[list[int]], rows_per_group: int) -> int:
    steps = 0
    for start in range(0, len(order), rows_per_group):
        steps += len(set().union(*(col_lists[r] for r in order[start : start + rows_per_group])))
    return steps


def group_block_rows(row_offsets: torch.Tensor, col_indices: torch.Tensor, rows_per_group: int) -> RowGroups:
    """Group the block-rows of a BSR layout `rows_per_group` at a time (see the module docstring).

    The tables index `values` as the BSR layout says, so they are only as safe as it is: derive
    them from a validated matrix, i.e. through `BlockSparseMatrix.row_groups`.

    Two member orders are tried, and the one with fewer padded steps kept: feature order (which
    keeps neighbouring rows, e.g. one attention head, together) and rows sorted by column pattern
    (which puts identical patterns side by side wherever they are).
    """
    if rows_per_group not in ROWS_PER_GROUP_CHOICES:
        raise ValueError(f"rows_per_group must be one of {ROWS_PER_GROUP_CHOICES}, got {rows_per_group}")
    device, index_dtype = row_offsets.device, row_offsets.dtype
    col_lists = _column_lists(row_offsets.cpu(), col_indices.cpu())
    offsets = row_offsets.cpu().tolist()
    n_rows = len(col_lists)
    natural = list(range(n_rows))
    if rows_per_group == 1:
        order = natural
    else:
        # Heaviest patterns first, then lexicographic: rows with equal patterns become adjacent.
        by_pattern = sorted(natural, key=lambda r: (-len(col_lists[r]), col_lists[r], r))
        order = min((natural, by_pattern), key=lambda o: _padded_steps(o, col_lists, rows_per_group))

    group_rows, step_offsets, step_cols, step_blocks = [], [0], [], []
    for start in range(0, n_rows, rows_per_group):
        members = order[start : start + rows_per_group]
        block_of = [dict(zip(col_lists[r], range(offsets[r], offsets[r + 1]))) for r in members]
        union = sorted(set().union(*(col_lists[r] for r in members)))
        for col in union:
            step_cols.append(col)
            step_blocks.extend(blocks.get(col, -1) for blocks in block_of)
            step_blocks.extend([-1] * (rows_per_group - len(members)))
        group_rows.extend(members + [-1] * (rows_per_group - len(members)))
        step_offsets.append(len(step_cols))

    steps_per_group = torch.tensor(step_offsets[1:]) - torch.tensor(step_offsets[:-1])
    group_order = torch.sort(steps_per_group, descending=True, stable=True).indices

    def as_index(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=index_dtype).reshape(-1).to(device)

    return RowGroups(
        rows_per_group=rows_per_group,
        group_rows=as_index(group_rows),
        step_offsets=as_index(step_offsets),
        step_cols=as_index(step_cols),
        step_blocks=as_index(step_blocks),
        group_order=as_index(group_order),
        nnz_blocks=int(col_indices.numel()),
    )
