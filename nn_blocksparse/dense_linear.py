"""`DenseLinear`: an `nn.Linear` (same parameters and state dict) with an optional fused GELU, whose CPU
forward runs oneDNN (`cpu.dense_linear_cpu`).

What `patch_bert(mode="hybrid")` makes of the matrices it keeps dense: on CPU they then run the
same dense GEMM a user's best CPU engine would (MKL's fp32 GEMM, what `F.linear` runs, takes its
AVX2 path on AMD CPUs), with GELU in its epilogue; elsewhere (CUDA, a trace under
`torch.compile`, inputs that need gradients) it is `F.linear` then GELU, as `nn.Linear` would do.
bf16 weights (`patch_bert(..., weight_dtype=torch.bfloat16)`) take fp32 inputs: computed in bf16,
returned in fp32 (`cpu.dense.dense_linear_cpu`).

By default the weight is read where it lies on every call: nothing derived from it is kept. With
`prepack=True` (for serving, what `patch_bert(..., prepack=True)` and `set_prepack(model)` ask for)
the CPU forward keeps oneDNN's packed copy of the weight (`cpu.dense.PackedWeight`): the weight's
memory twice, and no reorder of it on every call. It is packed again when the weight is replaced, moved, loaded
or written in place through itself; after a write that bypasses the tensor's version counter
(`weight.data`, a NumPy view) call `repack()`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cpu.dense import ACTIVATIONS, PackedWeight, dense_linear_cpu, takes_bf16_weights
from .resize import linear_from


class DenseLinear(nn.Linear):
    """`act(x @ weight^T + bias)`, `activation` None or "gelu" (exact erf form); `prepack`: keep oneDNN's
    packed copy of the weight on CPU (module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None,
                 prepack: bool = False, device=None, dtype=None) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(prepack, bool):
            raise TypeError(f"prepack must be a bool, got {prepack!r}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.prepack = prepack
        self._packed = PackedWeight()

    @classmethod
    def from_tensors(cls, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None = None,
                     prepack: bool = False) -> "DenseLinear":
        """A layer holding copies of `weight [out, in]` and `bias`, on their device and in their dtype."""
        return linear_from(weight, bias, cls, activation=activation, prepack=prepack)

    def repack(self) -> None:
        """Forget the packed weight (`prepack=True`): the next CPU forward packs the weight as it lies."""
        self._packed.clear()

    def forward(self, input: torch.Tensor, bf16_output: bool = False) -> torch.Tensor:
        """`bf16_output`: with bf16 weights on fp32 input, return the bf16 result itself rather than its
        fp32 copy (the same values), for a consumer that rounds its input to bf16 anyway."""
        if input.is_cpu and not torch.compiler.is_compiling():
            return dense_linear_cpu(input, self.weight, self.bias, self.activation,
                                    self._packed if self.prepack else None, bf16_output=bf16_output)
        if takes_bf16_weights(input, self.weight):
            y = self.forward(input.to(torch.bfloat16))
            return y if bf16_output else y.to(torch.float32)
        y = F.linear(input, self.weight, self.bias)
        return F.gelu(y) if self.activation == "gelu" else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}, prepack={self.prepack}"
