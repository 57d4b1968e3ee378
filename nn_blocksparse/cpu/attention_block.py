"""`NativeAttentionBlockCall`: a post-norm self-attention block's native calls, one after another.

`layer_norm(x + out(attention(qkv(x), mask)))` for `x [B, S, hidden]`: the fused QKV projection and
the output projection on the block-sparse kernel (`NativeLinearCall`), the attention straight from
the projection (`attention_launch`), the residual add and norm written over the output projection's
result (`NativeAddNormCall`): the calls and values of the four steps one by one, bit for bit. What
the weights' side needs is checked once, at `prepare`; a call checks `x` and the mask and hands each
kernel what the one before made, without checking it again. In a forward every check runs with the
interpreter's caches cold after a kernel, so a layer's checks cost more than their instructions
suggest (docs/cpu_engines.md, "Weights from memory"). Knows nothing of `nn.Module` or BERT.
"""

from __future__ import annotations

import torch

from .attention import _is_key_mask, _refusal, attention_launch
from .launcher import PLAIN_TENSORS as _PLAIN
from .launcher import NativeLinearCall
from .layer_norm import NativeAddNormCall


class NativeAttentionBlockCall:
    """The block for one set of prepared parts and one activation dtype.

    `prepare(qkv, out, norm, heads, head_dim, dtype, bf16_products)` takes the prepared calls of the
    two projections and of the norm (each already checked against its own tensors) and returns None
    where they do not fit together (widths, dtypes, libraries) or the attention would not run
    natively on `dtype` with this head size. Calling it with `(x, mask, qkv_tensors, out_tensors,
    norm_weight, norm_bias)`, the tensors those calls were prepared for, returns the block's output
    `[B, S, hidden]`, or None where it does not serve `x` (another dtype or width, not contiguous, a
    negated view, no rows) or the mask (not an additive mask over the keys), and the caller takes the
    steps one by one.
    """

    __slots__ = ("qkv", "out", "norm", "heads", "head_dim", "hidden", "dtype", "norm_dtype", "bf16_products")

    @classmethod
    def prepare(cls, qkv: NativeLinearCall, out: NativeLinearCall, norm: NativeAddNormCall, heads: int,
                head_dim: int, dtype: torch.dtype, bf16_products: bool):
        if not (isinstance(qkv, NativeLinearCall) and isinstance(out, NativeLinearCall)
                and isinstance(norm, NativeAddNormCall) and isinstance(heads, int) and isinstance(head_dim, int)
                and heads > 0 and head_dim > 0):
            return None
        inner = heads * head_dim
        if not (qkv.n == 3 * inner and out.k == inner and out.n == qkv.k == norm.width):
            return None
        if dtype not in qkv.x_dtypes or dtype not in out.x_dtypes or not (qkv.library is out.library is norm.library):
            return None
        norm_dtype = norm.pairs.get((dtype, dtype))
        if norm_dtype != dtype:  # (the norm written over the projection's output: the sum's dtype is x's)
            return None
        probe = torch.empty(1, 1, 3 * inner, dtype=dtype)  # what the attention is given: its checks, once
        if _refusal(probe, head_dim, None, qkv.library) is not None:
            return None
        call = cls()
        call.qkv, call.out, call.norm, call.heads, call.head_dim = qkv, out, norm, heads, head_dim
        call.hidden, call.dtype, call.norm_dtype, call.bf16_products = qkv.k, dtype, norm_dtype, bool(bf16_products)
        return call

    def __call__(self, x, mask, qkv_tensors, out_tensors, norm_weight, norm_bias):
        if not (type(x) in _PLAIN and x.dtype == self.dtype and x.is_cpu and x.dim() == 3
                and x.shape[2] == self.hidden and x.is_contiguous() and not x.is_neg()):
            return None
        batch, seq = x.shape[0], x.shape[1]
        if batch * seq == 0 or (mask is not None and not _is_key_mask(mask, self.dtype, batch, seq)):
            return None
        x2d = x.view(batch * seq, self.hidden)
        qkv = self.qkv.launch(x2d, *qkv_tensors).view(batch, seq, 3 * self.heads * self.head_dim)
        context = attention_launch(self.qkv.library, qkv, self.heads, self.head_dim, mask, self.bf16_products)
        projected = self.out.launch(context.view(batch * seq, self.heads * self.head_dim), *out_tensors)
        out = self.norm.launch(projected, x2d, norm_weight, norm_bias, self.norm_dtype, True)
        return out.view(batch, seq, self.hidden)
