"""ThinBertLayer: a patched layer's short forward gives transformers' BertLayer.forward output.

The reference is the same patched layer run through transformers' own `BertLayer.forward` (the
class swapped back), so any difference is the thin forward's. Its residual adds and layer norms
run natively (`norm.add_layer_norm`): close to transformers', not bit for bit; with a hook on each
layer norm the norms run as modules, and then the output is transformers', bit for bit. The patched
model as a whole is checked against the unpatched one in test_patching.py.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.models.bert.modeling_bert import BertLayer  # noqa: E402

from nn_blocksparse.bert import load_patched_bert, patch_bert, save_patched_bert  # noqa: E402
from nn_blocksparse.bert.patching import bert_layers  # noqa: E402
from nn_blocksparse.bert.thin_layer import ThinBertLayer, use_transformers_layers  # noqa: E402


def padded_inputs(vocab_size: int, batch: int = 3, seq: int = 24) -> dict:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq // 2:] = 0
    mask[2, 5:] = 0
    return {"input_ids": torch.randint(1000, vocab_size, (batch, seq), generator=generator), "attention_mask": mask}


def hook_layer_norms(model) -> list:
    """A no-op forward hook on every LayerNorm of `model`'s layers (the thin forward then calls them as
    modules); returns the calls they saw."""
    calls = []
    for layer in bert_layers(model):
        for norm in (layer.attention.output.LayerNorm, layer.output.LayerNorm):
            norm.register_forward_hook(lambda module, args, output: calls.append(module))
    return calls


def with_transformers_layers(model):
    """A copy of a patched model whose layers run transformers' own BertLayer.forward."""
    plain = copy.deepcopy(model)
    use_transformers_layers(bert_layers(plain))
    assert all(type(layer) is BertLayer for layer in bert_layers(plain))
    return plain


@pytest.mark.parametrize("mode", ["hybrid", "blocksparse"])
def test_thin_layers_match_transformers_forward(pruned_minilm, single_intra_op_thread, mode, monkeypatch):
    from nn_blocksparse.cpu import layer_norm

    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode=mode)
    assert all(type(layer) is ThinBertLayer for layer in bert_layers(patched))
    assert all(isinstance(layer, BertLayer) for layer in bert_layers(patched))
    inputs = padded_inputs(model.config.vocab_size)
    plain = with_transformers_layers(patched)
    from nn_blocksparse.cpu.attention_block import NativeAttentionBlockCall

    native_norms, blocks = [], []
    run, block = layer_norm._run, NativeAttentionBlockCall.__call__
    monkeypatch.setattr(layer_norm, "_run", lambda *args: native_norms.append(args) or run(*args))
    monkeypatch.setattr(NativeAttentionBlockCall, "__call__", lambda *args: blocks.append(block(*args)) or blocks[-1])
    with torch.inference_mode():
        thin_out = patched(**inputs, output_hidden_states=True)
        plain_out = plain(**inputs, output_hidden_states=True)
    from nn_blocksparse.cpu import native_isa

    assert len(native_norms) == (12 if native_isa() is not None else 0)  # both norms of all 6 layers, natively
    # The attention halves as native blocks where both projections are block-sparse (all of them in
    # blocksparse mode), none returning None.
    block_sparse = sum(type(layer.attention.output.dense).__name__ == "BlockSparseLinear"
                       and type(layer.attention.self.attention.qkv).__name__ == "BlockSparseLinear"
                       for layer in bert_layers(patched))
    assert mode == "hybrid" or block_sparse == 6
    assert len(blocks) == (block_sparse if native_isa() is not None else 0) and all(b is not None for b in blocks)
    # transformers records every layer's output through hooks on BertLayer: still there, still close
    # (the norms' statistics summed in another order: fp32 rounding, compounded over the layers).
    assert len(thin_out.hidden_states) == 7
    for thin, reference in zip(thin_out.hidden_states, plain_out.hidden_states):
        assert (thin - reference).abs().max().item() <= 2e-5 * max(1.0, reference.abs().max().item())
    # The state dict is the patched model's: same keys, same tensors.
    assert patched.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("mode", ["hybrid", "blocksparse"])
def test_thin_layers_with_hooked_norms_are_bit_identical_to_transformers_forward(pruned_minilm, single_intra_op_thread,
                                                                                 mode):
    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode=mode)
    inputs = padded_inputs(model.config.vocab_size)
    plain = with_transformers_layers(patched)
    calls = hook_layer_norms(patched)
    with torch.inference_mode():
        thin_out = patched(**inputs, output_hidden_states=True)
        plain_out = plain(**inputs, output_hidden_states=True)
    assert len(calls) == 12  # the hooks fired: the norms ran as modules
    assert torch.equal(thin_out.last_hidden_state, plain_out.last_hidden_state)
    assert all(torch.equal(a, b) for a, b in zip(thin_out.hidden_states, plain_out.hidden_states))


@pytest.mark.parametrize("mode", ["hybrid", "blocksparse"])
def test_norms_write_over_a_linears_output_only_where_nothing_else_holds_it(pruned_minilm, single_intra_op_thread,
                                                                            mode, monkeypatch):
    from nn_blocksparse.cpu import layer_norm, native_isa

    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode=mode)
    inputs = padded_inputs(model.config.vocab_size)
    plain = with_transformers_layers(patched)
    over_x = []
    run = layer_norm._run
    monkeypatch.setattr(layer_norm, "_run", lambda library, x, *rest: over_x.append(rest[-1] is x)
                        or run(library, x, *rest))
    with torch.inference_mode():
        expected = plain(**inputs).last_hidden_state
        assert torch.allclose(patched(**inputs).last_hidden_state, expected, atol=2e-5)
    assert over_x == ([True] * 12 if native_isa() is not None else [])  # unhooked linears: their outputs reused
    # A hook on a linear sees its output, and may keep it: the norm then writes elsewhere.
    recorded = []
    first = bert_layers(patched)[0]
    for linear in (first.attention.output.dense, first.output.dense):
        linear.register_forward_hook(lambda module, args, output: recorded.append((output, output.clone())))
    over_x.clear()
    with torch.inference_mode():
        assert torch.allclose(patched(**inputs).last_hidden_state, expected, atol=2e-5)
    assert len(recorded) == 2 and all(torch.equal(kept, copied) for kept, copied in recorded)
    if native_isa() is not None:
        assert over_x == [False, False] + [True] * 10
    # Copies leave the layers' prepared norms behind and prepare their own.
    copied = copy.deepcopy(patched)
    with torch.inference_mode():
        assert torch.allclose(copied(**inputs).last_hidden_state, expected, atol=2e-5)


def test_bf16_weight_ffns_pass_bf16_between_them_bit_identically(pruned_minilm, single_intra_op_thread):
    # bf16 weights on fp32 activations: where both FFN matrices are bf16 DenseLinears with GELU fused,
    # FFN-in's bf16 result goes to FFN-out without its fp32 copy: the same output, bit for bit, as
    # transformers' forward (which makes the copy), and as DenseLinear's fp32 result (the norms hooked,
    # so that they run as modules: the comparison is of the FFNs alone).
    from nn_blocksparse.bert.thin_layer import _bf16_between
    from nn_blocksparse.dense_linear import DenseLinear

    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold=0.5, weight_dtype=torch.bfloat16)
    layers = bert_layers(patched)
    assert any(_bf16_between(layer.intermediate.dense, layer.output.dense, layer.intermediate.intermediate_act_fn)
               for layer in layers)
    inputs = padded_inputs(model.config.vocab_size)
    plain = with_transformers_layers(patched)
    hook_layer_norms(patched)
    with torch.inference_mode():
        assert torch.equal(patched(**inputs).last_hidden_state, plain(**inputs).last_hidden_state)
        ffn_in = next(layer.intermediate.dense for layer in layers if type(layer.intermediate.dense) is DenseLinear)
        x = torch.randn(5, ffn_in.in_features)
        kept = ffn_in(x, bf16_output=True)
        assert kept.dtype == torch.bfloat16 and torch.equal(kept.float(), ffn_in(x))


def test_resize_keeps_transformers_layers(pruned_minilm):
    patched = patch_bert(copy.deepcopy(pruned_minilm[0]), mode="resize")
    assert all(type(layer) is BertLayer for layer in bert_layers(patched))


def test_thin_layer_leaves_training_attentions_and_chunking_to_transformers(pruned_minilm, single_intra_op_thread,
                                                                  monkeypatch):
    from transformers.models.bert import modeling_bert

    calls = []
    original = modeling_bert.apply_chunking_to_forward
    monkeypatch.setattr(modeling_bert, "apply_chunking_to_forward",
                        lambda *args: calls.append(1) or original(*args))  # only BertLayer.forward calls it
    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode="hybrid")
    plain = with_transformers_layers(patched)
    inputs = padded_inputs(model.config.vocab_size)
    with torch.inference_mode():
        patched(**inputs)
    assert calls == []  # eval, no chunking: the thin forward ran in every layer
    patched.train()
    plain.train()
    with torch.no_grad():
        torch.manual_seed(1)
        thin_out = patched(**inputs).last_hidden_state
        assert len(calls) == 6  # training: transformers' forward, in every layer
        torch.manual_seed(1)
        plain_out = plain(**inputs).last_hidden_state
        torch.manual_seed(2)
        other_dropout = patched(**inputs).last_hidden_state
    assert torch.equal(thin_out, plain_out)  # the same dropout draws
    assert not torch.equal(thin_out, other_dropout)  # and dropout really was on
    patched.eval()
    calls.clear()
    with torch.inference_mode():
        patched(**inputs, output_attentions=True)  # the adapter and transformers' hooks provide those
    assert len(calls) == 6
    for layer in bert_layers(patched):
        layer.chunk_size_feed_forward = 8
    calls.clear()
    with torch.inference_mode():
        patched(**inputs)
    assert len(calls) == 6


def test_loaded_patched_model_has_thin_layers(pruned_minilm, tmp_path, single_intra_op_thread):
    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode="hybrid")
    save_patched_bert(patched, tmp_path / "patched")
    loaded = load_patched_bert(tmp_path / "patched")
    assert all(type(layer) is ThinBertLayer for layer in bert_layers(loaded))
    inputs = padded_inputs(model.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(loaded(**inputs).last_hidden_state, patched(**inputs).last_hidden_state)


def test_a_norm_with_hooks_or_its_own_forward_is_called_as_a_module(monkeypatch):
    # The thin layer runs a LayerNorm natively only where calling it would run nothing but its forward.
    from nn_blocksparse import ops
    from nn_blocksparse.bert.thin_layer import _add_norm
    from nn_blocksparse.cpu import native_isa

    native = []
    call = ops.call_add_layer_norm_cpu
    monkeypatch.setattr(ops, "call_add_layer_norm_cpu", lambda *args: native.append(1) or call(*args))
    x, residual = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    norm = torch.nn.LayerNorm(16).eval()
    with torch.inference_mode():
        expected = norm(x + residual)
        assert torch.allclose(_add_norm(x, residual, norm), expected, atol=1e-5)
    assert len(native) == (1 if native_isa() is not None else 0)
    # A backward hook fires through the module call (with gradients wanted, in eval mode).
    fired = []
    handle = norm.register_full_backward_hook(lambda module, grad_in, grad_out: fired.append(1))
    leaf = x.clone().requires_grad_()
    _add_norm(leaf, residual, norm).sum().backward()
    assert fired and leaf.grad is not None
    handle.remove()
    # A forward set on the instance (what offloading libraries wrap the module's call with) runs.
    wrapped = []
    original = norm.forward
    norm.forward = lambda *args, **kwargs: wrapped.append(1) or original(*args, **kwargs)
    with torch.inference_mode():
        assert torch.equal(_add_norm(x, residual, norm), expected)
    assert wrapped == [1]


def test_key_mask_turns_transformers_padding_mask_into_an_additive_key_mask():
    from nn_blocksparse.bert.masks import key_mask

    keys = torch.ones(3, 10, dtype=torch.bool)
    keys[1, 6:] = False
    padding = keys[:, None, None, :].expand(3, 1, 10, 10).clone()  # transformers 5's form
    additive = key_mask(padding)
    assert additive.shape == (3, 1, 1, 10) and additive.dtype == torch.float32
    assert torch.equal(additive[:, 0, 0] == 0, keys)
    assert (additive[1, 0, 0, 6:] == torch.finfo(torch.float32).min).all()
    scores = torch.randn(3, 2, 10, 10, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((scores + additive).softmax(-1), scores.masked_fill(~padding, float("-inf")).softmax(-1))
    causal = torch.ones(10, 10, dtype=torch.bool).tril().expand(3, 1, 10, 10)
    empty = padding.clone()
    empty[2] = False  # a sequence with every key masked out: SDPA's own convention, kept
    for kept in (causal, empty, None, additive, padding.float(), padding[:, :, :5], padding.to("meta")):
        assert key_mask(kept) is kept
    # In traces and transforms the mask stays as it is: its values are not read.
    assert torch.equal(torch.vmap(key_mask)(padding[:, None]), padding[:, None])
    traced = torch.jit.trace(lambda mask: key_mask(mask).float(), (padding,))
    assert torch.equal(traced(causal), causal.float())


def test_padded_batches_run_the_native_attention(pruned_minilm, single_intra_op_thread, monkeypatch):
    from nn_blocksparse.cpu import attention, attention_block, native_isa

    if native_isa() is None:
        pytest.skip("no native kernel here")
    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode="hybrid")
    inputs = padded_inputs(model.config.vocab_size)
    native = []
    launch = attention.attention_launch
    for module in (attention, attention_block):  # the modules one by one, and the native block
        monkeypatch.setattr(module, "attention_launch", lambda *args: native.append(1) or launch(*args))
    with torch.inference_mode():
        patched_out = patched(**inputs).last_hidden_state
        expected = model.eval()(**inputs).last_hidden_state
    assert len(native) == 6  # every layer, the padded batch included
    valid = inputs["attention_mask"].bool()
    error = (patched_out - expected)[valid].abs().max().item()
    assert error < 1e-3 * max(1.0, expected.abs().max().item())
