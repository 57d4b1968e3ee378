"""`patch_bert`: put a (pruned) transformers BERT on the block-sparse kernels.

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
  The choices, with the times measured, are kept in `model.nn_blocksparse_choices`. The matrices
  hybrid keeps dense become `DenseLinear`s (`nn.Linear`s whose CPU forward runs oneDNN, the FFN-in
  with GELU fused).

`prepack=True` (for serving on CPU; `prepack.set_prepack`) has every linear keep the weight layout
its CPU kernel reads: the `DenseLinear`s oneDNN's packed weight, the fp32 `BlockSparseLinear`s their
blocks transposed. Faster, and twice those weights' memory. `prepack_dense` is its deprecated old
name (from when only the dense layers kept a copy).

`permute_for_row_groups=R` (block-sparse and hybrid; off by default until a GPU has measured what it
gains) first reorders each layer's FFN neurons and attention heads / head dimensions, exactly
(`nn_blocksparse.permutation`), so that R consecutive block-rows share block-columns.

Layers whose attention is fused become `ThinBertLayer`s (`thin_layer.py`): in inference they call
their modules directly instead of through transformers' module tree, each residual add and layer
norm as one native pass on CPU (transformers' values to the norm's rounding).

`weight_dtype=torch.bfloat16` (CPU, fp32 models; block-sparse and hybrid): every linear keeps bf16
weights and biases and takes the fp32 activations (rounded to bf16, fp32 accumulation; the
block-sparse kernel's output is fp32, the dense `DenseLinear`s' is rounded to bf16 by oneDNN, then
returned in fp32); layer norms, softmax and the residual stream stay fp32.

`patch_bert` runs as plain steps: check the arguments, plan every layer's new modules (deciding,
and where asked measuring, which matrices go block-sparse), apply the plans, record the mode and
choices on the model. Saving and loading a patched model is `patched_checkpoint.py`'s job.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers.models.bert.modeling_bert import BertSelfAttention

from ..attention import FusedSelfAttention
from ..block_sparse_matrix import SUPPORTED_BLOCK_SIZES
from ..dtypes import weight_and_bias_in
from ..dense_linear import DenseLinear
from ..functional import BACKENDS, _warn_caller
from ..linear import BlockSparseLinear
from ..layouts import block_density
from ..permutation import attention_feature_permutation, ffn_feature_permutation
from ..prepack import set_prepack
from ..resize import linear_from, prunable_heads, prunable_neurons, remove_heads, remove_neurons
from ..selection import DEFAULT_ROWS, measure_block_sparse
from .masks import key_mask
from .thin_layer import use_thin_layers

MODES = ("resize", "blocksparse", "hybrid")
WEIGHT_DTYPES = (None, torch.bfloat16)
RESIZE_ALIGNMENT = 8  # resized FFN hidden sizes round up to this: 16-byte fp16 rows (resize.py)
PERMUTATION_ROWS_PER_GROUP = (2, 4, 8)  # the row-group widths patch_bert can reorder features for


class BertSelfAttentionAdapter(BertSelfAttention):
    """Stands in for `BertSelfAttention`: BERT's call signature around a `FusedSelfAttention`.

    A subclass so that transformers' output recorder finds it: with `output_attentions=True` it
    returns the attention probabilities (computed explicitly), as `BertSelfAttention` does.
    """

    def __init__(self, attention: FusedSelfAttention) -> None:
        nn.Module.__init__(self)  # BertSelfAttention.__init__ would build the separate Q/K/V projections
        self.attention = attention

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, cache=None, **kwargs):
        if encoder_hidden_states is not None or cache is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("patched BERT attention is encoder self-attention only (no cross-attention or cache)")
        attention_mask = key_mask(attention_mask)
        if kwargs.get("output_attentions"):
            return self.attention(hidden_states, attention_mask, return_probabilities=True)
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


def is_exact_gelu(act_fn) -> bool:
    """BERT's "gelu" (erf form) is the only activation the kernel epilogue fuses."""
    from transformers.activations import GELUActivation

    return isinstance(act_fn, GELUActivation) or act_fn is torch.nn.functional.gelu


# ---------------------------------------------------------------------------------- patching
def _projection(weight, bias, sparse: bool, block_size: int, backend: str, activation=None,
                weight_dtype=None, mode: str = "hybrid") -> nn.Module:
    """The module of one matrix: block-sparse, or dense (`DenseLinear` in hybrid, with `activation`
    fused; resize keeps nn_pruning's plain `nn.Linear`, which takes no activation)."""
    if mode == "resize":
        if activation is not None:
            raise ValueError("resize keeps plain nn.Linear layers, with no fused activation")
        return linear_from(weight, bias)
    weight, bias = weight_and_bias_in(weight, bias, weight_dtype)
    if sparse:
        return BlockSparseLinear.from_dense(weight, bias, block_size, activation=activation, backend=backend)
    return DenseLinear.from_tensors(weight, bias, activation)


def _permuted_for_row_groups(query, key, value, output, inner, outer, num_heads: int, block_size: int,
                             rows_per_group: int):
    """The layer's linears with heads and FFN neurons reordered (exactly) for row groups of `rows_per_group`."""
    def rows(linear, order):
        return linear_from(linear.weight[order], None if linear.bias is None else linear.bias[order])

    order = attention_feature_permutation(query.weight, key.weight, value.weight, num_heads, block_size, rows_per_group)
    query, key, value = rows(query, order), rows(key, order), rows(value, order)
    output = linear_from(output.weight[:, order], output.bias)
    order = ffn_feature_permutation(inner.weight, block_size, rows_per_group)
    return query, key, value, output, rows(inner, order), linear_from(outer.weight[:, order], outer.bias)


def _check_patch_arguments(mode, block_size, backend, dense_threshold, ffn_multiple_of,
                           permute_for_row_groups) -> int:
    """Every argument of `patch_bert` checked; returns the FFN multiple to resize to."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode != "resize" and (isinstance(block_size, bool) or block_size not in SUPPORTED_BLOCK_SIZES):
        # Checked up front: hybrid would otherwise only fail on the first matrix it makes block-sparse.
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if ffn_multiple_of is None:
        ffn_multiple_of = block_size if mode == "hybrid" else RESIZE_ALIGNMENT
    if isinstance(ffn_multiple_of, bool) or not isinstance(ffn_multiple_of, numbers.Integral) or ffn_multiple_of < 1:
        raise ValueError(f"ffn_multiple_of must be a positive int, got {ffn_multiple_of!r}")
    valid = (dense_threshold in ("auto", "measure") if isinstance(dense_threshold, str)
             else isinstance(dense_threshold, numbers.Real) and 0.0 <= dense_threshold <= 1.0)
    if not valid:
        raise ValueError(f"dense_threshold must be a block density in [0, 1], 'auto' or 'measure', "
                         f"got {dense_threshold!r}")
    if permute_for_row_groups not in (None, *PERMUTATION_ROWS_PER_GROUP) or (permute_for_row_groups and mode == "resize"):
        raise ValueError(f"permute_for_row_groups must be None or one of {PERMUTATION_ROWS_PER_GROUP} (block-sparse "
                         f"and hybrid modes), got {permute_for_row_groups!r} with mode {mode!r}")
    return int(ffn_multiple_of)


def _check_weight_dtype(weight_dtype, parameter) -> None:
    if weight_dtype not in WEIGHT_DTYPES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if weight_dtype is not None and parameter is not None and (
            parameter.device.type != "cpu" or parameter.dtype != torch.float32):
        raise ValueError(f"weight_dtype={weight_dtype} is for fp32 models on CPU (bf16 weights, fp32 activations); "
                         f"this model is {parameter.dtype} on {parameter.device}")


def _refuse_patched(model: nn.Module) -> None:
    """A second patch (even resize then blocksparse) would mix the modes layer by layer: refused."""
    mode = getattr(model, "nn_blocksparse_mode", None)
    patched = any(isinstance(m, (BlockSparseLinear, BertSelfAttentionAdapter)) or
                  getattr(m, "nn_blocksparse_mode", None) is not None for m in model.modules())
    if mode is not None or patched:
        raise ValueError(f"this model is already patched{f' (mode {mode!r})' if mode else ''}: patch_bert "
                         "patches an unpatched model once; start again from the original model")


class _SparseChoice:
    """Whether each matrix becomes block-sparse (the mode's rule); hybrid records why in `choices`."""

    def __init__(self, mode: str, block_size: int, backend: str, dense_threshold, measure_rows: int,
                 device: torch.device | None, weight_dtype: torch.dtype | None) -> None:
        self.mode, self.block_size, self.backend, self.weight_dtype = mode, block_size, backend, weight_dtype
        self.dense_threshold, self.measure_rows = dense_threshold, measure_rows
        self.measure = dense_threshold == "measure" or (
            dense_threshold == "auto" and device is not None and device.type == "cuda")
        self.choices: list[dict] = []

    def __call__(self, weight: torch.Tensor, bias, layer_index: int, name: str, activation=None) -> bool:
        block_size = self.block_size
        if self.mode == "resize":
            return False
        if weight.shape[0] % block_size or weight.shape[1] % block_size:
            if self.mode == "hybrid":
                # Off the block grid (hybrid pads resized FFNs onto it; this is a model whose own
                # sizes the block size does not divide): it stays a dense nn.Linear.
                return False
            raise ValueError(f"block_size {block_size} does not divide the {name} weight of layer {layer_index}, "
                             f"of shape {tuple(weight.shape)}")
        if self.mode == "blocksparse":
            return True
        choice = {"layer": layer_index, "matrix": name, "shape": list(weight.shape),
                  "block_density": round(block_density(weight, block_size), 4)}
        if self.measure and weight.numel():
            timing = measure_block_sparse(weight, bias, activation, block_size, self.backend, rows=self.measure_rows,
                                          weight_dtype=self.weight_dtype)
            choice.update(dense_ms=timing.dense_ms, block_sparse_ms=timing.block_sparse_ms,
                          block_sparse=timing.use_block_sparse)
        elif isinstance(self.dense_threshold, str):
            from ..cpu import use_block_sparse

            choice["block_sparse"] = use_block_sparse(choice["block_density"], self.weight_dtype or weight.dtype,
                                                      weight.dtype, block_size)
        else:
            choice["block_sparse"] = choice["block_density"] <= self.dense_threshold
        self.choices.append(choice)
        return choice["block_sparse"]


@dataclass
class LayerPlan:
    """The modules one layer gets. `bert_attention` (query, key, value, heads) keeps transformers'
    attention on resized projections; otherwise `fused_attention` replaces it."""

    bert_attention: tuple[nn.Linear, nn.Linear, nn.Linear, int] | None
    fused_attention: BertSelfAttentionAdapter | None
    attention_output: nn.Module
    intermediate: nn.Module
    gelu_fused: bool
    output: nn.Module


def _plan_layer(layer: nn.Module, layer_index: int, mode: str, ffn_multiple_of: int, sparse_for: _SparseChoice,
                block_size: int, backend: str, permute_for_row_groups: int | None,
                weight_dtype: torch.dtype | None) -> LayerPlan:
    """Build the layer's new modules without touching the layer."""
    attention = layer.attention.self
    head_dim = attention.attention_head_size
    query, key, value = attention.query, attention.key, attention.value
    output = layer.attention.output.dense
    num_heads = query.out_features // head_dim
    inner, outer = layer.intermediate.dense, layer.output.dense
    if mode in ("resize", "hybrid"):
        removed = prunable_heads(value, output, num_heads)
        query, key, value, output = remove_heads(query, key, value, output, num_heads, removed)
        num_heads -= len(removed)
        # Aligned hidden sizes keep cuBLAS on its fast kernels (resize.py).
        inner, outer = remove_neurons(inner, outer, prunable_neurons(inner, outer),
                                      layer.intermediate.intermediate_act_fn, multiple_of=ffn_multiple_of)
    if permute_for_row_groups:
        query, key, value, output, inner, outer = _permuted_for_row_groups(
            query, key, value, output, inner, outer, num_heads, block_size, permute_for_row_groups)

    bert_attention = fused_attention = None
    if mode == "resize" and num_heads > 0:
        bert_attention = (query, key, value, num_heads)
    else:
        qkv_weight = torch.cat([query.weight, key.weight, value.weight])
        qkv_bias = torch.cat([query.bias, key.bias, value.bias]) if query.bias is not None else None
        qkv_sparse = num_heads > 0 and sparse_for(qkv_weight, qkv_bias, layer_index, "qkv")
        qkv = _projection(qkv_weight, qkv_bias, qkv_sparse, block_size, backend, weight_dtype=weight_dtype, mode=mode)
        fused_attention = BertSelfAttentionAdapter(FusedSelfAttention(qkv, num_heads, head_dim, attention.dropout.p))
    output_sparse = sparse_for(output.weight, output.bias, layer_index, "attention_output")
    attention_output = _projection(output.weight, output.bias, output_sparse, block_size, backend,
                                   weight_dtype=weight_dtype, mode=mode)

    fuse_gelu = is_exact_gelu(layer.intermediate.intermediate_act_fn)
    inner_sparse = sparse_for(inner.weight, inner.bias, layer_index, "ffn_in", "gelu" if fuse_gelu else None)
    gelu_fused = fuse_gelu and (inner_sparse or mode == "hybrid")  # hybrid's dense FFN-in fuses it too
    intermediate = _projection(inner.weight, inner.bias, inner_sparse, block_size, backend,
                               activation="gelu" if gelu_fused else None, weight_dtype=weight_dtype, mode=mode)
    outer_sparse = sparse_for(outer.weight, outer.bias, layer_index, "ffn_out")
    return LayerPlan(bert_attention, fused_attention, attention_output, intermediate, gelu_fused,
                      _projection(outer.weight, outer.bias, outer_sparse, block_size, backend, weight_dtype=weight_dtype,
                                  mode=mode))


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Forward hooks registered on a replaced module (transformers' output recorders among them) follow it."""
    for name in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        getattr(new, name).update(getattr(old, name))


def apply_layer_plan(layer: nn.Module, plan: LayerPlan) -> None:
    """Put the planned modules in place (attribute assignments only: nothing here can fail halfway)."""
    attention = layer.attention.self
    if plan.bert_attention is not None:
        attention.query, attention.key, attention.value, num_heads = plan.bert_attention
        attention.num_attention_heads = num_heads
        attention.all_head_size = num_heads * attention.attention_head_size
    else:
        _move_hooks(attention, plan.fused_attention)
        layer.attention.self = plan.fused_attention
    layer.attention.output.dense = plan.attention_output
    layer.intermediate.dense = plan.intermediate
    if plan.gelu_fused:
        layer.intermediate.intermediate_act_fn = nn.Identity()
    layer.output.dense = plan.output
    use_thin_layers([layer])


def _refuse_save_pretrained(*args, **kwargs):
    raise ValueError("save_pretrained cannot save a patched model (from_pretrained would rebuild the unpatched "
                     "structure and fail on the patched tensors): use nn_blocksparse.save_patched_bert(model, path) "
                     "and load_patched_bert(path)")


def record_patch(model: nn.Module, mode: str, choices: list[dict]) -> None:
    """Mark `model` as patched in `mode` (with hybrid's `choices`), and make it refuse `save_pretrained`."""
    model.train(model.training)  # new modules start in training mode: give them the model's (dropout!)
    model.nn_blocksparse_mode = mode
    model.nn_blocksparse_choices = choices
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.nn_blocksparse_mode = mode  # so the encoder of a head model is also known as patched
            module.save_pretrained = _refuse_save_pretrained  # also what push_to_hub calls


def patch_bert(model: nn.Module, mode: str = "hybrid", block_size: int = 32, backend: str = "auto",
               dense_threshold: float | str = "auto", measure_rows: int = DEFAULT_ROWS,
               ffn_multiple_of: int | None = None, permute_for_row_groups: int | None = None,
               weight_dtype: torch.dtype | None = None, prepack: bool = False,
               prepack_dense: bool | None = None) -> nn.Module:
    """Patch in place and return `model`. See the module docstring for the modes and `prepack`.

    Patch the model on the device and in the dtype it will run in: `"measure"` times there, with
    `measure_rows` tokens per call. `ffn_multiple_of`: resize and hybrid round each FFN's hidden
    size up to a multiple of it with all-zero neurons (exact; `resize.remove_neurons`); by default
    `RESIZE_ALIGNMENT` for resize and `block_size` for hybrid (so a resized FFN stays on the block
    grid and may go block-sparse); "blocksparse" resizes nothing and ignores it. `weight_dtype`:
    see the module docstring.

    All or nothing: every layer's new modules are built (and every check made, e.g. that the block
    size divides every matrix in "blocksparse" mode) before the first one is put in place. A model
    is patched once: a second `patch_bert` on it is refused. The patched model refuses
    `save_pretrained`; `save_patched_bert` saves it.
    """
    ffn_multiple_of = _check_patch_arguments(mode, block_size, backend, dense_threshold, ffn_multiple_of,
                                             permute_for_row_groups)
    if prepack_dense is not None:
        if not isinstance(prepack_dense, bool):
            raise TypeError(f"prepack_dense must be a bool, got {prepack_dense!r}")
        _warn_caller("prepack_dense is deprecated: it is now named prepack (and also covers the block-sparse "
                     "layers)", DeprecationWarning)
        prepack = prepack or prepack_dense
    if not isinstance(prepack, bool):
        raise TypeError(f"prepack must be a bool, got {prepack!r}")
    layers = bert_layers(model)
    _refuse_patched(model)
    parameter = next(model.parameters(), None)
    _check_weight_dtype(weight_dtype, parameter)
    sparse_for = _SparseChoice(mode, block_size, backend, dense_threshold, measure_rows,
                               parameter.device if parameter is not None else None, weight_dtype)
    with torch.no_grad():
        plans = [_plan_layer(layer, index, mode, ffn_multiple_of, sparse_for, block_size, backend, permute_for_row_groups,
                             weight_dtype) for index, layer in enumerate(layers)]
    for layer, plan in zip(layers, plans):
        apply_layer_plan(layer, plan)
    set_prepack(model, prepack)
    record_patch(model, mode, sparse_for.choices)
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
