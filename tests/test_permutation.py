"""Output-feature permutations: exact (the layer computes the same function) and never more padding."""

import pytest
import torch
import torch.nn.functional as F

from nn_blocksparse.attention import FusedSelfAttention
from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
from nn_blocksparse.layouts import block_layout, block_sparse_weight, make_layout
from nn_blocksparse.permutation import (attention_feature_permutation, consecutive_group_steps, feature_permutation,
                                        ffn_feature_permutation, grouped_block_row_order)


def library_inflation(layout: torch.Tensor, rows_per_group: int) -> float:
    return BlockSparseMatrix.from_dense(block_sparse_weight(layout, 16), 16).row_groups(rows_per_group).inflation


@pytest.mark.parametrize("name", ["random", "head_structured", "nn_pruning_like"])
@pytest.mark.parametrize("rows_per_group", [2, 4, 8])
def test_order_is_a_permutation_that_never_pads_more(name, rows_per_group):
    layout = make_layout(name, 24, 12, 0.5, seed=5, rows_per_head=2)
    order = grouped_block_row_order([layout], rows_per_group)
    assert sorted(order.tolist()) == list(range(24))
    permuted = layout[order]
    assert int(permuted.sum()) == int(layout.sum())  # whole block-rows move: the stored blocks stay
    assert consecutive_group_steps(permuted, rows_per_group) <= consecutive_group_steps(layout, rows_per_group)
    assert library_inflation(permuted, rows_per_group) <= library_inflation(layout, rows_per_group) + 1e-12


def test_scattered_identical_rows_are_brought_together():
    # Four patterns, each on 4 rows spread over the matrix: feature order pads every group of 4.
    patterns = make_layout("random", 4, 16, 0.5, seed=1)
    layout = patterns[torch.tensor([0, 1, 2, 3] * 4)]
    assert consecutive_group_steps(layout, 4) > int(layout.sum()) // 4
    order = grouped_block_row_order([layout], 4)
    assert consecutive_group_steps(layout[order], 4) * 4 == int(layout.sum())  # no padding left


def test_layouts_that_share_a_permutation_are_weighed_together():
    first = make_layout("random", 8, 6, 0.5, seed=2)
    second = make_layout("random", 8, 10, 0.5, seed=3)
    joint = grouped_block_row_order([first, second], 2)
    total = consecutive_group_steps(first[joint], 2) + consecutive_group_steps(second[joint], 2)
    assert total <= consecutive_group_steps(first, 2) + consecutive_group_steps(second, 2)
    with pytest.raises(ValueError, match="block-rows"):
        grouped_block_row_order([first, make_layout("random", 6, 6, 0.5)], 2)


def test_units_stay_whole():
    layout = make_layout("random", 24, 8, 0.4, seed=4)
    # Units of 4 rows, groups of 2: rows move only inside their unit.
    inside = grouped_block_row_order([layout], 2, unit_rows=4).view(6, 4)
    assert all(sorted(unit.tolist()) == list(range(4 * u, 4 * u + 4)) for u, unit in enumerate(inside))
    # Units of 2 rows, groups of 8: units move whole, in their own order.
    whole = grouped_block_row_order([layout], 8, unit_rows=2).view(12, 2)
    assert all(unit[1] == unit[0] + 1 and unit[0] % 2 == 0 for unit in whole.tolist())
    with pytest.raises(ValueError, match="divide"):
        grouped_block_row_order([layout], 4, unit_rows=3)


def test_ffn_permutation_is_exact():
    generator = torch.Generator().manual_seed(0)
    inner = block_sparse_weight(make_layout("random", 8, 4, 0.5, seed=6), 16, generator=generator).double()
    outer = torch.randn(64, 128, generator=generator, dtype=torch.float64)
    inner_bias = torch.randn(128, generator=generator, dtype=torch.float64)
    x = torch.randn(5, 64, generator=generator, dtype=torch.float64)
    perm = ffn_feature_permutation(inner, 16, 4)
    assert not torch.equal(perm, torch.arange(128))  # this layout does get reordered
    expected = F.linear(F.gelu(F.linear(x, inner, inner_bias)), outer)
    permuted = F.linear(F.gelu(F.linear(x, inner[perm], inner_bias[perm])), outer[:, perm])
    torch.testing.assert_close(permuted, expected, rtol=1e-12, atol=1e-12)
    assert block_layout(inner[perm], 16).sum() == block_layout(inner, 16).sum()


@pytest.mark.parametrize("head_dim, block_size, rows_per_group", [(32, 16, 4), (32, 16, 2), (16, 32, 2), (32, 32, 2)])
def test_attention_permutation_is_exact(head_dim, block_size, rows_per_group):
    num_heads, hidden = 8, 64
    features = num_heads * head_dim
    generator = torch.Generator().manual_seed(1)

    def weight():  # head-structured zero blocks on the head axis, as pruning leaves them
        layout = make_layout("random", features // block_size, hidden // block_size, 0.5, generator=generator)
        return block_sparse_weight(layout, block_size, generator=generator).double()

    q, k, v = weight(), weight(), weight()
    biases = [torch.randn(features, generator=generator, dtype=torch.float64) for _ in range(3)]
    out = torch.randn(hidden, features, generator=generator, dtype=torch.float64)
    x = torch.randn(2, 7, hidden, generator=generator, dtype=torch.float64)

    def attention(q, k, v, biases, out):
        qkv = torch.nn.Linear(hidden, 3 * features, dtype=torch.float64)
        with torch.no_grad():
            qkv.weight.copy_(torch.cat([q, k, v]))
            qkv.bias.copy_(torch.cat(biases))
        return F.linear(FusedSelfAttention(qkv, num_heads, head_dim)(x), out)

    perm = attention_feature_permutation(q, k, v, num_heads, block_size, rows_per_group)
    assert sorted(perm.tolist()) == list(range(features))
    expected = attention(q, k, v, biases, out)
    permuted = attention(q[perm], k[perm], v[perm], [b[perm] for b in biases], out[:, perm])
    torch.testing.assert_close(permuted, expected, rtol=1e-10, atol=1e-10)
    # Heads stay whole: every head's features land in one head's slot.
    slots = perm.view(num_heads, head_dim) // head_dim if head_dim >= block_size else None
    if slots is not None:
        assert all(len(set(slot.tolist())) == 1 for slot in slots)


def test_attention_head_sizes_off_the_block_grid_get_the_identity():
    q = torch.randn(48, 32)  # 4 heads of 12: no block-row move keeps heads whole
    assert torch.equal(attention_feature_permutation(q, q, q, 4, 16, 2), torch.arange(48))


def test_feature_permutation_moves_whole_block_rows():
    assert feature_permutation(torch.tensor([2, 0, 1]), 2).tolist() == [4, 5, 0, 1, 2, 3]


def test_permutation_report_quick(tmp_path):
    """The CPU report's quick mode: counts for every layout, role and R, the pruned MiniLM's too."""
    from benchmarks import common, permutation_report

    assert permutation_report.main(["--quick", "--out", str(tmp_path)]) == 0
    environment, rows = common.read_csv(tmp_path / f"permutation_{common.device_tag(torch.device('cpu'))}_quick.csv")
    assert list(rows[0]) == permutation_report.COLUMNS and environment["device"] == "cpu"
    assert {r["source"] for r in rows} == {"layout random", "layout head_structured", "layout nn_pruning_like",
                                           "pruned_minilm hybrid"}
    assert {int(r["rows_per_group"]) for r in rows} == {2, 4, 8}
    for row in rows:
        assert int(row["steps_after"]) <= int(row["steps_before"]), row
        assert float(row["consecutive_inflation_after"]) <= float(row["consecutive_inflation_before"]) + 1e-9, row
        assert float(row["useful_flop_fraction_after"]) == pytest.approx(1 / float(row["inflation_after"]), rel=1e-5)
    gains = [int(r["steps_after"]) < int(r["steps_before"]) for r in rows if r["source"] == "layout random"]
    assert any(gains)  # random FFN-in rows do get grouped better
