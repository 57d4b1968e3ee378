"""`add_layer_norm(x, residual, normalized_shape, weight, bias, eps)`: `F.layer_norm(x + residual, ...)`.

The residual add and layer norm a transformer layer ends each of its blocks with. Where
`cpu.layer_norm.runs_native_add_layer_norm` holds (plain fp32 or bf16 CPU tensors normalized over
their last dimension, no gradient wanted, no trace; see there), the native kernel computes both in
one pass over the stream: the same values up to the order of the statistics' additions, so close to
torch's but not bit for bit. Everywhere else (CUDA, autograd, torch.compile, other shapes and
dtypes) it is `F.layer_norm(x + residual, ...)` itself. `AddLayerNorm` is the same for a caller
that calls it again and again with one set of parameters (a layer's norm), with those checked once.
Knows nothing of `nn.Module` or BERT.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import ops
from .cpu.layer_norm import NativeAddNormCall, runs_native_add_layer_norm


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: Sequence[int],
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5, reuse_x: bool = False) -> torch.Tensor:
    """`F.layer_norm(x + residual, normalized_shape, weight, bias, eps)`, natively on CPU where it can (above).

    `reuse_x=True` says `x` is not needed afterwards (a temporary, such as a linear's output): on the
    native path in plain eager mode the result may then be written over `x` and be `x` (see
    `cpu.layer_norm.add_layer_norm_cpu`); `x`'s contents are unspecified after the call either way."""
    if x.is_cpu and runs_native_add_layer_norm(x, residual, normalized_shape, weight, bias, eps):
        return ops.call_add_layer_norm_cpu(x, residual, tuple(normalized_shape), weight, bias, eps, reuse_x)
    return F.layer_norm(x + residual, normalized_shape, weight, bias, eps)


class AddLayerNorm:
    """`add_layer_norm`, for a caller that calls it again and again with the same parameters.

    Calling it takes `add_layer_norm`'s arguments and gives its result. In plain eager mode on CPU it
    keeps a `cpu.layer_norm.NativeAddNormCall` for the parameters' `NativeAddNormCall.key` (prepared
    again when that changes) and calls the kernel through it, without the general path's per-call
    checks of the parameters; inputs that call does not serve, and everything else, take
    `add_layer_norm`. Copies and pickles are empty (they prepare again on first use).
    """

    __slots__ = ("_prepared",)

    def __init__(self) -> None:
        self._prepared = (None, None)  # (key, call): one attribute, so a thread never sees a mismatched pair

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, normalized_shape: Sequence[int],
                 weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5,
                 reuse_x: bool = False) -> torch.Tensor:
        if x.is_cpu and ops.plain_eager(x, residual, weight, bias):
            call = self.prepared(normalized_shape, weight, bias, eps)
            if call is not None:
                y = ops.direct("add_layer_norm_cpu", call, x, residual, weight, bias, reuse_x)
                if y is not None:
                    return y
        return add_layer_norm(x, residual, normalized_shape, weight, bias, eps, reuse_x)

    def prepared(self, normalized_shape, weight, bias, eps) -> NativeAddNormCall | None:
        """The `NativeAddNormCall` for these parameters (prepared again where their key changed), or None
        where the native kernel does not take them. For callers that check their inputs themselves."""
        key = NativeAddNormCall.key(normalized_shape, weight, bias, eps)
        prepared = self._prepared
        if key != prepared[0]:
            prepared = self._prepared = (key, NativeAddNormCall.prepare(normalized_shape, weight, bias, eps))
        return prepared[1]

    def __reduce__(self):
        return AddLayerNorm, ()
