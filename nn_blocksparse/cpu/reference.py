"""The pure-torch reference of the CPU block-sparse linear: for CPUs without a native variant.

It re-densifies W on every call and runs `F.linear`, so it is slower than a dense layer: it is for
correctness where the native kernel cannot run (no AVX2/NEON, no C++ compiler, not Linux,
`NN_BLOCKSPARSE_NATIVE=0`), not for speed, and the planner never picks block-sparse for it. It
follows the kernel's numerics: fp32 math (fp16 and bf16 computed in fp32, the output rounded once),
and with bf16 weights and fp32 activations x rounded to bf16 first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..block_sparse_matrix import bsr_to_dense


def block_sparse_linear_reference(x2d: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                                  col_indices: torch.Tensor, bias: torch.Tensor | None,
                                  activation: str | None) -> torch.Tensor:
    """`act(x2d @ W^T + bias)` -> `[M, N]` in x2d's dtype; arguments as `block_sparse_linear_cpu`'s."""
    block_size = values.shape[-1]
    shape = ((row_offsets.numel() - 1) * block_size, x2d.shape[1])
    weight = bsr_to_dense(values.float(), row_offsets, col_indices, shape)
    x = x2d.to(values.dtype) if values.dtype == torch.bfloat16 else x2d
    y = F.linear(x.float(), weight, None if bias is None else bias.float())
    if activation == "gelu":
        y = F.gelu(y)
    return y.to(x2d.dtype)
