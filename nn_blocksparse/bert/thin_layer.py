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
`nn.Linear` called plainly, `module_calls.called_plainly`), the norm writes over that output
(`reuse_x=True`), rather than into a new buffer that comes cold from memory. The attention half
(fused attention, output projection, add + norm) runs as one `AttentionBlock` where its modules
allow it (see there): the values of the modules called one by one, bit for bit, without their
module calls and checks between the kernels. Everything else gives transformers' values bit for
bit. (With bf16 weights on fp32 activations and GELU fused into FFN-in, FFN-in's bf16 output goes to
FFN-out as it is, without the fp32 copy FFN-out would round straight back: the same values.) The
attention mask goes through `masks.key_mask`, as the adapter the layer skips sends it.

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
from transformers.models.bert.modeling_bert import BertLayer

from ..attention_block import AttentionBlock
from ..dense_linear import DenseLinear
from ..linear import BlockSparseLinear
from ..module_calls import called_plainly as _called_plainly
from ..norm import AddLayerNorm, add_layer_norm
from .masks import key_mask

# Linears whose forward returns a tensor of its own that nothing else refers to (when called plainly).
_FRESH_OUTPUT_LINEARS = (BlockSparseLinear, DenseLinear, nn.Linear)


def _bf16_between(ffn_in: nn.Module, ffn_out: nn.Module, activation: nn.Module) -> bool:
    """Whether the FFN's two matrices are bf16-weight `DenseLinear`s with nothing between them (GELU
    fused): FFN-in's bf16 result then goes to FFN-out as it is, not through an fp32 copy that FFN-out
    rounds back to bf16 (the same values either way)."""
    return (type(activation) is nn.Identity and type(ffn_in) is DenseLinear and type(ffn_out) is DenseLinear
            and ffn_in.weight.dtype == torch.bfloat16 and ffn_out.weight.dtype == torch.bfloat16)


def _add_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, x_from: nn.Module | None = None,
              apply=add_layer_norm) -> torch.Tensor:
    """`norm(x + residual)`: one `apply` (`add_layer_norm`, or an `AddLayerNorm` kept for `norm`) where
    `norm` is a plain `nn.LayerNorm` called plainly, written over `x` where `x_from`, the linear that
    returned `x`, leaves it to no one else."""
    if type(norm) is nn.LayerNorm and _called_plainly(norm):
        reuse_x = type(x_from) in _FRESH_OUTPUT_LINEARS and _called_plainly(x_from)
        return apply(x, residual, norm.normalized_shape, norm.weight, norm.bias, norm.eps, reuse_x)
    return norm(x + residual)


def prepared_calls(layer: nn.Module) -> tuple[AttentionBlock, AddLayerNorm, AddLayerNorm]:
    """A thin layer's attention block and its two `AddLayerNorm`s (after attention, after the FFN), made
    on first use: a layer becomes thin by a change of class, without an `__init__`."""
    calls = layer.__dict__.get("_prepared_calls")
    if calls is None:
        calls = layer.__dict__["_prepared_calls"] = (AttentionBlock(), AddLayerNorm(), AddLayerNorm())
    return calls


class ThinBertLayer(BertLayer):
    """A `BertLayer` whose self-attention is a `BertSelfAttentionAdapter` (see the module docstring)."""

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, *args, **kwargs):
        if (self.training or encoder_hidden_states is not None or args or self.chunk_size_feed_forward
                or kwargs.get("output_attentions")  # the adapter computes the probabilities, hooks record them
                or any(kwargs.get(name) is not None for name in ("encoder_attention_mask", "cache", "past_key_values"))):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, *args, **kwargs)
        attention, attention_output = self.attention.self.attention, self.attention.output
        attention_mask = key_mask(attention_mask)  # as the skipped adapter converts it
        block, first_norm, second_norm = prepared_calls(self)
        attended = block(attention, attention_output.dense, attention_output.LayerNorm, first_norm, hidden_states,
                         attention_mask)
        if attended is None:
            attended = _add_norm(attention_output.dense(attention(hidden_states, attention_mask)), hidden_states,
                                 attention_output.LayerNorm, attention_output.dense, first_norm)
        hidden_states = attended
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
            layer.__dict__.pop("_prepared_calls", None)
