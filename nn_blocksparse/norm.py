"""`add_layer_norm(x, residual, normalized_shape, weight, bias, eps)`: `F.layer_norm(x + residual, ...)`.

The residual add and layer norm a transformer layer ends each of its blocks with. Where
`cpu.layer_norm.runs_native_add_layer_norm` holds (plain fp32 or bf16 CPU tensors normalized over
their last dimension, no gradient wanted, no trace; see there), the native kernel computes both in
one pass over the stream: the same values up to the order of the statistics' additions, so close to
torch's but not bit for bit. Everywhere else (CUDA, autograd, torch.compile, other shapes and
dtypes) it is `F.layer_norm(x + residual, ...)` itself. Knows nothing of `nn.Module` or BERT.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import ops
from .cpu.layer_norm import runs_native_add_layer_norm


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, normalized_shape: Sequence[int],
                   weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """`F.layer_norm(x + residual, normalized_shape, weight, bias, eps)`, natively on CPU where it can (above)."""
    if x.is_cpu and runs_native_add_layer_norm(x, residual, normalized_shape, weight, bias, eps):
        return ops.call_add_layer_norm_cpu(x, residual, tuple(normalized_shape), weight, bias, eps)
    return F.layer_norm(x + residual, normalized_shape, weight, bias, eps)
