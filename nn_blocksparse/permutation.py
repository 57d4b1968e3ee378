"""Exact permutations of output features that let a weight's row groups share block-columns.

A row group (`row_groups.py`) walks the union of its members' block-columns, and a member without a
block at a step costs padded tensor-core work (`RowGroups.inflation`; the useful-FLOP fraction is its
inverse). Which block-rows sit side by side is often the model's free choice: the output features of
a linear layer can be put in any order if whatever reads them is reordered to match, and the model
then computes exactly the same function. In a transformer layer:

- FFN: the intermediate neurons. Permute FFN-in's rows and bias and FFN-out's columns alike (the
  activation is elementwise);
- attention: whole heads, in Q, K and V alike and in the attention output's columns; and inside each
  head its dimensions, with one permutation for Q and K (scores are sums over q . k products) and
  one for V and the output's columns (here: the same one, see `attention_feature_permutation`).

This module chooses such permutations at block granularity (whole block-rows move, so a layout
keeps its stored-block count) so that consecutive runs of R block-rows share columns, and applies
none: callers permute their weights with the returned index (`weight[p]`, `bias[p]`, consumer
`weight[:, p]`). It knows nothing of BERT or modules; callers say which layouts must share one
permutation and how many block-rows form a unit that must stay together (a head).

Why consecutive runs, when `row_groups.group_block_rows` may group any rows: its grouping is a
heuristic (feature order or rows sorted by pattern, the better of the two), which a search for
shared columns beats on layouts with near-identical rows; and a kernel that stores a group's
output tile in one piece (TMA) needs the group's features to be adjacent.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .layouts import block_layout

# Local-search passes after the greedy grouping: each tries every swap between two groups once.
SWAP_PASSES = 2


def _row_masks(layouts: Sequence[torch.Tensor]) -> list[int]:
    """Each block-row's stored block-columns over all `layouts`, as one bit mask (Python int) per row."""
    if not layouts:
        raise ValueError("need at least one layout")
    rows = layouts[0].shape[0]
    masks = [0] * rows
    offset = 0
    for layout in layouts:
        if layout.dim() != 2 or layout.shape[0] != rows or layout.dtype != torch.bool:
            raise ValueError(f"layouts must be 2-D bool tensors with {rows} block-rows, got {layout.dtype} "
                             f"{tuple(layout.shape)}")
        for row, cols in enumerate(layout.cpu().tolist()):
            for col, stored in enumerate(cols):
                if stored:
                    masks[row] |= 1 << (offset + col)
        offset += layout.shape[1]
    return masks


def _row_union(masks: Sequence[int]) -> int:
    union = 0
    for mask in masks:
        union |= mask
    return union


def _union_steps(masks: Sequence[int]) -> int:
    return _row_union(masks).bit_count()


def _greedy_groups(items: list[int], size: int) -> list[list[int]]:
    """Items (bit masks) into groups of `size`: seed each group with the heaviest item left, then add the
    item sharing most columns with the group net of the columns it adds (ties: heavier, then earlier)."""
    left = sorted(range(len(items)), key=lambda i: (-items[i].bit_count(), i))
    groups = []
    while left:
        seed = left.pop(0)
        group, union = [seed], items[seed]
        while len(group) < size and left:
            best = max(left, key=lambda i: ((items[i] & union).bit_count() - (items[i] & ~union).bit_count(),
                                            items[i].bit_count(), -i))
            left.remove(best)
            group.append(best)
            union |= items[best]
        groups.append(group)
    return groups


def _improve_by_swaps(items: list[int], groups: list[list[int]]) -> None:
    """Swap members between groups wherever that lowers the total steps (first improvement, in place)."""

    def without_each(group: list[int]) -> list[int]:  # the group's union with each member left out
        return [_row_union([items[m] for k, m in enumerate(group) if k != i]) for i in range(len(group))]

    for _ in range(SWAP_PASSES):
        improved = False
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                rest_a, rest_b = without_each(groups[a]), without_each(groups[b])
                steps = _union_steps([items[m] for m in groups[a]]) + _union_steps([items[m] for m in groups[b]])
                for i in range(len(groups[a])):
                    for j in range(len(groups[b])):
                        ga, gb = groups[a], groups[b]
                        swapped = (rest_a[i] | items[gb[j]]).bit_count() + (rest_b[j] | items[ga[i]]).bit_count()
                        if swapped < steps:
                            ga[i], gb[j] = gb[j], ga[i]
                            rest_a, rest_b, steps = without_each(ga), without_each(gb), swapped
                            improved = True
        if not improved:
            return


def _total_steps(items: list[int], groups: list[list[int]]) -> int:
    return sum(_union_steps([items[m] for m in group]) for group in groups)


def _best_grouping(items: list[int], size: int) -> list[list[int]]:
    """The fewest-steps grouping found among: items in order, items sorted by pattern, greedy + swaps."""
    in_order = [list(range(start, min(start + size, len(items)))) for start in range(0, len(items), size)]
    by_pattern = sorted(range(len(items)), key=lambda i: (-items[i].bit_count(), _columns(items[i]), i))
    sorted_groups = [by_pattern[start:start + size] for start in range(0, len(items), size)]
    searched = _greedy_groups(items, size)
    _improve_by_swaps(items, searched)
    return min((in_order, sorted_groups, searched), key=lambda groups: _total_steps(items, groups))


def _columns(mask: int) -> list[int]:
    return [bit for bit in range(mask.bit_length()) if mask >> bit & 1]


def grouped_block_row_order(layouts: Sequence[torch.Tensor], rows_per_group: int, unit_rows: int = 1) -> torch.Tensor:
    """A permutation of the block-rows shared by `layouts` (int64, new position -> old block-row) after
    which consecutive runs of `rows_per_group` block-rows have as few block-columns in their union as
    this search finds, summed over all layouts. Never worse than the identity or the pattern sort.

    `unit_rows` consecutive block-rows form a unit that stays together, in order (an attention head):
    with `unit_rows >= rows_per_group` only the rows inside each unit are reordered (units keep their
    places); with fewer, whole units are grouped. One of the two must divide the other.
    """
    if rows_per_group < 1 or unit_rows < 1:
        raise ValueError(f"rows_per_group and unit_rows must be positive, got {rows_per_group} and {unit_rows}")
    if rows_per_group % unit_rows and unit_rows % rows_per_group:
        raise ValueError(f"one of rows_per_group ({rows_per_group}) and unit_rows ({unit_rows}) must divide the other")
    masks = _row_masks(layouts)
    rows = len(masks)
    if rows % unit_rows:
        raise ValueError(f"unit_rows ({unit_rows}) must divide the block-rows ({rows})")
    if rows_per_group == 1:
        return torch.arange(rows)
    order = []
    if unit_rows >= rows_per_group:
        for start in range(0, rows, unit_rows):  # units stay in place; rows move inside each
            members = list(range(start, start + unit_rows))
            for group in _best_grouping([masks[r] for r in members], rows_per_group):
                order.extend(members[i] for i in group)
    else:
        units = [_row_union(masks[u * unit_rows:(u + 1) * unit_rows]) for u in range(rows // unit_rows)]
        for group in _best_grouping(units, rows_per_group // unit_rows):
            for unit in group:
                order.extend(range(unit * unit_rows, (unit + 1) * unit_rows))
    return torch.tensor(order, dtype=torch.int64)


def consecutive_group_steps(layout: torch.Tensor, rows_per_group: int) -> int:
    """Loop steps of a layout grouped `rows_per_group` consecutive block-rows at a time (union sizes summed)."""
    masks = _row_masks([layout])
    return sum(_union_steps(masks[start:start + rows_per_group]) for start in range(0, len(masks), rows_per_group))


def feature_permutation(block_row_order: torch.Tensor, block_size: int) -> torch.Tensor:
    """The permutation of features (int64, length block-rows * block_size) that moves whole block-rows."""
    within = torch.arange(block_size)
    return (block_row_order[:, None] * block_size + within[None, :]).reshape(-1)


def ffn_feature_permutation(inner_weight: torch.Tensor, block_size: int, rows_per_group: int) -> torch.Tensor:
    """Neuron order for an FFN whose first weight (`[neurons, hidden]`) is `inner_weight`: apply it to
    that weight's rows and bias and the second weight's columns."""
    neurons, hidden = inner_weight.shape
    if neurons % block_size or hidden % block_size:  # off the block grid: stays dense, nothing to group
        return torch.arange(neurons, device=inner_weight.device)
    order = grouped_block_row_order([block_layout(inner_weight, block_size)], rows_per_group)
    return feature_permutation(order, block_size).to(inner_weight.device)


def attention_feature_permutation(query_weight: torch.Tensor, key_weight: torch.Tensor, value_weight: torch.Tensor,
                                  num_heads: int, block_size: int, rows_per_group: int) -> torch.Tensor:
    """Feature order for Q, K and V (`[num_heads * head_dim, hidden]` each), shared by all three and by
    the attention output's columns: heads move whole and, inside a head, block-rows move in Q, K and V
    alike, so the scores and the context are the same up to that order.

    Heads are kept whole at block granularity: a unit is a head when `block_size` divides the head
    size, or a block-row of whole heads when the head size divides `block_size`; other head sizes get
    the identity (no exact block-row move exists).
    """
    features = query_weight.shape[0]
    if key_weight.shape[0] != features or value_weight.shape[0] != features or features % max(num_heads, 1):
        raise ValueError(f"Q, K and V must have num_heads * head_dim rows, got {query_weight.shape[0]}, "
                         f"{key_weight.shape[0]}, {value_weight.shape[0]} for {num_heads} heads")
    identity = torch.arange(features, device=query_weight.device)
    if num_heads == 0 or features % block_size or query_weight.shape[1] % block_size:
        return identity
    head_dim = features // num_heads
    if head_dim % block_size and block_size % head_dim:
        return identity
    unit_rows = max(head_dim, block_size) // block_size
    block_rows = features // block_size
    if block_rows % unit_rows:
        return identity
    if rows_per_group % unit_rows and unit_rows % rows_per_group:
        return identity
    layouts = [block_layout(w, block_size) for w in (query_weight, key_weight, value_weight)]
    order = grouped_block_row_order(layouts, rows_per_group, unit_rows)
    # Q, K and V usually run as one fused [Q; K; V] weight, whose consecutive groups straddle the
    # three where R does not divide their block-rows: keep the order only if that weight gains too.
    fused = torch.cat(layouts)
    if (consecutive_group_steps(torch.cat([layout[order] for layout in layouts]), rows_per_group)
            > consecutive_group_steps(fused, rows_per_group)):
        return identity
    return feature_permutation(order, block_size).to(query_weight.device)
