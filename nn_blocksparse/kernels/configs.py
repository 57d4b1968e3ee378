"""Launch configurations of the block-sparse kernels: the tuned table and the fallback heuristic.

Like torch's `_triton_ops_meta.py`, measured best configurations live in a table committed
with the package (`tuned_configs.json`, written by `benchmarks/tune_kernel.py` on a GPU), keyed by
GPU architecture, dtype, block size, weight shape, number of rows M and block density. A
problem missing from the table takes the nearest tuned entry of the same architecture, dtype,
block size and shape (nearest M, then nearest density), and failing that a heuristic.

Every configuration this module can return is listed by `launchable_configs`, so
`python -m nn_blocksparse.aot` can compile all of them ahead of time and prove none spills.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

TUNED_TABLE_PATH = Path(__file__).with_name("tuned_configs.json")

BLOCK_M_CHOICES = (16, 32, 64, 128)
SPLIT_K_CHOICES = (1, 2, 4, 8)
GROUP_M_CHOICES = (8,)
# SMs of the GPUs the heuristic is written for (A100: 108, H100 SXM: 132); the interpreter has none.
DEFAULT_SM_COUNT = 108


@dataclass(frozen=True)
class KernelConfig:
    block_m: int = 64
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        if self.block_m not in BLOCK_M_CHOICES:
            raise ValueError(f"block_m must be one of {BLOCK_M_CHOICES}, got {self.block_m}")
        if self.split_k not in SPLIT_K_CHOICES:
            raise ValueError(f"split_k must be one of {SPLIT_K_CHOICES}, got {self.split_k}")
        if self.group_m < 1 or self.num_warps not in (1, 2, 4, 8) or self.num_stages < 1:
            raise ValueError(f"invalid launch configuration {self}")

    def as_list(self) -> list[int]:
        return [self.block_m, self.group_m, self.split_k, self.num_warps, self.num_stages]

    @classmethod
    def from_list(cls, values) -> "KernelConfig":
        return cls(*[int(v) for v in values])


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def m_bucket(m: int) -> int:
    """Next power of two, at least 16: tuned entries are keyed by bucket, not by exact M."""
    return max(16, 1 << max(0, math.ceil(math.log2(max(m, 1)))))


def density_bucket(density: float) -> float:
    return round(min(max(density, 0.0), 1.0) * 20) / 20  # steps of 0.05


def table_key(dtype: torch.dtype, block_size: int, n: int, k: int, m: int, density: float) -> str:
    return f"{DTYPE_NAMES[dtype]}/bs{block_size}/n{n}/k{k}/m{m_bucket(m)}/d{density_bucket(density):.2f}"


def _parse_key(key: str) -> dict:
    dtype, bs, n, k, m, d = key.split("/")
    return {"prefix": "/".join((dtype, bs, n, k)), "m": int(m[1:]), "density": float(d[1:])}


@lru_cache(maxsize=1)
def load_tuned_table(path: str = str(TUNED_TABLE_PATH)) -> dict:
    """`{arch: {key: [block_m, group_m, split_k, num_warps, num_stages]}}`; empty if no table."""
    p = Path(path)
    if not p.exists():
        return {}
    return json.loads(p.read_text()).get("configs", {})


def heuristic_config(dtype: torch.dtype, block_size: int, m: int, n_block_rows: int, nnz_blocks: int,
                     sm_count: int = DEFAULT_SM_COUNT) -> KernelConfig:
    """A sound default where nothing was tuned.

    - BLOCK_M grows with M (up to 128) so each loaded weight block is reused by more rows;
      with 64-wide blocks in fp32 it stops at 64 to keep the accumulator in registers.
    - When the grid has fewer tiles than SMs (batch 1 x seq 128), split each block-row's
      blocks over programs, but keep at least 2 blocks per split so partial sums pay off.
    """
    # fp32 runs on CUDA cores (or tf32 MMA) with much larger register tiles than fp16/bf16:
    # past these sizes ptxas spills (see `python -m nn_blocksparse.aot`).
    limit = 32 if (block_size == 64 and dtype == torch.float32) else 128
    block_m = min(max(16, m_bucket(m)), limit)
    tiles = math.ceil(m / block_m) * max(n_block_rows, 1)
    blocks_per_row = nnz_blocks / max(n_block_rows, 1)
    split_k = 1
    while (split_k * 2 in SPLIT_K_CHOICES and tiles * split_k < sm_count
           and blocks_per_row / (split_k * 2) >= 2):
        split_k *= 2
    # Warps by tile area; the thresholds are where `aot` showed spills (fp32 >= 32x64 on sm80,
    # fp16/bf16 64x64 on sm90 with 4 warps) or an oddly spilling tiny fp32 tile with 4 warps.
    tile = block_m * block_size
    if dtype == torch.float32:
        num_warps = 2 if tile <= 32 * 16 else (8 if tile >= 32 * 64 else 4)
    else:
        num_warps = 8 if tile >= 64 * 64 else 4
    num_stages = 2 if dtype == torch.float32 else 3
    return KernelConfig(block_m=block_m, group_m=8, split_k=split_k, num_warps=num_warps, num_stages=num_stages)


def tuned_config(arch: str, dtype: torch.dtype, block_size: int, n: int, k: int, m: int,
                 density: float) -> KernelConfig | None:
    """The table entry for this problem, or the nearest one of the same shape, or None."""
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
    best = min(
        same_shape,
        key=lambda e: (abs(math.log2(e[0]["m"]) - math.log2(wanted["m"])), abs(e[0]["density"] - wanted["density"])),
    )
    return KernelConfig.from_list(best[1])


def device_arch(device: torch.device) -> str:
    if device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@lru_cache(maxsize=4096)  # called on every launch: keep table look-ups and device queries off the hot path
def select_config(dtype: torch.dtype, block_size: int, n: int, k: int, m: int, nnz_blocks: int,
                  device: torch.device) -> KernelConfig:
    n_block_rows = n // block_size
    density = nnz_blocks / max(n_block_rows * (k // block_size), 1)
    config = tuned_config(device_arch(device), dtype, block_size, n, k, m, density)
    if config is not None:
        return config
    sm_count = (torch.cuda.get_device_properties(device).multi_processor_count
                if device.type == "cuda" else DEFAULT_SM_COUNT)
    return heuristic_config(dtype, block_size, m, n_block_rows, nnz_blocks, sm_count)


def launchable_configs(dtype: torch.dtype, block_size: int) -> list[KernelConfig]:
    """Every configuration `select_config` may return for this dtype and block size."""
    configs = set()
    for m in BLOCK_M_CHOICES:
        for split_k in SPLIT_K_CHOICES:
            base = heuristic_config(dtype, block_size, m, 1, 0)
            configs.add(KernelConfig(base.block_m, base.group_m, split_k, base.num_warps, base.num_stages))
    prefix = f"{DTYPE_NAMES[dtype]}/bs{block_size}/"
    for entries in load_tuned_table().values():
        for key, values in entries.items():
            if key.startswith(prefix):
                configs.add(KernelConfig.from_list(values))
    return sorted(configs, key=lambda c: c.as_list())


def config_dict(config: KernelConfig) -> dict:
    return asdict(config)
