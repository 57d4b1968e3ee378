"""`AttentionBlock`: the attention half of a post-norm layer as one native block, bit for bit the
modules called one by one, checked against float64; and everything that sends it back to them."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from nn_blocksparse.attention import FusedSelfAttention
from nn_blocksparse.attention_block import AttentionBlock
from nn_blocksparse.cpu import native_isa
from nn_blocksparse.cpu.attention_block import NativeAttentionBlockCall
from nn_blocksparse.dense_linear import DenseLinear
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse.linear import BlockSparseLinear
from nn_blocksparse.norm import AddLayerNorm

needs_native = pytest.mark.skipif(native_isa() is None, reason="no native kernel here")
HIDDEN, HEADS, HEAD_DIM = 64, 2, 32


def parts(dtype=torch.float32, seed=0):
    """A fused attention (block-sparse QKV), a block-sparse output projection and a layer norm."""
    generator = torch.Generator().manual_seed(seed)
    inner = HEADS * HEAD_DIM
    qkv = BlockSparseLinear.from_dense(random_block_sparse_weight(3 * inner, HIDDEN, 32, 0.6, seed=seed),
                                       torch.randn(3 * inner, generator=generator))
    output = BlockSparseLinear.from_dense(random_block_sparse_weight(HIDDEN, inner, 32, 0.5, seed=seed + 1),
                                          torch.randn(HIDDEN, generator=generator))
    norm = torch.nn.LayerNorm(HIDDEN, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(HIDDEN, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(HIDDEN, generator=generator))
    attention = FusedSelfAttention(qkv, HEADS, HEAD_DIM).eval()
    return attention.to(dtype), output.to(dtype), norm.to(dtype)


def inputs(batch=3, seq=24, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, seq, HIDDEN, generator=generator) + 1).to(dtype)
    mask = torch.zeros(batch, 1, 1, seq)
    mask[1, ..., seq // 2:] = torch.finfo(torch.float32).min  # a padded row
    return x, mask


def one_by_one(attention, output, norm, x, mask):
    """The modules called one by one, as the thin layer calls them without a block."""
    from nn_blocksparse.bert.thin_layer import _add_norm

    return _add_norm(output(attention(x, mask)), x, norm, output, AddLayerNorm())


def float64_reference(attention, output, norm, x, mask):
    qkv = F.linear(x.double(), attention.qkv.weight.double(), attention.qkv.bias.double())
    batch, seq = x.shape[:2]
    q, k, v = qkv.view(batch, seq, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
    scores = q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5 + (0 if mask is None else mask.double())
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, HEADS * HEAD_DIM)
    projected = F.linear(context, output.weight.double(), output.bias.double())
    return F.layer_norm(projected + x.double(), (HIDDEN,), norm.weight.double(), norm.bias.double(), norm.eps)


@needs_native
@pytest.mark.parametrize("masked", [True, False])
def test_block_is_the_modules_one_by_one_bit_for_bit(masked):
    attention, output, norm = parts()
    block, add_norm = AttentionBlock(), AddLayerNorm()
    for seed in (0, 1):  # the second call on the prepared block
        x, mask = inputs(seed=seed)
        mask = mask if masked else None
        with torch.inference_mode():
            out = block(attention, output, norm, add_norm, x, mask)
            expected = one_by_one(attention, output, norm, x, mask)
        assert out is not None and isinstance(block._prepared[1], NativeAttentionBlockCall)
        assert torch.equal(out, expected)
        error = (out.double() - float64_reference(attention, output, norm, x, mask)).abs().max().item()
        assert error < 1e-4


@needs_native
def test_block_in_bf16_where_the_attention_runs_on_tiles():
    attention, output, norm = parts(torch.bfloat16)
    x, mask = inputs(dtype=torch.bfloat16)
    with torch.inference_mode():
        out = AttentionBlock()(attention, output, norm, AddLayerNorm(), x, mask)
        expected = one_by_one(attention, output, norm, x, mask)
    if native_isa() != "amx_bf16":  # bf16 attention runs on SDPA here: the block leaves it to the modules
        assert out is None
        return
    assert torch.equal(out, expected)
    reference = float64_reference(*(module.float() for module in (attention, output, norm)), x.float(), mask)
    assert (out.double() - reference).abs().max().item() < 0.1  # bf16 roundings of each step


@needs_native
def test_block_leaves_to_the_modules_what_it_cannot_replay():
    x, mask = inputs()
    cases = {}

    def hooked(index):
        modules = list(parts())
        target = [modules[0], modules[0].qkv, modules[1], modules[2]][index]
        target.register_forward_hook(lambda module, args, output: None)
        return modules

    for index, name in enumerate(("attention", "projection", "output", "norm")):
        cases[f"hooked {name}"] = (hooked(index), x, mask)
    attention, output, norm = parts()
    cases["dense output"] = ((attention, DenseLinear.from_tensors(output.weight, output.bias), norm), x, mask)
    cases["a mask per query"] = (parts(), x, torch.zeros(3, 1, 24, 24))
    cases["not contiguous"] = (parts(), x.transpose(0, 1).contiguous().transpose(0, 1), mask)
    cases["a negated view"] = (parts(), torch._neg_view(x), mask)
    training = parts()
    training[0].train().dropout = 0.1
    cases["dropout in training"] = (training, x, mask)
    compiled = parts()
    compiled[1].compile()  # its compiled call runs instead of its forward
    cases["a compiled output projection"] = (compiled, x, mask)
    for name, ((attention, output, norm), x_case, mask_case) in cases.items():
        with torch.inference_mode():
            assert AttentionBlock()(attention, output, norm, AddLayerNorm(), x_case, mask_case) is None, name
    attention, output, norm = parts()
    assert AttentionBlock()(attention, output, norm, AddLayerNorm(), x, mask) is None  # gradients enabled
    with torch.inference_mode(), torch.autograd.profiler.profile():
        assert AttentionBlock()(attention, output, norm, AddLayerNorm(), x, mask) is None  # the ops' ranges


@needs_native
def test_block_follows_changes_to_its_modules():
    attention, output, norm = parts()
    block, add_norm = AttentionBlock(), AddLayerNorm()
    x, mask = inputs()
    with torch.inference_mode():
        block(attention, output, norm, add_norm, x, mask)
        # In place: new values seen.
        output.values.mul_(2)
        norm.weight.mul_(0.5)
        assert torch.equal(block(attention, output, norm, add_norm, x, mask), one_by_one(attention, output, norm, x, mask))
        # A bias of another size: refused by the block as by the module.
        kept_bias = output.bias
        output.bias = torch.nn.Parameter(torch.zeros(HIDDEN + 32), requires_grad=False)
        for run in (lambda: block(attention, output, norm, add_norm, x, mask),
                    lambda: one_by_one(attention, output, norm, x, mask)):
            with pytest.raises(ValueError):
                run()
        output.bias = kept_bias
        # Fewer heads: prepared again.
        smaller = FusedSelfAttention(attention.qkv, 1, 2 * HEAD_DIM).eval()
        assert torch.equal(block(smaller, output, norm, add_norm, x, mask), one_by_one(smaller, output, norm, x, mask))
        # Indices modified in place into an invalid matrix: refused as the module's forward refuses them.
        output.col_indices[0] = 99
        with pytest.raises(ValueError):
            block(attention, output, norm, add_norm, x, mask)


def test_copies_and_pickles_of_a_block_are_empty():
    block = AttentionBlock()
    block._prepared = (("prepared",), object())
    for copied in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert copied._prepared == (None, None)
