"""``save_pruned_bert``: write a BERT as an nn_pruning / transformers-4 head-pruned checkpoint.

The heads and, on request, the FFN neurons that can go without changing the outputs are cut from
the weights as they are written, by :mod:`nn_blocksparse.resize`'s rule, the one ``patch_bert``
resizes by, so a checkpoint and a patched model of the same weights agree on what was removed.
The folder is what :func:`~nn_blocksparse.bert.pruned_load.load_pruned_bert` reads (and what
transformers 4 wrote; the format is described in :mod:`nn_blocksparse.bert.pruned_checkpoint`),
so tests can make realistic fixtures from any model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..resize import prunable_heads, prunable_neurons, remove_heads, remove_neurons
from .checkpoint_files import BASE_PREFIX, write_checkpoint
from .pruned_load import normalize_pruned_heads
from .pruning import base_bert as _base_bert

__all__ = ["save_pruned_bert"]


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
    """Store each ``(name, nn.Linear)`` pair's weight and bias in ``state`` under ``prefix + name``."""
    for name, linear in named_linears:
        state[f"{prefix}{name}.weight"] = linear.weight.detach()
        if linear.bias is not None:
            state[f"{prefix}{name}.bias"] = linear.bias.detach()


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
    previously_pruned = normalize_pruned_heads(getattr(config, "pruned_heads", None) or {},
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

    config_dict = config.to_dict()
    config_dict["pruned_heads"] = {str(layer): heads for layer, heads in sorted(all_pruned.items())}
    config_dict["architectures"] = [type(model).__name__]
    if "dtype" in config_dict and "torch_dtype" not in config_dict:
        config_dict["torch_dtype"] = config_dict["dtype"]  # the key transformers 4 reads
    tie_sources = set(getattr(model, "all_tied_weights_keys", {}).values())
    return write_checkpoint(Path(path), config_dict, state, safe_serialization, tie_sources)
