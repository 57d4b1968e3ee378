"""The kernels a `KernelConfig` can name besides the default Triton kernel, and which launcher runs each.

`KernelConfig.kernel` picks the kernel; `block_sparse_linear.block_sparse_linear` (the launcher
every caller uses) hands any config whose kernel is not "triton" to `launch_variant`, so callers
keep one entry point and one signature. Gluon launchers are imported only when asked for: a
Triton without Gluon still runs everything else.

| kernel              | file                           | runs on                                  |
|---------------------|--------------------------------|------------------------------------------|
| "triton"            | block_sparse_linear.py         | CUDA (sm80+), CPU under the interpreter  |
| "triton_swapped"    | block_sparse_linear_swapped.py | CUDA (sm80+), CPU under the interpreter  |
| "gluon_member(_ws)" | gluon_member_mma.py            | Hopper (sm90) only                       |
| "gluon_wide(_ws)"   | gluon_wide_mma.py              | Hopper (sm90) only                       |
"""

from __future__ import annotations

import torch

from .configs import KernelConfig


def launch_variant(x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
                   row_order: torch.Tensor, out_features: int, bias: torch.Tensor | None, activation: str | None,
                   config: KernelConfig, row_groups) -> torch.Tensor:
    """Run `config.kernel` (not "triton"); same arguments and result as `block_sparse_linear`."""
    if values.shape[0] == 0:
        # Nothing stored: the output is the epilogue of zeros, which the default kernel writes (the
        # TMA kernels cannot describe an empty weight).
        from .block_sparse_linear import block_sparse_linear

        return block_sparse_linear(x, values, row_offsets, col_indices, row_order, out_features, bias, activation,
                                   KernelConfig())
    if config.kernel == "triton_swapped":
        from .block_sparse_linear_swapped import swapped_linear as launcher
    elif config.kernel in ("gluon_member", "gluon_member_ws"):
        from .gluon_member_mma import member_mma_linear as launcher
    elif config.kernel in ("gluon_wide", "gluon_wide_ws"):
        from .gluon_wide_mma import wide_mma_linear as launcher
    else:  # KernelConfig validates the name; this guards a new name added there but not here
        raise ValueError(f"no launcher for kernel {config.kernel!r}")
    return launcher(x, values, out_features, bias, activation, config, row_groups)
