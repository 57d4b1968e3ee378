"""The CPU path of nn_blocksparse: one native kernel for every x86-64 and ARM server, calibrated per machine.

- `block_sparse_linear_cpu(x2d, values, row_offsets, col_indices, bias, activation)`: the forward,
  a pure function of the stored BSR tensors (`launcher.py`): the native kernel
  (`block_sparse_linear.cpp`, one source compiled per ISA by `build.py`), else the pure-torch
  reference (`reference.py`).
- `native_isa()` / `native_status()`: the ISA in use ("amx_bf16", "avx512_bf16", "avx512", "avx2",
  "neon_bf16", "neon") or None, and why (`isa.py`: CPU features, the OS's grant of AMX tiles,
  `NN_BLOCKSPARSE_ISA`, `NN_BLOCKSPARSE_NATIVE`).
- `dense_linear_cpu(x, weight, bias, activation)`: the dense linear beside it (`dense.py`): oneDNN
  (ISA-specific kernels, GELU fused) where torch has it, else `F.linear`.
- `density_threshold(...)` / `use_block_sparse(...)`: whether block-sparse beats that dense linear
  here, from this machine's calibrated profile (`planner.py`), written by
  `python -m nn_blocksparse.cpu.calibrate` (`calibrate.py`).

Knows nothing of `nn.Module` or BERT.
"""

from .build import native_isa, native_status
from .dense import dense_linear_cpu
from .isa import cpu_model
from .launcher import block_sparse_linear_cpu
from .planner import density_threshold, use_block_sparse

__all__ = ["block_sparse_linear_cpu", "cpu_model", "dense_linear_cpu", "density_threshold", "native_isa",
           "native_status", "use_block_sparse"]
