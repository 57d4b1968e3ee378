"""A tensor-descriptor (TMA) variant of the block-sparse linear kernel, and its launcher.

Same product and work split as `block_sparse_linear.py` with one block-row per program
(`y = act(x @ W^T + b)`, W in BSR by block-rows, `K_BLOCKS` stored blocks per loop step, split-K
and the grouped launch order), but x tiles and weight blocks are loaded through tensor
descriptors instead of pointer tensors. On Hopper (sm90) a descriptor load is one TMA copy: no
`[BLOCK_M, bs]` tensor of 64-bit addresses in registers, no masks (rows past M read as zeros),
and the copy runs asynchronously beside the tensor cores. The pointer kernel's per-step cost
(address arithmetic, index loads, masked gathers) is what bounds it on the H200 (README, *What
bounds the kernel*); this variant removes most of it. Where the GPU has no TMA, Triton lowers
descriptor loads to ordinary loads.

Each of a step's `K_BLOCKS` blocks is its own `[BLOCK_M, bs] x [bs, bs]` dot into the same
accumulator (a descriptor load is a box, so blocks from scattered block-columns are not joined
into one deeper tile). A block-row's last `n_steps % K_BLOCKS` blocks run one per step.

Knows nothing of `nn.Module` or BERT. Needs 2-byte dtypes (fp16/bf16), x `[M, K]` with unit
stride along K and a row stride of a multiple of 16 bytes, and a 16-byte-aligned x and values
(`tma_compatible` says whether a launch qualifies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .block_sparse_linear import (_ACTIVATION_CODES, _INV_SQRT2, ACTIVATIONS, REDUCE_TILE, _split_k_reduce_kernel,
                                  interpreter_enabled)
from .configs import KernelConfig

TMA_DTYPES = (torch.float16, torch.bfloat16)
_TMA_ALIGNMENT_BYTES = 16


@triton.jit(do_not_specialize=["M", "n_rows"])
def _block_sparse_linear_tma_kernel(
    x_desc, w_desc, row_offsets_ptr, col_indices_ptr, row_order_ptr, bias_ptr, out_ptr,
    M, n_rows,
    stride_om, stride_on, stride_split,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # 0: none, 1: gelu (ignored when SPLIT_K > 1: the reduce kernel applies it)
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
    K_BLOCKS: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,  # interpreter only: its bf16 tl.dot returns garbage
):
    pid = tl.program_id(0)
    split = tl.program_id(1)

    # Grouped launch order, as in the pointer kernel: GROUP_M M-tiles sweep every block-row.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    programs_per_sweep = GROUP_M * n_rows
    sweep = pid // programs_per_sweep
    first_pid_m = sweep * GROUP_M
    sweep_tiles_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_in_sweep = pid % programs_per_sweep
    pid_m = first_pid_m + pid_in_sweep % sweep_tiles_m
    block_row = tl.load(row_order_ptr + pid_in_sweep // sweep_tiles_m)

    first_step = tl.load(row_offsets_ptr + block_row)
    end_step = tl.load(row_offsets_ptr + block_row + 1)
    m_start = pid_m * BLOCK_M

    acc = tl.zeros((BLOCK_M, BLOCK_SIZE), dtype=tl.float32)
    # Whole steps of K_BLOCKS blocks, dealt round-robin over the SPLIT_K programs of this tile...
    full_steps = (end_step - first_step) // K_BLOCKS
    tail_start = first_step + full_steps * K_BLOCKS
    for step in range(first_step + split * K_BLOCKS, tail_start, SPLIT_K * K_BLOCKS):
        for j in tl.static_range(K_BLOCKS):
            block_col = tl.load(col_indices_ptr + step + j)
            x_tile = x_desc.load([m_start, block_col * BLOCK_SIZE])
            w_tile = w_desc.load([(step + j) * BLOCK_SIZE, 0])
            if UPCAST_OPERANDS:
                x_tile = x_tile.to(tl.float32)
                w_tile = w_tile.to(tl.float32)
            acc = tl.dot(x_tile, w_tile.T, acc)
    # ...then the block-row's last few blocks one at a time, dealt the same way.
    for step in range(tail_start + split, end_step, SPLIT_K):
        block_col = tl.load(col_indices_ptr + step)
        x_tile = x_desc.load([m_start, block_col * BLOCK_SIZE])
        w_tile = w_desc.load([step * BLOCK_SIZE, 0])
        if UPCAST_OPERANDS:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(x_tile, w_tile.T, acc)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    features = block_row * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    out_ptrs = out_ptr + split * stride_split + offs_m[:, None] * stride_om + features[None, :] * stride_on
    out_mask = (offs_m < M)[:, None]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + features).to(tl.float32)[None, :]
        if ACTIVATION == 1:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * _INV_SQRT2))
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


def tma_compatible(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `block_sparse_linear_tma` can take this x and these values (dtype, strides, alignment)."""
    element = x.element_size()
    return (x.dtype in TMA_DTYPES and values.dtype == x.dtype and x.dim() == 2 and x.stride(1) == 1
            and (x.stride(0) * element) % _TMA_ALIGNMENT_BYTES == 0
            and x.data_ptr() % _TMA_ALIGNMENT_BYTES == 0 and values.is_contiguous()
            and values.data_ptr() % _TMA_ALIGNMENT_BYTES == 0)


def block_sparse_linear_tma(
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
    """Launch `y = act(x @ W^T + b)` with descriptor loads; x is `[M, K]`, see `tma_compatible`.

    `config.rows_per_program` must be 1; `config.k_blocks` is the number of blocks per step."""
    if not tma_compatible(x, values):
        raise ValueError("the TMA launcher needs fp16/bf16 x and values of one dtype, x 2-D with unit stride along K, "
                         "a row stride of a multiple of 16 bytes, and 16-byte-aligned x and values")
    if config.rows_per_program != 1:
        raise ValueError("the TMA kernel runs one block-row per program (rows_per_program = 1)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    block_size = values.shape[-1]
    m = x.shape[0]
    n_rows = row_order.shape[0]
    out = torch.empty((m, out_features), dtype=x.dtype, device=x.device)
    if m == 0 or out_features == 0:
        return out
    x_desc = TensorDescriptor.from_tensor(x, [config.block_m, block_size])
    # Every block is a [bs, bs] box of the values viewed as [nnz * bs, bs]; an empty matrix
    # still needs a well-formed descriptor (no program reads it then).
    blocks = values.reshape(-1, block_size) if values.numel() else values.new_zeros(block_size, block_size)
    w_desc = TensorDescriptor.from_tensor(blocks, [block_size, block_size])

    split_k = config.split_k
    grid = (triton.cdiv(m, config.block_m) * n_rows, split_k)
    bias_arg = bias if bias is not None else out
    activation_code = _ACTIVATION_CODES[activation]
    if split_k == 1:
        target, stride_split = out, 0
    else:
        target = torch.empty((split_k, m, out_features), dtype=torch.float32, device=x.device)
        stride_split = target.stride(0)
    _block_sparse_linear_tma_kernel[grid](
        x_desc, w_desc, row_offsets, col_indices, row_order, bias_arg, target,
        m, n_rows,
        target.stride(-2), target.stride(-1), stride_split,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation_code,
        BLOCK_SIZE=block_size,
        BLOCK_M=config.block_m,
        GROUP_M=config.group_m,
        SPLIT_K=split_k,
        K_BLOCKS=config.k_blocks,
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
