"""``load_pruned_bert``: rebuild a BERT at a checkpoint's per-layer sizes, then load it strictly.

transformers 5 does not read ``config.pruned_heads``, so ``from_pretrained`` builds full-size
modules that a head- or FFN-pruned checkpoint's smaller tensors do not fit (the format is described
in :mod:`nn_blocksparse.bert.pruned_checkpoint`). Here every layer's head count and FFN width are
read off the tensor shapes (cross-checked with ``pruned_heads`` where the config has it), and
checked before any module is built so that an error names the offending tensor; the modules are
then replaced by ones of those sizes and the state dict is loaded strictly.

transformers 5's ``BertSelfAttention.forward`` reshapes with ``-1`` heads and takes the head size
from ``attention_head_size``, so smaller ``nn.Linear`` modules work in forward (eager and sdpa)
once they are in place. The one case it cannot reshape is a layer with *zero* heads left (a
``view(..., -1, head_dim)`` of an empty tensor is ambiguous); such layers get
:class:`NoHeadsSelfAttention`, which outputs the exact zero contribution of an empty attention.
"""

from __future__ import annotations

import contextlib
import os
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

from .checkpoint_files import BASE_PREFIX, CONFIG_FILE, align_prefix, read_config, read_state_dict, rename_legacy_keys
from .pruning import base_bert as _base_bert

__all__ = ["TASK_TO_MODEL_CLASS", "NoHeadsSelfAttention", "load_pruned_bert", "normalize_pruned_heads",
           "skip_weight_init"]

TASK_TO_MODEL_CLASS: dict[str, type] = {
    "base": BertModel,
    "question-answering": BertForQuestionAnswering,
    "sequence-classification": BertForSequenceClassification,
    "token-classification": BertForTokenClassification,
    "masked-lm": BertForMaskedLM,
}

# Buffers that old transformers versions saved as persistent state; transformers 5 makes them
# non-persistent, so they are legitimately "unexpected" in a v4 checkpoint.
_IGNORABLE_UNEXPECTED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")

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


def normalize_pruned_heads(raw: Mapping | None, num_layers: int, num_heads: int) -> dict[int, set[int]]:
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
def skip_weight_init():
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
    raw_config = read_config(folder)
    if not isinstance(raw_config, dict) or raw_config.get("model_type") != "bert":
        raw_config = raw_config if isinstance(raw_config, dict) else {}
        raise ValueError(
            f"{folder / CONFIG_FILE} has model_type={raw_config.get('model_type')!r}; only BERT checkpoints "
            f"(model_type 'bert') are supported"
        )
    raw_pruned_heads = raw_config.pop("pruned_heads", None)
    config = BertConfig.from_dict(raw_config)
    state_dict = read_state_dict(folder)

    num_layers, num_heads, hidden = config.num_hidden_layers, config.num_attention_heads, config.hidden_size
    head_dim = hidden // num_heads
    # None (key absent) means "infer heads from the tensor shapes"; {} means "nothing pruned".
    pruned_heads = None if raw_pruned_heads is None else normalize_pruned_heads(raw_pruned_heads, num_layers, num_heads)

    model_class = TASK_TO_MODEL_CLASS[task]
    uses_prefix = task != "base"
    state_dict = align_prefix(rename_legacy_keys(state_dict), uses_prefix)
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

    with skip_weight_init():
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

