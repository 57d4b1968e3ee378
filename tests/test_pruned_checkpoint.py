"""Tests for nn_blocksparse.bert.pruned_checkpoint: nn_pruning / transformers-4 head-pruned checkpoints.

The fixtures are real: the bundled MiniLM weights (6 layers, 12 heads of 32) pruned by the seeded
generator, written by ``save_pruned_bert`` in the transformers-4 format (smaller Q/K/V/O tensors plus
``pruned_heads`` in config.json), and read back by ``load_pruned_bert``.  The reference for every
output comparison is the *dense* pruned model (zeroed heads, full-size matrices) run by plain
transformers 5 with the same attention implementation; the checks on the files read them with
safetensors / torch.load directly, not through the code under test.
"""

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)

from nn_blocksparse.bert.patching import heads_per_layer
from nn_blocksparse.bert.pruned_checkpoint import TASK_TO_MODEL_CLASS, load_pruned_bert, save_pruned_bert
from nn_blocksparse.bert.pruning import load_minilm, minilm_path, prune_like_nn_pruning

FP32_TOLERANCE = 1e-5
HEAD_DIM = 32  # MiniLM: hidden 384 / 12 heads
SENTENCES = [
    "Block-sparse kernels skip the zero blocks that movement pruning leaves in BERT.",
    "A short one.",  # padded in the batch: exercises the attention mask
]


pytestmark = pytest.mark.usefixtures("single_intra_op_thread")


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _with_attention(model, implementation: str):
    model = copy.deepcopy(model)
    model.set_attn_implementation(implementation)
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert encoded["attention_mask"][1].sum() < encoded["attention_mask"].shape[1], "second row must be padded"
    return dict(encoded)


@pytest.fixture(scope="module")
def checkpoints(pruned_minilm, tmp_path_factory):
    model, _ = pruned_minilm
    folders = {}
    for fmt, safe in (("safetensors", True), ("bin", False)):
        folders[fmt] = save_pruned_bert(model, tmp_path_factory.mktemp(f"pruned_{fmt}"), safe_serialization=safe)
    return folders


def _read_weights(folder):
    if (folder / "model.safetensors").exists():
        return load_file(str(folder / "model.safetensors"))
    return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)


def _write_config(folder, mutate):
    config = json.loads((folder / "config.json").read_text())
    mutate(config)
    (folder / "config.json").write_text(json.dumps(config))


def _copy_checkpoint(source, destination):
    destination.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        (destination / file.name).write_bytes(file.read_bytes())
    return destination


# ------------------------------------------------------------------------------------------------
# Round trip on the real MiniLM weights
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_roundtrip_matches_pruned_dense_model(pruned_minilm, checkpoints, batch, fmt, implementation):
    dense_pruned, _ = pruned_minilm
    reference_model = _with_attention(dense_pruned, implementation)
    loaded = load_pruned_bert(checkpoints[fmt], attn_implementation=implementation)
    assert not loaded.training
    assert loaded.config._attn_implementation == implementation
    with torch.no_grad():
        reference = reference_model(**batch)
        actual = loaded(**batch)
        unpruned = _with_attention(load_minilm(), implementation)(**batch)
    # padded positions included: the whole tensor must agree
    assert _max_abs_diff(actual.last_hidden_state, reference.last_hidden_state) < FP32_TOLERANCE
    assert _max_abs_diff(actual.pooler_output, reference.pooler_output) < FP32_TOLERANCE
    # the comparison means something: pruning changed the outputs a lot
    assert _max_abs_diff(unpruned.last_hidden_state, reference.last_hidden_state) > 0.1


def test_roundtrip_is_exact_up_to_rounding_in_float64(pruned_minilm, checkpoints, batch):
    """In float64 the gap shrinks by ~9 orders of magnitude: the fp32 differences above are only
    summation-order rounding (the shrunk matmuls reduce over fewer, differently blocked columns)."""
    dense_pruned, _ = pruned_minilm
    reference_model = copy.deepcopy(dense_pruned).double()
    loaded = load_pruned_bert(checkpoints["safetensors"], dtype=torch.float64)
    assert loaded.encoder.layer[0].attention.self.query.weight.dtype == torch.float64
    with torch.no_grad():
        diff = _max_abs_diff(loaded(**batch).last_hidden_state, reference_model(**batch).last_hidden_state)
    assert diff < 1e-12


def test_loaded_model_has_the_pruned_head_counts(pruned_minilm, checkpoints):
    _, report = pruned_minilm
    loaded = load_pruned_bert(checkpoints["safetensors"])
    assert heads_per_layer(loaded) == report.heads_kept_per_layer
    assert sum(heads_per_layer(loaded)) == 72 - 24
    for layer, layer_module in enumerate(loaded.encoder.layer):
        self_attention = layer_module.attention.self
        kept = report.heads_kept_per_layer[layer]
        assert self_attention.num_attention_heads == kept
        assert self_attention.all_head_size == kept * HEAD_DIM
        assert self_attention.query.weight.shape == (kept * HEAD_DIM, 384)
        assert layer_module.attention.output.dense.weight.shape == (384, kept * HEAD_DIM)
        assert layer_module.attention.pruned_heads == set(report.heads_removed[layer])
    assert loaded.config.pruned_heads == {k: v for k, v in report.heads_removed.items() if v}


def test_eager_attention_probabilities_have_per_layer_head_counts(pruned_minilm, checkpoints, batch):
    _, report = pruned_minilm
    loaded = load_pruned_bert(checkpoints["bin"], attn_implementation="eager")
    with torch.no_grad():
        attentions = loaded(**batch, output_attentions=True).attentions
    assert [a.shape[1] for a in attentions] == report.heads_kept_per_layer
    padded = batch["attention_mask"][1] == 0
    # padding keys get no attention mass in any kept head
    assert torch.all(attentions[0][1][..., padded] < 1e-6)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_fixture_is_in_transformers4_format(pruned_minilm, checkpoints, fmt):
    dense_pruned, report = pruned_minilm
    folder = checkpoints[fmt]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert config["pruned_heads"] == {str(k): v for k, v in report.heads_removed.items() if v}
    assert config["num_attention_heads"] == 12 and config["intermediate_size"] == 1536
    assert config["architectures"] == ["BertModel"]

    if fmt == "safetensors":
        assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
    else:
        assert sorted(os.listdir(folder)) == ["config.json", "pytorch_model.bin"]
        raw = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        assert type(raw) is dict and all(isinstance(t, torch.Tensor) for t in raw.values())
    weights = _read_weights(folder)
    assert not any(k.endswith("position_ids") for k in weights)

    for layer, layer_module in enumerate(dense_pruned.encoder.layer):
        removed = report.heads_removed[layer]
        kept_heads = [h for h in range(12) if h not in removed]
        kept_rows = torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in kept_heads])
        prefix = f"encoder.layer.{layer}.attention."
        for name in ("query", "key", "value"):
            dense = getattr(layer_module.attention.self, name)
            assert torch.equal(weights[f"{prefix}self.{name}.weight"], dense.weight[kept_rows])
            assert torch.equal(weights[f"{prefix}self.{name}.bias"], dense.bias[kept_rows])
        assert torch.equal(weights[f"{prefix}output.dense.weight"], layer_module.attention.output.dense.weight[:, kept_rows])
        assert torch.equal(weights[f"{prefix}output.dense.bias"], layer_module.attention.output.dense.bias)
        # FFN neurons are zeroed but kept full size unless shrink_ffn=True
        assert weights[f"encoder.layer.{layer}.intermediate.dense.weight"].shape == (1536, 384)


def test_plain_transformers5_from_pretrained_cannot_load_it(pruned_minilm, checkpoints, batch):
    """Why the loader exists: transformers 5 dropped prune_heads/config.pruned_heads."""
    dense_pruned, _ = pruned_minilm
    with pytest.raises(RuntimeError, match="mismatch"):
        BertModel.from_pretrained(str(checkpoints["safetensors"]), local_files_only=True)
    # ignore_mismatched_sizes "works" by re-initialising every attention matrix at full size
    naive = BertModel.from_pretrained(str(checkpoints["safetensors"]), local_files_only=True,
                                      ignore_mismatched_sizes=True).eval()
    assert heads_per_layer(naive) == [12] * 6
    with torch.no_grad():
        wrong = naive(**batch).last_hidden_state
        right = dense_pruned(**batch).last_hidden_state
    assert _max_abs_diff(wrong, right) > 0.1


def test_resave_of_a_loaded_model_is_stable(checkpoints, batch, tmp_path):
    loaded = load_pruned_bert(checkpoints["safetensors"])
    folder = save_pruned_bert(loaded, tmp_path / "again")
    assert json.loads((folder / "config.json").read_text())["pruned_heads"] == \
        json.loads((checkpoints["safetensors"] / "config.json").read_text())["pruned_heads"]
    again = load_pruned_bert(folder)
    with torch.no_grad():
        assert torch.equal(again(**batch).last_hidden_state, loaded(**batch).last_hidden_state)


def test_shrunk_ffn_roundtrip(pruned_minilm, batch, tmp_path):
    dense_pruned, report = pruned_minilm
    folder = save_pruned_bert(dense_pruned, tmp_path / "ffn", shrink_ffn=True)
    config = json.loads((folder / "config.json").read_text())
    assert config["intermediate_size"] == 1536  # stays the original, as nn_pruning left it
    weights = _read_weights(folder)
    for layer, kept in enumerate(report.ffn_neurons_kept):
        assert weights[f"encoder.layer.{layer}.intermediate.dense.weight"].shape == (kept, 384)
        assert weights[f"encoder.layer.{layer}.intermediate.dense.bias"].shape == (kept,)
        assert weights[f"encoder.layer.{layer}.output.dense.weight"].shape == (384, kept)
    loaded = load_pruned_bert(folder)
    assert [layer.intermediate.dense.out_features for layer in loaded.encoder.layer] == report.ffn_neurons_kept
    with torch.no_grad():
        diff = _max_abs_diff(loaded(**batch).last_hidden_state, dense_pruned(**batch).last_hidden_state)
    assert diff < FP32_TOLERANCE


def test_without_pruned_heads_key_heads_come_from_shapes(pruned_minilm, checkpoints, batch, tmp_path):
    dense_pruned, report = pruned_minilm
    folder = _copy_checkpoint(checkpoints["safetensors"], tmp_path / "no_key")
    _write_config(folder, lambda c: c.pop("pruned_heads"))
    loaded = load_pruned_bert(folder)
    assert heads_per_layer(loaded) == report.heads_kept_per_layer
    with torch.no_grad():
        diff = _max_abs_diff(loaded(**batch).last_hidden_state, dense_pruned(**batch).last_hidden_state)
    assert diff < FP32_TOLERANCE


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_layer_with_every_head_pruned(batch, tmp_path, implementation):
    """transformers 4 allowed pruning all heads of a layer; the attention then adds only the output bias."""
    model = load_minilm(attn_implementation=implementation)
    with torch.no_grad():
        attention = model.encoder.layer[2].attention
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            linear.weight.zero_()
            linear.bias.zero_()
        attention.output.dense.weight.zero_()
    folder = save_pruned_bert(model, tmp_path / "empty_layer")
    assert json.loads((folder / "config.json").read_text())["pruned_heads"] == {"2": list(range(12))}
    loaded = load_pruned_bert(folder, attn_implementation=implementation)
    assert heads_per_layer(loaded) == [12, 12, 0, 12, 12, 12]
    with torch.no_grad():
        diff = _max_abs_diff(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)
        if implementation == "eager":
            attentions = loaded(**batch, output_attentions=True).attentions
            assert [a.shape[1] for a in attentions] == [12, 12, 0, 12, 12, 12]
    assert diff < FP32_TOLERANCE


def test_plain_bert_checkpoint_loads_identically():
    """A general loader: the unpruned MiniLM folder (v4 era, with a saved position_ids buffer)."""
    loaded = load_pruned_bert(minilm_path())
    reference = load_minilm()
    assert heads_per_layer(loaded) == [12] * 6
    assert loaded.config.pruned_heads == {}
    reference_state = reference.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference_state[key]), key


# ------------------------------------------------------------------------------------------------
# Task heads, legacy key names, tied weights (small random BERT: fast)
# ------------------------------------------------------------------------------------------------

SMALL_CONFIG = dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=128, max_position_embeddings=64, num_labels=3)


def _small_pruned(model_class, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(**SMALL_CONFIG)
    if model_class is BertForQuestionAnswering:
        config.num_labels = 2  # qa_outputs is Linear(hidden, num_labels): start and end logits
    model = model_class(config).eval()
    prune_like_nn_pruning(model, seed=seed, block_size=16, heads_removed_fraction=0.25)
    return model


def _heads_with_empty_value_or_output(base, head_dim=16):
    """Per layer, the heads whose value rows or attention-output columns are all zero, read off the weights."""
    removable = []
    for layer in base.encoder.layer:
        value, output = layer.attention.self.value.weight, layer.attention.output.dense.weight
        heads = range(value.shape[0] // head_dim)
        removable.append([h for h in heads if not value[h * head_dim:(h + 1) * head_dim].any()
                          or not output[:, h * head_dim:(h + 1) * head_dim].any()])
    return removable


def _randomize_biases(model):
    """transformers 5 initialises biases to zero, which would make every bias fold a no-op."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)


def _small_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 500, (2, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("task", list(TASK_TO_MODEL_CLASS))
@pytest.mark.parametrize("safe", [True, False])
def test_every_task_roundtrips(task, safe, tmp_path):
    model_class = TASK_TO_MODEL_CLASS[task]
    model = _small_pruned(model_class)
    folder = save_pruned_bert(model, tmp_path / task, safe_serialization=safe)
    loaded = load_pruned_bert(folder, task=task)
    assert type(loaded) is model_class
    assert heads_per_layer(loaded) == [4 - len(json.loads((folder / "config.json").read_text())["pruned_heads"]
                                           .get(str(layer), [])) for layer in range(2)]
    # The pruner removes 2 of 8 heads; its zero blocks may empty further heads' value rows or output
    # columns, and those are removable too.
    removable = _heads_with_empty_value_or_output(model.base_model)
    assert sum(len(heads) for heads in removable) >= 2
    assert heads_per_layer(loaded) == [4 - len(heads) for heads in removable]
    batch = _small_batch()
    with torch.no_grad():
        expected, actual = model(**batch), loaded(**batch)
    for name in ("last_hidden_state", "logits", "start_logits", "end_logits"):
        if getattr(expected, name, None) is not None:
            assert _max_abs_diff(getattr(actual, name), getattr(expected, name)) < FP32_TOLERANCE, name


def test_masked_lm_ties_decoder_to_word_embeddings(tmp_path):
    model = _small_pruned(BertForMaskedLM)
    folder = save_pruned_bert(model, tmp_path / "mlm")
    weights = load_file(str(folder / "model.safetensors"))
    # safetensors cannot hold shared tensors: like transformers 4, only the tie source is written
    assert "bert.embeddings.word_embeddings.weight" in weights
    assert "cls.predictions.decoder.weight" not in weights
    loaded = load_pruned_bert(folder, task="masked-lm")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert torch.equal(loaded.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight)


def test_legacy_names_prefix_and_head_dropping(tmp_path):
    """Old checkpoints: `bert.` prefix, LayerNorm gamma/beta, a saved position_ids buffer."""
    qa_model = _small_pruned(BertForQuestionAnswering)
    folder = save_pruned_bert(qa_model, tmp_path / "qa", safe_serialization=False)
    state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    legacy = {}
    for key, tensor in state.items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        legacy[key] = tensor
    legacy["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    assert any(k.endswith("LayerNorm.gamma") for k in legacy)
    torch.save(legacy, folder / "pytorch_model.bin")

    batch = _small_batch()
    loaded_qa = load_pruned_bert(folder, task="question-answering")
    with torch.no_grad():
        expected = qa_model(**batch)
        actual = loaded_qa(**batch)
        assert _max_abs_diff(actual.start_logits, expected.start_logits) < FP32_TOLERANCE
        assert _max_abs_diff(actual.end_logits, expected.end_logits) < FP32_TOLERANCE
        # task="base" on a head checkpoint: the encoder only (QA models have no pooler)
        base = load_pruned_bert(folder, task="base")
        assert base.pooler is None
        encoder_out = qa_model.bert(**batch).last_hidden_state
        assert _max_abs_diff(base(**batch).last_hidden_state, encoder_out) < FP32_TOLERANCE


def test_base_checkpoint_into_head_model_is_refused(tmp_path):
    base = _small_pruned(BertModel)
    folder = save_pruned_bert(base, tmp_path / "base")
    with pytest.raises(ValueError, match="missing keys.*qa_outputs"):
        load_pruned_bert(folder, task="question-answering")


def test_dtype_and_config_overrides(tmp_path):
    folder = save_pruned_bert(_small_pruned(BertForSequenceClassification), tmp_path / "cls")
    loaded = load_pruned_bert(folder, task="sequence-classification", dtype=torch.float64,
                              attn_implementation="eager", classifier_dropout=0.0)
    assert loaded.classifier.weight.dtype == torch.float64
    assert loaded.config.classifier_dropout == 0.0
    assert loaded.config.num_labels == 3
    with pytest.raises(TypeError, match="no_such_option"):
        load_pruned_bert(folder, task="sequence-classification", no_such_option=1)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def small_folder(tmp_path):
    return save_pruned_bert(_small_pruned(BertModel), tmp_path / "small")


def test_error_unknown_task(small_folder):
    with pytest.raises(ValueError, match="allowed tasks: base, question-answering, sequence-classification, "
                                         "token-classification, masked-lm"):
        load_pruned_bert(small_folder, task="multiple-choice")


def test_error_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_pruned_bert(tmp_path / "nowhere")


def test_error_no_config(tmp_path):
    tmp_path.joinpath("model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no config.json"):
        load_pruned_bert(tmp_path)


def test_error_no_weights(small_folder):
    (small_folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights file"):
        load_pruned_bert(small_folder)


def test_error_not_bert(small_folder):
    _write_config(small_folder, lambda c: c.update(model_type="roberta"))
    with pytest.raises(ValueError, match="model_type='roberta'"):
        load_pruned_bert(small_folder)


def test_error_shapes_disagree_with_pruned_heads(small_folder):
    config = json.loads((small_folder / "config.json").read_text())
    layer, heads = next(iter(config["pruned_heads"].items()))
    extra = next(h for h in range(4) if h not in heads)
    _write_config(small_folder, lambda c: c["pruned_heads"].__setitem__(layer, heads + [extra]))
    with pytest.raises(ValueError, match=rf"layer {layer}: .*query.weight has shape"):
        load_pruned_bert(small_folder)


def test_error_pruned_heads_out_of_range(small_folder):
    _write_config(small_folder, lambda c: c["pruned_heads"].__setitem__("9", [0]))
    with pytest.raises(ValueError, match="names layer 9"):
        load_pruned_bert(small_folder)
    _write_config(small_folder, lambda c: (c["pruned_heads"].pop("9"), c["pruned_heads"].__setitem__("0", [7])))
    with pytest.raises(ValueError, match="outside"):
        load_pruned_bert(small_folder)


def test_error_inconsistent_attention_tensors(small_folder):
    weights = load_file(str(small_folder / "model.safetensors"))
    weights["encoder.layer.0.attention.self.key.weight"] = weights["encoder.layer.0.attention.self.key.weight"][:16]
    save_file(weights, str(small_folder / "model.safetensors"))
    with pytest.raises(ValueError, match="key.weight has shape"):
        load_pruned_bert(small_folder)


def test_error_inconsistent_ffn_tensors(small_folder):
    weights = load_file(str(small_folder / "model.safetensors"))
    weights["encoder.layer.1.output.dense.weight"] = weights["encoder.layer.1.output.dense.weight"][:, :100].contiguous()
    save_file(weights, str(small_folder / "model.safetensors"))
    with pytest.raises(ValueError, match="FFN tensors disagree"):
        load_pruned_bert(small_folder)


def test_error_unexpected_and_missing_keys(small_folder):
    weights = load_file(str(small_folder / "model.safetensors"))
    weights["encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    save_file(weights, str(small_folder / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected keys.*rotary"):
        load_pruned_bert(small_folder)
    del weights["encoder.layer.0.attention.self.rotary.weight"]
    del weights["encoder.layer.1.output.LayerNorm.weight"]
    save_file(weights, str(small_folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys.*encoder\.layer\.1\.output\.LayerNorm\.weight"):
        load_pruned_bert(small_folder)


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a directory if unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_bin_is_read_without_unsafe_unpickling(small_folder, tmp_path):
    (small_folder / "model.safetensors").unlink()
    marker = str(tmp_path / "code_ran")
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2), "payload": _RunsCodeWhenUnpickled(marker)},
               small_folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="refusing to unpickle"):
        load_pruned_bert(small_folder)
    assert not os.path.exists(marker)


def test_save_removes_every_head_that_cannot_change_the_output(tmp_path):
    """The heads `patch_bert` resizes away are the heads the checkpoint drops (`resize.prunable_heads`):
    zero Q/K/V/O weights with live biases (the biases cannot pass zero output columns); zero output
    columns alone (the head adds nothing whatever it attends to); zero value rows alone (the head
    outputs its value bias at every position, a constant folded into the output bias). A head with
    only Q and K zeroed attends uniformly, which is not constant: it stays."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**SMALL_CONFIG)).eval()
    _randomize_biases(model)
    with torch.no_grad():
        attention = model.encoder.layer[0].attention
        for linear in (attention.self.query, attention.self.key, attention.self.value):
            linear.weight[16:32] = 0  # head 1: weights only, biases stay nonzero
        attention.output.dense.weight[:, 16:32] = 0
        attention.self.query.weight[48:64] = attention.self.key.weight[48:64] = 0  # head 3: Q and K only
        model.encoder.layer[1].attention.output.dense.weight[:, 32:48] = 0  # layer 1, head 2: O only
        model.encoder.layer[1].attention.self.value.weight[0:16] = 0  # layer 1, head 0: V only
    folder = save_pruned_bert(model, tmp_path / "weights_only")
    assert json.loads((folder / "config.json").read_text())["pruned_heads"] == {"0": [1], "1": [0, 2]}
    weights = _read_weights(folder)
    assert torch.equal(weights["encoder.layer.0.attention.output.dense.bias"], attention.output.dense.bias)
    layer1 = model.encoder.layer[1].attention
    folded = layer1.output.dense.bias.double() + layer1.output.dense.weight[:, 0:16].double() @ \
        layer1.self.value.bias[0:16].double()
    assert torch.allclose(weights["encoder.layer.1.attention.output.dense.bias"].double(), folded, rtol=0, atol=1e-6)
    assert not torch.allclose(folded, layer1.output.dense.bias.double())  # the fold is not a no-op here
    loaded = load_pruned_bert(folder)
    assert heads_per_layer(loaded) == [3, 2]
    batch = _small_batch()
    with torch.no_grad():
        assert _max_abs_diff(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state) < FP32_TOLERANCE


def test_shrink_ffn_removes_every_neuron_that_cannot_change_the_output(tmp_path):
    """`resize.prunable_neurons`: a zero output column adds nothing; a zero intermediate row outputs
    act(bias) at every position, a constant folded into the FFN output bias."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(**SMALL_CONFIG)).eval()
    _randomize_biases(model)
    with torch.no_grad():
        layer = model.encoder.layer[0]
        layer.intermediate.dense.weight[[3, 7]] = 0  # intermediate rows only: biases stay live
        layer.output.dense.weight[:, [5, 100]] = 0  # output columns only
    folder = save_pruned_bert(model, tmp_path / "ffn", shrink_ffn=True)
    weights = _read_weights(folder)
    assert weights["encoder.layer.0.intermediate.dense.weight"].shape == (124, 64)
    assert weights["encoder.layer.1.intermediate.dense.weight"].shape == (128, 64)
    constant = layer.intermediate.intermediate_act_fn(layer.intermediate.dense.bias[[3, 7]]).double()
    folded = layer.output.dense.bias.double() + layer.output.dense.weight[:, [3, 7]].double() @ constant
    assert torch.allclose(weights["encoder.layer.0.output.dense.bias"].double(), folded, rtol=0, atol=1e-6)
    assert not torch.allclose(folded, layer.output.dense.bias.double())
    loaded = load_pruned_bert(folder)
    assert [layer.intermediate.dense.out_features for layer in loaded.encoder.layer] == [124, 128]
    batch = _small_batch()
    with torch.no_grad():
        assert _max_abs_diff(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state) < FP32_TOLERANCE


def test_error_crafted_files(small_folder, tmp_path):
    weights = small_folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pruned_bert(small_folder)
    weights.unlink()
    (small_folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../outside.safetensors"}}))
    with pytest.raises(ValueError, match="weight_map must map tensor names to file names in"):
        load_pruned_bert(small_folder)
    (small_folder / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a shard index"):
        load_pruned_bert(small_folder)
    (small_folder / "config.json").write_text("{")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pruned_bert(small_folder)
    (small_folder / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="only BERT checkpoints"):
        load_pruned_bert(small_folder)


def test_error_one_dimensional_projection(small_folder):
    from safetensors.torch import load_file, save_file

    state = load_file(str(small_folder / "model.safetensors"))
    state["encoder.layer.0.attention.self.query.weight"] = state["encoder.layer.0.attention.self.query.weight"][0]
    save_file(state, str(small_folder / "model.safetensors"))
    with pytest.raises(ValueError, match="query.weight must be 2-D"):
        load_pruned_bert(small_folder)


def test_a_patched_model_is_not_saved_in_this_format(tmp_path):
    from nn_blocksparse.bert import patch_bert

    model = patch_bert(_small_pruned(BertModel), mode="resize")
    with pytest.raises(ValueError, match="save_patched_bert"):
        save_pruned_bert(model, tmp_path / "out")
