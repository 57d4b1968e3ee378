"""Triton kernels for `y = act(x @ W^T + b)` with W block-sparse (BSR by block-rows), and their launcher.

Work split: one program owns a `[BLOCK_M, R * bs]` tile of y, i.e. `BLOCK_M` rows of x against
`R` block-rows of W (`ROWS_PER_PROGRAM`, 1, 2, 4 or 8), and walks only their nonzero blocks. With
R = 1 it walks one block-row's stored blocks: for each block (r, c) it loads the `[BLOCK_M, bs]`
slice of x at block-column c and the `bs x bs` block, and accumulates on tensor cores in fp32.
A zero block costs nothing: no load, no FLOP, which is the whole point.

- Row groups (R > 1): a `bs`-wide output tile re-reads x for only `bs` outputs. A program may
  instead own a group of R block-rows (`row_groups.py`) and walk the union of their block-columns:
  each x tile then feeds `R * bs` outputs. Members without a block at a step load zeros (index
  -1, masked: no memory traffic), so grouping pays where the members' patterns agree.
- Deeper steps (`K_BLOCKS` > 1, one block-row per program): a step multiplies K_BLOCKS stored
  blocks at once, x gathered from their block-columns into one `[BLOCK_M, K_BLOCKS * bs]` tile:
  fewer loop steps, each with more work to hide its index loads and latency behind.
- Launch order: groups come in `group_order` (heaviest first, so long programs start in the
  first wave), and `GROUP_M` tiles of M are walked together across all groups so that the
  x tiles of a group stay in L2 while the weight streams past them.
- Split-K (`SPLIT_K > 1`): for small M there are too few tiles to fill the GPU, so the steps of
  one group are dealt round-robin to `SPLIT_K` programs that write fp32 partial sums; a
  second small kernel adds them and applies the epilogue. Deterministic (no atomics).
- Epilogue: optional bias and exact (erf) GELU, fused, computed in fp32 before the cast.
- Dense walk (`DENSE_WALK`, measurement only): on a fully dense layout a group's steps are its
  block-columns in order, so the kernel can take the block-column from the step number instead of
  loading it (and each member's block index from its block-row): the same work without the per-step
  index loads, which is what `tools/gpu_diagnosis.py` times to price them.

This file knows nothing of `nn.Module`, BERT or `BlockSparseMatrix`: it takes raw tensors.
Inputs are assumed validated (see `nn_blocksparse.functional`); the launcher only re-checks
what would otherwise make the kernel read out of bounds.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .configs import KernelConfig

ACTIVATIONS = (None, "gelu")
_ACTIVATION_CODES = {None: 0, "gelu": 1}
_INV_SQRT2 = tl.constexpr(0.7071067811865476)


# M (tokens) and n_groups change with every batch and layer: not specialising on their values
# (== 1, divisible by 16) keeps one compiled kernel per configuration instead of several, and
# costs nothing, since they only bound loops and masks.
@triton.jit(do_not_specialize=["M", "n_groups"])
def _block_sparse_linear_kernel(
    x_ptr, values_ptr, step_offsets_ptr, step_cols_ptr, step_blocks_ptr, group_rows_ptr, group_order_ptr,
    bias_ptr, out_ptr,
    M, n_groups,
    stride_xm, stride_xk, stride_om, stride_on, stride_split,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0: none, 1: gelu (ignored when SPLIT_K > 1: the reduce kernel applies it)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_BLOCKS: tl.constexpr,  # R = 1: stored blocks multiplied per loop step (one K_BLOCKS * bs deep dot)
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: its bf16 tl.dot returns garbage
    DENSE_WALK: tl.constexpr = False,  # dense layouts only: block-columns from the step, no index loads
):
    """With ROWS_PER_PROGRAM == 1 a group is one block-row: steps are its stored blocks
    (`step_offsets`/`step_cols`/`group_order` are the BSR `row_offsets`/`col_indices`/`row_order`)
    and `step_blocks`/`group_rows` are not read."""
    BLOCK_N: tl.constexpr = ROWS_PER_PROGRAM * BLOCK_SIZE
    pid = tl.program_id(0)
    split = tl.program_id(1)

    # Grouped launch order: GROUP_M consecutive M-tiles sweep every row group together.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    programs_per_sweep = GROUP_M * n_groups
    sweep = pid // programs_per_sweep
    first_pid_m = sweep * GROUP_M
    sweep_tiles_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_in_sweep = pid % programs_per_sweep
    pid_m = first_pid_m + pid_in_sweep % sweep_tiles_m
    row_group = tl.load(group_order_ptr + pid_in_sweep // sweep_tiles_m)

    first_step = tl.load(step_offsets_ptr + row_group)
    end_step = tl.load(step_offsets_ptr + row_group + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_SIZE)
    offs_n = tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # W block (n, k) is stored row-major at n * bs + k; read it as its transpose [k, n].
    if ROWS_PER_PROGRAM == 1:
        w_block_t = offs_k[:, None] + offs_n[None, :] * BLOCK_SIZE
        features = row_group * BLOCK_SIZE + offs_n
        mask_n = offs_n < BLOCK_N  # all true
    else:
        # Output column j of the tile is feature j % bs of member j // bs's block-row.
        member = offs_n // BLOCK_SIZE
        within = offs_n % BLOCK_SIZE
        w_block_t = offs_k[:, None] + within[None, :] * BLOCK_SIZE
        member_rows = tl.load(group_rows_ptr + row_group * ROWS_PER_PROGRAM + member)
        features = member_rows * BLOCK_SIZE + within
        mask_n = member_rows >= 0  # padding members of the last group

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if K_BLOCKS > 1:
        # K_BLOCKS stored blocks per step: x is gathered from K_BLOCKS block-columns into one
        # [BLOCK_M, K_BLOCKS * bs] tile and the blocks, consecutive in `values`, form its
        # [K_BLOCKS * bs, bs] partner. Fewer, deeper steps: less per-step index and loop work.
        # A block-row's last step may be partial (masked: no traffic).
        offs_kk = tl.arange(0, K_BLOCKS * BLOCK_SIZE)
        sub_block = offs_kk // BLOCK_SIZE
        within_k = offs_kk % BLOCK_SIZE
        w_blocks_t = sub_block[:, None] * (BLOCK_SIZE * BLOCK_SIZE) + within_k[:, None] + offs_n[None, :] * BLOCK_SIZE
        x_row_starts = x_ptr + offs_m[:, None] * stride_xm
        for step in range(first_step + split * K_BLOCKS, end_step, SPLIT_K * K_BLOCKS):
            steps = step + sub_block
            valid_k = steps < end_step
            if DENSE_WALK:
                cols = steps - first_step
            else:
                cols = tl.load(step_cols_ptr + steps, mask=valid_k, other=0)
            x_tile = tl.load(x_row_starts + (cols * BLOCK_SIZE + within_k)[None, :] * stride_xk,
                             mask=mask_m[:, None] & valid_k[None, :], other=0.0)
            w_tile = tl.load(values_ptr + step * (BLOCK_SIZE * BLOCK_SIZE) + w_blocks_t, mask=valid_k[:, None],
                             other=0.0)
            if UPCAST_OPERANDS:
                x_tile = x_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
    else:
        for step in range(first_step + split, end_step, SPLIT_K):
            if DENSE_WALK:
                block_col = step - first_step
            else:
                block_col = tl.load(step_cols_ptr + step)
            x_tile = tl.load(x_rows + block_col * BLOCK_SIZE * stride_xk, mask=mask_m[:, None], other=0.0)
            if ROWS_PER_PROGRAM == 1:
                w_tile = tl.load(values_ptr + step * (BLOCK_SIZE * BLOCK_SIZE) + w_block_t)
            else:
                if DENSE_WALK:
                    # Block-row r of a dense layout holds its blocks at r * block_cols + column.
                    blocks = tl.where(member_rows >= 0, member_rows * (end_step - first_step) + block_col, -1)
                else:
                    blocks = tl.load(step_blocks_ptr + step * ROWS_PER_PROGRAM + member)
                w_tile = tl.load(values_ptr + blocks[None, :] * (BLOCK_SIZE * BLOCK_SIZE) + w_block_t,
                                 mask=(blocks >= 0)[None, :], other=0.0)
            if UPCAST_OPERANDS:
                # bf16 x bf16 products are exact in fp32, so this matches tensor-core math.
                x_tile = x_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + split * stride_split + offs_m[:, None] * stride_om + features[None, :] * stride_on
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + features, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == 1:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit(do_not_specialize=["M", "N"])
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


@functools.cache  # fixed once the kernel is decorated, and asked on every call
def interpreter_enabled() -> bool:
    """True when Triton was imported with `TRITON_INTERPRET=1`: kernels then run on CPU tensors.

    Triton reads the variable once, when `@triton.jit` decorates a kernel, so the choice is per
    process: set it before importing nn_blocksparse (the test suite does so on machines without
    CUDA).
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_block_sparse_linear_kernel, InterpretedFunction)


def _launchable(kernel):
    """`kernel`, wrapped so that `torch.library.triton_op` tracing records its launch (torch >= 2.6).

    Outside such a trace the wrapper launches the kernel as is; the interpreter's kernels cannot be
    traced, so they are never wrapped.
    """
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap_triton is None or interpreter_enabled() else wrap_triton(kernel)


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
    row_groups=None,
    dense_walk: bool = False,
) -> torch.Tensor:
    """Launch `y = act(x @ W^T + b)`; x is `[M, K]` with unit stride along K.

    `config.rows_per_program > 1` needs `row_groups`: the index tables of the BSR weight grouped
    that many block-rows at a time (any object with the int32 tensors `group_rows`,
    `step_offsets`, `step_cols`, `step_blocks`, `group_order` and `rows_per_group`, such as
    `nn_blocksparse.row_groups.RowGroups`). `dense_walk` (a measurement of the index loads' cost,
    see the module docstring) needs a layout that stores every block.

    On a CUDA device the compiled kernel runs; in a process started with `TRITON_INTERPRET=1`,
    Triton's interpreter runs the very same kernel source on CPU tensors (slow, for tests).
    """
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("the launcher expects a 2-D x with unit stride along K")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if config.kernel != "triton":  # another kernel named by the config (kernel_variants.py)
        from .kernel_variants import launch_variant

        return launch_variant(x, values, row_offsets, col_indices, row_order, out_features, bias, activation, config,
                              row_groups)
    rows_per_program = config.rows_per_program
    if rows_per_program == 1:
        # One block-row per program: the BSR tables are the steps (the kernel does not read
        # step_blocks / group_rows then; row_offsets stands in for them).
        steps = (row_offsets, col_indices, row_offsets, row_offsets, row_order)
    elif row_groups is None or row_groups.rows_per_group != rows_per_program:
        raise ValueError(f"config.rows_per_program = {rows_per_program} needs the row groups of the weight "
                         f"for {rows_per_program} rows per group, got {row_groups!r:.80}")
    else:
        steps = (row_groups.step_offsets, row_groups.step_cols, row_groups.step_blocks, row_groups.group_rows,
                 row_groups.group_order)
    step_offsets, step_cols, step_blocks, group_rows, group_order = steps
    block_size = values.shape[-1]
    m = x.shape[0]
    if dense_walk and values.shape[0] != (row_offsets.shape[0] - 1) * (x.shape[1] // block_size):
        raise ValueError(f"dense_walk needs a layout that stores every block, got {values.shape[0]} blocks of "
                         f"{(row_offsets.shape[0] - 1) * (x.shape[1] // block_size)}")
    n_groups = group_order.shape[0]
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out

    split_k = config.split_k
    num_pid_m = triton.cdiv(m, config.block_m)
    grid = (num_pid_m * n_groups, split_k)
    # Unused pointer arguments still need a tensor; `out` is a harmless stand-in for a missing bias.
    bias_arg = bias if bias is not None else out
    activation_code = _ACTIVATION_CODES[activation]

    if split_k == 1:
        target, stride_split = out, 0
    else:
        target = torch.empty((split_k, m, out_features), dtype=torch.float32, device=x.device)
        stride_split = target.stride(0)
    _launchable(_block_sparse_linear_kernel)[grid](
        x, values, step_offsets, step_cols, step_blocks, group_rows, group_order, bias_arg, target,
        m, n_groups,
        x.stride(0), x.stride(1), target.stride(-2), target.stride(-1), stride_split,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation_code,
        INPUT_PRECISION=input_precision_for(x.dtype),
        BLOCK_SIZE=block_size,
        ROWS_PER_PROGRAM=rows_per_program,
        BLOCK_M=config.block_m,
        GROUP_M=config.group_m,
        SPLIT_K=split_k,
        K_BLOCKS=config.k_blocks,
        UPCAST_OPERANDS=x.dtype == torch.bfloat16 and interpreter_enabled(),
        DENSE_WALK=dense_walk,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split_k > 1:
        reduce_block_m, reduce_block_n = REDUCE_TILE
        reduce_grid = (triton.cdiv(m, reduce_block_m), triton.cdiv(out_features, reduce_block_n))
        _launchable(_split_k_reduce_kernel)[reduce_grid](
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
