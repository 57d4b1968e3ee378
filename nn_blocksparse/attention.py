"""`FusedSelfAttention`: multi-head self-attention with one fused QKV projection and SDPA.

Knows nothing of BERT: it is given a QKV projection (any module mapping `[..., hidden]` to
`[..., 3 * num_heads * head_dim]`, laid out as all Q heads, then all K heads, then all V
heads), a head count and a head size. The head count is per instance, so a pruned model can
keep a different number of heads in every layer. The projection is one matmul (one kernel
launch, x read once) instead of three; attention itself runs in
`torch.nn.functional.scaled_dot_product_attention`, or on CPU in inference in the native kernel's
attention (`cpu.attention.self_attention_cpu`, through `ops.call_attention_cpu`; fp32, and bf16 on
AMX), which reads the projection's output as it lies and writes the heads merged. A projection
with bf16 weights on fp32 activations rounds its inputs to bf16; the attention's two products then
do the same where the native kernel runs them on AMX tiles (the softmax stays fp32).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .cpu.attention import runs_native_attention


class FusedSelfAttention(nn.Module):
    def __init__(self, qkv: nn.Module, num_heads: int, head_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv = qkv
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dropout = dropout

    @property
    def inner_size(self) -> int:
        return self.num_heads * self.head_dim

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_probabilities: bool = False):
        """`[batch, seq, hidden]` -> context `[batch, seq, num_heads * head_dim]`.

        `attention_mask` is anything SDPA takes and broadcasts to `[batch, heads, seq, seq]`:
        boolean (True = attend) or additive float. With `return_probabilities=True`, returns
        `(context, probabilities)`, the softmax `[batch, heads, seq, seq]` computed explicitly (SDPA
        does not return it: slower, for inspection).
        """
        if self.num_heads == 0:  # every head pruned: no projection to compute
            return self._no_heads(hidden_states, return_probabilities)
        return self.attend(self.qkv(hidden_states), attention_mask, return_probabilities)

    def attend(self, projected: torch.Tensor, attention_mask: torch.Tensor | None = None,
               return_probabilities: bool = False):
        """`forward` from the fused projection `projected [batch, seq, 3 * heads * head_dim]` on."""
        if self.num_heads == 0:
            return self._no_heads(projected, return_probabilities)
        batch, seq = projected.shape[:2]
        dropout = self.dropout if self.training else 0.0
        if not return_probabilities and runs_native_attention(projected, self.head_dim, attention_mask, dropout):
            return ops.call_attention_cpu(projected, self.num_heads, self.head_dim, attention_mask,
                                          projected.dtype == torch.float32 and self._bf16_weights())
        qkv = projected.view(batch, seq, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [batch, heads, seq, head_dim]
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
        if return_probabilities:
            context, probabilities = _attention_with_probabilities(query, key, value, attention_mask, dropout)
            return context.transpose(1, 2).reshape(batch, seq, self.inner_size), probabilities
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        return context.transpose(1, 2).reshape(batch, seq, self.inner_size)

    @staticmethod
    def _no_heads(like: torch.Tensor, return_probabilities: bool):
        """Every head pruned: the attention block adds nothing (an empty context)."""
        batch, seq = like.shape[:2]
        context = like.new_zeros(batch, seq, 0)
        return (context, like.new_zeros(batch, 0, seq, seq)) if return_probabilities else context

    def _bf16_weights(self) -> bool:
        """Whether the projection keeps bf16 weights (for fp32 activations): its products round their
        inputs to bf16, and so do the attention's where the native kernel runs them on AMX tiles."""
        weight = next(self.qkv.parameters(), None)
        return weight is not None and weight.dtype == torch.bfloat16

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


def _attention_with_probabilities(query, key, value, attention_mask, dropout: float):
    """SDPA's math written out, keeping the softmax: `(context, probabilities)`."""
    scores = query @ key.transpose(-2, -1) * query.shape[-1] ** -0.5
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    dropped = F.dropout(probabilities, p=dropout) if dropout else probabilities
    return dropped @ value, dropped  # the weights applied, as transformers returns them
