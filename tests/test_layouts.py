"""The layout generators mean what their docstrings say: exact densities, structure, determinism."""

import pytest
import torch

from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
from nn_blocksparse.layouts import (LAYOUTS, block_layout, block_sparse_weight, head_structured_layout, make_layout,
                                    nn_pruning_like_layout, random_block_sparse_weight, random_layout,
                                    stored_block_count, two_to_four_mask)


@pytest.mark.parametrize("density", [0.0, 0.05, 0.36, 0.5, 1.0])
def test_random_layout_keeps_exactly_the_rounded_block_count(density):
    layout = random_layout(24, 24, density, seed=3)
    assert layout.shape == (24, 24) and layout.dtype == torch.bool
    assert int(layout.sum()) == round(density * 576)
    assert torch.equal(layout, random_layout(24, 24, density, seed=3))  # deterministic per seed


def test_random_block_layout_has_the_requested_density():
    weight = random_block_sparse_weight(256, 128, 32, 0.36, seed=3)
    blocks = weight.reshape(8, 32, 4, 32).ne(0).any(dim=3).any(dim=1)
    assert int(blocks.sum()) == round(0.36 * 32)
    sparser = random_block_sparse_weight(256, 128, 32, 0.1, seed=3)
    assert not (sparser.ne(0) & weight.eq(0)).any()  # nested layouts at equal seed


def test_random_layouts_are_nested_at_equal_seed_and_never_empty_above_zero():
    dense, sparse = random_layout(8, 4, 0.36, seed=3), random_layout(8, 4, 0.1, seed=3)
    assert not (sparse & ~dense).any()
    assert int(random_layout(2, 2, 0.01).sum()) == 1 and stored_block_count(4, 0.01) == 1
    assert int(random_layout(2, 2, 0.0).sum()) == 0


def test_random_block_sparse_weight_is_zero_outside_its_blocks():
    weight = random_block_sparse_weight(256, 128, 32, 0.36, seed=3)
    layout = block_layout(weight, 32)
    assert int(layout.sum()) == round(0.36 * 32)
    assert torch.equal(block_sparse_weight(layout, 32, seed=1).ne(0), weight.ne(0))  # every kept value is nonzero
    emptied = random_block_sparse_weight(256, 128, 32, 1.0, empty_block_rows=(1, 5))
    assert block_layout(emptied, 32).sum(dim=1).tolist() == [4, 0, 4, 4, 4, 0, 4, 4]
    assert BlockSparseMatrix.from_dense(weight, 32).density == pytest.approx(int(layout.sum()) / 32)


def test_head_structured_rows_of_a_head_share_their_pattern():
    layout = head_structured_layout(12, 24, 0.5, rows_per_head=4, seed=1)
    assert layout.sum(dim=1).tolist() == [12] * 12
    for head in range(3):
        rows = layout[head * 4 : head * 4 + 4]
        assert (rows == rows[0]).all()
    assert not torch.equal(layout[0], layout[4])  # heads differ
    matrix = BlockSparseMatrix.from_dense(block_sparse_weight(layout, 16), 16)
    assert dict(matrix.grouping_inflation())[4] == 1.0


@pytest.mark.parametrize("density", [0.2, 0.36, 0.5, 0.75, 1.0])
def test_nn_pruning_like_removes_whole_heads_and_hits_the_density(density):
    layout = nn_pruning_like_layout(24, 24, density, rows_per_head=2, seed=2)
    assert int(layout.sum()) == round(density * 576)
    empty_heads = int((~layout.view(12, 2 * 24).any(dim=1)).sum())
    # A third of 12 heads go wherever the kept ones can still hold the blocks.
    assert empty_heads == min(4, 12 - -(-round(density * 576) // 48))
    if density <= 0.5:
        assert empty_heads == 4


def test_make_layout_names_and_errors():
    assert set(LAYOUTS) == {"random", "head_structured", "nn_pruning_like"}
    for name in LAYOUTS:
        assert make_layout(name, 8, 6, 0.5, seed=4, rows_per_head=2).shape == (8, 6)
    with pytest.raises(ValueError, match="unknown layout"):
        make_layout("diagonal", 8, 6, 0.5)
    with pytest.raises(ValueError, match="density"):
        random_layout(4, 4, 1.5)
    with pytest.raises(ValueError, match="rows_per_head"):
        nn_pruning_like_layout(5, 4, 0.5, rows_per_head=2)
    with pytest.raises(ValueError, match="divide"):
        random_block_sparse_weight(100, 64, 32, 0.5)


def test_two_to_four_mask_keeps_two_of_every_four():
    mask = two_to_four_mask(6, 16, seed=2)
    assert mask.view(6, 4, 4).sum(dim=-1).eq(2).all()
    assert not torch.equal(mask, two_to_four_mask(6, 16, seed=3))
    with pytest.raises(ValueError, match="multiple of 4"):
        two_to_four_mask(2, 6)


def test_block_density_counts_like_the_stored_matrix():
    from nn_blocksparse.layouts import block_density

    weight = random_block_sparse_weight(128, 96, 32, 0.5, seed=4)
    assert block_density(weight, 32) == BlockSparseMatrix.from_dense(weight, 32).density == 6 / 12
    assert block_density(torch.zeros(64, 64), 32) == 0.0  # an all-zero matrix stores nothing
    assert block_density(torch.zeros(0, 64), 32) == 1.0 == BlockSparseMatrix.from_dense(torch.zeros(0, 64), 32).density


def test_block_layout_pads_edge_blocks_only_when_asked():
    weight = torch.zeros(40, 70)
    weight[39, 69] = 1.0  # in the padded corner block
    with pytest.raises(ValueError, match="must divide"):
        block_layout(weight, 32)
    layout = block_layout(weight, 32, pad_edges=True)
    assert layout.shape == (2, 3) and layout.sum() == 1 and layout[1, 2]
