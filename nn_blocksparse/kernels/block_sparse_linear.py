"""Triton kernels for `y = act(x @ W^T + b)` with W block-sparse (BSR by block-rows), and their launcher.

Work split: one program owns a `[BLOCK_M, bs]` tile of y, i.e. `BLOCK_M` rows of x against
one block-row of W (`bs` output features), and walks only that block-row's nonzero blocks:
for each stored block (r, c) it loads the `[BLOCK_M, bs]` slice of x at block-column c and the
`bs x bs` block, and accumulates on tensor cores in fp32. A zero block costs nothing: no load,
no FLOP, which is the whole point.

- Launch order: block-rows come in `row_order` (heaviest first, so long programs start in the
  first wave), and `GROUP_M` tiles of M are walked together across all block-rows so that the
  x tiles of a group stay in L2 while the weight streams past them.
- Split-K (`SPLIT_K > 1`): for small M there are too few tiles to fill the GPU, so the blocks of
  one block-row are dealt round-robin to `SPLIT_K` programs that write fp32 partial sums; a
  second small kernel adds them and applies the epilogue. Deterministic (no atomics).
- Epilogue: optional bias and exact (erf) GELU, fused, computed in fp32 before the cast.

This file knows nothing of `nn.Module`, BERT or `BlockSparseMatrix`: it takes raw tensors.
Inputs are assumed validated (see `nn_blocksparse.functional`); the launcher only re-checks
what would otherwise make the kernel read out of bounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import KernelConfig

ACTIVATIONS = (None, "gelu")
_ACTIVATION_CODES = {None: 0, "gelu": 1}
_INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _block_sparse_linear_kernel(
    x_ptr, values_ptr, row_offsets_ptr, col_indices_ptr, row_order_ptr, bias_ptr, out_ptr,
    M, n_block_rows,
    stride_xm, stride_xk, stride_om, stride_on, stride_split,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0: none, 1: gelu (ignored when SPLIT_K > 1: the reduce kernel applies it)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: its bf16 tl.dot returns garbage
):
    pid = tl.program_id(0)
    split = tl.program_id(1)

    # Grouped launch order: GROUP_M consecutive M-tiles sweep every block-row together.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    programs_per_group = GROUP_M * n_block_rows
    group = pid // programs_per_group
    first_pid_m = group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_in_group = pid % programs_per_group
    pid_m = first_pid_m + pid_in_group % group_rows
    block_row = tl.load(row_order_ptr + pid_in_group // group_rows)

    first_block = tl.load(row_offsets_ptr + block_row)
    end_block = tl.load(row_offsets_ptr + block_row + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_SIZE)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_b[None, :] * stride_xk
    # W block (n, k) is stored row-major at n * bs + k; read it as its transpose [k, n].
    w_block_t = offs_b[:, None] + offs_b[None, :] * BLOCK_SIZE

    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    for block in range(first_block + split, end_block, SPLIT_K):
        block_col = tl.load(col_indices_ptr + block)
        x_tile = tl.load(x_rows + block_col * BLOCK_SIZE * stride_xk, mask=mask_m[:, None], other=0.0)
        w_tile = tl.load(values_ptr + block * (BLOCK_SIZE * BLOCK_SIZE) + w_block_t)
        if UPCAST_OPERANDS:
            # bf16 x bf16 products are exact in fp32, so this matches tensor-core math.
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)

    offs_n = block_row * BLOCK_SIZE + offs_b
    out_ptrs = out_ptr + split * stride_split + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        if ACTIVATION == 1:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(out_ptrs, acc, mask=mask_m[:, None])


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr, bias_ptr, out_ptr,
    M, N,
    stride_split, stride_pm, stride_om,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Sum the fp32 split-K partials in a fixed order, then bias, GELU and cast."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = partial_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(ptrs + split * stride_split, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == 1:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def interpreter_enabled() -> bool:
    """True when Triton was imported with `TRITON_INTERPRET=1`: kernels then run on CPU tensors.

    Triton reads the variable once, when `@triton.jit` decorates a kernel, so the choice is per
    process: set it before importing nn_blocksparse (the test suite does so on machines without
    CUDA).
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_block_sparse_linear_kernel, InterpretedFunction)


def input_precision_for(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's own TF32 switch, so ours matches what dense F.linear would do."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def block_sparse_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    row_order: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    activation: str | None,
    config: KernelConfig,
) -> torch.Tensor:
    """Launch `y = act(x @ W^T + b)`; x is `[M, K]` with unit stride along K.

    On a CUDA device the compiled kernel runs; in a process started with `TRITON_INTERPRET=1`,
    Triton's interpreter runs the very same kernel source on CPU tensors (slow, for tests).
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("the launcher expects a 2-D x with unit stride along K")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    block_size = values.shape[-1]
    m = x.shape[0]
    n_block_rows = row_offsets.shape[0] - 1
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out

    split_k = config.split_k
    num_pid_m = triton.cdiv(m, config.block_m)
    grid = (num_pid_m * n_block_rows, split_k)
    # Unused pointer arguments still need a tensor; `out` is a harmless stand-in for a missing bias.
    bias_arg = bias if bias is not None else out
    activation_code = _ACTIVATION_CODES[activation]

    if split_k == 1:
        target, stride_split = out, 0
    else:
        target = torch.empty((split_k, m, out_features), dtype=torch.float32, device=x.device)
        stride_split = target.stride(0)
    _block_sparse_linear_kernel[grid](
        x, values, row_offsets, col_indices, row_order, bias_arg, target,
        m, n_block_rows,
        x.stride(0), x.stride(1), target.stride(-2), target.stride(-1), stride_split,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation_code,
        INPUT_PRECISION=input_precision_for(x.dtype),
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        GROUP_M=config.group_m,
        SPLIT_K=split_k,
        UPCAST_OPERANDS=x.dtype == torch.bfloat16 and interpreter_enabled(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split_k > 1:
        reduce_block_m, reduce_block_n = REDUCE_TILE
        reduce_grid = (triton.cdiv(m, reduce_block_m), triton.cdiv(out_features, reduce_block_n))
        _split_k_reduce_kernel[reduce_grid](
            target, bias_arg, out,
            m, out_features,
            target.stride(0), target.stride(1), out.stride(0),
            HAS_BIAS=bias is not None,
            ACTIVATION=activation_code,
            SPLIT_K=split_k,
            BLOCK_M=reduce_block_m,
            BLOCK_N=reduce_block_n,
        )
    return out


# Tile of the split-K reduction: small, it only streams SPLIT_K x [M, N] fp32 once.
REDUCE_TILE = (32, 64)
