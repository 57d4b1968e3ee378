"""`ThinBertLayer`: a patched `BertLayer` whose inference forward calls its parts directly.

transformers' `BertLayer.forward` goes through seven module calls (`BertAttention`, the
self-attention adapter, `BertSelfOutput`, `BertIntermediate`, `BertOutput`, two dropouts),
keyword-deprecation wrappers and `apply_chunking_to_forward` before it reaches the modules that do
the work. That Python is forward time no kernel can cut, and the faster the linears, the larger its
share (`benchmarks/profile_cpu_hybrid.py` measures it, beside `hybrid_plain_layers`). So a patched
layer calls the same modules, in the same order on the same tensors, directly:

    context = fused_attention(x, mask)
    x = LayerNorm_1(attention_output(context) + x)
    y = LayerNorm_2(ffn_out(act(ffn_in(x))) + x)

Each residual add and the layer norm after it run as one `norm.add_layer_norm` (on CPU, one native
pass over the stream: the statistics' additions in another order than torch's, so the output is
close to transformers' forward, not bit for bit); a layer norm with hooks (forward or backward) or a
forward of its own, or not a plain `nn.LayerNorm`, is called as a module instead. Where the linear
before it is one whose output nothing else can hold (a `BlockSparseLinear`, `DenseLinear` or
`nn.Linear` called plainly, see `_called_plainly`), the norm writes over that output
(`reuse_x=True`), rather than into a new buffer that comes cold from memory. Everything else
gives transformers' values bit for bit. (With bf16 weights on fp32 activations and GELU fused into
FFN-in, FFN-in's bf16 output goes to FFN-out as it is, without the fp32 copy FFN-out would round
straight back: the same values.)

Only where nothing else is asked of the layer: in eval mode (dropout is the identity), without
cross-attention, cache, feed-forward chunking or `output_attentions`. Anything else runs
transformers' own forward.
The layer keeps its modules, so its state dict, `isinstance(layer, BertLayer)` and hooks on the
layer itself (transformers' `output_hidden_states`) and on the modules that do the work (linears,
layer norms, the fused attention) still fire; hooks on the containers it skips
(`BertAttention`, the self-attention adapter, `BertSelfOutput`, `BertIntermediate`, `BertOutput`,
the dropouts) do not fire.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as module_globals
from transformers.models.bert.modeling_bert import BertLayer

from ..dense_linear import DenseLinear
from ..linear import BlockSparseLinear
from ..norm import AddLayerNorm, add_layer_norm

# Linears whose forward returns a tensor of its own that nothing else refers to (when called plainly).
_FRESH_OUTPUT_LINEARS = (BlockSparseLinear, DenseLinear, nn.Linear)


def _bf16_between(ffn_in: nn.Module, ffn_out: nn.Module, activation: nn.Module) -> bool:
    """Whether the FFN's two matrices are bf16-weight `DenseLinear`s with nothing between them (GELU
    fused): FFN-in's bf16 result then goes to FFN-out as it is, not through an fp32 copy that FFN-out
    rounds back to bf16 (the same values either way)."""
    return (type(activation) is nn.Identity and type(ffn_in) is DenseLinear and type(ffn_out) is DenseLinear
            and ffn_in.weight.dtype == torch.bfloat16 and ffn_out.weight.dtype == torch.bfloat16)


def _called_plainly(module: nn.Module) -> bool:
    """Whether calling `module` would run nothing but its class's forward: no forward or backward hooks
    (its own or global ones) and no forward of its own (a wrapper set on the instance, as offloading
    libraries set)."""
    return not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__
                or module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
                or module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks)


def _add_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, x_from: nn.Module | None = None,
              apply=add_layer_norm) -> torch.Tensor:
    """`norm(x + residual)`: one `apply` (`add_layer_norm`, or an `AddLayerNorm` kept for `norm`) where
    `norm` is a plain `nn.LayerNorm` called plainly, written over `x` where `x_from`, the linear that
    returned `x`, leaves it to no one else."""
    if type(norm) is nn.LayerNorm and _called_plainly(norm):
        reuse_x = type(x_from) in _FRESH_OUTPUT_LINEARS and _called_plainly(x_from)
        return apply(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps, reuse_x)
    return norm(x + residual)


def add_norms(layer: nn.Module) -> tuple[AddLayerNorm, AddLayerNorm]:
    """A thin layer's two `AddLayerNorm`s (after attention, after the FFN), made on first use: a layer
    becomes thin by a change of class, without an `__init__`."""
    norms = layer.__dict__.get("_add_norms")
    if norms is None:
        norms = layer.__dict__["_add_norms"] = (AddLayerNorm(), AddLayerNorm())
    return norms


class ThinBertLayer(BertLayer):
    """A `BertLayer` whose self-attention is a `BertSelfAttentionAdapter` (see the module docstring)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
        if (self.training or encoder_hidden_states is not None or args or self.chunk_size_feed_forward
                or kwargs.get("output_attentions")  # the adapter computes the probabilities, hooks record them
                or any(kwargs.get(name) is not None for name in ("encoder_attention_mask", "cache", "past_key_values"))):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
        attention_output, (first_norm, second_norm) = self.attention.output, add_norms(self)
        context = self.attention.self.attention(hidden_states, attention_mask)
        hidden_states = _add_norm(attention_output.dense(context), hidden_states, attention_output.LayerNorm,
                                  attention_output.dense, first_norm)
        ffn_in, ffn_out = self.intermediate.dense, self.output.dense
        if _bf16_between(ffn_in, ffn_out, self.intermediate.intermediate_act_fn):
            intermediate = ffn_in(hidden_states, bf16_output=True)
        else:
            intermediate = self.intermediate.intermediate_act_fn(ffn_in(hidden_states))
        return _add_norm(ffn_out(intermediate), hidden_states, self.output.LayerNorm, ffn_out, second_norm)


def use_thin_layers(layers: list[nn.Module]) -> None:
    """Make every plain `BertLayer` of `layers` whose self-attention is the fused adapter a `ThinBertLayer`."""
    from .patching import BertSelfAttentionAdapter

    for layer in layers:
        if type(layer) is BertLayer and isinstance(layer.attention.self, BertSelfAttentionAdapter):
            layer.__class__ = ThinBertLayer


def use_transformers_layers(layers: list[nn.Module]) -> None:
    """Undo `use_thin_layers`: the layers run transformers' own `BertLayer.forward` again (to compare)."""
    for layer in layers:
        if type(layer) is ThinBertLayer:
            layer.__class__ = BertLayer
            layer.__dict__.pop("_add_norms", None)
