"""Row groups: every stored block reached exactly once, padding counted, identical patterns grouped free."""

import pytest
import torch

from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
from nn_blocksparse.row_groups import group_block_rows


def rebuild_from_groups(matrix: BlockSparseMatrix, rows_per_group: int) -> torch.Tensor:
    """The dense weight as the kernel sees it through the groups: member rows x step columns."""
    groups = matrix.row_groups(rows_per_group)
    bs, r = matrix.block_size, rows_per_group
    dense = torch.zeros(matrix.shape, dtype=matrix.dtype)
    offsets = groups.step_offsets.tolist()
    group_rows = groups.group_rows.view(-1, r).tolist()
    step_blocks = groups.step_blocks.view(-1, r).tolist()
    seen = []
    for group in range(groups.group_count):
        for step in range(offsets[group], offsets[group + 1]):
            col = int(groups.step_cols[step])
            for member, block in enumerate(step_blocks[step]):
                row = group_rows[group][member]
                if block < 0:
                    continue
                assert row >= 0, "a padding member must not own blocks"
                seen.append(block)
                dense[row * bs:(row + 1) * bs, col * bs:(col + 1) * bs] += matrix.values[block]
    assert sorted(seen) == list(range(matrix.nnz_blocks)), "every stored block exactly once"
    return dense


@pytest.mark.parametrize("rows_per_group", [1, 2, 4, 8])
@pytest.mark.parametrize("density", [0.0, 0.3, 0.7, 1.0])
def test_groups_cover_every_block_once(rows_per_group, density):
    # 7 block-rows: the last group of 2, 4 or 8 is padded.
    weight = random_block_sparse_weight(7 * 16, 10 * 16, 16, density, seed=int(density * 10))
    matrix = BlockSparseMatrix.from_dense(weight, 16)
    assert torch.equal(rebuild_from_groups(matrix, rows_per_group), weight)
    groups = matrix.row_groups(rows_per_group)
    members = [r for r in groups.group_rows.tolist() if r >= 0]
    assert sorted(members) == list(range(7))
    assert groups.group_count == -(-7 // rows_per_group)
    # Steps ascend inside a group, and the padding the kernel will multiply is what `inflation` says.
    offsets = groups.step_offsets.tolist()
    for g in range(groups.group_count):
        cols = groups.step_cols[offsets[g]:offsets[g + 1]].tolist()
        assert cols == sorted(set(cols))
    padded = groups.step_count * rows_per_group
    assert groups.inflation == pytest.approx(padded / matrix.nnz_blocks if matrix.nnz_blocks else 1.0)
    steps = [offsets[g + 1] - offsets[g] for g in groups.group_order.tolist()]
    assert steps == sorted(steps, reverse=True) and sorted(groups.group_order.tolist()) == list(range(groups.group_count))
    if rows_per_group == 1:
        assert groups.inflation == 1.0


def test_identical_patterns_are_grouped_without_padding():
    # Rows 0, 2, 4, 6 share one pattern and 1, 3, 5, 7 another: feature order would pad every group,
    # grouping by pattern pads nothing.
    keep = torch.zeros(8, 6, dtype=torch.bool)
    keep[0::2, :3] = True
    keep[1::2, 3:] = True
    weight = torch.randn(8 * 32, 6 * 32) * keep.repeat_interleave(32, 0).repeat_interleave(32, 1)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    for rows in (2, 4):
        assert matrix.row_groups(rows).inflation == 1.0
        assert torch.equal(rebuild_from_groups(matrix, rows), weight)
    assert matrix.grouping_inflation() == ((2, 1.0), (4, 1.0))
    # A dense matrix pads nothing when R divides its block-rows; a padded last group does cost.
    assert BlockSparseMatrix.from_dense(torch.randn(128, 64), 32).grouping_inflation() == ((2, 1.0), (4, 1.0))
    assert dict(BlockSparseMatrix.from_dense(torch.randn(96, 64), 32).grouping_inflation())[2] == pytest.approx(4 / 3)


def test_random_layouts_pay_for_grouping():
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(768, 768, 32, 0.5, seed=1), 32)
    inflation = dict(matrix.grouping_inflation())
    # Two random rows at density 1/2 share about half their columns: ~1.5x the products.
    assert 1.25 < inflation[2] < inflation[4]


def test_row_groups_are_cached_and_follow_the_device():
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(64, 64, 32, 1.0), 32)
    assert matrix.row_groups(2) is matrix.row_groups(2)
    groups = matrix.row_groups(2)
    assert all(t.dtype == torch.int32 and t.device == matrix.device
               for t in (groups.group_rows, groups.step_offsets, groups.step_cols, groups.step_blocks,
                         groups.group_order))
    moved = matrix.to(dtype=torch.float16)
    assert moved.row_groups(2) is not groups  # a new matrix derives its own


def test_invalid_rows_per_group():
    matrix = BlockSparseMatrix.from_dense(torch.randn(64, 64), 32)
    with pytest.raises(ValueError, match="rows_per_group"):
        group_block_rows(matrix.row_offsets, matrix.col_indices, 3)
