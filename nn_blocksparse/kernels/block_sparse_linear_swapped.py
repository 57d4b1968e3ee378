"""Triton kernel for the swapped product `y^T = W x^T`: weight rows as the MMA's M side, tokens as its wide N side.

The block-sparse weight has only 32 rows per block-row, while Hopper's warpgroup MMA (wgmma) is 64
rows tall per warpgroup and does its best with 128-256 columns. In `y = x W^T` (today's kernel)
the 32-wide block is the MMA's N: a narrow N. Swapped, `y^T[f, t] = sum_k W[f, k] x[t, k]`, the
tokens t are the N side and can be as wide as the tile (`BLOCK_T` = 64-256), and the weight
supplies M: a program owns a row group of R = 2 or 4 block-rows (`row_groups.py`), i.e. R * bs
= 64 or 128 weight rows, which fills wgmma's M (one or two 64-row halves).

Per step (a block-column c in the union of the members' columns) the program loads the members'
blocks stacked into an `[R * bs, bs]` tile (a member without a block at c loads masked zeros:
no memory traffic, but MMA work, as in the row-group kernel) and the x tile `[BLOCK_T, bs]` at
column c, transposed in registers to `[bs, BLOCK_T]`, and accumulates `[R * bs, BLOCK_T]` in fp32.
The epilogue (bias per weight row, exact GELU) runs on y^T and stores it transposed into y.

Versus the row-group kernel, the padding is the same for the same R, but the tile is tall in
weight rows and wide in tokens: with R = 2 the padded unit is a pair of block-rows (the least
padding a 64-row MMA allows) while the MMA still gets a 128-256 wide N. Whether that beats the
narrow-N kernels is what `tools/gpu_kernels_probe.py` measures.

Plain Triton (`tl.dot`): it runs under the interpreter on CPU, compiles for sm80 (mma.sync) and
sm90 (wgmma), and takes the same index tables as the row-group kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .block_sparse_linear import _ACTIVATION_CODES, _INV_SQRT2, input_precision_for, interpreter_enabled


@triton.jit(do_not_specialize=["M", "n_groups"])
def _swapped_kernel(
    x_ptr, values_ptr, step_offsets_ptr, step_cols_ptr, step_blocks_ptr, group_rows_ptr, group_order_ptr,
    bias_ptr, out_ptr,
    M, n_groups,
    stride_xm, stride_om,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    GROUP_M: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: its bf16 tl.dot returns garbage
):
    ROWS: tl.constexpr = ROWS_PER_PROGRAM * BLOCK_SIZE
    pid = tl.program_id(0)
    # The row-group kernel's launch order: GROUP_M token tiles sweep every group together.
    num_pid_t = tl.cdiv(M, BLOCK_T)
    programs_per_sweep = GROUP_M * n_groups
    sweep = pid // programs_per_sweep
    first_pid_t = sweep * GROUP_M
    sweep_tiles_t = tl.minimum(num_pid_t - first_pid_t, GROUP_M)
    pid_in_sweep = pid % programs_per_sweep
    pid_t = first_pid_t + pid_in_sweep % sweep_tiles_t
    row_group = tl.load(group_order_ptr + pid_in_sweep // sweep_tiles_t)
    first_step = tl.load(step_offsets_ptr + row_group)
    end_step = tl.load(step_offsets_ptr + row_group + 1)

    # Weight row i of the tile is row i % bs of member i // bs's block-row.
    offs_r = tl.arange(0, ROWS)
    member = offs_r // BLOCK_SIZE
    within = offs_r % BLOCK_SIZE
    offs_k = tl.arange(0, BLOCK_SIZE)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < M
    member_rows = tl.load(group_rows_ptr + row_group * ROWS_PER_PROGRAM + member)
    features = member_rows * BLOCK_SIZE + within
    mask_r = member_rows >= 0

    # x^T tile [bs, BLOCK_T]: element (k, t) is x[t, c * bs + k].
    x_cols = x_ptr + offs_t[None, :] * stride_xm + offs_k[:, None]
    w_rows = within[:, None] * BLOCK_SIZE + offs_k[None, :]
    acc = tl.zeros((ROWS, BLOCK_T), dtype=tl.float32)
    for step in range(first_step, end_step):
        block_col = tl.load(step_cols_ptr + step)
        blocks = tl.load(step_blocks_ptr + step * ROWS_PER_PROGRAM + member)
        w_tile = tl.load(values_ptr + blocks[:, None] * (BLOCK_SIZE * BLOCK_SIZE) + w_rows,
                         mask=(blocks >= 0)[:, None], other=0.0)
        x_tile = tl.load(x_cols + block_col * BLOCK_SIZE, mask=mask_t[None, :], other=0.0)
        if UPCAST_OPERANDS:
            w_tile = w_tile.to(tl.float32)
            x_tile = x_tile.to(tl.float32)
        acc = tl.dot(w_tile, x_tile, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + features, mask=mask_r, other=0.0).to(tl.float32)[:, None]
    if ACTIVATION == 1:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
    out_ptrs = out_ptr + offs_t[None, :] * stride_om + features[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_r[:, None] & mask_t[None, :])


def swapped_linear(x, values, out_features: int, bias, activation, config, row_groups):
    """Launch the swapped kernel; same contract as `block_sparse_linear.block_sparse_linear`.

    `config.block_m` is the token tile `BLOCK_T`, `config.rows_per_program` the row-group size R.
    """
    import torch

    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("the launcher expects a 2-D x with unit stride along K")
    if row_groups is None or row_groups.rows_per_group != config.rows_per_program:
        raise ValueError(f"kernel 'triton_swapped' needs the row groups of the weight for "
                         f"{config.rows_per_program} rows per group, got {row_groups!r:.80}")
    m = x.shape[0]
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out
    n_groups = row_groups.group_count
    grid = (triton.cdiv(m, config.block_m) * n_groups,)
    _swapped_kernel[grid](
        x, values, row_groups.step_offsets, row_groups.step_cols, row_groups.step_blocks, row_groups.group_rows,
        row_groups.group_order, bias if bias is not None else out, out,
        m, n_groups, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
        ACTIVATION=_ACTIVATION_CODES[activation],
        INPUT_PRECISION=input_precision_for(x.dtype),
        BLOCK_SIZE=values.shape[-1],
        ROWS_PER_PROGRAM=config.rows_per_program,
        BLOCK_T=config.block_m,
        GROUP_M=config.group_m,
        UPCAST_OPERANDS=x.dtype == torch.bfloat16 and interpreter_enabled(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
