"""Save and load a patched BERT: `save_patched_bert`, `load_patched_bert` and the checks of `patch.json`.

A saved patched model is a folder: `config.json` (the transformers config), `patch.json` (what
replaced what, layer by layer, so the structure can be rebuilt before the weights load) and
`model.safetensors`. No pickle. `from_pretrained` cannot load it: it would build the unpatched
structure. Loading checks the folder before building anything (`load_patched_bert`).

`patch.json`: `{"format": PATCH_FORMAT, "model_class": "Bert...", "mode": one of MODES or null,
"dtype": torch's name of the model dtype, "layers": [...]}`; each layer gives its attention
(`"fused"`: one `qkv` module, or `"bert"`: `query`/`key`/`value`), `attention_output`,
`intermediate`, `intermediate_activation_fused` and `output`, each module a `"linear"` or
`"block_sparse"` spec (sizes, bias, block size, fused activation, weight dtype; a `"linear"` with an
`activation` field is a `DenseLinear`, hybrid's dense matrices).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..attention import FusedSelfAttention
from ..block_sparse_matrix import SUPPORTED_BLOCK_SIZES
from ..dense_linear import DenseLinear
from ..dtypes import TORCH_DTYPE_NAMES, dtype_from_name
from ..functional import BACKENDS
from ..linear import BlockSparseLinear
from .checkpoint_files import BASE_PREFIX, SAFETENSORS_FILE, read_json
from .patching import (MODES, BertSelfAttentionAdapter, LayerPlan, apply_layer_plan, bert_layers, is_exact_gelu,
                       record_patch)

PATCH_FORMAT = "nn_blocksparse.patched_bert/1"
PATCH_FILE = "patch.json"


def _module_spec(module: nn.Module) -> dict:
    if isinstance(module, BlockSparseLinear):
        return {"type": "block_sparse", **module.config_dict(), "dtype": TORCH_DTYPE_NAMES[module.values.dtype]}
    if isinstance(module, nn.Linear):
        spec = {"type": "linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
        if isinstance(module, DenseLinear):  # may keep bf16 weights in an fp32 model (patch_bert's weight_dtype)
            return {**spec, "activation": module.activation, "dtype": TORCH_DTYPE_NAMES[module.weight.dtype]}
        return spec
    raise TypeError(f"cannot describe a {type(module).__name__}")


def _module_from_spec(spec: dict, dtype: torch.dtype, backend: str) -> nn.Module:
    if spec["type"] == "block_sparse":
        # Block-sparse weights may be kept in another dtype than the model (patch_bert's weight_dtype).
        weight_dtype = dtype_from_name(spec["dtype"], TORCH_DTYPE_NAMES) if "dtype" in spec else dtype
        return BlockSparseLinear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                                 block_size=spec["block_size"], activation=spec["activation"], backend=backend,
                                 dtype=weight_dtype)
    if spec["type"] == "linear":
        if "activation" in spec:  # a DenseLinear (hybrid's dense matrices); without it nn_pruning's plain nn.Linear
            weight_dtype = dtype_from_name(spec["dtype"], TORCH_DTYPE_NAMES) if "dtype" in spec else dtype
            return DenseLinear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                               activation=spec["activation"], dtype=weight_dtype)
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

    layers = bert_layers(model)
    dtype = next(model.parameters()).dtype
    if dtype not in TORCH_DTYPE_NAMES:
        raise ValueError(f"cannot save a {dtype} model: load_patched_bert reads {sorted(TORCH_DTYPE_NAMES.values())}")
    patch = {"format": PATCH_FORMAT, "model_class": type(model).__name__,
             "mode": getattr(model, "nn_blocksparse_mode", None), "dtype": TORCH_DTYPE_NAMES[dtype],
             "layers": [_layer_spec(layer) for layer in layers]}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    (path / PATCH_FILE).write_text(json.dumps(patch, indent=1))
    save_model(model, str(path / SAFETENSORS_FILE))  # handles tied weights, unlike save_file
    return path


def load_patched_bert(path: str | Path, device=None, backend: str = "auto") -> nn.Module:
    """Rebuild a model saved by `save_patched_bert`; weights load strictly, without pickle.

    The folder is checked before anything is built: `patch.json` field by field (types, the model
    class and dtype from allowlists, head counts and every module's sizes against `config.json`),
    then those sizes against the tensor shapes recorded in `model.safetensors`; the block-sparse
    tensors are validated as they load. Anything wrong raises `ValueError`/`TypeError` naming it.
    """
    import transformers
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_model

    from .pruned_load import skip_weight_init

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path = Path(path)
    patch = _read_patch_json(path)
    config = transformers.BertConfig.from_pretrained(path)
    weights = path / SAFETENSORS_FILE
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, FileNotFoundError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from None
    model_class = getattr(transformers, patch["model_class"])
    prefix = "" if model_class is transformers.BertModel else BASE_PREFIX
    _check_against_config(patch, config, shapes, prefix, weights)

    dtype = dtype_from_name(patch["dtype"], TORCH_DTYPE_NAMES)
    with skip_weight_init():  # every tensor comes from the file
        model = model_class(config).to(dtype)
        for index, (layer, spec) in enumerate(zip(bert_layers(model), patch["layers"])):
            if spec["intermediate_activation_fused"] and not is_exact_gelu(layer.intermediate.intermediate_act_fn):
                raise ValueError(f"patch.json layers[{index}] fuses GELU, but the config's hidden_act is "
                                 f"{config.hidden_act!r}")
            apply_layer_plan(layer, _plan_from_spec(spec, layer, dtype, backend))
    # Tying normally happens in init_weights, which the no-init context skipped; the file holds one
    # copy of each tied tensor.
    model.tie_weights()
    try:
        load_model(model, str(weights), strict=True)
    except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
        raise ValueError(f"{weights} does not fit patch.json: {err}") from None
    except (TypeError, ValueError) as err:
        raise type(err)(f"{weights}: {err}") from None
    if patch["mode"] is not None:
        record_patch(model, patch["mode"], [])
    model.eval()
    return model.to(device) if device is not None else model


def _plan_from_spec(spec: dict, layer: nn.Module, dtype: torch.dtype, backend: str) -> LayerPlan:
    """The empty modules a checked layer spec describes (the weights load into them)."""
    attention_spec = spec["attention"]
    bert_attention = fused_attention = None
    if attention_spec["type"] == "fused":
        fused_attention = BertSelfAttentionAdapter(FusedSelfAttention(
            _module_from_spec(attention_spec["qkv"], dtype, backend), attention_spec["num_heads"],
            attention_spec["head_dim"], layer.attention.self.dropout.p))
    else:
        bert_attention = (*(_module_from_spec(attention_spec[name], dtype, backend)
                            for name in ("query", "key", "value")), attention_spec["num_heads"])
    return LayerPlan(bert_attention, fused_attention, _module_from_spec(spec["attention_output"], dtype, backend),
                      _module_from_spec(spec["intermediate"], dtype, backend), spec["intermediate_activation_fused"],
                      _module_from_spec(spec["output"], dtype, backend))


# ---------------------------------------------------------------------------------- patch.json checks
_LAYER_FIELDS = {"attention": dict, "attention_output": dict, "intermediate": dict,
                 "intermediate_activation_fused": bool, "output": dict}
_LINEAR_FIELDS = {"type": str, "in_features": int, "out_features": int, "bias": bool}
_BLOCK_SPARSE_FIELDS = {**_LINEAR_FIELDS, "block_size": int, "activation": (str, type(None))}
_MODULE_FIELDS = {"linear": _LINEAR_FIELDS, "block_sparse": _BLOCK_SPARSE_FIELDS}
# A module's weight dtype, which patch_bert's weight_dtype may make differ from the model's (block-sparse
# modules and DenseLinears). A linear's activation marks a DenseLinear (absent: a plain nn.Linear).
_OPTIONAL_MODULE_FIELDS = {"linear": {"activation": (str, type(None)), "dtype": str}, "block_sparse": {"dtype": str}}
_ATTENTION_FIELDS = {"fused": {"type": str, "num_heads": int, "head_dim": int, "qkv": dict},
                     "bert": {"type": str, "num_heads": int, "query": dict, "key": dict, "value": dict}}


def _check_fields(obj, fields: dict, where: str, optional: dict | None = None) -> None:
    """`obj` is a JSON object with exactly `fields` (and any of `optional`), each of its type (bool is not an int)."""
    optional = optional or {}
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(obj).__name__}")
    if not set(fields) <= set(obj) <= set(fields) | set(optional):
        extra = f" (optional: {sorted(optional)})" if optional else ""
        raise ValueError(f"{where} must have the fields {sorted(fields)}{extra}, got {sorted(obj)}")
    for name, kind in {**fields, **optional}.items():
        if name not in obj:
            continue
        value = obj[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{where}.{name} must be {getattr(kind, '__name__', 'a string or null')}, "
                            f"got {value!r:.60}")
        if kind is int and value < 0:
            raise ValueError(f"{where}.{name} must be >= 0, got {value}")


def _read_patch_json(path: Path) -> dict:
    """`patch.json`, its top-level fields checked (the layers are checked against the config)."""
    import transformers

    patch = read_json(path / PATCH_FILE, f"{path} has no {PATCH_FILE}: not a model saved by save_patched_bert")
    if not isinstance(patch, dict) or patch.get("format") != PATCH_FORMAT:
        found = patch.get("format") if isinstance(patch, dict) else patch
        raise ValueError(f"unsupported patch format {found!r:.60}, expected {PATCH_FORMAT!r}")
    _check_fields(patch, {"format": str, "model_class": str, "mode": (str, type(None)), "dtype": str, "layers": list},
                  "patch.json")
    class_name = patch["model_class"]
    # A name checked before transformers is asked for it, and the answer checked to be a BERT model.
    model_class = getattr(transformers, class_name, None) if re.fullmatch(r"Bert[A-Za-z]*", class_name) else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.BertPreTrainedModel)):
        raise ValueError(f"patch.json names an unsupported model class {class_name!r:.60}")
    if patch["mode"] is not None and patch["mode"] not in MODES:
        raise ValueError(f"patch.json mode must be one of {MODES} or null, got {patch['mode']!r:.60}")
    dtype_from_name(patch["dtype"], TORCH_DTYPE_NAMES, what="patch.json dtype")
    return patch


def _check_module_spec(spec, where: str, in_features: int | None, out_features: int, tensor: str, *, shapes: dict,
                       weights: Path, model_dtype: str, activation_allowed: bool = False) -> None:
    """One module spec: fields, sizes against the config, and its tensors' shapes in the weights file."""
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind not in _MODULE_FIELDS:
        raise ValueError(f"{where}.type must be one of {sorted(_MODULE_FIELDS)}, got {kind!r:.60}")
    _check_fields(spec, _MODULE_FIELDS[kind], where, _OPTIONAL_MODULE_FIELDS[kind])
    if kind == "linear" and "dtype" in spec and "activation" not in spec:
        raise ValueError(f"{where}.dtype is only for a DenseLinear (a linear with an activation field); a plain "
                         f"nn.Linear runs in the model's dtype")
    if spec.get("dtype", model_dtype) not in (model_dtype, *(["bfloat16"] if model_dtype == "float32" else [])):
        raise ValueError(f"{where}.dtype must be the model's ({model_dtype}) or, in an fp32 model, bfloat16 "
                         f"(patch_bert's weight_dtype), got {spec['dtype']!r:.60}")
    n, k = spec["out_features"], spec["in_features"]
    for name, value, expected in (("in_features", k, in_features), ("out_features", n, out_features)):
        if expected is not None and value != expected:
            raise ValueError(f"{where}.{name} is {value}, the config makes it {expected}")
    wanted = {}
    allowed = ("gelu", None) if activation_allowed else (None,)
    if spec.get("activation") not in allowed:
        raise ValueError(f"{where}.activation must be one of {allowed}, got {spec['activation']!r:.60}")
    if kind == "linear":
        wanted["weight"] = (n, k)
    else:
        block_size = spec["block_size"]
        if block_size not in SUPPORTED_BLOCK_SIZES or n % block_size or k % block_size:
            raise ValueError(f"{where}.block_size must be one of {SUPPORTED_BLOCK_SIZES} and divide "
                             f"{n} x {k}, got {block_size}")
        wanted.update(row_offsets=(n // block_size + 1,), row_order=(n // block_size,))
    if spec["bias"]:
        wanted["bias"] = (n,)
    for name, shape in wanted.items():
        key = f"{tensor}.{name}"
        if key not in shapes:
            raise ValueError(f"{weights} has no tensor {key}, which {where} needs")
        if shapes[key] != shape:
            raise ValueError(f"{weights}: {key} has shape {shapes[key]}, but {where} makes it {shape}")


def _check_against_config(patch: dict, config, shapes: dict, prefix: str, weights: Path) -> None:
    """Every layer spec against the config and the weights file, before any module is built."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    if hidden % heads:
        raise ValueError(f"config.json: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    head_dim = hidden // heads
    check_module = functools.partial(_check_module_spec, shapes=shapes, weights=weights, model_dtype=patch["dtype"])
    for name, rows in (("word", config.vocab_size), ("position", config.max_position_embeddings),
                       ("token_type", config.type_vocab_size)):
        key = f"{prefix}embeddings.{name}_embeddings.weight"
        if shapes.get(key) != (rows, hidden):
            raise ValueError(f"{weights}: {key} has shape {shapes.get(key)}, config.json makes it {(rows, hidden)}")
    layers = patch["layers"]
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"patch.json describes {len(layers)} layers, the config {config.num_hidden_layers}")
    for index, spec in enumerate(layers):
        where = f"patch.json layers[{index}]"
        tensor = f"{prefix}encoder.layer.{index}."
        _check_fields(spec, _LAYER_FIELDS, where)
        attention = spec["attention"]
        kind = attention.get("type")
        if kind not in _ATTENTION_FIELDS:
            raise ValueError(f"{where}.attention.type must be one of {sorted(_ATTENTION_FIELDS)}, got {kind!r:.60}")
        _check_fields(attention, _ATTENTION_FIELDS[kind], f"{where}.attention")
        num_heads = attention["num_heads"]
        if not (0 if kind == "fused" else 1) <= num_heads <= heads:
            raise ValueError(f"{where}.attention.num_heads must be in [{0 if kind == 'fused' else 1}, {heads}] "
                             f"(the config's heads), got {num_heads}")
        width = num_heads * head_dim
        if kind == "fused":
            if attention["head_dim"] != head_dim:
                raise ValueError(f"{where}.attention.head_dim is {attention['head_dim']}, the config makes it "
                                 f"{head_dim}")
            check_module(attention["qkv"], f"{where}.attention.qkv", hidden, 3 * width,
                         f"{tensor}attention.self.attention.qkv")
        else:
            for name in ("query", "key", "value"):
                check_module(attention[name], f"{where}.attention.{name}", hidden, width,
                             f"{tensor}attention.self.{name}")
        check_module(spec["attention_output"], f"{where}.attention_output", width, hidden,
                     f"{tensor}attention.output.dense")
        intermediate = spec["intermediate"]
        check_module(intermediate, f"{where}.intermediate", hidden, None, f"{tensor}intermediate.dense",
                     activation_allowed=True)
        fused = intermediate.get("activation") == "gelu"
        if spec["intermediate_activation_fused"] != fused:
            raise ValueError(f"{where}.intermediate_activation_fused is {spec['intermediate_activation_fused']}, "
                             f"but the intermediate module {'fuses' if fused else 'does not fuse'} GELU")
        check_module(spec["output"], f"{where}.output", intermediate["out_features"], hidden, f"{tensor}output.dense")
