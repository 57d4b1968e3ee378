"""Load and save head-pruned BERT checkpoints in the nn_pruning / transformers-4 format.

nn_pruning "hybrid" BERT models (huggingface/nn_pruning) were saved by transformers 4 after
``model.prune_heads(...)``.  Such a checkpoint folder has

* ``config.json`` with ``"pruned_heads": {"<layer>": [removed ORIGINAL head indices], ...}``;
* physically smaller attention tensors: query/key/value weight ``[n_kept_heads * head_dim, hidden]``,
  bias ``[n_kept_heads * head_dim]``, attention-output dense weight ``[hidden, n_kept_heads * head_dim]``;
* optionally smaller FFN tensors (removed neurons): intermediate.dense weight ``[n_kept, hidden]``,
  output.dense weight ``[hidden, n_kept]``, while ``intermediate_size`` in the config keeps the
  original value.

transformers 5 removed ``PreTrainedModel.prune_heads`` and no longer reads ``config.pruned_heads``,
so ``from_pretrained`` builds full-size modules and the smaller tensors do not fit.  This module
rebuilds the model at the right per-layer sizes and loads the weights strictly:

* :func:`load_pruned_bert` -- load such a folder (or a plain BERT folder) as a transformers 5 model.
* :func:`save_pruned_bert` -- write a model in exactly that format, physically removing the heads
  and, with ``shrink_ffn=True``, the FFN neurons (nn_pruning's optional resize) whose removal leaves
  the outputs unchanged, by :mod:`nn_blocksparse.resize`'s rule; so tests can make fixtures.

transformers 5's ``BertSelfAttention.forward`` reshapes with ``-1`` heads and takes the head size
from ``attention_head_size``, so smaller ``nn.Linear`` modules work in forward (eager and sdpa)
once they are in place.  The one case it cannot reshape is a layer with *zero* heads left (a
``view(..., -1, head_dim)`` of an empty tensor is ambiguous); such layers get
:class:`NoHeadsSelfAttention`, which outputs the exact zero contribution of an empty attention.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from transformers.models.bert.modeling_bert import BertSelfAttention

from ..resize import prunable_heads, prunable_neurons, remove_heads, remove_neurons
from .pruning import base_bert as _base_bert

logger = logging.getLogger(__name__)

__all__ = [
    "TASK_TO_MODEL_CLASS",
    "NoHeadsSelfAttention",
    "load_pruned_bert",
    "save_pruned_bert",
]

TASK_TO_MODEL_CLASS: dict[str, type] = {
    "base": BertModel,
    "question-answering": BertForQuestionAnswering,
    "sequence-classification": BertForSequenceClassification,
    "token-classification": BertForTokenClassification,
    "masked-lm": BertForMaskedLM,
}

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_BIN_FILE = "pytorch_model.bin"
PYTORCH_BIN_INDEX_FILE = "pytorch_model.bin.index.json"

# The prefix transformers gives the encoder inside every BERT head model (BertPreTrainedModel.base_model_prefix).
BASE_PREFIX = "bert."

# Buffers that old transformers versions saved as persistent state; transformers 5 makes them
# non-persistent, so they are legitimately "unexpected" in a v4 checkpoint.
_IGNORABLE_UNEXPECTED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")

# Old (TF-converted / pytorch-pretrained-bert) LayerNorm parameter names.
_LEGACY_LAYERNORM_RENAMES = ((re.compile(r"LayerNorm\.gamma$"), "LayerNorm.weight"),
                             (re.compile(r"LayerNorm\.beta$"), "LayerNorm.bias"))

_ATTENTION_PROJECTIONS = ("query", "key", "value")


class NoHeadsSelfAttention(BertSelfAttention):
    """Self-attention of a layer whose heads were *all* pruned (transformers 4 allowed this).

    With zero heads the attention contributes nothing: the output is an empty ``[..., 0]`` tensor and
    the following ``attention.output.dense`` (``Linear(0, hidden)``) reduces to its bias.  transformers 5's
    ``BertSelfAttention.forward`` cannot express that (it reshapes with ``-1`` heads, ambiguous for an
    empty tensor), hence this subclass.  It keeps empty ``query``/``key``/``value`` Linear modules so the
    state-dict keys (tensors of shape ``[0, hidden]`` / ``[0]``) match a transformers 4 checkpoint, and it
    subclasses ``BertSelfAttention`` so ``output_attentions`` still records one (empty) tensor per layer.
    """

    def __init__(self, config: BertConfig, layer_idx: int | None = None):
        nn.Module.__init__(self)  # BertSelfAttention.__init__ would build full-size projections
        self.config = config
        self.num_attention_heads = 0
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = 0
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, 0)
        self.key = nn.Linear(config.hidden_size, 0)
        self.value = nn.Linear(config.hidden_size, 0)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_decoder = config.is_decoder
        self.is_causal = False
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        *leading, seq_len, _ = hidden_states.shape
        empty_output = hidden_states.new_zeros(*leading, seq_len, 0)
        empty_attention_probs = hidden_states.new_zeros(*leading, 0, seq_len, seq_len)
        return empty_output, empty_attention_probs


# --------------------------------------------------------------------------------------------------
# Small helpers shared with the save path
# --------------------------------------------------------------------------------------------------


def _normalize_pruned_heads(raw: Mapping | None, num_layers: int, num_heads: int) -> dict[int, set[int]]:
    """``{"3": [0, 5]}`` (JSON) or ``{3: [0, 5]}`` -> ``{3: {0, 5}}``, validated against the config."""
    if not raw:
        return {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"config.json 'pruned_heads' must be a mapping layer -> list of heads, got {raw!r}")
    result: dict[int, set[int]] = {}
    for layer_key, heads in raw.items():
        try:
            layer = int(layer_key)
            head_set = {int(h) for h in heads}
        except (TypeError, ValueError) as err:
            raise ValueError(f"config.json 'pruned_heads' has a malformed entry {layer_key!r}: {heads!r}") from err
        if not 0 <= layer < num_layers:
            raise ValueError(f"pruned_heads names layer {layer}, but the config has {num_layers} layers")
        bad = sorted(h for h in head_set if not 0 <= h < num_heads)
        if bad:
            raise ValueError(f"pruned_heads for layer {layer} has head indices {bad} outside [0, {num_heads})")
        if head_set:
            result[layer] = head_set
    return result


# --------------------------------------------------------------------------------------------------
# Reading the checkpoint folder
# --------------------------------------------------------------------------------------------------


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Read ``model.safetensors`` (preferred) or ``pytorch_model.bin``, sharded variants included."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(file), device="cpu")
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from None

    def read_bin(file: Path) -> dict[str, torch.Tensor]:
        # weights_only=True: a .bin is a pickle, and only tensors/containers may be unpickled.
        try:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise ValueError(
                f"{file} holds objects other than tensors; refusing to unpickle it (weights_only=True): {err}"
            ) from err
        if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise ValueError(f"{file} does not contain a flat dict of tensors (a state dict)")
        return dict(loaded)

    def read_sharded(index_file: Path, read_shard) -> dict[str, torch.Tensor]:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index_file} is not a shard index ({{\"weight_map\": {{name: file}}}}): {err!r}") from None
        shards = set(weight_map.values()) if isinstance(weight_map, Mapping) else None
        # Shards are files of this folder: a name with a path in it could read files elsewhere.
        if shards is None or not all(isinstance(f, str) and f == Path(f).name and f not in ("", ".", "..")
                                     for f in shards):
            raise ValueError(f"{index_file}: weight_map must map tensor names to file names in {folder}")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(shards):
            state.update(read_shard(folder / shard))
        return state

    if (folder / SAFETENSORS_FILE).is_file():
        return read_safetensors(folder / SAFETENSORS_FILE)
    if (folder / SAFETENSORS_INDEX_FILE).is_file():
        return read_sharded(folder / SAFETENSORS_INDEX_FILE, read_safetensors)
    if (folder / PYTORCH_BIN_FILE).is_file():
        return read_bin(folder / PYTORCH_BIN_FILE)
    if (folder / PYTORCH_BIN_INDEX_FILE).is_file():
        return read_sharded(folder / PYTORCH_BIN_INDEX_FILE, read_bin)
    raise ValueError(
        f"no weights file in {folder}: expected {SAFETENSORS_FILE} or {PYTORCH_BIN_FILE} "
        f"(or their sharded .index.json variants)"
    )


def _rename_legacy_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in _LEGACY_LAYERNORM_RENAMES:
            key = pattern.sub(replacement, key)
        renamed[key] = tensor
    return renamed


def _align_prefix(state_dict: dict[str, torch.Tensor], model_uses_prefix: bool) -> dict[str, torch.Tensor]:
    """Make checkpoint key names match the model's (with or without the ``bert.`` prefix).

    * head model from a bare ``BertModel`` checkpoint: add ``bert.`` (the head weights will then be
      reported missing by the strict load, which is the honest answer);
    * ``BertModel`` from a head-model checkpoint: keep the ``bert.`` subtree and drop the head
      (``qa_outputs``, ``cls``, ``classifier``): asking for the base model means "the encoder only",
      exactly what ``from_pretrained`` does.
    """
    has_prefixed = any(k.startswith(BASE_PREFIX) for k in state_dict)
    if model_uses_prefix and not has_prefixed:
        return {BASE_PREFIX + k: v for k, v in state_dict.items()}
    if not model_uses_prefix and has_prefixed:
        head_keys = sorted(k for k in state_dict if not k.startswith(BASE_PREFIX))
        if head_keys:
            logger.info("loading the base model only; dropping task-head weights %s", head_keys)
        return {k[len(BASE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BASE_PREFIX)}
    return state_dict


def _checkpoint_head_count(state_dict, prefix: str, layer: int, head_dim: int, hidden: int,
                           pruned: set[int] | None, num_heads: int) -> int | None:
    """Heads kept in ``layer`` according to the checkpoint tensors (cross-checked with pruned_heads).

    Returns None when the layer's attention tensors are absent (the strict load reports that).
    """
    attention = f"{prefix}encoder.layer.{layer}.attention."
    query_key, output_key = f"{attention}self.query.weight", f"{attention}output.dense.weight"
    if query_key not in state_dict or output_key not in state_dict:
        return None
    pruned_note = f" (config.json pruned_heads for this layer: {sorted(pruned)})" if pruned is not None else ""
    if state_dict[query_key].dim() != 2:
        raise ValueError(f"layer {layer}: {query_key} must be 2-D, got shape {tuple(state_dict[query_key].shape)}")
    width = state_dict[query_key].shape[0]
    if pruned is not None:
        expected_heads = num_heads - len(pruned)
        if width != expected_heads * head_dim:
            raise ValueError(
                f"layer {layer}: {query_key} has shape {tuple(state_dict[query_key].shape)}, but "
                f"{expected_heads} of {num_heads} heads = {expected_heads * head_dim} rows should remain"
                + pruned_note
            )
    elif width % head_dim or width > num_heads * head_dim:
        raise ValueError(
            f"layer {layer}: {query_key} has {width} rows; expected a multiple of the head size {head_dim} "
            f"up to {num_heads * head_dim} ({num_heads} heads)"
        )
    kept_heads = width // head_dim

    expected_shapes = {f"{attention}output.dense.weight": (hidden, width)}
    for name in _ATTENTION_PROJECTIONS:
        expected_shapes[f"{attention}self.{name}.weight"] = (width, hidden)
        expected_shapes[f"{attention}self.{name}.bias"] = (width,)
    for key, shape in expected_shapes.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            raise ValueError(
                f"layer {layer}: {key} has shape {tuple(state_dict[key].shape)}, expected {shape} for "
                f"{kept_heads} heads of size {head_dim}" + pruned_note
            )
    return kept_heads


def _checkpoint_ffn_width(state_dict, prefix: str, layer: int, hidden: int) -> int | None:
    """FFN neurons kept in ``layer`` according to the checkpoint tensors (None when absent)."""
    layer_prefix = f"{prefix}encoder.layer.{layer}."
    in_weight = state_dict.get(f"{layer_prefix}intermediate.dense.weight")
    out_weight = state_dict.get(f"{layer_prefix}output.dense.weight")
    if in_weight is None or out_weight is None:
        return None
    if in_weight.dim() != 2:
        raise ValueError(f"layer {layer}: intermediate.dense.weight must be 2-D, got shape {tuple(in_weight.shape)}")
    width = in_weight.shape[0]
    in_bias = state_dict.get(f"{layer_prefix}intermediate.dense.bias")
    if (tuple(in_weight.shape) != (width, hidden) or tuple(out_weight.shape) != (hidden, width)
            or (in_bias is not None and tuple(in_bias.shape) != (width,))):
        raise ValueError(
            f"layer {layer}: FFN tensors disagree: intermediate.dense.weight {tuple(in_weight.shape)}, "
            f"output.dense.weight {tuple(out_weight.shape)}"
            + (f", intermediate.dense.bias {tuple(in_bias.shape)}" if in_bias is not None else "")
        )
    return width


# --------------------------------------------------------------------------------------------------
# Resizing a freshly built model to the checkpoint's per-layer sizes
# --------------------------------------------------------------------------------------------------


def _resize_attention(attention: nn.Module, config: BertConfig, layer: int, kept_heads: int,
                      removed_heads: set[int]) -> None:
    """Give ``attention`` (a BertAttention) ``kept_heads`` heads, as transformers 4's prune_heads did."""
    head_dim = config.hidden_size // config.num_attention_heads
    width = kept_heads * head_dim
    if kept_heads == 0:
        attention.self = NoHeadsSelfAttention(config, layer_idx=layer)
    else:
        self_attention = attention.self
        for name in _ATTENTION_PROJECTIONS:
            setattr(self_attention, name, nn.Linear(config.hidden_size, width))
        # forward only uses attention_head_size, but keep these consistent for anyone who reads them
        # (and for parity with transformers 4, whose prune_heads updated both).
        self_attention.num_attention_heads = kept_heads
        self_attention.all_head_size = width
    attention.output.dense = nn.Linear(width, config.hidden_size)
    attention.pruned_heads = set(removed_heads)  # same attribute name transformers 4 used


def _resize_ffn(layer_module: nn.Module, config: BertConfig, width: int) -> None:
    layer_module.intermediate.dense = nn.Linear(config.hidden_size, width)
    layer_module.output.dense = nn.Linear(width, config.hidden_size)


@contextlib.contextmanager
def _skip_weight_init():
    """Skip random init of modules that the strict load overwrites anyway (~2 s on BERT-base)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older/newer layout: correctness does not depend on it
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def _split_kwargs(kwargs: dict, config: BertConfig, task: str):
    """Separate loader options from config overrides, mimicking what from_pretrained accepts."""
    kwargs = dict(kwargs)
    attn_implementation = kwargs.pop("attn_implementation", None)
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)  # transformers 4 spelling
    dtype = dtype if dtype is not None else torch_dtype
    model_init_kwargs = {}
    if "add_pooling_layer" in kwargs:
        if task != "base":
            raise TypeError("add_pooling_layer is only meaningful for task='base'")
        model_init_kwargs["add_pooling_layer"] = bool(kwargs.pop("add_pooling_layer"))
    for key in ("local_files_only", "trust_remote_code"):  # harmless from_pretrained options: we never download
        kwargs.pop(key, None)
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise TypeError(
                f"load_pruned_bert got an unexpected keyword argument {key!r} (accepted: attn_implementation, "
                f"dtype/torch_dtype, add_pooling_layer, or an attribute of the config)"
            )
        setattr(config, key, value)
    return attn_implementation, dtype, model_init_kwargs


def _resolve_dtype(dtype, state_dict) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype == "auto":
        floating = [t.dtype for t in state_dict.values() if t.is_floating_point()]
        return floating[0] if floating else None
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


def load_pruned_bert(path: str | os.PathLike, task: str = "base", **from_pretrained_kwargs) -> nn.Module:
    """Load a (possibly head/FFN-pruned) BERT checkpoint folder as a transformers 5 model in eval mode.

    Args:
        path: local folder with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``.
        task: ``"base"`` (BertModel), ``"question-answering"``, ``"sequence-classification"``,
            ``"token-classification"`` or ``"masked-lm"``.
        **from_pretrained_kwargs: ``attn_implementation`` ("eager", "sdpa", ...), ``dtype`` /
            ``torch_dtype`` (a torch dtype, its name, or "auto" = the checkpoint's), ``add_pooling_layer``
            (base only; default: whether the checkpoint has pooler weights), or config attributes to
            override (as ``from_pretrained`` allows).

    Per layer, attention heads are taken from ``pruned_heads`` in config.json (and checked against the
    tensor shapes) or, without that key, inferred from the tensor shapes; FFN widths come from the
    tensor shapes.  The state dict is loaded strictly: missing or unexpected keys raise ``ValueError``,
    except the non-persistent ``position_ids``/``token_type_ids`` buffers, weights tied to a loaded
    parameter, a pooler the model does not have, and the task head of a head-model checkpoint loaded
    as ``task="base"``.  ``model.config.pruned_heads`` is set (``{layer: [original heads]}``) so that
    :func:`save_pruned_bert` can write the same format back.

    Raises:
        ValueError: folder missing, no config.json / weights file, ``model_type`` is not "bert", unknown
            task, shapes that disagree with ``pruned_heads`` or with each other, missing/unexpected keys.
    """
    if task not in TASK_TO_MODEL_CLASS:
        raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASK_TO_MODEL_CLASS)}")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"checkpoint folder {str(folder)!r} does not exist (or is not a directory)")
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"no {CONFIG_FILE} in {folder}")
    try:
        raw_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON ({err})") from None
    if not isinstance(raw_config, dict) or raw_config.get("model_type") != "bert":
        raw_config = raw_config if isinstance(raw_config, dict) else {}
        raise ValueError(
            f"{config_file} has model_type={raw_config.get('model_type')!r}; only BERT checkpoints "
            f"(model_type 'bert') are supported"
        )
    raw_pruned_heads = raw_config.pop("pruned_heads", None)
    config = BertConfig.from_dict(raw_config)
    state_dict = _read_state_dict(folder)

    num_layers, num_heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    head_dim = hidden // num_heads
    # None (key absent) means "infer heads from the tensor shapes"; {} means "nothing pruned".
    pruned_heads = None if raw_pruned_heads is None else _normalize_pruned_heads(raw_pruned_heads, num_layers, num_heads)

    model_class = TASK_TO_MODEL_CLASS[task]
    uses_prefix = task != "base"
    state_dict = _align_prefix(_rename_legacy_keys(state_dict), uses_prefix)
    prefix = BASE_PREFIX if uses_prefix else ""

    attn_implementation, dtype, model_init_kwargs = _split_kwargs(from_pretrained_kwargs, config, task)
    if task == "base" and "add_pooling_layer" not in model_init_kwargs:
        # A checkpoint saved from a pooler-less head model (QA, token classification, MLM) has no pooler;
        # building one would leave it randomly initialised (and the strict load would refuse).
        model_init_kwargs["add_pooling_layer"] = any(k.startswith("pooler.") for k in state_dict)

    # Per-layer sizes, validated before any module is built so errors name the offending tensor.
    kept_heads_per_layer: list[int | None] = []
    removed_heads_per_layer: list[set[int]] = []
    ffn_widths: list[int | None] = []
    for layer in range(num_layers):
        layer_pruned = None if pruned_heads is None else pruned_heads.get(layer, set())
        kept = _checkpoint_head_count(state_dict, prefix, layer, head_dim, hidden, layer_pruned, num_heads)
        kept_heads_per_layer.append(kept)
        if layer_pruned is not None:
            removed = set(layer_pruned)
        elif kept is not None:
            # Without pruned_heads the original indices are unknown; v4's convention is that the kept
            # heads keep their order, so record the highest indices as removed (only counts matter here).
            removed = set(range(kept, num_heads))
        else:
            removed = set()
        removed_heads_per_layer.append(removed)
        ffn_widths.append(_checkpoint_ffn_width(state_dict, prefix, layer, hidden))

    with _skip_weight_init():
        model = model_class(config, **model_init_kwargs)
        base = _base_bert(model)
        for layer, layer_module in enumerate(base.encoder.layer):
            kept = kept_heads_per_layer[layer]
            if kept is not None and kept != num_heads:
                _resize_attention(layer_module.attention, config, layer, kept, removed_heads_per_layer[layer])
            elif kept is not None:
                layer_module.attention.pruned_heads = set()
            if ffn_widths[layer] is not None and ffn_widths[layer] != config.intermediate_size:
                _resize_ffn(layer_module, config, ffn_widths[layer])
    # Tying normally happens in init_weights, which the no-init context skipped.
    model.tie_weights()

    _load_state_dict_strictly(model, state_dict)

    # Without pruned_heads in config.json only the counts are known; the assumed indices (the highest
    # ones) are recorded so that save_pruned_bert writes a consistent pruned_heads back.
    recorded = pruned_heads if pruned_heads is not None else {
        layer: removed for layer, removed in enumerate(removed_heads_per_layer) if removed}
    model.config.pruned_heads = {layer: sorted(heads) for layer, heads in sorted(recorded.items()) if heads}

    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    resolved_dtype = _resolve_dtype(dtype, state_dict)
    if resolved_dtype is not None:
        model.to(resolved_dtype)
    model.eval()
    return model


def _load_state_dict_strictly(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    model_state = model.state_dict()
    mismatched = [
        f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(model_state[key].shape)}"
        for key, tensor in state_dict.items()
        if key in model_state and tuple(tensor.shape) != tuple(model_state[key].shape)
    ]
    if mismatched:
        raise ValueError("checkpoint tensors do not fit the model:\n  " + "\n  ".join(mismatched[:20]))

    result = model.load_state_dict(state_dict, strict=False)
    has_pooler = any(name.endswith("pooler.dense.weight") for name in model_state)
    unexpected = [
        key for key in result.unexpected_keys
        if not key.endswith(_IGNORABLE_UNEXPECTED_SUFFIXES)
        # transformers 4 also ignored a checkpoint pooler in pooler-less models (QA, MLM, token cls)
        and not (not has_pooler and ".pooler." in f".{key}")
    ]
    # A missing key is fine when it names the same Parameter as a loaded key (tied weights such as
    # cls.predictions.decoder.weight == bert.embeddings.word_embeddings.weight).
    loaded_tensor_ids = set()
    params_by_name = dict(model.named_parameters(remove_duplicate=False))
    params_by_name.update(dict(model.named_buffers(remove_duplicate=False)))
    for key in state_dict:
        if key in params_by_name:
            loaded_tensor_ids.add(id(params_by_name[key]))
    missing = [key for key in result.missing_keys
               if not (key in params_by_name and id(params_by_name[key]) in loaded_tensor_ids)]
    if missing or unexpected:
        message = []
        if missing:
            message.append(f"missing keys (not in the checkpoint): {missing[:20]}"
                           + (f" ... ({len(missing)} in all)" if len(missing) > 20 else ""))
        if unexpected:
            message.append(f"unexpected keys (not in the model): {unexpected[:20]}"
                           + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 20 else ""))
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(message))


# --------------------------------------------------------------------------------------------------
# Saving in the transformers-4 / nn_pruning format
# --------------------------------------------------------------------------------------------------


def _cut_heads(state: dict[str, torch.Tensor], layer_prefix: str, attention: nn.Module, present_heads: int) -> list[int]:
    """Cut from ``state`` the heads of ``attention`` (a BertAttention) whose removal changes nothing.

    What is removable and how it is cut is ``resize``'s rule, the one ``patch_bert`` resizes by;
    the constant a removed head still added goes into the kept output bias, which this format
    holds like any other tensor. Returns the removed heads' positions among the present ones.
    """
    self_attention, output = attention.self, attention.output.dense
    removable = prunable_heads(self_attention.value, output, present_heads)
    if removable:
        cut = remove_heads(self_attention.query, self_attention.key, self_attention.value, output, present_heads,
                           removable)
        _put_linears(state, layer_prefix, zip(("self.query", "self.key", "self.value", "output.dense"), cut))
    return removable


def _cut_ffn_neurons(state: dict[str, torch.Tensor], layer_prefix: str, layer_module: nn.Module) -> None:
    """Cut from ``state`` the FFN neurons of ``layer_module`` whose removal changes nothing (``resize``'s rule)."""
    inner, outer = layer_module.intermediate.dense, layer_module.output.dense
    removable = prunable_neurons(inner, outer)
    if removable:
        cut = remove_neurons(inner, outer, removable, layer_module.intermediate.intermediate_act_fn)
        _put_linears(state, layer_prefix, zip(("intermediate.dense", "output.dense"), cut))


def _put_linears(state: dict[str, torch.Tensor], prefix: str, named_linears) -> None:
    for name, linear in named_linears:
        state[f"{prefix}{name}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            state[f"{prefix}{name}.bias"] = linear.bias.detach()


def _dedupe_shared_tensors(state: dict[str, torch.Tensor], preferred: set[str]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied weights): keep one name per storage.

    transformers 4 did the same on save and re-tied on load; ``preferred`` names (tie sources, e.g.
    the word embeddings) win over their tied targets.
    """
    by_storage: dict[tuple, str] = {}
    for key in sorted(state, key=lambda k: (k not in preferred, k)):
        tensor = state[key]
        storage_key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and storage_key in by_storage:
            continue
        by_storage[storage_key] = key
    kept_names = set(by_storage.values()) | {k for k, t in state.items() if not t.numel()}
    return {k: v for k, v in state.items() if k in kept_names}


def save_pruned_bert(model: nn.Module, path: str | os.PathLike, safe_serialization: bool = True,
                     *, shrink_ffn: bool = False) -> Path:
    """Write ``model`` as an nn_pruning / transformers-4 head-pruned checkpoint folder.

    Every head whose removal leaves the outputs unchanged is physically removed, by the rule
    ``patch_bert`` resizes by (:mod:`nn_blocksparse.resize`): a head whose value rows or
    attention-output columns are all zero. Its Q/K/V weight rows and biases and its attention-output
    columns are dropped, as transformers 4's ``prune_heads`` did, and the constant it still added
    (``O[:, head] @ b_v[head]``, zero when its output columns are zero) goes into the kept output
    bias. ``config.json`` gets ``"pruned_heads": {"<layer>": [original head indices]}`` (merged with
    heads already pruned in a model loaded by :func:`load_pruned_bert`). With ``shrink_ffn=True``,
    FFN neurons whose intermediate row or output column is zero are removed too, the constant
    output of the first kind folded into the FFN output bias (nn_pruning's optional resize;
    ``intermediate_size`` in the config stays the original). The model itself is not modified.

    The loaded model's outputs equal ``model``'s in eval mode. In training mode they are equal in
    expectation only: attention dropout makes a value-empty head's output vary around its bias.

    Weights go to ``model.safetensors`` (tied duplicates dropped, metadata ``{"format": "pt"}``) or, with
    ``safe_serialization=False``, to ``pytorch_model.bin`` (``torch.save`` of a plain dict of tensors).
    Returns the folder path.
    """
    if getattr(model, "nn_blocksparse_mode", None) is not None:
        raise ValueError("save_pruned_bert writes unpatched models in the transformers 4 format; this model is "
                         "patched: save it with save_patched_bert")
    base = _base_bert(model)
    config = model.config
    num_heads, hidden = config.num_attention_heads, config.hidden_size
    head_dim = hidden // num_heads
    prefix = BASE_PREFIX if base is not model else ""
    previously_pruned = _normalize_pruned_heads(getattr(config, "pruned_heads", None) or {},
                                                config.num_hidden_layers, num_heads)

    with torch.no_grad():
        state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
        all_pruned: dict[int, list[int]] = {}
        for layer, layer_module in enumerate(base.encoder.layer):
            attention = layer_module.attention
            present_heads = attention.self.query.out_features // head_dim
            already = set(getattr(attention, "pruned_heads", None) or previously_pruned.get(layer, set()))
            if len(already) != num_heads - present_heads:
                raise ValueError(
                    f"layer {layer}: {present_heads} heads present but pruned_heads records {sorted(already)}; "
                    f"cannot map heads back to their original indices"
                )
            # Original index of each head still present, in order (transformers 4 kept the order).
            present_original = [h for h in range(num_heads) if h not in already]
            removable = _cut_heads(state, f"{prefix}encoder.layer.{layer}.attention.", attention, present_heads)
            removed_original = already | {present_original[p] for p in removable}
            if removed_original:
                all_pruned[layer] = sorted(removed_original)
            if shrink_ffn:
                _cut_ffn_neurons(state, f"{prefix}encoder.layer.{layer}.", layer_module)

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_dict()
    config_dict["pruned_heads"] = {str(layer): heads for layer, heads in sorted(all_pruned.items())}
    config_dict["architectures"] = [type(model).__name__]
    if "dtype" in config_dict and "torch_dtype" not in config_dict:
        config_dict["torch_dtype"] = config_dict["dtype"]  # the key transformers 4 reads
    (folder / CONFIG_FILE).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")

    if safe_serialization:
        from safetensors.torch import save_file

        tie_sources = set(getattr(model, "all_tied_weights_keys", {}).values())
        deduped = _dedupe_shared_tensors(state, preferred=tie_sources)
        save_file({k: v.contiguous().clone() for k, v in deduped.items()}, str(folder / SAFETENSORS_FILE),
                  metadata={"format": "pt"})
        stale = folder / PYTORCH_BIN_FILE
    else:
        # clone(): the cut tensors are fresh, but untouched entries share storage with the live model;
        # a plain dict of independent tensors is what transformers 4 wrote.
        torch.save({k: v.contiguous().clone() for k, v in state.items()}, folder / PYTORCH_BIN_FILE)
        stale = folder / SAFETENSORS_FILE
    # A leftover weights file of the other format would be preferred/confusing on the next load.
    if stale.exists():
        stale.unlink()
    return folder
