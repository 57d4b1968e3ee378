"""`AttentionBlock`: `norm(x + output(attention(x, mask)))` as one native block where it can.

The attention half of a post-norm transformer layer: a `FusedSelfAttention` with a
`BlockSparseLinear` projection, a `BlockSparseLinear` output projection and an `nn.LayerNorm`, the
residual add and norm through an `AddLayerNorm`. Calling the modules one by one costs each its
module call and its checks, and in a forward those run with the interpreter's caches cold after a
kernel (docs/cpu_engines.md). Where none of the four modules is hooked or has a forward of its own
(`module_calls.called_plainly`), the attention is not training with dropout, no gradient is wanted,
the profiler is off and the call is plain eager (`ops.plain_eager`), `AttentionBlock` asks each
module for the call its own forward would make (`BlockSparseLinear.native_call` after the matrix's
revalidation, as the forward does; `AddLayerNorm.prepared`) and runs them through one
`cpu.attention_block.NativeAttentionBlockCall`, prepared again whenever one of them changes: the
same values, bit for bit, as calling the modules. Everywhere else it returns None, and the caller
calls the modules. Copies and pickles are empty. Knows nothing of BERT.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .attention import FusedSelfAttention
from .cpu.attention_block import NativeAttentionBlockCall
from .linear import BlockSparseLinear
from .module_calls import called_plainly
from .norm import AddLayerNorm

_profiling = torch._C._autograd._profiler_enabled


class AttentionBlock:
    """One block's prepared native call (see the module docstring)."""

    __slots__ = ("_prepared",)

    def __init__(self) -> None:
        self._prepared = (None, None)  # (parts, call): one attribute, so a thread never sees a mismatched pair

    def __call__(self, attention: nn.Module, output: nn.Module, norm: nn.Module, add_norm: AddLayerNorm,
                 x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if torch.compiler.is_compiling():
            return None  # traced, the modules' ops go into the graph
        if not (type(attention) is FusedSelfAttention and type(output) is BlockSparseLinear
                and type(norm) is nn.LayerNorm and type(attention.qkv) is BlockSparseLinear):
            return None
        qkv = attention.qkv
        if (attention.num_heads == 0 or (attention.training and attention.dropout) or torch.is_grad_enabled()
                or _profiling() or not x.is_cpu or not (called_plainly(attention) and called_plainly(qkv)
                                                        and called_plainly(output) and called_plainly(norm))):
            return None
        qkv.matrix  # noqa: B018 - the forwards' revalidation: raises where theirs would
        output.matrix  # noqa: B018
        projection, projected = qkv.native_call(), output.native_call()
        weight, bias = norm.weight, norm.bias
        norm_call = add_norm.prepared(norm.normalized_shape, weight, bias, norm.eps)
        if (projection is None or projected is None or norm_call is None
                or not ops.plain_eager(x, mask, *projection[1:], *projected[1:], weight, bias)):
            return None
        parts = (projection[0], projected[0], norm_call, attention.num_heads, attention.head_dim, x.dtype)
        prepared = self._prepared
        if parts != prepared[0]:
            # The attention's products on bf16 tiles where the projection keeps bf16 weights, as its forward decides.
            bf16_products = x.dtype == torch.float32 and attention._bf16_weights()
            prepared = self._prepared = (parts, NativeAttentionBlockCall.prepare(*parts, bf16_products))
        call = prepared[1]
        return None if call is None else call(x, mask, projection[1:], projected[1:], weight, bias)

    def __reduce__(self):
        return AttentionBlock, ()
