"""Launch configurations of the block-sparse kernels: the tuned table and the fallback heuristic.

Like torch's `_triton_ops_meta.py`, measured best configurations live in a table committed
with the package (`tuned_configs.json`, written by `benchmarks/tune_kernel.py` on a GPU), keyed by
GPU architecture, dtype, block size, weight shape, number of rows M and block density. A
problem missing from the table takes the nearest tuned entry of the same architecture, dtype,
block size and shape (nearest M, then nearest density), and failing that a heuristic.

A table of one's own (the tuner's `--out` file) is laid over the bundled one by naming it in
`NN_BLOCKSPARSE_TUNED_CONFIGS=<path>`: its entries win where both have the same architecture
and key, the bundled ones stay elsewhere. It is read once per process, at the first launch
(or `launchable_configs` call), and checked entry by entry like the bundled table.

Every configuration this module can return is listed by `launchable_configs`, so
`python -m nn_blocksparse.aot` can compile all of them ahead of time and prove none spills.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ..dtypes import DTYPE_NAMES

TUNED_TABLE_PATH = Path(__file__).with_name("tuned_configs.json")
TUNED_CONFIGS_ENV = "NN_BLOCKSPARSE_TUNED_CONFIGS"

BLOCK_M_CHOICES = (16, 32, 64, 128)
SPLIT_K_CHOICES = (1, 2, 4, 8)
# M-tiles swept together per group (launch order): 8 is what the tuner and the heuristic use; 1 (plain
# order) is there to be measured against it (tools/gpu_diagnosis.py).
GROUP_M_CHOICES = (1, 8)
# Block-rows one program covers (its output tile is ROWS_PER_PROGRAM * bs wide); see row_groups.py.
# The tuner and the heuristic choose among ROWS_PER_PROGRAM_CHOICES. WIDE_ROWS_PER_PROGRAM (a 256-wide
# tile with 32x32 blocks) launches too, from an explicit config, and the AOT check compiles it, but no
# GPU has timed it yet (tools/gpu_diagnosis.py does), so neither the tuner nor the heuristic picks it.
ROWS_PER_PROGRAM_CHOICES = (1, 2, 4)
WIDE_ROWS_PER_PROGRAM = (8,)
# Stored blocks one loop step multiplies (one program per block-row only): deeper steps, fewer of them.
K_BLOCKS_CHOICES = (1, 2, 4)
NUM_WARPS_CHOICES = (1, 2, 4, 8)
MAX_NUM_STAGES = 8
# SMs of the GPUs the heuristic is written for (A100: 108, H100 SXM: 132); the interpreter has none.
DEFAULT_SM_COUNT = 108

# The kernels a config can name (`kernel_variants.py`). The heuristic only ever picks "triton": the
# others are chosen by a tuned table entry or an explicit config, after a GPU measured them.
KERNEL_CHOICES = ("triton", "triton_swapped", "gluon_member", "gluon_member_ws", "gluon_wide", "gluon_wide_ws")
GLUON_KERNELS = ("gluon_member", "gluon_member_ws", "gluon_wide", "gluon_wide_ws")
# Gluon tiles: one warpgroup's wgmma is 64 rows tall (8 warps: two warpgroups, 128 rows); row groups of
# up to 8 block-rows; ring stages of shared memory.
GLUON_BLOCK_M_CHOICES = (64, 128)
GLUON_ROWS_PER_PROGRAM_CHOICES = (2, 4, 8)
GLUON_STAGES_CHOICES = (2, 3, 4, 5, 6)
# The swapped kernel (y^T = W x^T): `block_m` is its token tile (wgmma's N), R * bs its weight rows (M).
SWAPPED_BLOCK_T_CHOICES = (64, 128, 256)
SWAPPED_ROWS_PER_PROGRAM_CHOICES = (2, 4)


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 64
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    rows_per_program: int = 1
    k_blocks: int = 1
    kernel: str = "triton"

    def __post_init__(self) -> None:
        if isinstance(self.kernel, int) and not isinstance(self.kernel, bool) and 0 <= self.kernel < len(KERNEL_CHOICES):
            # By position in KERNEL_CHOICES (`kernel_index`): where a config travels as ints only.
            object.__setattr__(self, "kernel", KERNEL_CHOICES[self.kernel])
        if self.kernel != "triton":  # the other kernels (kernel_variants.py) have their own rules
            self._check_variant()
            return
        if self.block_m not in BLOCK_M_CHOICES:
            raise ValueError(f"block_m must be one of {BLOCK_M_CHOICES}, got {self.block_m}")
        if self.split_k not in SPLIT_K_CHOICES:
            raise ValueError(f"split_k must be one of {SPLIT_K_CHOICES}, got {self.split_k}")
        if self.rows_per_program not in ROWS_PER_PROGRAM_CHOICES + WIDE_ROWS_PER_PROGRAM:
            raise ValueError(f"rows_per_program must be one of {ROWS_PER_PROGRAM_CHOICES + WIDE_ROWS_PER_PROGRAM}, "
                             f"got {self.rows_per_program}")
        if self.k_blocks not in K_BLOCKS_CHOICES:
            raise ValueError(f"k_blocks must be one of {K_BLOCKS_CHOICES}, got {self.k_blocks}")
        if self.k_blocks > 1 and self.rows_per_program > 1:
            raise ValueError("k_blocks > 1 needs rows_per_program = 1 (row groups step one block-column at a time)")
        if self.group_m not in GROUP_M_CHOICES:
            raise ValueError(f"group_m must be one of {GROUP_M_CHOICES}, got {self.group_m}")
        if self.num_warps not in NUM_WARPS_CHOICES:
            raise ValueError(f"num_warps must be one of {NUM_WARPS_CHOICES}, got {self.num_warps}")
        if not 1 <= self.num_stages <= MAX_NUM_STAGES:
            raise ValueError(f"num_stages must be in [1, {MAX_NUM_STAGES}], got {self.num_stages}")

    def as_list(self) -> list:
        """The tuned-table form: `[block_m, group_m, split_k, num_warps, num_stages, rows_per_program]`,
        then `k_blocks` when above 1 or when a kernel name follows, then the kernel's name unless "triton"."""
        values = [self.block_m, self.group_m, self.split_k, self.num_warps, self.num_stages, self.rows_per_program]
        if self.kernel != "triton":
            return values + [self.k_blocks, self.kernel]
        return values + [self.k_blocks] if self.k_blocks > 1 else values

    def _check_variant(self) -> None:
        """The swapped and Gluon kernels walk row groups one block-column per step, unsplit."""
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel must be one of {KERNEL_CHOICES}, got {self.kernel!r}")
        if self.group_m < 1 or self.num_stages < 1:
            raise ValueError(f"invalid launch configuration {self}")
        if self.split_k != 1 or self.k_blocks != 1:
            raise ValueError(f"kernel {self.kernel!r} takes split_k = 1 and k_blocks = 1, got {self}")
        if self.kernel == "triton_swapped":
            block_m_choices, rows_choices = SWAPPED_BLOCK_T_CHOICES, SWAPPED_ROWS_PER_PROGRAM_CHOICES
            if self.num_warps not in NUM_WARPS_CHOICES:
                raise ValueError(f"invalid launch configuration {self}")
        else:
            block_m_choices, rows_choices = GLUON_BLOCK_M_CHOICES, GLUON_ROWS_PER_PROGRAM_CHOICES
            if self.num_warps not in (4, 8) or self.block_m < 16 * self.num_warps:
                raise ValueError(f"kernel {self.kernel!r} needs 4 warps, or 8 with block_m = 128 (one warpgroup "
                                 f"per 64 rows), got num_warps = {self.num_warps}, block_m = {self.block_m}")
            if self.num_stages not in GLUON_STAGES_CHOICES:
                raise ValueError(f"kernel {self.kernel!r}: num_stages must be one of {GLUON_STAGES_CHOICES}, "
                                 f"got {self.num_stages}")
        if self.block_m not in block_m_choices:
            raise ValueError(f"kernel {self.kernel!r}: block_m must be one of {block_m_choices}, got {self.block_m}")
        if self.rows_per_program not in rows_choices:
            raise ValueError(f"kernel {self.kernel!r}: rows_per_program must be one of {rows_choices}, "
                             f"got {self.rows_per_program}")

    @property
    def is_gluon(self) -> bool:
        return self.kernel in GLUON_KERNELS

    @property
    def kernel_index(self) -> int:
        """`kernel` as its position in KERNEL_CHOICES (0: "triton"); `KernelConfig(kernel=index)` reads it back."""
        return KERNEL_CHOICES.index(self.kernel)

    @classmethod
    def from_list(cls, values) -> "KernelConfig":
        """From `as_list()`; shorter lists come from older tables: 5 entries mean one row per
        program, 6 one block per step, 7 the Triton kernel; a trailing name picks another kernel."""
        values = list(values) if isinstance(values, (list, tuple)) else values
        kernel = values.pop() if isinstance(values, list) and values and isinstance(values[-1], str) else "triton"
        if (not isinstance(values, list) or not 5 <= len(values) <= 7
                or any(isinstance(v, bool) or not isinstance(v, int) for v in values)):
            raise ValueError("a launch configuration is a list of 5 to 7 ints [block_m, group_m, split_k, "
                             f"num_warps, num_stages(, rows_per_program(, k_blocks))] and an optional kernel "
                             f"name, got {values!r:.80}")
        return cls(*values, kernel=kernel)


def m_bucket(m: int) -> int:
    """Next power of two, at least 16: tuned entries are keyed by bucket, not by exact M."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(m, 1)))))


def density_bucket(density: float) -> float:
    return round(min(max(density, 0.0), 1.0) * 20) / 20  # steps of 0.05


def table_key(dtype: torch.dtype, block_size: int, n: int, k: int, m: int, density: float) -> str:
    return f"{DTYPE_NAMES[dtype]}/bs{block_size}/n{n}/k{k}/m{m_bucket(m)}/d{density_bucket(density):.2f}"


_KEY_PATTERN = re.compile(r"(?P<dtype>fp32|fp16|bf16)/bs(?P<bs>\d+)/n(?P<n>\d+)/k(?P<k>\d+)/m(?P<m>\d+)/d(?P<d>\d\.\d\d)")
_ARCH_PATTERN = re.compile(r"sm\d{2,3}|interpreter")


def _parse_key(key: str) -> dict:
    dtype, bs, n, k, m, d = key.split("/")
    return {"prefix": "/".join((dtype, bs, n, k)), "m": int(m[1:]), "density": float(d[1:])}


def _check_entry(key, values) -> None:
    """Raise `ValueError` unless `key: values` is a tuned entry `tuned_config` can look up and launch."""
    match = _KEY_PATTERN.fullmatch(key) if isinstance(key, str) else None
    if match is None:
        raise ValueError("the key must read <fp32|fp16|bf16>/bs<block size>/n<N>/k<K>/m<M>/d<density>, "
                         "e.g. fp16/bs32/n768/k3072/m128/d0.35")
    bs, n, k, m = (int(match[name]) for name in ("bs", "n", "k", "m"))
    if bs < 16 or bs & (bs - 1) or n % bs or k % bs:
        raise ValueError(f"block size {bs} must be a power of two >= 16 dividing n = {n} and k = {k}")
    if m != m_bucket(m):
        raise ValueError(f"m = {m} is not an M bucket (a power of two >= 16)")
    if not 0.0 <= float(match["d"]) <= 1.0:
        raise ValueError(f"density {match['d']} is outside [0, 1]")
    KernelConfig.from_list(values)


def check_tuned_table(table, source: str = "tuned table") -> dict:
    """The `configs` of a tuned table, every entry checked; a `ValueError` names the first bad one."""
    configs = table.get("configs", {}) if isinstance(table, dict) else None
    if not isinstance(configs, dict):
        raise ValueError(f"{source}: expected an object {{\"configs\": {{arch: {{key: [...]}}}}}}")
    for arch, entries in configs.items():
        if not _ARCH_PATTERN.fullmatch(arch) or not isinstance(entries, dict):
            raise ValueError(f"{source}: {arch!r:.40} must be a GPU architecture (sm80, sm90, ...) mapping keys "
                             "to launch configurations")
        for key, values in entries.items():
            try:
                _check_entry(key, values)
            except ValueError as err:
                raise ValueError(f"{source}: bad entry {arch}/{key!s:.80}: {err}") from None
    return configs


def read_tuned_table(path: Path, source: str | None = None) -> dict:
    """The checked `configs` of the table file at `path` (`check_tuned_table`); `{}` if there is none."""
    source = source or str(path)
    if not path.exists():
        return {}
    try:
        table = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: not valid JSON ({err})") from None
    return check_tuned_table(table, source)


@lru_cache(maxsize=1)
def load_tuned_table(path: str | None = None) -> dict:
    """`{arch: {key: [block_m, group_m, split_k, num_warps, num_stages, rows_per_program(, k_blocks)]}}`.

    `path` None: the table launches use, the bundled one with the table `NN_BLOCKSPARSE_TUNED_CONFIGS`
    names laid over it (module docstring); otherwise that file alone. Every entry is checked here:
    a bad one, or a `NN_BLOCKSPARSE_TUNED_CONFIGS` naming no file, is refused with a `ValueError`
    naming it, before anything is launched."""
    if path is not None:
        return read_tuned_table(Path(path))
    table = read_tuned_table(TUNED_TABLE_PATH)
    user = os.environ.get(TUNED_CONFIGS_ENV)
    if user:
        user_path = Path(user)
        if not user_path.is_file():
            raise ValueError(f"{TUNED_CONFIGS_ENV}={user!r:.200} names no file (a table written by "
                             "python -m benchmarks.tune_kernel --out FILE)")
        for arch, entries in read_tuned_table(user_path, f"{TUNED_CONFIGS_ENV}={user}").items():
            table[arch] = {**table.get(arch, {}), **entries}
    return table


# Row groups (rows_per_program > 1) widen the output tile to R * bs, which is what dense GEMMs do to
# re-read x less; they pay only where grouping pads little (`RowGroups.inflation`) and the grid
# keeps `PROGRAMS_PER_SM` programs per SM at the full tile. fp32 keeps one row per program: its
# register tiles are already at the spill limit (see `aot`).
MAX_GROUPING_INFLATION = 1.05
# Programs per SM the heuristic's M tiling aims for with one block per step: the best eagerly
# tuned H200 configs had 4-12 (each program walks its blocks one after another; more of them hide
# the load latency). Row groups must keep this many at their full tile: shrinking a row-group tile
# to get there was up to 2x slower than one block-row per program (graph-timed H200 tuning).
PROGRAMS_PER_SM = 4
# Small M (at most this many rows): one block-row per program takes deeper steps (`k_blocks`), on
# tiles of 32-64 rows with a grid of one wave. Under CUDA-graph timing on an H200 that family won
# 19 of the 20 M = 128 problems tuned, by up to 1.3x over one block per step and 1.1-3x over the
# 16-row tiles this heuristic chose before (`benchmarks/results/nvidia-h200/tune_cudagraph_nvidia-h200.csv`).
# At M = 512 the best configs all had 32-128-row tiles, k_blocks ones within 8% of the best: the
# one-block rule's 16-row tiles (for 4 programs per SM on 768-wide outputs) were 1.2-2.2x slower.
MAX_M_FOR_K_BLOCKS = 512
K_BLOCKS_BLOCK_M = (16, 32, 64)  # 16 only for M <= 16
K_BLOCKS_WARPS, K_BLOCKS_STAGES = 4, 3  # the launch of every k_blocks tile (x tiles sized for 4 warps)
# Split-K only while each split keeps this many loop steps: partial sums cost a second pass.
MIN_STEPS_PER_SPLIT = 2
K_BLOCKS_MIN_STEPS_PER_SPLIT = 4
# Deepest step (k_blocks x block size), and the largest gathered x tile (BLOCK_M x step depth) per
# warp count: past these the gathered pointer tiles spill on sm80 (the AOT check).
MAX_STEP_DEPTH = 128
MAX_X_TILE_BY_WARPS = {4: 64 * 64, 8: 128 * 64}
# A tuned entry stands in for M buckets at most this many octaves from its own (the table has
# entries at M 128, 512 and 2048: 8192 takes the 2048 ones, 32 the 128 ones, 16 none).
MAX_TUNED_M_OCTAVES = 2
MIN_M_FOR_ROW_GROUPS = 256
_MAX_TILE_AREA_16BIT = 128 * 128


def row_groups_considered(dtype: torch.dtype, m: int) -> bool:
    """Whether the heuristic may group block-rows for this launch (so whether their padding is worth computing)."""
    return dtype != torch.float32 and m >= MIN_M_FOR_ROW_GROUPS


def launch_tile_limit(dtype: torch.dtype, block_size: int, rows_per_program: int) -> int:
    """Largest BLOCK_M that compiles without spills for this dtype, block size and rows per program."""
    return _tile_launch(dtype, block_size, BLOCK_M_CHOICES[-1], rows_per_program)[0]


def k_blocks_for_tile(dtype: torch.dtype, block_size: int, block_m: int) -> int:
    """Blocks per step for a small-M tile of `block_m` rows: the most (up to 4, at most
    `MAX_STEP_DEPTH` deep) whose gathered x tile fits `K_BLOCKS_WARPS` warps; 1 for fp32 (not tuned)."""
    if dtype == torch.float32:
        return 1
    for k_blocks in (4, 2):
        if (k_blocks * block_size <= MAX_STEP_DEPTH
                and block_m * k_blocks * block_size <= MAX_X_TILE_BY_WARPS[K_BLOCKS_WARPS]):
            return k_blocks
    return 1


def _tile_launch(dtype: torch.dtype, block_size: int, block_m: int, rows_per_program: int) -> tuple[int, int, int]:
    """(block_m, num_warps, num_stages) for a tile of up to `block_m` rows and `rows_per_program` block-rows.

    The caps and warp counts are where `python -m nn_blocksparse.aot` showed spills: fp32 with
    64-wide blocks above 32 rows, fp16/bf16 128x128 tiles with 64-wide blocks (K step 64), fp32
    tiles >= 32x64 on 4 warps, fp16/bf16 128x128 tiles on 4 warps, fp16/bf16 128x64 row-group
    tiles on sm80 with 8 warps, and an oddly spilling tiny fp32 tile with 4 warps. Where both warp
    counts hold a 16-bit tile of 32x32 blocks, 4 won every problem tuned on an H200
    (`benchmarks/results/tune_*`).
    """
    if dtype == torch.float32:
        block_m = min(block_m, 32 if block_size == 64 else 128)
    else:
        # 64-wide blocks also double the K step, so their tiles get half the area (128x128 spills).
        max_area = _MAX_TILE_AREA_16BIT * 32 // max(block_size, 32)
        block_m = min(block_m, max(BLOCK_M_CHOICES[0], max_area // (rows_per_program * block_size)))
    tile = block_m * block_size * rows_per_program
    if dtype == torch.float32:
        num_warps = 2 if tile <= 32 * 16 else (8 if tile >= 32 * 64 else 4)
    elif block_size == 32 and tile <= 128 * 64:
        # Up to 128x64 with 32x32 blocks, 4 warps hold the tile without spilling on sm80 and sm90
        # (with 8, ptxas caps 128x64 row-group tiles at 128 registers and spills on sm80), and
        # they measured 1.1-1.5x faster than 8 on an H200. (16-wide blocks: 64x64 on 4 warps
        # spills on sm80.)
        num_warps = 4
    else:
        num_warps = 8 if tile >= 64 * 64 else 4
    num_stages = 2 if dtype == torch.float32 else 3
    return block_m, num_warps, num_stages


def _split_k(tiles: int, steps_per_row: float, min_steps_per_split: int, sm_count: int) -> int:
    """Split-K for a grid of `tiles` programs: doubled while the grid is under one wave and each
    split keeps at least `min_steps_per_split` of a row's `steps_per_row` loop steps."""
    split_k = 1
    while (split_k * 2 in SPLIT_K_CHOICES and tiles * split_k < sm_count
           and steps_per_row / (split_k * 2) >= min_steps_per_split):
        split_k *= 2
    return split_k


def heuristic_config(dtype: torch.dtype, block_size: int, m: int, n_block_rows: int, nnz_blocks: int,
                     sm_count: int = DEFAULT_SM_COUNT,
                     grouping_inflation: tuple[tuple[int, float], ...] = ()) -> KernelConfig:
    """A sound default where nothing was tuned (what the H200's graph-timed tuning taught).

    - Small M (at most `MAX_M_FOR_K_BLOCKS` rows), fp16/bf16: one block-row per program stepping
      several blocks at a time (`k_blocks_for_tile`) on 64-row tiles, split along K while the grid
      is under one wave and each split keeps 4 steps; 32-row tiles where even that grid stays under
      one wave (16 for M <= 16).
    - Otherwise BLOCK_M grows with M (up to 128) so each loaded weight block is reused by more
      rows, but shrinks (down to 16) until the grid has `PROGRAMS_PER_SM` programs per SM.
    - fp16/bf16 with M >= 256: the widest row group (R = 4, then 2) whose padding
      (`grouping_inflation`, `((R, inflation), ...)` from `BlockSparseMatrix.grouping_inflation`)
      is at most 5% and whose grid has `PROGRAMS_PER_SM` programs per SM at the full tile;
      otherwise one block-row per program.
    - When the grid still has fewer tiles than SMs (few block-rows), split each block-row's
      blocks over programs, but keep at least 2 steps per split so partial sums pay off.
    """
    wanted_block_m = min(max(16, m_bucket(m)), BLOCK_M_CHOICES[-1])
    blocks_per_row = nnz_blocks / max(n_block_rows, 1)
    rows_per_program = 1
    if row_groups_considered(dtype, m):
        for rows, inflation in sorted(grouping_inflation, reverse=True):
            if rows not in ROWS_PER_PROGRAM_CHOICES:
                continue  # WIDE_ROWS_PER_PROGRAM: not measured yet
            block_m = _tile_launch(dtype, block_size, wanted_block_m, rows)[0]
            programs = math.ceil(m / block_m) * math.ceil(n_block_rows / rows)
            if inflation <= MAX_GROUPING_INFLATION and programs >= PROGRAMS_PER_SM * sm_count:
                rows_per_program = rows
                break
    groups = max(math.ceil(n_block_rows / rows_per_program), 1)
    k_blocks = 1
    if rows_per_program == 1 and m <= MAX_M_FOR_K_BLOCKS and blocks_per_row >= 1.5:
        # The tallest tile that steps several blocks and whose grid, split along K where rows are
        # long, fills a wave; else 32 rows. (64-wide blocks step one block at a time on 64 rows.)
        block_m = min(wanted_block_m, K_BLOCKS_BLOCK_M[-1])
        while True:
            k_blocks = k_blocks_for_tile(dtype, block_size, block_m)
            tiles = math.ceil(m / block_m) * groups
            split_k = (_split_k(tiles, blocks_per_row / k_blocks, K_BLOCKS_MIN_STEPS_PER_SPLIT, sm_count)
                       if k_blocks > 1 else 1)
            if block_m <= K_BLOCKS_BLOCK_M[-2] or (k_blocks > 1 and tiles * split_k >= sm_count):
                break
            block_m //= 2
    if k_blocks > 1:
        num_warps, num_stages = K_BLOCKS_WARPS, K_BLOCKS_STAGES
    else:
        block_m, num_warps, num_stages = _tile_launch(dtype, block_size, wanted_block_m, rows_per_program)
        while block_m > BLOCK_M_CHOICES[0] and math.ceil(m / block_m) * groups < PROGRAMS_PER_SM * sm_count:
            block_m, num_warps, num_stages = _tile_launch(dtype, block_size, block_m // 2, rows_per_program)
        split_k = 1 if rows_per_program > 1 else _split_k(math.ceil(m / block_m) * groups, blocks_per_row,
                                                          MIN_STEPS_PER_SPLIT, sm_count)
    return KernelConfig(block_m=block_m, group_m=8, split_k=split_k, num_warps=num_warps, num_stages=num_stages,
                        rows_per_program=rows_per_program, k_blocks=k_blocks)


def tuned_config(arch: str, dtype: torch.dtype, block_size: int, n: int, k: int, m: int,
                 density: float) -> KernelConfig | None:
    """The table entry for this problem, or the nearest one of the same shape within
    `MAX_TUNED_M_OCTAVES` M buckets (ties to the larger M), or None.

    Ties go up because small-M entries carry small tiles: an H200 run whose look-up took the M=128
    entries (16-row tiles) for M=512 made 3072x768 at M=512 barely faster than at M=2048, with a
    quarter of the work."""
    entries = load_tuned_table().get(arch, {})
    if not entries:
        return None
    key = table_key(dtype, block_size, n, k, m, density)
    if key in entries:
        return KernelConfig.from_list(entries[key])
    wanted = _parse_key(key)
    same_shape = [(_parse_key(k_), v) for k_, v in entries.items() if _parse_key(k_)["prefix"] == wanted["prefix"]]
    if not same_shape:
        return None
    near = [(entry, values) for entry, values in same_shape
            if abs(math.log2(entry["m"]) - math.log2(wanted["m"])) <= MAX_TUNED_M_OCTAVES]
    if not near:
        return None
    best = min(
        near,
        key=lambda e: (abs(math.log2(e[0]["m"]) - math.log2(wanted["m"])), abs(e[0]["density"] - wanted["density"]),
                       -e[0]["m"]),
    )
    return KernelConfig.from_list(best[1])


def device_arch(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@lru_cache(maxsize=4096)  # called on every launch: keep table look-ups and device queries off the hot path
def select_config(dtype: torch.dtype, block_size: int, n: int, k: int, m: int, nnz_blocks: int,
                  device: torch.device, grouping_inflation: tuple[tuple[int, float], ...] = ()) -> KernelConfig:
    """The tuned configuration of this problem if there is one, else `heuristic_config`."""
    n_block_rows = n // block_size
    density = nnz_blocks / max(n_block_rows * (k // block_size), 1)
    config = tuned_config(device_arch(device), dtype, block_size, n, k, m, density)
    if config is not None:
        return config
    sm_count = (torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else DEFAULT_SM_COUNT)
    return heuristic_config(dtype, block_size, m, n_block_rows, nnz_blocks, sm_count, grouping_inflation)


# The other kernels' candidates (what the tuner tries and the AOT check compiles): fp32 accumulators
# of at most this many registers per thread (more spills with the A tile and addresses beside them),
# shared memory within what an H100/H200 block may take, ring depths and row-group sizes worth timing.
MAX_ACCUMULATOR_REGISTERS = 128
MAX_SWAPPED_ACCUMULATOR_REGISTERS = 64
MAX_SHARED_BYTES = 200 * 1024
VARIANT_DTYPES = (torch.float16, torch.bfloat16)
GLUON_CANDIDATE_ROWS = (4, 8)
GLUON_CANDIDATE_STAGES = (3, 4)
SWAPPED_CANDIDATE_STAGES = (3,)


def _gluon_shared_bytes(kernel: str, block_m: int, rows: int, block_size: int, stages: int) -> int:
    """Shared memory of a Gluon tile: ring stages of an x tile and R blocks each (16-bit elements), and the epilogue's."""
    ring = stages * (block_m * block_size + rows * block_size * block_size) * 2
    if kernel.startswith("gluon_member"):
        return ring + rows * block_m * block_size * 2  # the output tiles the TMA stores read
    return max(ring, rows * block_m * block_size * 4)  # the fp32 epilogue staging reuses the ring


def variant_candidate_configs(dtype: torch.dtype, block_size: int, arch: str | None = None) -> list[KernelConfig]:
    """The swapped kernel's candidates, and the Gluon kernels' too when `arch` is "sm90" (they run nowhere
    else); none for fp32. Tiles whose accumulators or shared memory exceed the limits above are left out."""
    if dtype not in VARIANT_DTYPES:
        return []
    configs = []
    for rows, block_t, stages in itertools.product(SWAPPED_ROWS_PER_PROGRAM_CHOICES, SWAPPED_BLOCK_T_CHOICES,
                                                   SWAPPED_CANDIDATE_STAGES):
        # Its pointer tensors take as many registers again as the accumulator and the operand tiles.
        # The AOT report under Triton 3.6 and 3.9: 4 warps hold one 64-row MMA (a [64, 128]
        # accumulator with [64, 32] and [32, 128] operands, 254 registers) but spill on 128 weight
        # rows or 64-wide blocks' [128, 64] operands; 8 warps hold up to 128 rows; 256 rows spill.
        # So: at most 128 weight rows, 8 warps past one 64-row MMA or a [64, 128] tile, and 64
        # accumulator registers per thread at most.
        weight_rows, tile = rows * block_size, rows * block_size * block_t
        num_warps = 4 if weight_rows <= 64 and tile <= 64 * 128 and block_size <= 32 else 8
        if weight_rows <= 128 and tile // (32 * num_warps) <= MAX_SWAPPED_ACCUMULATOR_REGISTERS:
            configs.append(KernelConfig(block_t, 8, 1, num_warps, stages, rows, kernel="triton_swapped"))
    if arch == "sm90":
        for kernel, rows, block_m, num_warps, stages in itertools.product(
                GLUON_KERNELS, GLUON_CANDIDATE_ROWS, GLUON_BLOCK_M_CHOICES, (4, 8), GLUON_CANDIDATE_STAGES):
            if (block_m < 16 * num_warps or block_m * rows * block_size // (32 * num_warps) > MAX_ACCUMULATOR_REGISTERS
                    or _gluon_shared_bytes(kernel, block_m, rows, block_size, stages) > MAX_SHARED_BYTES
                    or (kernel.startswith("gluon_wide") and rows * block_size > 256)):
                continue
            configs.append(KernelConfig(block_m, 8, 1, num_warps, stages, rows, kernel=kernel))
    return configs


def launchable_configs(dtype: torch.dtype, block_size: int, arch: str | None = None) -> list[KernelConfig]:
    """Every configuration `select_config` may return for this dtype and block size; given an `arch`
    ("sm80", "sm90": what the AOT check compiles for), also the other kernels' candidates
    (`variant_candidate_configs`: the swapped kernel's for both, the Gluon ones for sm90 only). Tuned
    Gluon entries count only for sm90, the one architecture they compile for."""
    configs = set(variant_candidate_configs(dtype, block_size, arch)) if arch is not None else set()
    for block_m, rows_per_program in itertools.product(BLOCK_M_CHOICES, ROWS_PER_PROGRAM_CHOICES + WIDE_ROWS_PER_PROGRAM):
        if rows_per_program > 1 and dtype == torch.float32:
            continue
        block_m, num_warps, num_stages = _tile_launch(dtype, block_size, block_m, rows_per_program)
        for split_k in SPLIT_K_CHOICES if rows_per_program == 1 else (1,):
            configs.add(KernelConfig(block_m, 8, split_k, num_warps, num_stages, rows_per_program))
    for block_m, split_k in itertools.product(K_BLOCKS_BLOCK_M, SPLIT_K_CHOICES):
        k_blocks = k_blocks_for_tile(dtype, block_size, block_m)
        if k_blocks > 1:
            configs.add(KernelConfig(block_m, 8, split_k, K_BLOCKS_WARPS, K_BLOCKS_STAGES, k_blocks=k_blocks))
    prefix = f"{DTYPE_NAMES[dtype]}/bs{block_size}/"
    for table_arch, entries in load_tuned_table().items():
        for key, values in entries.items():
            config = KernelConfig.from_list(values) if key.startswith(prefix) else None
            if config is not None and (not config.is_gluon or table_arch == arch == "sm90"):
                configs.add(config)
    return sorted(configs, key=lambda c: [str(v) for v in c.as_list()])
