"""Tests for nn_blocksparse.bert.pruning: the seeded nn_pruning-style pruning generator.

Every density here is recounted from the weights by the test itself (nonzero elements, zero rows,
zero blocks), not taken from the PruningReport, and then compared with the report.
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import BertConfig, BertForQuestionAnswering, BertModel

from nn_blocksparse.bert.pruning import (
    LINEAR_KINDS,
    encoder_linear_masks,
    load_minilm,
    minilm_path,
    prune_like_nn_pruning,
    random_bert_base,
)

BLOCK = 32


pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


def _linears(layer_module):
    attention = layer_module.attention
    return {
        "query": attention.self.query.weight,
        "key": attention.self.key.weight,
        "value": attention.self.value.weight,
        "attention_output": attention.output.dense.weight,
        "ffn_intermediate": layer_module.intermediate.dense.weight,
        "ffn_output": layer_module.output.dense.weight,
    }


def _zero_heads(layer_module, num_heads):
    """Heads whose Q/K/V rows, Q/K/V biases and attention-output columns are all zero."""
    attention = layer_module.attention
    head_dim = attention.self.query.weight.shape[0] // num_heads
    zero = []
    for head in range(num_heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        parts = [getattr(attention.self, n).weight[rows] for n in ("query", "key", "value")]
        parts += [getattr(attention.self, n).bias[rows] for n in ("query", "key", "value")]
        parts.append(attention.output.dense.weight[:, rows])
        if all(not p.any() for p in parts):
            zero.append(head)
    return zero


@pytest.fixture(scope="module")
def pruned_bert_base():
    model = random_bert_base(seed=0)
    report = prune_like_nn_pruning(model, seed=0)
    return model, report


def test_bert_base_hits_36_percent_and_48_of_144_heads(pruned_bert_base):
    model, report = pruned_bert_base
    # shapes are untouched: still a dense transformers BERT-base
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 768
    nonzero = total = 0
    removed_per_layer = []
    for layer_module in model.encoder.layer:
        weights = _linears(layer_module)
        assert weights["query"].shape == (768, 768) and weights["ffn_intermediate"].shape == (3072, 768)
        for weight in weights.values():
            nonzero += int((weight != 0).sum())
            total += weight.numel()
        removed_per_layer.append(_zero_heads(layer_module, 12))
    kept_fraction = nonzero / total
    assert abs(kept_fraction - 0.36) <= 0.01
    assert kept_fraction == pytest.approx(report.kept_fraction)
    assert sum(len(r) for r in removed_per_layer) == 48 == report.num_heads_removed
    assert {layer: heads for layer, heads in enumerate(removed_per_layer)} == report.heads_removed
    assert all(len(r) < 12 for r in removed_per_layer), "a layer lost every head"
    assert len({len(r) for r in removed_per_layer}) > 1, "heads should be removed unevenly, as in nn_pruning"


def test_bert_base_structure_blocks_and_neurons(pruned_bert_base):
    model, report = pruned_bert_base
    block_total = block_nonzero = 0
    for layer, layer_module in enumerate(model.encoder.layer):
        weights = _linears(layer_module)
        kept_heads = [h for h in range(12) if h not in report.heads_removed[layer]]
        kept_rows = torch.cat([torch.arange(h * 64, (h + 1) * 64) for h in kept_heads])
        for kind in ("query", "key", "value", "attention_output"):
            weight = weights[kind] if kind != "attention_output" else weights[kind].t()  # head axis first
            # every 32x32 block is entirely zero or entirely nonzero (random init has no exact zeros)
            blocks = (weight != 0).reshape(24, BLOCK, 24, BLOCK).permute(0, 2, 1, 3).reshape(24, 24, -1)
            counts = blocks.sum(-1)
            assert torch.all((counts == 0) | (counts == BLOCK * BLOCK)), kind
            kept_blocks = counts[kept_rows[::BLOCK] // BLOCK] > 0
            block_total += kept_blocks.numel()
            block_nonzero += int(kept_blocks.sum())
        # FFN: a neuron is either fully present or fully removed (row of W_in, bias, column of W_out)
        intermediate = layer_module.intermediate.dense
        row_alive = intermediate.weight.any(dim=1)
        assert torch.equal(row_alive, weights["ffn_output"].any(dim=0))
        assert not intermediate.bias[~row_alive].any()
        assert int(row_alive.sum()) == report.ffn_neurons_kept[layer] >= 1
    assert block_nonzero / block_total == pytest.approx(report.block_density_in_kept_heads)
    assert abs(report.block_density_in_kept_heads - report.target_attention_block_density) < 0.01
    # default split: the same density for attention blocks and FFN neurons, solved for 36% overall
    assert report.target_attention_block_density == pytest.approx(report.target_ffn_keep_fraction)
    expected_kind_fraction = (96 / 144) * report.block_density_in_kept_heads
    for kind in ("query", "key", "value", "attention_output"):
        assert report.kept_fraction_by_kind[kind] == pytest.approx(expected_kind_fraction, abs=1e-3)
    assert report.kept_fraction_by_kind["ffn_intermediate"] == pytest.approx(sum(report.ffn_neurons_kept) / (12 * 3072))


def test_minilm_head_count_rounds_proportionally():
    model = load_minilm()
    report = prune_like_nn_pruning(model, seed=3)
    assert report.num_heads_removed == 24  # 72 heads * 48/144
    assert abs(report.kept_fraction - 0.36) <= 0.01
    counted = sum(int(m.sum()) for m in encoder_linear_masks(model).values())
    total = sum(m.numel() for m in encoder_linear_masks(model).values())
    assert counted / total == pytest.approx(report.kept_fraction)


def test_same_seed_same_masks_different_seed_different_masks():
    original = load_minilm()
    first, second, third = (copy.deepcopy(original) for _ in range(3))
    report_first = prune_like_nn_pruning(first, seed=7)
    report_second = prune_like_nn_pruning(second, seed=7)
    report_third = prune_like_nn_pruning(third, seed=8)
    masks_first, masks_second, masks_third = map(encoder_linear_masks, (first, second, third))
    assert masks_first.keys() == masks_second.keys() and len(masks_first) == 6 * len(LINEAR_KINDS)
    assert all(torch.equal(masks_first[k], masks_second[k]) for k in masks_first)
    assert report_first == report_second
    assert any(not torch.equal(masks_first[k], masks_third[k]) for k in masks_first)
    assert report_first.heads_removed != report_third.heads_removed
    # pruning only zeroes: surviving weights are the original values
    for key, (a, b) in {"q": (first.encoder.layer[0].attention.self.query.weight,
                              original.encoder.layer[0].attention.self.query.weight)}.items():
        assert torch.equal(a[a != 0], b[a != 0]), key


def test_scores_follow_weight_norms():
    """A head 100x larger is never removed; a head 100x smaller always is, whatever the seed."""
    model = load_minilm()
    with torch.no_grad():
        attention = model.encoder.layer[1].attention
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            linear.weight[0:32] *= 100.0  # head 0 of layer 1
            linear.weight[64:96] *= 0.01  # head 2 of layer 1
        attention.output.dense.weight[:, 0:32] *= 100.0
        attention.output.dense.weight[:, 64:96] *= 0.01
    for seed in range(3):
        report = prune_like_nn_pruning(copy.deepcopy(model), seed=seed)
        assert 0 not in report.heads_removed[1]
        assert 2 in report.heads_removed[1]


def test_works_on_head_models_and_leaves_the_head_alone():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64)
    model = BertForQuestionAnswering(config).eval()
    qa_before = model.qa_outputs.weight.clone()
    report = prune_like_nn_pruning(model, seed=0, heads_removed_fraction=0.25)
    assert report.num_heads_removed == 2
    assert abs(report.kept_fraction - 0.36) <= 0.01
    assert torch.equal(model.qa_outputs.weight, qa_before)


def test_explicit_fractions():
    base = load_minilm()
    fixed_ffn = prune_like_nn_pruning(copy.deepcopy(base), ffn_keep_fraction=0.3)
    assert abs(fixed_ffn.kept_fraction - 0.36) <= 0.01
    assert abs(fixed_ffn.kept_fraction_by_kind["ffn_intermediate"] - 0.3) < 0.002
    fixed_blocks = prune_like_nn_pruning(copy.deepcopy(base), attention_block_density=0.75)
    assert abs(fixed_blocks.kept_fraction - 0.36) <= 0.01
    assert abs(fixed_blocks.block_density_in_kept_heads - 0.75) < 0.01
    both = prune_like_nn_pruning(copy.deepcopy(base), linear_density=None, ffn_keep_fraction=0.5,
                                 attention_block_density=0.5)
    # 1/3 of the weights are attention, 2/3 of heads kept: 1/3*2/3*0.5 + 2/3*0.5
    assert both.kept_fraction == pytest.approx(1 / 9 + 1 / 3, abs=0.005)
    no_heads = prune_like_nn_pruning(copy.deepcopy(base), heads_removed_fraction=0.0, linear_density=0.5)
    assert no_heads.num_heads_removed == 0 and abs(no_heads.kept_fraction - 0.5) <= 0.01


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ffn_keep_fraction=0.5, attention_block_density=0.5), "pass linear_density=None"),
        (dict(linear_density=0.95), "unreachable"),
        (dict(block_size=40), "must divide hidden_size"),
        (dict(heads_removed_fraction=1.0), r"must be in \[0, 1\)"),
        (dict(linear_density=0.0), r"must be in \(0, 1\]"),
    ],
)
def test_invalid_settings(kwargs, message):
    model = load_minilm()
    with pytest.raises(ValueError, match=message):
        prune_like_nn_pruning(model, **kwargs)


def test_refuses_physically_pruned_models():
    model = load_minilm()
    attention = model.encoder.layer[0].attention
    attention.self.query = torch.nn.Linear(384, 352)
    with pytest.raises(ValueError, match="already physically pruned"):
        prune_like_nn_pruning(model)


def test_helpers():
    assert (minilm_path() / "config.json").is_file()
    minilm = load_minilm()
    assert isinstance(minilm, BertModel) and not minilm.training
    assert (minilm.config.num_hidden_layers, minilm.config.hidden_size, minilm.config.num_attention_heads,
            minilm.config.intermediate_size) == (6, 384, 12, 1536)
    state = torch.random.get_rng_state()
    small_check = random_bert_base(seed=1).encoder.layer[0].attention.self.query.weight
    assert torch.equal(torch.random.get_rng_state(), state), "random_bert_base must not touch the global RNG"
    assert small_check.shape == (768, 768)
    assert torch.equal(small_check, random_bert_base(seed=1).encoder.layer[0].attention.self.query.weight)
