"""Gluon (sm90) kernel "wide MMA": one full-width wgmma per step for a row group, absent blocks zero-filled.

One program owns one `[BLOCK_M, R * bs]` tile of y (a row group of R block-rows, `row_groups.py`)
and walks the union of its members' block-columns, like the Triton row-group kernel. Each ring
stage holds the x tile `[BLOCK_M, bs]` and an `[R * bs, bs]` weight buffer: the R members' blocks
at that column stacked by member, K-major (64-byte rows for bs = 32). A member with no block there
gets its slice filled with zeros by the TMA engine itself: its box is addressed one row past the
end of the `[nnz * bs, bs]` values, and TMA fills out-of-bounds boxes with zeros without reading
memory. Then one wgmma `[BLOCK_M, bs] x [bs, R * bs]` (N = 128 or 256) does the whole step, as in
a dense GEMM of 128-256-wide tiles; both operands come from shared memory.

So on layouts where grouping pads nothing (dense matrices, head-structured pruning, rows sorted by
pattern: `RowGroups.inflation` = 1.0) this is a dense Hopper GEMM with a 32-deep K step, and where
members differ it multiplies zeros, like the row-group kernel, but at wgmma's full width. Its sibling
`gluon_member_mma.py` multiplies no zeros but issues 32-wide wgmmas; the tuned table picks per problem.

Pipeline: `NUM_STAGES` ring stages with one "ready" mbarrier each; exactly one wgmma per step, so
the wait after issuing step s keeps step s's MMA in flight (`num_outstanding = 1`) and guarantees
step s - 1's is done, which frees its stage for the loads of step s + NUM_STAGES - 1. With
`WARP_SPECIALIZE` a 1-warp loader partition issues the loads and the MMA partition hands stages back
through "empty" mbarriers.

Epilogue: bias and exact GELU in fp32, cast, stored through a blocked layout (16-byte stores) to
the members' feature columns (member j's outputs are features `group_rows[j] * bs + 0..bs-1`,
not contiguous across members); rows past M and padding members are masked.
"""

from __future__ import annotations

import torch

from .block_sparse_linear import _ACTIVATION_CODES
from .gluon_common import GLUON_AVAILABLE, launch_options, prepare_launch

if GLUON_AVAILABLE:
    from .gluon_common import (
        apply_epilogue,
        gl,
        gluon,
        mbarrier,
        allocate_barriers,
        invalidate_barriers,
        program_work,
        tma_load,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    _LOADER_REGISTERS = gl.constexpr(48)

    @gluon.jit
    def _load_wide_step(step, stage, bar, x_desc, w_desc, x_smem, w_smem, step_cols_ptr, step_blocks_ptr, m0,
                        absent_row, ROWS: gl.constexpr):
        """TMA the x tile and all R member slices of `step` into `stage`; absent members read zeros."""
        BS: gl.constexpr = w_desc.block_type.shape[1]
        col = gl.load(step_cols_ptr + step)
        mbarrier.expect(bar, x_desc.block_type.nbytes + ROWS * w_desc.block_type.nbytes)
        tma_load(x_desc, [m0, col * BS], bar, x_smem.index(stage))
        stage_w = w_smem.index(stage)
        for j in gl.static_range(ROWS):
            block = gl.load(step_blocks_ptr + step * ROWS + j)
            row = gl.where(block >= 0, block * BS, absent_row)
            tma_load(w_desc, [row, 0], bar, stage_w.slice(j * BS, BS))

    @gluon.jit
    def _wide_mma(acc, x_smem, w_smem, stage):
        # w_smem stage is [R * bs (n), bs (k)]: its transposed view is the [k, n] B operand.
        return warpgroup_mma(x_smem.index(stage), w_smem.index(stage).permute((1, 0)), acc, is_async=True)

    @gluon.jit
    def _wide_mma_partition(x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr, first_step,
                            n_steps, m0, absent_row, ROWS: gl.constexpr, NUM_STAGES: gl.constexpr,
                            mma_layout: gl.constexpr, WARP_SPECIALIZE: gl.constexpr):
        """The MMA side (the default partition when warp-specialised)."""
        BLOCK_M: gl.constexpr = x_smem.type.shape[1]
        WIDTH: gl.constexpr = w_smem.type.shape[1]
        acc = gl.zeros((BLOCK_M, WIDTH), gl.float32, mma_layout)
        # No MMA pipeline for a group without steps: ptxas would see that path's zeros reach the
        # final wgmma wait and serialise every wgmma.
        if n_steps > 0:
            acc = _wide_mma_loop(acc, x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr,
                                 first_step, n_steps, m0, absent_row, ROWS, NUM_STAGES, WARP_SPECIALIZE)
        return (acc,)

    @gluon.jit
    def _wide_mma_loop(acc, x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr, first_step,
                       n_steps, m0, absent_row, ROWS: gl.constexpr, NUM_STAGES: gl.constexpr,
                       WARP_SPECIALIZE: gl.constexpr):
        for s in range(n_steps):
            stage = s % NUM_STAGES
            mbarrier.wait(ready.index(stage), (s // NUM_STAGES) & 1)
            acc = _wide_mma(acc, x_smem, w_smem, stage)
            # Step s - 1's MMA is done once at most this step's is outstanding: its stage is free,
            # for the loader partition (handed back) or for step s + NUM_STAGES - 1's loads.
            acc = warpgroup_mma_wait(1, deps=(acc,))
            if WARP_SPECIALIZE:
                mbarrier.arrive(empty.index((s + NUM_STAGES - 1) % NUM_STAGES), pred=s > 0)
            else:
                refill = s + NUM_STAGES - 1
                if refill < n_steps:
                    _load_wide_step(first_step + refill, refill % NUM_STAGES, ready.index(refill % NUM_STAGES),
                                    x_desc, w_desc, x_smem, w_smem, step_cols_ptr, step_blocks_ptr, m0, absent_row,
                                    ROWS)
        return warpgroup_mma_wait(0, deps=(acc,))

    @gluon.jit
    def _wide_load_partition(x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr, first_step,
                             n_steps, m0, absent_row, ROWS: gl.constexpr, NUM_STAGES: gl.constexpr):
        for s in range(n_steps):
            stage = s % NUM_STAGES
            mbarrier.wait(empty.index(stage), ((s // NUM_STAGES) & 1) ^ 1)  # fresh barriers pass parity 1
            _load_wide_step(first_step + s, stage, ready.index(stage), x_desc, w_desc, x_smem, w_smem, step_cols_ptr,
                            step_blocks_ptr, m0, absent_row, ROWS)

    @gluon.jit(do_not_specialize=["M", "n_groups", "absent_row"])
    def _wide_mma_kernel(
        x_desc, w_desc, out_ptr,
        step_offsets_ptr, step_cols_ptr, step_blocks_ptr, group_rows_ptr, group_order_ptr, bias_ptr,
        M, n_groups, stride_om, absent_row,
        HAS_BIAS: gl.constexpr,
        ACTIVATION: gl.constexpr,
        ROWS: gl.constexpr,
        GROUP_M: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        WARP_SPECIALIZE: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BS: gl.constexpr = x_desc.block_type.shape[1]
        WIDTH: gl.constexpr = ROWS * BS
        NUM_WARPS: gl.constexpr = gl.num_warps()
        dtype: gl.constexpr = x_desc.dtype
        # One wgmma instruction spans at most 256 columns; 8 warps split M into two warpgroups.
        INSTR_N: gl.constexpr = WIDTH if WIDTH <= 256 else 256
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                             instr_shape=[16, INSTR_N, 16])

        m0, group, first_step, n_steps = program_work(gl.program_id(0), M, n_groups, step_offsets_ptr,
                                                      group_order_ptr, BLOCK_M, GROUP_M)

        x_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BS], x_desc.layout)
        w_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([WIDTH, BS], dtype)
        w_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, WIDTH, BS], w_layout)
        ready = allocate_barriers(NUM_STAGES)
        if WARP_SPECIALIZE:
            empty = allocate_barriers(NUM_STAGES)
            results = gl.warp_specialize([
                (_wide_mma_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr,
                                       first_step, n_steps, m0, absent_row, ROWS, NUM_STAGES, mma_layout, True)),
                (_wide_load_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr,
                                        first_step, n_steps, m0, absent_row, ROWS, NUM_STAGES)),
            ], [1], [_LOADER_REGISTERS])
            invalidate_barriers(empty, NUM_STAGES)
        else:
            # Software-pipelined: NUM_STAGES - 1 steps of loads in flight ahead of the MMAs.
            for i in gl.static_range(NUM_STAGES - 1):
                if i < n_steps:
                    _load_wide_step(first_step + i, i, ready.index(i), x_desc, w_desc, x_smem, w_smem, step_cols_ptr,
                                    step_blocks_ptr, m0, absent_row, ROWS)
            results = _wide_mma_partition(x_desc, w_desc, x_smem, w_smem, ready, ready, step_cols_ptr,
                                          step_blocks_ptr, first_step, n_steps, m0, absent_row, ROWS, NUM_STAGES,
                                          mma_layout, False)
        acc = results[0]
        invalidate_barriers(ready, NUM_STAGES)

        # Epilogue one member (bs columns) at a time: GELU on the whole [BLOCK_M, R * bs] fp32 tile at
        # once needs more registers than the accumulator leaves (ptxas spills). The tile is staged in
        # shared memory, and each member's slice is read back in a layout made for 16-byte stores.
        staging = gl.allocate_shared_memory(gl.float32, [BLOCK_M, WIDTH], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
        staging.store(acc)
        chunk_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (BS // 8), BS // 8], [NUM_WARPS, 1], [1, 0])
        offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, chunk_layout))
        within = gl.arange(0, BS, layout=gl.SliceLayout(0, chunk_layout))
        mask = gl.expand_dims(offs_m < M, 1)
        for j in gl.static_range(ROWS):
            row = gl.load(group_rows_ptr + group * ROWS + j)
            if row >= 0:  # padding members of the last group have no output
                features = row * BS + within
                y = apply_epilogue(staging.slice(j * BS, BS, dim=1).load(chunk_layout), bias_ptr, features, HAS_BIAS,
                                   ACTIVATION)
                gl.store(out_ptr + gl.expand_dims(offs_m, 1) * stride_om + gl.expand_dims(features, 0), y.to(dtype),
                         mask=mask)


def wide_mma_linear(x: torch.Tensor, values: torch.Tensor, out_features: int, bias: torch.Tensor | None,
                    activation: str | None, config, row_groups) -> torch.Tensor:
    """Launch the wide-MMA kernel; same contract as `block_sparse_linear.block_sparse_linear`.

    `config` is a `KernelConfig` with `kernel="gluon_wide"` (or `"gluon_wide_ws"`, warp-specialised).
    """
    out = torch.empty((x.shape[0], out_features), dtype=x.dtype, device=x.device)
    launch = prepare_launch(x, values, out, config, row_groups, out_needs_tma=False)
    if out.numel() == 0:
        return out
    _wide_mma_kernel[launch.grid](
        launch.x_desc, launch.w_desc, out,
        *launch.tables, bias if bias is not None else out,
        x.shape[0], row_groups.group_count, out.stride(0), launch.absent_row,
        HAS_BIAS=bias is not None,
        ACTIVATION=_ACTIVATION_CODES[activation],
        ROWS=config.rows_per_program,
        GROUP_M=config.group_m,
        NUM_STAGES=config.num_stages,
        WARP_SPECIALIZE=config.kernel == "gluon_wide_ws",
        num_warps=config.num_warps,
        **launch_options(config, values.shape[-1]),
    )
    return out
