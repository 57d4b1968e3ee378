"""patch_bert on the real MiniLM weights: every mode matches the unpatched pruned model.

The reference is transformers' own (unpatched) BertModel running the pruned dense weights.
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nn_blocksparse import BlockSparseLinear  # noqa: E402
from nn_blocksparse.bert import heads_per_layer, load_patched_bert, patch_bert, save_patched_bert  # noqa: E402
from nn_blocksparse.bert.patching import BertSelfAttentionAdapter  # noqa: E402
from nn_blocksparse.bert.pruning import minilm_path, prune_like_nn_pruning  # noqa: E402

# fp32, different summation order (fused QKV, block-sparse) and SDPA vs transformers' attention.
MAX_ABS_DIFF = 1e-4


@pytest.fixture(scope="module")
def padded_batch():
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    batch = tokenizer(["The zero blocks left inside pruned matrices are wasted work.",
                       "Short.", "A third sentence of medium length here."], padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # padding really is there
    return batch


def reference_output(model, batch):
    with torch.inference_mode():
        return model(**batch).last_hidden_state


def max_diff_on_real_tokens(a, b, batch):
    valid = batch["attention_mask"].bool()
    return (a - b)[valid].abs().max().item()


@pytest.mark.parametrize("mode", ["resize", "blocksparse", "hybrid"])
def test_patched_outputs_match_unpatched_pruned_model(pruned_minilm, padded_batch, mode):
    model, report = pruned_minilm
    reference = reference_output(model, padded_batch)
    patched = patch_bert(copy.deepcopy(model), mode=mode)
    output = reference_output(patched, padded_batch)
    assert max_diff_on_real_tokens(output, reference, padded_batch) < MAX_ABS_DIFF
    # Padded positions too: the mask is applied the same way.
    assert (output - reference).abs().max().item() < MAX_ABS_DIFF

    expected_heads = [12 - len(report.heads_removed[i]) for i in range(6)]
    if mode == "blocksparse":
        assert heads_per_layer(patched) == [12] * 6  # no resizing: all heads stay, zero blocks are skipped
    else:
        assert heads_per_layer(patched) == expected_heads
        assert len(set(expected_heads)) > 1  # a different number of heads per layer really is exercised
    sparse_layers = [m for m in patched.modules() if isinstance(m, BlockSparseLinear)]
    if mode == "resize":
        assert not sparse_layers
    else:
        # hybrid's choice rule itself is checked in test_hybrid_density_threshold_and_bad_thresholds.
        assert sparse_layers


def _padded_products(model, rows_per_group: int) -> int:
    """Block products the block-sparse matrices of `model` cost grouped `rows_per_group` block-rows at a time."""
    return sum(m.matrix.row_groups(rows_per_group).step_count * rows_per_group
               for m in model.modules() if isinstance(m, BlockSparseLinear))


@pytest.mark.parametrize("mode, rows_per_group", [("blocksparse", 8), ("hybrid", 2)])
def test_permuted_for_row_groups_matches_the_unpatched_model(pruned_minilm, padded_batch, mode, rows_per_group):
    """Heads, head dimensions and FFN neurons reordered at patch time: the same outputs, no more padding."""
    model, _ = pruned_minilm
    reference = reference_output(model, padded_batch)
    plain = patch_bert(copy.deepcopy(model), mode=mode)
    permuted = patch_bert(copy.deepcopy(model), mode=mode, permute_for_row_groups=rows_per_group)
    output = reference_output(permuted, padded_batch)
    assert (output - reference).abs().max().item() < MAX_ABS_DIFF
    moved = [not torch.equal(a.attention.self.attention.qkv.weight, b.attention.self.attention.qkv.weight)
             for a, b in zip(plain.encoder.layer, permuted.encoder.layer)]
    assert any(moved)  # the features really moved
    assert _padded_products(permuted, rows_per_group) <= _padded_products(plain, rows_per_group)


def test_permute_for_row_groups_refuses_what_it_cannot_do():
    tiny = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                                          intermediate_size=128))
    with pytest.raises(ValueError, match="permute_for_row_groups"):
        patch_bert(tiny, mode="resize", permute_for_row_groups=2)  # resize leaves nothing block-sparse
    with pytest.raises(ValueError, match="permute_for_row_groups"):
        patch_bert(tiny, mode="hybrid", permute_for_row_groups=3)


def test_hybrid_on_the_triton_kernel(pruned_minilm, padded_batch, kernel_device):
    """The same check with every block-sparse matmul on the Triton kernel (interpreter on CPU)."""
    model, _ = pruned_minilm
    reference = reference_output(model, padded_batch)
    patched = patch_bert(copy.deepcopy(model), mode="hybrid", backend="triton").to(kernel_device)
    batch = {k: v.to(kernel_device) for k, v in padded_batch.items()}
    output = reference_output(patched, batch).cpu()
    assert max_diff_on_real_tokens(output, reference, padded_batch) < MAX_ABS_DIFF


def _module_of(layer, matrix: str):
    return {"qkv": lambda: layer.attention.self.attention.qkv, "attention_output": lambda: layer.attention.output.dense,
            "ffn_in": lambda: layer.intermediate.dense, "ffn_out": lambda: layer.output.dense}[matrix]()


def test_hybrid_measure_keeps_the_faster_form_and_the_outputs(pruned_minilm, padded_batch):
    """dense_threshold="measure": every block-grid matrix timed both ways; the module built is the one chosen."""
    model, _ = pruned_minilm
    reference = reference_output(model, padded_batch)
    patched = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold="measure", measure_rows=64)
    assert max_diff_on_real_tokens(reference_output(patched, padded_batch), reference, padded_batch) < MAX_ABS_DIFF
    choices = patched.nn_blocksparse_choices
    assert {c["matrix"] for c in choices} >= {"qkv", "attention_output"}  # FFNs left the block grid when resized
    layers = patched.encoder.layer
    for choice in choices:
        assert choice["dense_ms"] > 0 and choice["block_sparse_ms"] > 0
        assert choice["block_sparse"] == (choice["block_sparse_ms"] < 0.95 * choice["dense_ms"])
        module = _module_of(layers[choice["layer"]], choice["matrix"])
        assert isinstance(module, BlockSparseLinear) == choice["block_sparse"]
        assert list(module.weight.shape) == choice["shape"]


def test_hybrid_density_threshold_and_bad_thresholds(pruned_minilm, monkeypatch):
    model, _ = pruned_minilm
    # "auto" on CPU asks the CPU planner (its calibrated profile; tests/test_cpu_planner.py checks it).
    import nn_blocksparse.cpu

    for threshold in (1.0, 0.8):
        monkeypatch.setattr(nn_blocksparse.cpu, "use_block_sparse", lambda density, *args: density <= threshold)
        patched = patch_bert(copy.deepcopy(model), mode="hybrid")
        choices = patched.nn_blocksparse_choices
        assert choices and all("dense_ms" not in c and c["block_sparse"] == (c["block_density"] <= threshold)
                               for c in choices)
        assert all(c["block_sparse"] for c in choices) == (threshold == 1.0)
        for choice in choices:
            assert isinstance(_module_of(patched.encoder.layer[choice["layer"]], choice["matrix"]),
                              BlockSparseLinear) == choice["block_sparse"]
    nothing_sparse = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold=0.0)
    assert not [m for m in nothing_sparse.modules() if isinstance(m, BlockSparseLinear)]
    for bad in ("fast", 1.5, -0.1):
        with pytest.raises(ValueError, match="dense_threshold"):
            patch_bert(copy.deepcopy(model), dense_threshold=bad)
    for mode in ("hybrid", "blocksparse"):  # refused up front, even where every matrix would stay dense
        with pytest.raises(ValueError, match="block_size must be one of"):
            patch_bert(copy.deepcopy(model), mode=mode, block_size=48, dense_threshold=0.0)


def test_bf16_weights_with_fp32_activations(pruned_minilm, padded_batch, tmp_path):
    # weight_dtype=bf16: every linear's weights (and biases) bf16, everything else fp32: the error is
    # the rounding of weights, of x and of the dense layers' outputs, not of the residual stream.
    from nn_blocksparse.dense_linear import DenseLinear

    model, _ = pruned_minilm
    reference = reference_output(model, padded_batch)
    patched = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold=0.5, weight_dtype=torch.bfloat16)
    sparse = [m for m in patched.modules() if isinstance(m, BlockSparseLinear)]
    dense = [m for m in patched.encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert sparse and dense  # hybrid at 0.5 leaves both kinds
    assert all(m.values.dtype == torch.bfloat16 for m in sparse)
    assert all(type(m) is DenseLinear and m.weight.dtype == m.bias.dtype == torch.bfloat16 for m in dense)
    assert all(p.dtype == torch.float32 for m in patched.modules() if isinstance(m, torch.nn.LayerNorm)
               for p in m.parameters())
    output = reference_output(patched, padded_batch)
    assert output.dtype == torch.float32
    error = max_diff_on_real_tokens(output, reference, padded_batch)
    # The whole model in bf16 is several times worse: its residual stream and norms round too.
    bf16_model = patch_bert(copy.deepcopy(model).to(torch.bfloat16), mode="hybrid", dense_threshold=0.5)
    bf16_error = max_diff_on_real_tokens(reference_output(bf16_model, padded_batch).float(), reference, padded_batch)
    assert 0 < error < 0.05 and error < bf16_error / 2, (error, bf16_error)
    loaded = load_patched_bert(save_patched_bert(patched, tmp_path / "bf16_weights"))
    assert all(m.values.dtype == torch.bfloat16 for m in loaded.modules() if isinstance(m, BlockSparseLinear))
    assert all(m.weight.dtype == torch.bfloat16 for m in loaded.encoder.modules() if isinstance(m, DenseLinear))
    assert torch.equal(reference_output(loaded, padded_batch), output)
    with pytest.raises(ValueError, match="weight_dtype"):
        patch_bert(copy.deepcopy(model), weight_dtype=torch.float16)
    with pytest.raises(ValueError, match="fp32 models on CPU"):
        patch_bert(copy.deepcopy(model).to(torch.bfloat16), weight_dtype=torch.bfloat16)


def test_resize_fuses_nothing_and_keeps_transformers_attention(pruned_minilm):
    patched = patch_bert(copy.deepcopy(pruned_minilm[0]), mode="resize")
    layer = patched.encoder.layer[0]
    assert not isinstance(layer.attention.self, BertSelfAttentionAdapter)
    assert isinstance(layer.attention.self.query, torch.nn.Linear)
    assert layer.intermediate.dense.out_features < 1536  # empty FFN neurons were cut


def test_resized_ffn_hidden_sizes_are_aligned(pruned_minilm, padded_batch):
    """Resize rounds kept FFN neurons up to 8 (16-byte fp16 rows), hybrid to the block grid, or
    both to `ffn_multiple_of`, with zero neurons; the outputs stay the unpatched model's."""
    model, _ = pruned_minilm
    reference = reference_output(model, padded_batch)
    for mode, multiple, asked in (("resize", 8, None), ("hybrid", 32, None), ("resize", 64, 64), ("hybrid", 1, 1)):
        patched = patch_bert(copy.deepcopy(model), mode=mode, ffn_multiple_of=asked)
        sizes = [layer.intermediate.dense.out_features for layer in patched.encoder.layer]
        assert all(size % multiple == 0 for size in sizes) and any(size < 1536 for size in sizes)
        if multiple == 1:  # no padding asked: the kept sizes themselves, not all multiples of 8
            assert any(size % 8 for size in sizes)
        assert max_diff_on_real_tokens(reference_output(patched, padded_batch), reference, padded_batch) < MAX_ABS_DIFF
    # An already resized model (as nn_pruning checkpoints load: odd FFN sizes, nothing left to cut) is padded too.
    from nn_blocksparse.resize import prunable_neurons, remove_neurons

    cut = copy.deepcopy(model)
    for layer in cut.encoder.layer:
        inner, outer = layer.intermediate.dense, layer.output.dense
        layer.intermediate.dense, layer.output.dense = remove_neurons(
            inner, outer, prunable_neurons(inner, outer), layer.intermediate.intermediate_act_fn)
    assert any(layer.intermediate.dense.out_features % 8 for layer in cut.encoder.layer)
    patched = patch_bert(cut, mode="resize")
    assert all(layer.intermediate.dense.out_features % 8 == 0 for layer in patched.encoder.layer)
    assert max_diff_on_real_tokens(reference_output(patched, padded_batch), reference, padded_batch) < MAX_ABS_DIFF
    for bad in (0, -8, 8.0, True):
        with pytest.raises(ValueError, match="ffn_multiple_of"):
            patch_bert(copy.deepcopy(model), mode="resize", ffn_multiple_of=bad)


def test_hybrid_keeps_its_dense_matrices_in_dense_linears_with_gelu_fused(pruned_minilm, padded_batch, tmp_path):
    """What hybrid leaves dense runs DenseLinear (oneDNN on CPU), the FFN-in with GELU; the output is the
    unpatched model's; a checkpoint keeps it so. resize keeps nn_pruning's plain nn.Linear."""
    from nn_blocksparse.dense_linear import DenseLinear

    model, _ = pruned_minilm
    reference = reference_output(model, padded_batch)
    hybrid = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold=0.0)  # every matrix dense
    for layer in hybrid.encoder.layer:
        assert type(layer.intermediate.dense) is DenseLinear and layer.intermediate.dense.activation == "gelu"
        assert isinstance(layer.intermediate.intermediate_act_fn, torch.nn.Identity)
        assert type(layer.output.dense) is DenseLinear and layer.output.dense.activation is None
        assert type(layer.attention.output.dense) is DenseLinear
    assert max_diff_on_real_tokens(reference_output(hybrid, padded_batch), reference, padded_batch) < MAX_ABS_DIFF
    loaded = load_patched_bert(save_patched_bert(hybrid, tmp_path / "hybrid"))
    assert [type(layer.intermediate.dense) for layer in loaded.encoder.layer] == [DenseLinear] * len(loaded.encoder.layer)
    assert all(layer.intermediate.dense.activation == "gelu" for layer in loaded.encoder.layer)
    assert torch.equal(reference_output(loaded, padded_batch), reference_output(hybrid, padded_batch))
    resized = patch_bert(copy.deepcopy(model), mode="resize")
    assert all(type(layer.output.dense) is torch.nn.Linear for layer in resized.encoder.layer)


def test_hybrid_prepack_keeps_every_linears_kernel_layout_and_the_outputs(pruned_minilm, padded_batch):
    """`prepack=True`: every DenseLinear keeps oneDNN's packed weight and every fp32 BlockSparseLinear its
    blocks transposed; the output is the unprepacked model's bit for bit and still the unpatched
    model's, also after weights are changed in place."""
    from nn_blocksparse import BlockSparseLinear
    from nn_blocksparse.dense_linear import DenseLinear

    model, _ = pruned_minilm
    reference = reference_output(model, padded_batch)
    hybrid = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold=0.6, prepack=True)
    plain = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold=0.6)
    dense_layers = [m for m in hybrid.modules() if isinstance(m, DenseLinear)]
    sparse_layers = [m for m in hybrid.modules() if isinstance(m, BlockSparseLinear)]
    assert dense_layers and sparse_layers and all(m.prepack for m in dense_layers + sparse_layers)
    assert not any(m.prepack for m in plain.modules() if isinstance(m, (DenseLinear, BlockSparseLinear)))
    output = reference_output(hybrid, padded_batch)
    assert torch.equal(output, reference_output(plain, padded_batch))
    assert max_diff_on_real_tokens(output, reference, padded_batch) < MAX_ABS_DIFF
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.encoder.layer[0].output.dense.weight.mul_(0.5)
        changed.encoder.layer[0].attention.output.dense.weight.mul_(-2)
        hybrid.encoder.layer[0].output.dense.weight.mul_(0.5)  # the same changes, in place, after packing
        patched_output = hybrid.encoder.layer[0].attention.output.dense
        (patched_output.values if isinstance(patched_output, BlockSparseLinear) else patched_output.weight).mul_(-2)
    assert max_diff_on_real_tokens(reference_output(hybrid, padded_batch), reference_output(changed, padded_batch),
                                   padded_batch) < MAX_ABS_DIFF
    with pytest.warns(DeprecationWarning, match="prepack_dense is deprecated"):
        old_name = patch_bert(copy.deepcopy(model), mode="hybrid", dense_threshold=0.6, prepack_dense=True)
    assert all(m.prepack for m in old_name.modules() if isinstance(m, (DenseLinear, BlockSparseLinear)))
    with pytest.raises(TypeError, match="prepack must be a bool"):
        patch_bert(copy.deepcopy(model), mode="hybrid", prepack="yes")
    with pytest.raises(TypeError, match="prepack_dense must be a bool"):
        patch_bert(copy.deepcopy(model), mode="hybrid", prepack_dense="yes")


def test_save_and_load_patched_model_without_pickle(pruned_minilm, padded_batch, tmp_path):
    model, _ = pruned_minilm
    patched = patch_bert(copy.deepcopy(model), mode="hybrid")
    save_patched_bert(patched, tmp_path / "patched")
    assert sorted(p.name for p in (tmp_path / "patched").iterdir()) == ["config.json", "model.safetensors", "patch.json"]
    loaded = load_patched_bert(tmp_path / "patched")
    assert heads_per_layer(loaded) == heads_per_layer(patched)
    assert torch.equal(reference_output(loaded, padded_batch), reference_output(patched, padded_batch))


@pytest.mark.parametrize("mode", ["resize", "hybrid"])
def test_a_saved_head_model_with_tied_weights_loads_back(mode, tmp_path):
    # BertForMaskedLM ties its decoder to the word embeddings; the file keeps one copy of them.
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=300)
    model = transformers.BertForMaskedLM(config).eval()
    prune_like_nn_pruning(model, seed=0)
    patched = patch_bert(model, mode=mode)
    save_patched_bert(patched, tmp_path / "mlm")
    loaded = load_patched_bert(tmp_path / "mlm")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, patched(input_ids=ids).logits)


def test_patching_a_question_answering_head_model(pruned_minilm, padded_batch):
    torch.manual_seed(0)
    qa = transformers.BertForQuestionAnswering(pruned_minilm[0].config).eval()
    qa.bert.load_state_dict(pruned_minilm[0].state_dict(), strict=False)
    with torch.inference_mode():
        reference = qa(**padded_batch).start_logits
        patched = patch_bert(copy.deepcopy(qa), mode="hybrid")
        output = patched(**padded_batch).start_logits
    valid = padded_batch["attention_mask"].bool()
    assert (output - reference)[valid].abs().max().item() < MAX_ABS_DIFF


def test_clear_errors():
    with pytest.raises(TypeError, match="BertModel"):
        patch_bert(torch.nn.Linear(4, 4))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2))
    with pytest.raises(TypeError, match="GPT2Model"):
        patch_bert(gpt2)
    decoder = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                                             intermediate_size=128, is_decoder=True))
    with pytest.raises(ValueError, match="unsupported BERT config"):
        patch_bert(decoder)
    small = transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=2,
                                                           intermediate_size=128))
    with pytest.raises(ValueError, match="mode"):
        patch_bert(small, mode="sparse")
    patch_bert(small, mode="blocksparse")
    with pytest.raises(ValueError, match="already patched"):
        patch_bert(small)
    with pytest.raises(ValueError, match="patch.json"):
        load_patched_bert(minilm_path())


def small_bert(intermediate_size=128, layers=2, **config):
    torch.manual_seed(0)
    config = {"num_attention_heads": 2, **config}
    return transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=layers, hidden_size=64, intermediate_size=intermediate_size, vocab_size=100,
        max_position_embeddings=32, **config)).eval()


def test_patching_is_all_or_nothing():
    """blocksparse on an FFN the block size does not divide: refused before layer 0 is touched."""
    model = small_bert(intermediate_size=96 + 16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="block_size 32 does not divide the ffn_in weight of layer 0"):
        patch_bert(model, mode="blocksparse")
    assert [type(m) for m in model.modules()] == modules_before
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert not hasattr(model, "nn_blocksparse_mode")
    patch_bert(model, mode="blocksparse", block_size=16)  # the model is still patchable


@pytest.mark.parametrize("mode", ["resize", "blocksparse", "hybrid"])
def test_a_layer_with_every_head_pruned_patches_in_every_mode(mode, tmp_path):
    """nn_pruning checkpoints may prune all heads of a layer (load_pruned_bert's NoHeadsSelfAttention):
    that layer's attention then adds only the output bias, patched or not."""
    from nn_blocksparse.bert import load_pruned_bert, save_pruned_bert

    model = small_bert(num_attention_heads=4)
    with torch.no_grad():
        attention = model.encoder.layer[1].attention
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            linear.weight.zero_()
            linear.bias.zero_()
        attention.output.dense.weight.zero_()
    loaded = load_pruned_bert(save_pruned_bert(model, tmp_path / "no_heads"))
    assert heads_per_layer(loaded) == [4, 0]
    batch = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    batch["attention_mask"][1, 4:] = 0
    with torch.inference_mode():
        reference = model(**batch).last_hidden_state
        patched = patch_bert(loaded, mode=mode, block_size=16)
        assert heads_per_layer(patched)[1] == 0
        assert (patched(**batch).last_hidden_state - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("first, second", [("resize", "blocksparse"), ("resize", "resize"), ("hybrid", "resize"),
                                           ("blocksparse", "hybrid")])
def test_any_second_patch_is_refused(first, second):
    model = patch_bert(small_bert(), mode=first)
    with pytest.raises(ValueError, match=f"already patched \\(mode '{first}'\\)"):
        patch_bert(model, mode=second)
    qa = patch_bert(transformers.BertForQuestionAnswering(small_bert().config).eval(), mode=first)
    with pytest.raises(ValueError, match="already patched"):
        patch_bert(qa.bert, mode=second)  # its encoder, too


def test_save_pretrained_is_refused_pointing_to_save_patched_bert(tmp_path):
    qa = patch_bert(transformers.BertForQuestionAnswering(small_bert().config).eval(), mode="hybrid")
    for model in (qa, qa.bert, copy.deepcopy(qa)):
        with pytest.raises(ValueError, match="save_patched_bert"):
            model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    small_bert().save_pretrained(tmp_path / "plain")  # unpatched models are untouched



def test_a_model_in_a_dtype_load_cannot_read_is_refused_at_save(tmp_path):
    model = patch_bert(small_bert().double(), mode="resize")
    with pytest.raises(ValueError, match="cannot save a torch.float64 model"):
        save_patched_bert(model, tmp_path / "f64")
    assert not (tmp_path / "f64").exists()  # nothing half-written

@pytest.mark.parametrize("mode", ["blocksparse", "hybrid"])
def test_output_attentions_returns_the_attention_probabilities(mode):
    """Reference: transformers' eager attention, on the unpatched model (all heads: blocksparse keeps
    them) or on the resized one (hybrid's heads). Head 1 of layer 0 is pruned (zero V rows)."""
    model = small_bert(num_attention_heads=4)
    with torch.no_grad():
        model.encoder.layer[0].attention.self.value.weight[16:32] = 0
    model.set_attn_implementation("eager")
    batch = {"input_ids": torch.randint(0, 100, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    with torch.inference_mode():
        model(**batch, output_attentions=True)  # recorder hooks installed before patching: they follow
        reference_model = model if mode == "blocksparse" else patch_bert(copy.deepcopy(model), mode="resize")
        reference = reference_model(**batch, output_attentions=True).attentions
        patched = patch_bert(copy.deepcopy(model), mode=mode, block_size=16, dense_threshold=1.0)
        attentions = patched(**batch, output_attentions=True).attentions
        fresh = patch_bert(small_bert(num_attention_heads=4), mode=mode, block_size=16)  # hooks installed later
        fresh_attentions = fresh(**batch, output_attentions=True).attentions
    assert len(attentions) == len(fresh_attentions) == len(reference) == 2
    assert [a.shape[1] for a in attentions] == heads_per_layer(patched) == ([4, 4] if mode == "blocksparse" else [3, 4])
    for ours, again, expected in zip(attentions, fresh_attentions, reference):
        assert ours.shape == expected.shape == (3, ours.shape[1], 9, 9)
        assert (ours - expected).abs().max().item() < 1e-6
        assert again.shape[1] == 4 and torch.allclose(again.sum(-1), torch.ones(()))


def _saved_small(tmp_path, mode="hybrid"):
    model = patch_bert(small_bert(), mode=mode, dense_threshold=1.0) if mode == "hybrid" else patch_bert(
        small_bert(), mode=mode)
    folder = save_patched_bert(model, tmp_path / mode)
    return model, folder


def _edit_patch(folder, edit):
    import json

    patch = json.loads((folder / "patch.json").read_text())
    edit(patch)
    (folder / "patch.json").write_text(json.dumps(patch))


def _set_path(*keys, value):
    def edit(patch):
        target = patch
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


CRAFTED_PATCHES = [
    (_set_path("model_class", value="BertTokenizer"), ValueError, "unsupported model class"),
    (_set_path("model_class", value="os.system"), ValueError, "unsupported model class"),
    (_set_path("dtype", value="float64"), ValueError, "patch.json dtype must be one of"),
    (_set_path("dtype", value="__class__"), ValueError, "patch.json dtype must be one of"),
    (_set_path("mode", value="turbo"), ValueError, "patch.json mode must be one of"),
    (_set_path("layers", value={}), TypeError, "patch.json.layers must be list"),
    (lambda p: p["layers"].pop(), ValueError, "describes 1 layers, the config 2"),
    (_set_path("layers", 0, "attention", "num_heads", value=3), ValueError, r"num_heads must be in \[0, 2\]"),
    (_set_path("layers", 0, "attention", "num_heads", value=True), TypeError, "num_heads must be int"),
    (_set_path("layers", 0, "attention", "head_dim", value=16), ValueError, "head_dim is 16, the config makes it 32"),
    (_set_path("layers", 0, "attention", "type", value="flash"), ValueError, "attention.type must be one of"),
    (_set_path("layers", 0, "attention", "qkv", "out_features", value=96), ValueError,
     r"layers\[0\].attention.qkv.out_features is 96, the config makes it 192"),
    (_set_path("layers", 0, "attention", "qkv", "block_size", value=48), ValueError, "block_size must be one of"),
    (_set_path("layers", 0, "attention", "qkv", "activation", value="gelu"), ValueError,
     r"qkv.activation must be one of \(None,\)"),
    (_set_path("layers", 0, "attention", "qkv", "type", value="conv"), ValueError, "qkv.type must be one of"),
    (_set_path("layers", 0, "output", "activation", value="gelu"), ValueError,
     r"output.activation must be one of \(None,\)"),
    (_set_path("layers", 0, "output", "activation", value=3), TypeError, "output.activation must be"),
    (_set_path("layers", 1, "intermediate", "out_features", value=10**9), ValueError,
     "intermediate.dense.row_offsets has shape"),
    (_set_path("layers", 1, "output", "in_features", value=64), ValueError,
     "output.in_features is 64, the config makes it 128"),
    (_set_path("layers", 1, "intermediate_activation_fused", value=False), ValueError,
     "intermediate_activation_fused is False, but the intermediate module fuses GELU"),
    (_set_path("layers", 1, "attention_output", "bias", value=False), ValueError, "make the tensors|does not fit"),
    (lambda p: p["layers"][0].pop("output"), ValueError, r"layers\[0\] must have the fields"),
    (lambda p: p.update(format="nn_blocksparse.patched_bert/9"), ValueError, "unsupported patch format"),
]


@pytest.mark.parametrize("edit, error, message", CRAFTED_PATCHES, ids=[case[2][:40] for case in CRAFTED_PATCHES])
def test_a_crafted_patch_json_is_refused_naming_the_field(tmp_path, edit, error, message):
    _, folder = _saved_small(tmp_path)
    _edit_patch(folder, edit)
    with pytest.raises(error, match=message):
        load_patched_bert(folder)


def test_dense_linear_specs_are_checked_and_older_plain_linear_specs_still_load(tmp_path):
    import json

    model = patch_bert(small_bert(), mode="hybrid", dense_threshold=0.0)  # every matrix a DenseLinear
    folder = save_patched_bert(model, tmp_path / "dense")
    layer = json.loads((folder / "patch.json").read_text())["layers"][0]
    assert layer["output"] == {"type": "linear", "in_features": 128, "out_features": 64, "bias": True,
                               "activation": None, "dtype": "float32"}
    assert layer["intermediate"]["activation"] == "gelu" and layer["intermediate_activation_fused"]
    for edit, message in ((_set_path("layers", 0, "output", "activation", value="gelu"),
                           r"layers\[0\].output.activation must be one of \(None,\)"),
                          (_set_path("layers", 0, "output", "dtype", value="float16"),
                           r"layers\[0\].output.dtype must be the model's \(float32\) or, in an fp32 model, bfloat16"),
                          (_set_path("layers", 1, "intermediate", "activation", value="relu"),
                           r"intermediate.activation must be one of \('gelu', None\)"),
                          (_set_path("layers", 1, "intermediate", "activation", value=None),
                           "intermediate_activation_fused is True, but the intermediate module does not fuse GELU")):
        crafted = save_patched_bert(model, tmp_path / "crafted")
        _edit_patch(crafted, edit)
        with pytest.raises(ValueError, match=message):
            load_patched_bert(crafted)
    # A checkpoint from before DenseLinear (linear specs without "activation", GELU unfused) loads as nn.Linear;
    # such a plain linear takes no dtype of its own.
    resized = patch_bert(small_bert(), mode="resize")
    crafted = save_patched_bert(resized, tmp_path / "crafted_plain")
    _edit_patch(crafted, _set_path("layers", 0, "output", "dtype", value="bfloat16"))
    with pytest.raises(ValueError, match=r"layers\[0\].output.dtype is only for a DenseLinear"):
        load_patched_bert(crafted)
    old = save_patched_bert(resized, tmp_path / "old")
    loaded = load_patched_bert(old)
    assert all(type(layer.output.dense) is torch.nn.Linear for layer in loaded.encoder.layer)
    batch = {"input_ids": torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        assert torch.equal(loaded(**batch).last_hidden_state, resized(**batch).last_hidden_state)


def test_crafted_weights_and_config_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model, folder = _saved_small(tmp_path)
    ids = torch.randint(0, 100, (2, 7))
    with torch.inference_mode():
        assert torch.equal(load_patched_bert(folder)(ids).last_hidden_state, model(ids).last_hidden_state)
    original = load_file(str(folder / "model.safetensors"))
    tensors = {name: tensor.clone() for name, tensor in original.items()}
    tensors["encoder.layer.0.attention.self.attention.qkv.col_indices"][0] = 7
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"qkv: col_indices\[0\] = 7 is outside \[0, 2\)"):
        load_patched_bert(folder)
    tensors = dict(original)
    tensors["encoder.layer.1.output.dense.row_offsets"] = tensors["encoder.layer.1.output.dense.row_offsets"].long()
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(TypeError, match="row_offsets must be torch.int32"):
        load_patched_bert(folder)
    tensors = dict(original)
    del tensors["pooler.dense.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="(?s)does not fit patch.json.*pooler.dense.bias"):
        load_patched_bert(folder)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_patched_bert(folder)
    save_file(original, str(folder / "model.safetensors"))
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"vocab_size": 100', '"vocab_size": 1000000000'))
    with pytest.raises(ValueError, match="word_embeddings.weight has shape"):
        load_patched_bert(folder)
    (folder / "config.json").write_text(config)
    (folder / "patch.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_patched_bert(folder)
