"""`patch_bert`: put a (pruned) transformers BERT on the block-sparse kernels; save/load the result.

The thin layer between transformers' BERT modules and the library's generic pieces
(`resize`, `BlockSparseLinear`, `FusedSelfAttention`). Modes:

- `"resize"`: nn_pruning's `optimize_model(model, "dense")`: empty heads and FFN neurons cut
  out of dense matrices; transformers' own attention keeps running, on smaller matrices.
- `"blocksparse"`: every Q/K/V (fused into one matmul), attention-output, FFN-in (with GELU
  fused into the kernel) and FFN-out matrix becomes a `BlockSparseLinear`; all heads stay.
- `"hybrid"` (default): resize first, then block-sparse for the zero blocks left inside, where
  they pay. `dense_threshold` says where: a block density (a matrix denser than it stays a dense
  `nn.Linear`), or `"measure"`: time each matrix both ways on its own device and dtype
  (`nn_blocksparse.selection`) and keep the faster. The default `"auto"` measures on a GPU,
  where the kernel only wins at low density (about 0.2 on an H200); on CPU it asks the CPU
  planner (`nn_blocksparse.cpu.use_block_sparse`: this machine's calibrated profile, or a
  conservative default; never block-sparse without the native kernel).
  The choices, with the times measured, are kept in `model.nn_blocksparse_choices`.

`weight_dtype=torch.bfloat16` (CPU, fp32 models): the block-sparse linears keep bf16 weights and
biases and take the fp32 activations (rounded to bf16 inside the kernel, fp32 accumulation and
output); layer norms, softmax, the residual stream and the dense `nn.Linear`s hybrid leaves stay fp32.

Saved patched models are a folder: `config.json` (the transformers config), `patch.json`
(what replaced what, so the structure can be rebuilt) and `model.safetensors`. No pickle.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch
import torch.nn as nn

from ..attention import FusedSelfAttention
from ..block_sparse_matrix import SUPPORTED_BLOCK_SIZES
from ..linear import BlockSparseLinear
from ..resize import linear_from, prunable_heads, prunable_neurons, remove_heads, remove_neurons
from ..selection import DEFAULT_ROWS, measure_block_sparse

MODES = ("resize", "blocksparse", "hybrid")
WEIGHT_DTYPES = (None, torch.bfloat16)
RESIZE_ALIGNMENT = 8  # resized FFN hidden sizes round up to this: 16-byte fp16 rows (resize.py)
PATCH_FORMAT = "nn_blocksparse.patched_bert/1"


class BertSelfAttentionAdapter(nn.Module):
    """Stands in for `BertSelfAttention`: BERT's call signature around a `FusedSelfAttention`."""

    def __init__(self, attention: FusedSelfAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, cache=None, **kwargs):
        if encoder_hidden_states is not None or cache is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("patched BERT attention is encoder self-attention only (no cross-attention or cache)")
        return self.attention(hidden_states, attention_mask), None


# ---------------------------------------------------------------------------------- discovery
def bert_layers(model: nn.Module) -> list[nn.Module]:
    """The `BertLayer`s of a transformers `BertModel` or BERT head model; clear errors otherwise."""
    from transformers.models.bert.modeling_bert import BertLayer, BertModel

    encoder_owner = model if isinstance(model, BertModel) else getattr(model, "bert", None)
    if not isinstance(encoder_owner, BertModel):
        raise TypeError(
            f"expected a transformers BertModel or a BERT head model (with a .bert BertModel), "
            f"got {type(model).__name__}"
        )
    config = encoder_owner.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("unsupported BERT config: decoder / cross-attention models are not supported")
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        raise ValueError(
            f"unsupported BERT config: position_embedding_type={config.position_embedding_type!r} "
            "(only 'absolute' is supported)"
        )
    layers = list(encoder_owner.encoder.layer)
    if not all(isinstance(layer, BertLayer) for layer in layers):
        raise TypeError("the encoder holds layers that are not BertLayer")
    return layers


def _is_exact_gelu(act_fn) -> bool:
    """BERT's "gelu" (erf form) is the only activation the kernel epilogue fuses."""
    from transformers.activations import GELUActivation

    return isinstance(act_fn, GELUActivation) or act_fn is torch.nn.functional.gelu


# ---------------------------------------------------------------------------------- patching
def _projection(weight, bias, sparse: bool, block_size: int, backend: str, activation=None,
                weight_dtype=None) -> nn.Module:
    if sparse:
        if weight_dtype is not None:
            weight = weight.to(weight_dtype)
        return BlockSparseLinear.from_dense(weight, bias, block_size, activation=activation, backend=backend)
    return linear_from(weight, bias)


def _block_density(weight: torch.Tensor, block_size: int) -> float:
    n, k = weight.shape
    if n == 0 or k == 0:
        return 1.0
    blocks = weight.reshape(n // block_size, block_size, k // block_size, block_size)
    return (blocks != 0).any(dim=3).any(dim=1).float().mean().item()


def auto_density_threshold(dtype: torch.dtype = torch.float32, block_size: int = 32,
                           weight_dtype: torch.dtype | None = None) -> float:
    """hybrid's `dense_threshold="auto"` on CPU: the block density above which a matrix stays dense."""
    from ..cpu import density_threshold

    return density_threshold(weight_dtype or dtype, dtype, block_size)


def patch_bert(model: nn.Module, mode: str = "hybrid", block_size: int = 32, backend: str = "auto",
               dense_threshold: float | str = "auto", measure_rows: int = DEFAULT_ROWS,
               ffn_multiple_of: int | None = None, weight_dtype: torch.dtype | None = None) -> nn.Module:
    """Patch in place and return `model`. See the module docstring for the modes.

    Patch the model on the device and in the dtype it will run in: `"measure"` times there, with
    `measure_rows` tokens per call. `ffn_multiple_of`: resize and hybrid round each FFN's hidden
    size up to a multiple of it with all-zero neurons (exact; `resize.remove_neurons`); by default
    `RESIZE_ALIGNMENT` for resize and `block_size` for hybrid (so a resized FFN stays on the block
    grid and may go block-sparse); "blocksparse" resizes nothing and ignores it. `weight_dtype`:
    see the module docstring.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "resize" and block_size not in SUPPORTED_BLOCK_SIZES:
        # Checked up front: hybrid would otherwise only fail on the first matrix it makes block-sparse.
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if ffn_multiple_of is None:
        ffn_multiple_of = block_size if mode == "hybrid" else RESIZE_ALIGNMENT
    if isinstance(ffn_multiple_of, bool) or not isinstance(ffn_multiple_of, numbers.Integral) or ffn_multiple_of < 1:
        raise ValueError(f"ffn_multiple_of must be a positive int, got {ffn_multiple_of!r}")
    valid = (dense_threshold in ("auto", "measure") if isinstance(dense_threshold, str)
             else 0.0 <= dense_threshold <= 1.0)
    if not valid:
        raise ValueError(f"dense_threshold must be a block density in [0, 1], 'auto' or 'measure', "
                         f"got {dense_threshold!r}")
    layers = bert_layers(model)
    for layer in layers:
        if not hasattr(layer.attention.self, "query"):
            raise ValueError("this model is already patched")
    parameter = next(model.parameters(), None)
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype is not None and parameter is not None and (
            parameter.device.type != "cpu" or parameter.dtype != torch.float32):
        raise ValueError(f"weight_dtype={weight_dtype} is for fp32 models on CPU (bf16 weights, fp32 activations); "
                         f"this model is {parameter.dtype} on {parameter.device}")

    resize = mode in ("resize", "hybrid")
    measure = dense_threshold == "measure" or (
        dense_threshold == "auto" and parameter is not None and parameter.device.type == "cuda")
    choices = []

    def sparse_for(weight: torch.Tensor, bias, layer_index: int, name: str, activation=None) -> bool:
        if mode == "resize":
            return False
        if weight.shape[0] % block_size or weight.shape[1] % block_size:
            if mode == "hybrid":
                # Off the block grid (hybrid pads resized FFNs onto it; this is a model whose own
                # sizes the block size does not divide): it stays a dense nn.Linear.
                return False
            raise ValueError(f"block_size {block_size} does not divide a weight of shape {tuple(weight.shape)}")
        if mode == "blocksparse":
            return True
        choice = {"layer": layer_index, "matrix": name, "shape": list(weight.shape),
                  "block_density": round(_block_density(weight, block_size), 4)}
        if measure and weight.numel():
            timing = measure_block_sparse(weight, bias, activation, block_size, backend, rows=measure_rows,
                                          weight_dtype=weight_dtype)
            choice.update(dense_ms=timing.dense_ms, block_sparse_ms=timing.block_sparse_ms,
                          block_sparse=timing.use_block_sparse)
        elif isinstance(dense_threshold, str):
            from ..cpu import use_block_sparse

            choice["block_sparse"] = use_block_sparse(choice["block_density"], weight_dtype or weight.dtype,
                                                      weight.dtype, block_size)
        else:
            choice["block_sparse"] = choice["block_density"] <= dense_threshold
        choices.append(choice)
        return choice["block_sparse"]

    with torch.no_grad():
        for layer_index, layer in enumerate(layers):
            attention = layer.attention.self
            head_dim = attention.attention_head_size
            query, key, value = attention.query, attention.key, attention.value
            output = layer.attention.output.dense
            num_heads = query.out_features // head_dim
            inner, outer = layer.intermediate.dense, layer.output.dense
            if resize:
                removed = prunable_heads(value, output, num_heads)
                query, key, value, output = remove_heads(query, key, value, output, num_heads, removed)
                num_heads -= len(removed)
                # Aligned hidden sizes keep cuBLAS on its fast kernels (resize.py).
                inner, outer = remove_neurons(inner, outer, prunable_neurons(inner, outer),
                                              layer.intermediate.intermediate_act_fn, multiple_of=int(ffn_multiple_of))

            if mode == "resize" and num_heads > 0:
                attention.query, attention.key, attention.value = query, key, value
                attention.num_attention_heads = num_heads
                attention.all_head_size = num_heads * head_dim
            else:
                qkv_weight = torch.cat([query.weight, key.weight, value.weight])
                qkv_bias = torch.cat([query.bias, key.bias, value.bias]) if query.bias is not None else None
                qkv_sparse = num_heads > 0 and sparse_for(qkv_weight, qkv_bias, layer_index, "qkv")
                qkv = _projection(qkv_weight, qkv_bias, qkv_sparse, block_size, backend, weight_dtype=weight_dtype)
                layer.attention.self = BertSelfAttentionAdapter(
                    FusedSelfAttention(qkv, num_heads, head_dim, attention.dropout.p))
            output_sparse = sparse_for(output.weight, output.bias, layer_index, "attention_output")
            layer.attention.output.dense = _projection(output.weight, output.bias, output_sparse, block_size, backend,
                                                       weight_dtype=weight_dtype)

            fuse_gelu = _is_exact_gelu(layer.intermediate.intermediate_act_fn)
            inner_sparse = sparse_for(inner.weight, inner.bias, layer_index, "ffn_in", "gelu" if fuse_gelu else None)
            layer.intermediate.dense = _projection(inner.weight, inner.bias, inner_sparse, block_size, backend,
                                                   activation="gelu" if (inner_sparse and fuse_gelu) else None,
                                                   weight_dtype=weight_dtype)
            if inner_sparse and fuse_gelu:
                layer.intermediate.intermediate_act_fn = nn.Identity()
            outer_sparse = sparse_for(outer.weight, outer.bias, layer_index, "ffn_out")
            layer.output.dense = _projection(outer.weight, outer.bias, outer_sparse, block_size, backend,
                                             weight_dtype=weight_dtype)
    model.train(model.training)  # new modules start in training mode: give them the model's (dropout!)
    model.nn_blocksparse_mode = mode
    model.nn_blocksparse_choices = choices
    return model


def heads_per_layer(model: nn.Module) -> list[int]:
    """Attention heads each layer runs (works before and after patching)."""
    counts = []
    for layer in bert_layers(model):
        attention = layer.attention.self
        if isinstance(attention, BertSelfAttentionAdapter):
            counts.append(attention.attention.num_heads)
        else:
            counts.append(attention.query.out_features // attention.attention_head_size)
    return counts


# ---------------------------------------------------------------------------------- save / load
def _module_spec(module: nn.Module) -> dict:
    if isinstance(module, BlockSparseLinear):
        return {"type": "block_sparse", **module.config_dict(),
                "dtype": str(module.values.dtype).removeprefix("torch.")}
    if isinstance(module, nn.Linear):
        return {"type": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    raise TypeError(f"cannot describe a {type(module).__name__}")


def _module_from_spec(spec: dict, dtype: torch.dtype, backend: str) -> nn.Module:
    if spec["type"] == "block_sparse":
        # Block-sparse weights may be kept in another dtype than the model (patch_bert's weight_dtype).
        weight_dtype = {"bfloat16": torch.bfloat16}.get(spec.get("dtype"), dtype)
        return BlockSparseLinear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                                 block_size=spec["block_size"], activation=spec["activation"], backend=backend,
                                 dtype=weight_dtype)
    if spec["type"] == "linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype)
    raise ValueError(f"unknown module type {spec['type']!r} in patch.json")


def _layer_spec(layer: nn.Module) -> dict:
    attention = layer.attention.self
    if isinstance(attention, BertSelfAttentionAdapter):
        fused = attention.attention
        attention_spec = {"type": "fused", "num_heads": fused.num_heads, "head_dim": fused.head_dim,
                          "qkv": _module_spec(fused.qkv)}
    else:
        attention_spec = {"type": "bert", "num_heads": attention.query.out_features // attention.attention_head_size,
                          "query": _module_spec(attention.query), "key": _module_spec(attention.key),
                          "value": _module_spec(attention.value)}
    return {
        "attention": attention_spec,
        "attention_output": _module_spec(layer.attention.output.dense),
        "intermediate": _module_spec(layer.intermediate.dense),
        "intermediate_activation_fused": isinstance(layer.intermediate.intermediate_act_fn, nn.Identity),
        "output": _module_spec(layer.output.dense),
    }


def save_patched_bert(model: nn.Module, path: str | Path) -> Path:
    """Write a patched model to a folder (config.json, patch.json, model.safetensors)."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    layers = bert_layers(model)
    model.config.save_pretrained(path)
    patch = {"format": PATCH_FORMAT, "model_class": type(model).__name__,
             "mode": getattr(model, "nn_blocksparse_mode", None),
             "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
             "layers": [_layer_spec(layer) for layer in layers]}
    (path / "patch.json").write_text(json.dumps(patch, indent=1))
    save_model(model, str(path / "model.safetensors"))  # handles tied weights, unlike save_file
    return path


def load_patched_bert(path: str | Path, device=None, backend: str = "auto") -> nn.Module:
    """Rebuild a model saved by `save_patched_bert`; weights load strictly, without pickle."""
    import transformers
    from safetensors.torch import load_model

    path = Path(path)
    patch_file = path / "patch.json"
    if not patch_file.exists():
        raise ValueError(f"{path} has no patch.json: not a model saved by save_patched_bert")
    patch = json.loads(patch_file.read_text())
    if patch.get("format") != PATCH_FORMAT:
        raise ValueError(f"unsupported patch format {patch.get('format')!r}, expected {PATCH_FORMAT!r}")
    class_name = patch["model_class"]
    if not (class_name.startswith("Bert") and hasattr(transformers, class_name)):
        raise ValueError(f"patch.json names an unsupported model class {class_name!r}")
    dtype = getattr(torch, patch["dtype"])
    config = transformers.BertConfig.from_pretrained(path)
    model = getattr(transformers, class_name)(config).to(dtype)
    layers = bert_layers(model)
    if len(layers) != len(patch["layers"]):
        raise ValueError(f"patch.json describes {len(patch['layers'])} layers, the config {len(layers)}")
    for layer, spec in zip(layers, patch["layers"]):
        attention_spec = spec["attention"]
        attention = layer.attention.self
        if attention_spec["type"] == "fused":
            layer.attention.self = BertSelfAttentionAdapter(FusedSelfAttention(
                _module_from_spec(attention_spec["qkv"], dtype, backend), attention_spec["num_heads"],
                attention_spec["head_dim"], attention.dropout.p))
        else:
            for name in ("query", "key", "value"):
                setattr(attention, name, _module_from_spec(attention_spec[name], dtype, backend))
            attention.num_attention_heads = attention_spec["num_heads"]
            attention.all_head_size = attention_spec["num_heads"] * attention.attention_head_size
        layer.attention.output.dense = _module_from_spec(spec["attention_output"], dtype, backend)
        layer.intermediate.dense = _module_from_spec(spec["intermediate"], dtype, backend)
        if spec["intermediate_activation_fused"]:
            layer.intermediate.intermediate_act_fn = nn.Identity()
        layer.output.dense = _module_from_spec(spec["output"], dtype, backend)
    load_model(model, str(path / "model.safetensors"), strict=True)
    model.nn_blocksparse_mode = patch["mode"]
    model.eval()
    return model.to(device) if device is not None else model
