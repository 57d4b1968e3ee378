"""Gluon (sm90) kernel "member MMA": x read once per block-column for R block-rows, no padded work.

One program owns one `[BLOCK_M, R * bs]` tile of y: `BLOCK_M` rows of x against a row group of R
block-rows (`row_groups.py`: R = 2, 4 or 8) and walks the union of their block-columns (the steps).
At each step it TMA-loads the x tile `[BLOCK_M, bs]` at block-column c once, as a plain 2-D box,
loads it from shared memory into registers as wgmma's A operand, and for every member that has a
block at c issues one wgmma `[BLOCK_M, bs] x [bs, bs]` into that member's own fp32 accumulator. A
member without a block there costs nothing: no TMA, no MMA. So x is read once per step for all
members (the x reuse of a wide tile) and no zeros are multiplied (the row-group kernel's padding).

Why registers for A: with N = bs = 32 per wgmma, an A operand read from shared memory for every
member would cost `2 KB per m64k16` against `1 KB` of B, more than shared memory delivers per
tensor-core cycle; loaded once per step into registers, A is reused by all R members.

Pipeline: a ring of `NUM_STAGES` shared-memory stages, each holding one x tile and R block slots,
one mbarrier per stage completing when its TMA bytes have landed (the expected byte count depends
on how many members are present, so one predicated `expect` per possible count fires). Two ways to
drive it (`WARP_SPECIALIZE`):

- software-pipelined: the same warps issue step s + NUM_STAGES - 1's loads right after step s's
  MMAs, into the stage step s - 1 used (its MMAs waited for first);
- warp-specialised: a 1-warp loader partition issues all TMA loads, waiting on a per-stage "empty"
  mbarrier that the MMA partition arrives on once a stage's x is in registers and its MMAs are done.

MMAs are asynchronous: step s's wgmmas run while step s + 1's x tile is loaded into registers; the
wait before issuing the next step's wgmmas keeps at most one step in flight (wgmma's wait count
is a compile-time number, and the number of MMAs per step is not).

Epilogue: bias and exact GELU in fp32, cast, one TMA store per member of its `[BLOCK_M, bs]` tile
(y rows past M are clipped by TMA; padding members of the last group are skipped).

Launch order, tables and results match the Triton row-group kernel (`block_sparse_linear.py`),
which is this kernel's CPU twin: Triton's interpreter cannot run Gluon.
"""

from __future__ import annotations

import torch

from .block_sparse_linear import _ACTIVATION_CODES
from .gluon_common import GLUON_AVAILABLE, launch_options, prepare_launch, tensor_descriptor

if GLUON_AVAILABLE:
    from .gluon_common import (
        apply_epilogue,
        fence_async_shared,
        gl,
        gluon,
        mbarrier,
        allocate_barriers,
        invalidate_barriers,
        program_work,
        tma,
        tma_load,
        tma_store,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )

    # Registers of the 1-warp TMA loader partition (scalars only: step, block ids, coordinates).
    _LOADER_REGISTERS = gl.constexpr(48)

    @gluon.jit
    def _load_step(step, stage, bar, x_desc, w_desc, x_smem, w_smem, step_cols_ptr, step_blocks_ptr, m0,
                   ROWS: gl.constexpr):
        """TMA the x tile of `step` and the blocks of its present members into ring stage `stage`."""
        BS: gl.constexpr = w_desc.block_type.shape[1]
        col = gl.load(step_cols_ptr + step)
        blocks = ()
        present = 0
        for j in gl.static_range(ROWS):
            block = gl.load(step_blocks_ptr + step * ROWS + j)
            blocks = blocks + (block,)
            present += (block >= 0).to(gl.int32)
        # `expect` takes a compile-time byte count: one predicated expect per possible count, one fires.
        for count in gl.static_range(ROWS + 1):
            mbarrier.expect(bar, x_desc.block_type.nbytes + count * w_desc.block_type.nbytes, pred=present == count)
        tma_load(x_desc, [m0, col * BS], bar, x_smem.index(stage))
        for j in gl.static_range(ROWS):
            tma_load(w_desc, [blocks[j] * BS, 0], bar, w_smem.index(stage * ROWS + j), pred=blocks[j] >= 0)

    @gluon.jit
    def _step_blocks(step_blocks_ptr, step, ROWS: gl.constexpr):
        blocks = ()
        for j in gl.static_range(ROWS):
            blocks = blocks + (gl.load(step_blocks_ptr + step * ROWS + j),)
        return blocks

    @gluon.jit
    def _member_mmas(accs, a, w_smem, stage, blocks, ROWS: gl.constexpr):
        """One async wgmma per member present at this step, into its own accumulator."""
        issued = ()
        for j in gl.static_range(ROWS):
            acc = warpgroup_mma_init(accs[j])
            if blocks[j] >= 0:
                # The block is [n, k] row-major: its transposed view is the [k, n] B operand.
                acc = warpgroup_mma(a, w_smem.index(stage * ROWS + j).permute((1, 0)), acc, is_async=True)
            issued = issued + (acc,)
        return issued

    @gluon.jit
    def _wait_mmas(accs, a, ROWS: gl.constexpr):
        """Wait for every wgmma in flight; the A registers are a dependency too (wgmma reads them)."""
        done = warpgroup_mma_wait(0, deps=accs + (a,))
        waited = ()
        for j in gl.static_range(ROWS):
            waited = waited + (done[j],)
        return waited, done[ROWS]

    @gluon.jit
    def _wait_last_mmas(accs, ROWS: gl.constexpr):
        """Wait for the last step's wgmmas (nothing reuses the A registers after them)."""
        done = warpgroup_mma_wait(0, deps=accs)
        waited = ()
        for j in gl.static_range(ROWS):
            waited = waited + (done[j],)
        return waited

    @gluon.jit
    def _zero_accumulators(BLOCK_M: gl.constexpr, BS: gl.constexpr, ROWS: gl.constexpr, layout: gl.constexpr):
        accs = ()
        for j in gl.static_range(ROWS):
            accs = accs + (gl.zeros((BLOCK_M, BS), gl.float32, layout),)
        return accs

    @gluon.jit
    def _mma_loop(accs, x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr, first_step,
                  n_steps, m0, ROWS: gl.constexpr, NUM_STAGES: gl.constexpr, a_layout: gl.constexpr,
                  WARP_SPECIALIZE: gl.constexpr):
        """The MMA side's steps; with WARP_SPECIALIZE the loader partition fills the ring (`empty`
        hands stages back), else these warps refill it themselves."""
        BLOCK_M: gl.constexpr = x_smem.type.shape[1]
        BS: gl.constexpr = x_smem.type.shape[2]
        a = gl.zeros((BLOCK_M, BS), x_smem.dtype, a_layout)
        for s in range(n_steps):
            stage = s % NUM_STAGES
            blocks = _step_blocks(step_blocks_ptr, first_step + s, ROWS)
            mbarrier.wait(ready.index(stage), (s // NUM_STAGES) & 1)
            a_next = x_smem.index(stage).load(a_layout)
            accs, a = _wait_mmas(accs, a, ROWS)
            # Step s - 1's x is in registers and its MMAs are done: its stage may be refilled. The
            # fence orders those shared-memory reads before the TMA write that refills it.
            if WARP_SPECIALIZE:
                fence_async_shared()
                mbarrier.arrive(empty.index((s + NUM_STAGES - 1) % NUM_STAGES), pred=s > 0)
            a = a_next
            accs = _member_mmas(accs, a, w_smem, stage, blocks, ROWS)
            refill = s + NUM_STAGES - 1
            if not WARP_SPECIALIZE:  # the refill comes after this step's MMAs are issued
                if refill < n_steps:
                    fence_async_shared()
                    _load_step(first_step + refill, refill % NUM_STAGES, ready.index(refill % NUM_STAGES), x_desc,
                               w_desc, x_smem, w_smem, step_cols_ptr, step_blocks_ptr, m0, ROWS)
        return _wait_last_mmas(accs, ROWS)

    @gluon.jit
    def _mma_partition(x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr, first_step,
                       n_steps, m0, ROWS: gl.constexpr, NUM_STAGES: gl.constexpr, mma_layout: gl.constexpr,
                       a_layout: gl.constexpr, WARP_SPECIALIZE: gl.constexpr):
        """The MMA side (the default partition when warp-specialised)."""
        BLOCK_M: gl.constexpr = x_smem.type.shape[1]
        BS: gl.constexpr = x_smem.type.shape[2]
        accs = _zero_accumulators(BLOCK_M, BS, ROWS, mma_layout)
        # No MMA pipeline at all for a group without steps (empty block-rows): ptxas would otherwise
        # see the zeros of that path reach the final wgmma wait and serialise every wgmma.
        if n_steps > 0:
            accs = _mma_loop(accs, x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr,
                             first_step, n_steps, m0, ROWS, NUM_STAGES, a_layout, WARP_SPECIALIZE)
        return accs

    @gluon.jit
    def _load_partition(x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr, first_step,
                        n_steps, m0, ROWS: gl.constexpr, NUM_STAGES: gl.constexpr):
        """Warp-specialised loader (1 warp): fill each stage once the MMA side has handed it back."""
        for s in range(n_steps):
            stage = s % NUM_STAGES
            # A fresh mbarrier counts as having completed the phase before phase 0: the first
            # NUM_STAGES waits (parity 1) pass at once.
            mbarrier.wait(empty.index(stage), ((s // NUM_STAGES) & 1) ^ 1)
            _load_step(first_step + s, stage, ready.index(stage), x_desc, w_desc, x_smem, w_smem, step_cols_ptr,
                       step_blocks_ptr, m0, ROWS)

    @gluon.jit(do_not_specialize=["M", "n_groups"])
    def _member_mma_kernel(
        x_desc, w_desc, out_desc,
        step_offsets_ptr, step_cols_ptr, step_blocks_ptr, group_rows_ptr, group_order_ptr, bias_ptr,
        M, n_groups,
        HAS_BIAS: gl.constexpr,
        ACTIVATION: gl.constexpr,
        ROWS: gl.constexpr,
        GROUP_M: gl.constexpr,
        NUM_STAGES: gl.constexpr,
        WARP_SPECIALIZE: gl.constexpr,
    ):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BS: gl.constexpr = x_desc.block_type.shape[1]
        dtype: gl.constexpr = x_desc.dtype
        # Accumulators tile M over the warps (a warpgroup's wgmma covers 64 rows); one wgmma is
        # [m64, n=bs, k16], A from registers in the layout wgmma wants.
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                             instr_shape=[16, BS, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_layout, k_width=2)

        m0, group, first_step, n_steps = program_work(gl.program_id(0), M, n_groups, step_offsets_ptr,
                                                      group_order_ptr, BLOCK_M, GROUP_M)

        x_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BS], x_desc.layout)
        w_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES * ROWS, BS, BS], w_desc.layout)
        ready = allocate_barriers(NUM_STAGES)
        if WARP_SPECIALIZE:
            empty = allocate_barriers(NUM_STAGES)
            accs = gl.warp_specialize([
                (_mma_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr,
                                  first_step, n_steps, m0, ROWS, NUM_STAGES, mma_layout, a_layout, True)),
                (_load_partition, (x_desc, w_desc, x_smem, w_smem, ready, empty, step_cols_ptr, step_blocks_ptr,
                                   first_step, n_steps, m0, ROWS, NUM_STAGES)),
            ], [1], [_LOADER_REGISTERS])
            invalidate_barriers(empty, NUM_STAGES)
        else:
            # Software-pipelined: NUM_STAGES - 1 steps of loads in flight ahead of the MMAs.
            for i in gl.static_range(NUM_STAGES - 1):
                if i < n_steps:
                    _load_step(first_step + i, i, ready.index(i), x_desc, w_desc, x_smem, w_smem, step_cols_ptr,
                               step_blocks_ptr, m0, ROWS)
            accs = _mma_partition(x_desc, w_desc, x_smem, w_smem, ready, ready, step_cols_ptr, step_blocks_ptr,
                                  first_step, n_steps, m0, ROWS, NUM_STAGES, mma_layout, a_layout, False)
        invalidate_barriers(ready, NUM_STAGES)

        out_smem = gl.allocate_shared_memory(dtype, [ROWS, BLOCK_M, BS], out_desc.layout)
        within = gl.arange(0, BS, layout=gl.SliceLayout(0, mma_layout))
        for j in gl.static_range(ROWS):
            row = gl.load(group_rows_ptr + group * ROWS + j)
            if row >= 0:  # padding members of the last group have no output
                y = apply_epilogue(accs[j], bias_ptr, row * BS + within, HAS_BIAS, ACTIVATION)
                out_smem.index(j).store(y.to(dtype))
                fence_async_shared()
                tma_store(out_desc, [m0, row * BS], out_smem.index(j))
        tma.store_wait(0)


def member_mma_linear(x: torch.Tensor, values: torch.Tensor, out_features: int, bias: torch.Tensor | None,
                      activation: str | None, config, row_groups) -> torch.Tensor:
    """Launch the member-MMA kernel; same contract as `block_sparse_linear.block_sparse_linear`.

    `config` is a `KernelConfig` with `kernel="gluon_member"` (or `"gluon_member_ws"`, the
    warp-specialised pipeline); `row_groups` the tables for `config.rows_per_program` rows per group.
    """
    out = torch.empty((x.shape[0], out_features), dtype=x.dtype, device=x.device)
    launch = prepare_launch(x, values, out, config, row_groups, out_needs_tma=True)
    if out.numel() == 0:
        return out
    block_size = values.shape[-1]
    _member_mma_kernel[launch.grid](
        launch.x_desc, launch.w_desc, tensor_descriptor(out, (config.block_m, block_size)),
        *launch.tables, bias if bias is not None else out,
        x.shape[0], row_groups.group_count,
        HAS_BIAS=bias is not None,
        ACTIVATION=_ACTIVATION_CODES[activation],
        ROWS=config.rows_per_program,
        GROUP_M=config.group_m,
        NUM_STAGES=config.num_stages,
        WARP_SPECIALIZE=config.kernel == "gluon_member_ws",
        num_warps=config.num_warps,
        **launch_options(config, block_size),
    )
    return out
