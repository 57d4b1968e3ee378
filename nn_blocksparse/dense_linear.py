"""`DenseLinear`: an `nn.Linear` (same parameters and state dict) with an optional fused GELU, whose CPU
forward runs oneDNN (`cpu.dense_linear_cpu`).

What `patch_bert(mode="hybrid")` makes of the matrices it keeps dense: on CPU they then run the
same dense GEMM a user's best CPU engine would (MKL's fp32 GEMM, what `F.linear` runs, takes its
AVX2 path on AMD CPUs), with GELU in its epilogue; elsewhere (CUDA, a trace under
`torch.compile`, inputs that need gradients) it is `F.linear` then GELU, as `nn.Linear` would do.
The weight is read where it lies on every call: nothing derived from it is kept.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu.dense import ACTIVATIONS, dense_linear_cpu
from .resize import linear_from


class DenseLinear(nn.Linear):
    """`act(x @ weight^T + bias)`, `activation` None or "gelu" (exact erf form)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 device=None, dtype=None) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None) -> "DenseLinear":
        """A layer holding copies of `weight [out, in]` and `bias`, on their device and in their dtype."""
        return linear_from(weight, bias, cls, activation=activation)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.is_cpu and not torch.compiler.is_compiling():
            return dense_linear_cpu(input, self.weight, self.bias, self.activation)
        y = F.linear(input, self.weight, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
