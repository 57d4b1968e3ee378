"""What the Gluon (sm90) kernels share: availability, version shims, launch-tile mapping, TMA descriptors.

Gluon (`triton.experimental.gluon`) exposes Hopper's TMA copies, mbarriers and warpgroup MMAs
(wgmma) explicitly. It is experimental and its names move between Triton releases; the kernels here
are written to the subset that Triton 3.6 (what the lent H200 machine runs) and Triton 3.9 (what
this project develops with) share, plus the shims below for the two names that moved:

- a TMA load is `tma.async_load` in 3.9 and `tma.async_copy_global_to_shared` in 3.6 (same
  arguments: descriptor, coordinates, barrier, destination, predicate);
- a TMA store is `tma.async_store` in 3.9 and `tma.async_copy_shared_to_global` in 3.6.

`GLUON_AVAILABLE` is False where Triton has no Gluon (or no Hopper part of it): the launchers
then refuse with a clear error and the Triton kernel stays the fallback.

Layouts: weight blocks are loaded by TMA from `values` viewed as a 2-D `[nnz * bs, bs]` tensor
(block i is rows `i*bs : (i+1)*bs`), so one `bs x bs` box is one block, row-major `[n, k]`, which is
exactly wgmma's K-major B operand after a transposed view. x tiles are plain 2-D boxes
`[BLOCK_M, bs]` of x at `(m0, c * bs)`: no gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..dtypes import DTYPE_NAMES
from .block_sparse_linear import _INV_SQRT2

try:  # pragma: no cover - depends on the installed Triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    GLUON_AVAILABLE = True
    GLUON_MISSING_REASON = ""
except ImportError as error:  # pragma: no cover
    GLUON_AVAILABLE = False
    GLUON_MISSING_REASON = f"{type(error).__name__}: {error}"

# Element dtypes the Gluon kernels take (wgmma's 16-bit inputs; fp32 stays on the Triton kernel).
GLUON_DTYPES = (torch.float16, torch.bfloat16)
# Block sizes the Gluon kernels take: wgmma's K step is 16 and its N a multiple of 8.
GLUON_BLOCK_SIZES = (16, 32, 64)
# The only compute capability they compile for.
GLUON_ARCH = 90
# Register cap (ptx .maxnreg) of the warp-specialised kernels per MMA warp count. 4 MMA warps and the
# 1-warp loader launch as two warpgroups; at 128 registers a thread two programs fit on an SM (a
# second program's loads and epilogue overlap this one's MMAs) and `setmaxnreg` still gives the MMA
# warpgroup 208 (the loader keeps 48). With 8 MMA warps (three warpgroups) Triton picks the cap itself.
WARP_SPECIALIZED_MAXNREG = {4: 128}
# ...but ptxas needs the cap above one wgmma's own accumulator: a 256-wide one (128 registers) does
# not assemble under it ("Insufficient registers"), so wider instructions launch uncapped.
MAX_CAPPED_WGMMA_N = 128


def launch_options(config, block_size: int) -> dict:
    """Extra compile/launch options of a Gluon config (the AOT check compiles with the same)."""
    instruction_n = block_size * (config.rows_per_program if config.kernel.startswith("gluon_wide") else 1)
    if (config.kernel.endswith("_ws") and config.num_warps in WARP_SPECIALIZED_MAXNREG
            and instruction_n <= MAX_CAPPED_WGMMA_N):
        return {"maxnreg": WARP_SPECIALIZED_MAXNREG[config.num_warps]}
    return {}


def gluon_unavailable_reason(device: torch.device | None = None, dtype: torch.dtype | None = None,
                             block_size: int | None = None) -> str:
    """Why a Gluon kernel cannot run here ("" if it can): missing Gluon, not a Hopper GPU, dtype, block size."""
    if not GLUON_AVAILABLE:
        return f"this Triton has no Gluon for Hopper ({GLUON_MISSING_REASON})"
    if dtype is not None and dtype not in GLUON_DTYPES:
        return f"the Gluon kernels take fp16 or bf16, got {dtype} (fp32 runs on the Triton kernel)"
    if block_size is not None and block_size not in GLUON_BLOCK_SIZES:
        return f"the Gluon kernels take block sizes {GLUON_BLOCK_SIZES}, got {block_size}"
    if device is not None:
        if device.type != "cuda":
            return (f"the Gluon kernels run only on a Hopper GPU (sm90); got device {device} (Triton's interpreter "
                    "cannot run Gluon: on CPU, the Triton row-group kernel is their twin)")
        capability = torch.cuda.get_device_capability(device)
        if capability[0] != GLUON_ARCH // 10:
            return f"the Gluon kernels need a Hopper GPU (sm90), this one is sm{capability[0]}{capability[1]}"
    return ""


if GLUON_AVAILABLE:
    tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global

    @gluon.jit
    def program_work(pid, M, n_groups, step_offsets_ptr, group_order_ptr, BLOCK_M: gl.constexpr,
                     GROUP_M: gl.constexpr):
        """(first row of x, row group, its first step, its step count) of program `pid`: the Triton
        kernel's launch order, so that `GROUP_M` consecutive M-tiles sweep every row group together
        (heaviest groups first)."""
        num_pid_m = gl.cdiv(M, BLOCK_M)
        programs_per_sweep = GROUP_M * n_groups
        sweep = pid // programs_per_sweep
        first_pid_m = sweep * GROUP_M
        sweep_tiles_m = gl.minimum(num_pid_m - first_pid_m, GROUP_M)
        pid_in_sweep = pid % programs_per_sweep
        pid_m = first_pid_m + pid_in_sweep % sweep_tiles_m
        group = gl.load(group_order_ptr + pid_in_sweep // sweep_tiles_m)
        first_step = gl.load(step_offsets_ptr + group)
        return pid_m * BLOCK_M, group, first_step, gl.load(step_offsets_ptr + group + 1) - first_step

    @gluon.jit
    def allocate_barriers(COUNT: gl.constexpr):
        """COUNT mbarriers, each completing a phase on one arrival (plus the bytes it is told to expect)."""
        barriers = gl.allocate_shared_memory(gl.int64, [COUNT, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(COUNT):
            mbarrier.init(barriers.index(i), count=1)
        return barriers

    @gluon.jit
    def invalidate_barriers(barriers, COUNT: gl.constexpr):
        for i in gl.static_range(COUNT):
            mbarrier.invalidate(barriers.index(i))

    @gluon.jit
    def apply_epilogue(acc, bias_ptr, features, HAS_BIAS: gl.constexpr, ACTIVATION: gl.constexpr):
        """acc + bias[features], then exact (erf) GELU when ACTIVATION == 1; fp32 in, fp32 out.

        `features` has the layout of acc's columns (a SliceLayout(0, ...) of it)."""
        y = acc
        if HAS_BIAS:
            y = y + gl.expand_dims(gl.load(bias_ptr + features).to(gl.float32), 0)
        if ACTIVATION == 1:
            y = 0.5 * y * (1.0 + gl.erf(y * _INV_SQRT2))
        return y


def nvmma_layout(block_shape, dtype: torch.dtype):
    """The shared-memory layout (widest swizzle the box allows) a TMA box and wgmma operand use."""
    return gl.NVMMASharedLayout.get_default_for(list(block_shape), _gl_dtype(dtype))


def _gl_dtype(dtype: torch.dtype):
    return {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}[dtype]


def tensor_descriptor(tensor: torch.Tensor, block_shape) -> "TensorDescriptor":
    """A host TMA descriptor of a 2-D tensor with unit inner stride and a 16-byte aligned base and row stride."""
    return TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), list(block_shape),
                            nvmma_layout(block_shape, tensor.dtype))


def tma_unfit_reason(tensor: torch.Tensor, name: str) -> str:
    """Why `tensor` cannot be a TMA source/target ("" if it can): TMA wants 16-byte aligned base and rows."""
    element = tensor.element_size()
    if tensor.dim() != 2 or tensor.stride(-1) != 1:
        return f"{name} must be 2-D with unit inner stride for TMA"
    if tensor.data_ptr() % 16 or (tensor.stride(0) * element) % 16:
        return (f"{name} must start on a 16-byte boundary and have rows a multiple of 16 bytes apart for TMA "
                f"(data_ptr % 16 = {tensor.data_ptr() % 16}, row stride {tensor.stride(0) * element} bytes)")
    return ""


def descriptor_signature(dtype: torch.dtype, block_shape) -> str:
    """The `triton.compile` signature string of a Gluon TMA descriptor argument (for the AOT check)."""
    name = DTYPE_NAMES[dtype]  # Triton's type names are ours
    layout = nvmma_layout(block_shape, dtype)
    return f"tensordesc<{name}[{', '.join(str(int(s)) for s in block_shape)}],{layout!r}>"


@dataclass
class GluonLaunch:
    """What both Gluon launchers pass the same way: TMA descriptors of x and the blocks, the index tables, the grid."""

    x_desc: object
    w_desc: object
    tables: tuple  # step_offsets, step_cols, step_blocks, group_rows, group_order
    grid: tuple
    absent_row: int  # one row past the blocks viewed as [nnz * bs, bs]: a TMA box there reads zeros


def prepare_launch(x: torch.Tensor, values: torch.Tensor, out: torch.Tensor, config, row_groups,
                   out_needs_tma: bool) -> GluonLaunch:
    """Check what the Gluon kernels need before touching the GPU (the rest is `functional.check_inputs`)
    and build their common arguments; raises ValueError naming the problem."""
    block_size = values.shape[-1]
    reason = gluon_unavailable_reason(x.device, x.dtype, block_size)
    if reason:
        raise ValueError(f"kernel {config.kernel!r}: {reason}")
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("the launcher expects a 2-D x with unit stride along K")
    if row_groups is None or row_groups.rows_per_group != config.rows_per_program:
        raise ValueError(f"kernel {config.kernel!r} needs the row groups of the weight for "
                         f"{config.rows_per_program} rows per group, got {row_groups!r:.80}")
    if values.shape[0] == 0:
        raise ValueError(f"kernel {config.kernel!r}: the weight stores no block (use the Triton kernel)")
    values_2d = values.reshape(-1, block_size)
    fits = ((x, "x"), (values_2d, "the block values")) + (((out, "the output"),) if out_needs_tma else ())
    for tensor, name in fits:
        unfit = tma_unfit_reason(tensor, name)
        if unfit:
            raise ValueError(f"kernel {config.kernel!r}: {unfit}")
    groups = row_groups
    return GluonLaunch(
        x_desc=tensor_descriptor(x, (config.block_m, block_size)),
        w_desc=tensor_descriptor(values_2d, (block_size, block_size)),
        tables=(groups.step_offsets, groups.step_cols, groups.step_blocks, groups.group_rows, groups.group_order),
        grid=(triton.cdiv(x.shape[0], config.block_m) * groups.group_count,),
        absent_row=values_2d.shape[0],
    )
