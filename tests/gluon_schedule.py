"""A Python model of the Gluon kernels' schedule, for CPU tests (Triton's interpreter cannot run Gluon).

It replays, program by program, what `gluon_member_mma.py` and `gluon_wide_mma.py` issue over the
same `RowGroups` tables: the launch-grid mapping (`program_work`), every TMA box (coordinates,
shared-memory slot, bytes; out-of-bounds parts read as zeros, as TMA does), the mbarrier
protocol of the ring (expected bytes, arrivals, phase parities: the software-pipelined order, or
the loader and MMA partitions of the warp-specialised one interleaved in random orders with TMA
copies landing late), every wgmma (member kernel: one per present member; wide kernel: one per
step over the stacked slices) and the epilogue (bias, exact GELU, TMA store clipped at M / masked
stores). Arithmetic is float64 on the data the boxes deliver, so the result can be compared with
a dense float64 reference; the model also records which stored block each MMA consumed.

What it checks as it goes (AssertionError otherwise): a wait never passes before its copies
have landed, a stage is never refilled while the MMA side still holds it, each MMA reads the
slot of its own step, the expected bytes equal the bytes the copies deliver, and the partitions
never deadlock. The kernels' own arithmetic for these rules is copied here on purpose, written
independently of the kernel source, so that a change to either shows up as a disagreement.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import torch


def program_work(pid: int, m: int, n_groups: int, group_order: list[int], block_m: int, group_m: int):
    num_pid_m = -(-m // block_m)
    per_sweep = group_m * n_groups
    sweep = pid // per_sweep
    first_pid_m = sweep * group_m
    tiles_m = min(num_pid_m - first_pid_m, group_m)
    in_sweep = pid % per_sweep
    return (first_pid_m + in_sweep % tiles_m) * block_m, group_order[in_sweep // tiles_m]


def tma_box(tensor: torch.Tensor, row: int, col: int, height: int, width: int) -> torch.Tensor:
    """A TMA load of a `[height, width]` box at (row, col): parts outside the tensor read as zeros."""
    box = torch.zeros(height, width, dtype=tensor.dtype)
    rows, cols = tensor.shape
    r0, r1, c0, c1 = max(row, 0), min(row + height, rows), max(col, 0), min(col + width, cols)
    if r0 < r1 and c0 < c1:
        box[r0 - row:r1 - row, c0 - col:c1 - col] = tensor[r0:r1, c0:c1]
    return box


class MBarrier:
    """One mbarrier: a phase completes when its arrivals and its expected transaction bytes are all in."""

    def __init__(self, count: int):
        self.count = count
        self.arrivals = 0
        self.tx = 0
        self.completed = 0  # phases completed so far

    def passes(self, parity: int) -> bool:
        # A fresh barrier counts the phase before phase 0 as complete: wait(parity 1) passes at once.
        return parity != self.completed % 2

    def arrive(self, expect_bytes: int = 0) -> None:
        self.arrivals += 1
        self.tx += expect_bytes
        self._maybe_complete()

    def complete_tx(self, nbytes: int) -> None:
        self.tx -= nbytes
        assert self.tx >= 0 or self.arrivals < self.count, "more bytes landed than the phase expected"
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.arrivals == self.count and self.tx == 0:
            self.arrivals, self.completed = 0, self.completed + 1


@dataclass
class Copy:
    """A TMA load in flight: it lands in `slot` (and counts its bytes on `barrier`) later."""

    barrier: MBarrier
    slot: tuple
    data: torch.Tensor
    tag: tuple
    nbytes: int


@dataclass
class Program:
    """One program's shared memory and barriers, plus what its MMA side holds."""

    stages: int
    ready: list = field(default_factory=list)
    empty: list = field(default_factory=list)
    slots: dict = field(default_factory=dict)  # slot -> (tag, data)
    held: set = field(default_factory=set)  # slots the MMA side may still read
    in_flight: list = field(default_factory=list)

    def land(self, copy: Copy) -> None:
        assert copy.slot not in self.held, f"TMA overwrote slot {copy.slot} while the MMA side held it"
        self.slots[copy.slot] = (copy.tag, copy.data)
        copy.barrier.complete_tx(copy.nbytes)


@dataclass
class Kernel:
    """The launch: tables, data and config of one Gluon kernel call."""

    wide: bool
    x: torch.Tensor  # [M, K] float64
    values: torch.Tensor  # [nnz, bs, bs] float64
    groups: object  # RowGroups
    block_m: int
    group_m: int
    stages: int
    warp_specialized: bool
    element_bytes: int = 2

    def __post_init__(self):
        self.bs = self.values.shape[-1]
        self.rows = self.groups.rows_per_group
        self.values_2d = self.values.reshape(-1, self.bs)
        self.step_offsets = self.groups.step_offsets.tolist()
        self.step_cols = self.groups.step_cols.tolist()
        self.step_blocks = self.groups.step_blocks.tolist()
        self.group_rows = self.groups.group_rows.tolist()
        self.x_bytes = self.block_m * self.bs * self.element_bytes
        self.w_bytes = self.bs * self.bs * self.element_bytes
        self.mma_blocks = Counter()  # (m0, block) -> MMAs that consumed the block
        self.padded_mmas = 0  # wide kernel: member slices multiplied as zeros

    # ------------------------------------------------------------------ what the loader issues
    def load_step(self, program: Program, step: int, stage: int, m0: int) -> None:
        bar = program.ready[stage]
        blocks = self.step_blocks[step * self.rows:(step + 1) * self.rows]
        col = self.step_cols[step]
        x_tile = tma_box(self.x, m0, col * self.bs, self.block_m, self.bs)
        copies = [Copy(bar, ("x", stage), x_tile, ("x", step), self.x_bytes)]
        if self.wide:
            expected = self.x_bytes + self.rows * self.w_bytes
            absent_row = self.values_2d.shape[0]
            for j, block in enumerate(blocks):
                row = block * self.bs if block >= 0 else absent_row
                copies.append(Copy(bar, ("w", stage, j), tma_box(self.values_2d, row, 0, self.bs, self.bs),
                                   ("w", step, j), self.w_bytes))
        else:
            expected = self.member_expected_bytes(sum(block >= 0 for block in blocks))
            for j, block in enumerate(blocks):
                if block >= 0:
                    copies.append(Copy(bar, ("w", stage * self.rows + j), tma_box(self.values_2d, block * self.bs, 0,
                                                                                  self.bs, self.bs),
                                       ("w", step, j), self.w_bytes))
        assert expected == sum(c.nbytes for c in copies), "expected bytes differ from the bytes the copies deliver"
        bar.arrive(expected)  # expect = arrive + expect_tx
        program.in_flight.extend(copies)

    def member_expected_bytes(self, present: int) -> int:
        """The member kernel's predicated expects: one per possible count of present members, one fires."""
        fired = [self.x_bytes + count * self.w_bytes for count in range(self.rows + 1) if present == count]
        assert len(fired) == 1
        return fired[0]

    # ------------------------------------------------------------------ what the MMA side issues
    def mma_step(self, program: Program, step: int, stage: int, m0: int, accs: list) -> None:
        tag, x_tile = program.slots[("x", stage)]
        assert tag == ("x", step), f"step {step} read the x tile of {tag}"
        blocks = self.step_blocks[step * self.rows:(step + 1) * self.rows]
        if self.wide:
            for j, block in enumerate(blocks):
                tag, w_tile = program.slots[("w", stage, j)]
                assert tag == ("w", step, j)
                if block >= 0:
                    self.mma_blocks[(m0, block)] += 1
                else:
                    assert not w_tile.any(), "an absent member's slice must read as zeros"
                    self.padded_mmas += 1
                accs[j] += x_tile @ w_tile.T
            program.held = {("x", stage)} | {("w", stage, j) for j in range(self.rows)}
        else:
            program.held = {("x", stage)}
            for j, block in enumerate(blocks):
                if block < 0:
                    continue  # no MMA, no slot read for an absent member
                tag, w_tile = program.slots[("w", stage * self.rows + j)]
                assert tag == ("w", step, j), f"member {j} at step {step} read the block of {tag}"
                self.mma_blocks[(m0, block)] += 1
                accs[j] += x_tile @ w_tile.T
                program.held.add(("w", stage * self.rows + j))

    # ------------------------------------------------------------------ one program
    def run_program(self, m0: int, group: int, rng: random.Random) -> list:
        first, end = self.step_offsets[group], self.step_offsets[group + 1]
        program = Program(self.stages)
        program.ready = [MBarrier(1) for _ in range(self.stages)]
        program.empty = [MBarrier(1) for _ in range(self.stages)]
        accs = [torch.zeros(self.block_m, self.bs, dtype=torch.float64) for _ in range(self.rows)]
        if self.warp_specialized:
            threads = [self._loader(program, first, end - first, m0), self._consumer(program, first, end - first, m0,
                                                                                     accs)]
        else:
            threads = [self._pipelined(program, first, end - first, m0, accs)]
        waiting = [next(thread, None) for thread in threads]
        while any(w is not None for w in waiting) or program.in_flight:
            runnable = [i for i, w in enumerate(waiting) if w is not None and w[0].passes(w[1])]
            choices = runnable + (["land"] if program.in_flight else [])
            assert choices, "deadlock: every partition waits on a barrier no copy will complete"
            choice = rng.choice(choices)
            if choice == "land":
                program.land(program.in_flight.pop(rng.randrange(len(program.in_flight))))
            else:
                waiting[choice] = next(threads[choice], None)
        return accs

    def _pipelined(self, program, first, n_steps, m0, accs):
        """gluon_*: the prologue loads, then per step: wait, MMAs, refill the stage of step s - 1."""
        stages = self.stages
        for i in range(stages - 1):
            if i < n_steps:
                self.load_step(program, first + i, i, m0)
        for s in range(n_steps):
            stage = s % stages
            yield program.ready[stage], (s // stages) & 1
            program.held = set()  # the wait for step s - 1's MMAs, before step s's are issued
            self.mma_step(program, first + s, stage, m0, accs)
            refill = s + stages - 1
            if refill < n_steps:
                self.load_step(program, first + refill, refill % stages, m0)
        program.held = set()

    def _loader(self, program, first, n_steps, m0):
        """gluon_*_ws loader partition."""
        stages = self.stages
        for s in range(n_steps):
            stage = s % stages
            yield program.empty[stage], ((s // stages) & 1) ^ 1
            self.load_step(program, first + s, stage, m0)

    def _consumer(self, program, first, n_steps, m0, accs):
        """gluon_*_ws MMA partition: after step s's wait for step s - 1's MMAs, hand that stage back."""
        stages = self.stages
        for s in range(n_steps):
            stage = s % stages
            yield program.ready[stage], (s // stages) & 1
            if s > 0:
                previous = (s + stages - 1) % stages
                program.held = set()
                program.empty[previous].arrive()
            self.mma_step(program, first + s, stage, m0, accs)
        program.held = set()


def emulate(kernel: Kernel, m: int, n: int, bias: torch.Tensor | None, activation: str | None,
            seed: int = 0) -> torch.Tensor:
    """The kernel's whole launch: y `[M, N]` float64 (unwritten outputs are NaN)."""
    rng = random.Random(seed)
    groups = kernel.groups
    order = groups.group_order.tolist()
    grid = -(-m // kernel.block_m) * groups.group_count
    y = torch.full((m, n), math.nan, dtype=torch.float64)
    tiles = set()
    for pid in range(grid):
        m0, group = program_work(pid, m, groups.group_count, order, kernel.block_m, kernel.group_m)
        assert (m0, group) not in tiles, f"program {pid} repeats tile {(m0, group)}"
        tiles.add((m0, group))
        accs = kernel.run_program(m0, group, rng)
        for j in range(kernel.rows):
            row = kernel.group_rows[group * kernel.rows + j]
            if row < 0:
                continue  # a padding member stores nothing
            out = accs[j]
            features = slice(row * kernel.bs, (row + 1) * kernel.bs)
            if bias is not None:
                out = out + bias[features]
            if activation == "gelu":
                out = torch.nn.functional.gelu(out)
            rows = min(kernel.block_m, m - m0)  # TMA stores (or masked stores) clip at M
            y[m0:m0 + rows, features] = out[:rows]
    assert tiles == {(tile * kernel.block_m, g) for tile in range(-(-m // kernel.block_m))
                     for g in range(groups.group_count)}, "the grid misses a tile"
    return y
