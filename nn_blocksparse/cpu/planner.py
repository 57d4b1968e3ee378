"""Whether a block-sparse weight beats the dense linear on this CPU: this machine's calibrated profile.

A profile (written by `python -m nn_blocksparse.cpu.calibrate`) holds, for one CPU (its `cpu_model`
field is `isa.cpu_identity()`: model name and, on x86, family and model numbers), native ISA and
thread count, the measured speedup of the native kernel over the dense linear
(`dense.dense_linear_cpu`, oneDNN where torch has it) at a few block densities, per compute mode
and block size. The planner turns it into a decision by *efficiency*,
`speedup x density` (the kernel's rate on stored blocks over dense's rate), interpolated linearly
in density between the measured points and held constant above the densest; the predicted speedup
at density d is `efficiency(d) / d`. Below the sparsest measured density the speedup measured
there is assumed (no more: fixed costs weigh more as the work shrinks).

- Block-sparse is chosen where the predicted speedup is at least `REQUIRED_SPEEDUP` (1.1): a choice
  is never slower than dense unless the profile is off by more than that 10% margin.
- The decision is a threshold: block-sparse for every density up to `density_threshold(...)`, dense
  above it (the longest run of densities from 0 that all pass), so it is monotone in density.
- Without a profile for this machine: `DEFAULT_EFFICIENCY`, deliberately below every machine
  measured so far. Without the native kernel: never block-sparse (the pure-torch reference is
  slower than dense by construction).

The profile also says whether the dense linear should fuse GELU into oneDNN's epilogue
(`gelu_fusion`: per activation dtype, the time of the linear followed by `F.gelu` over the fused
one, measured at an FFN-in shape): fused where that ratio is above 1, else the two apart
(`fuse_dense_gelu`). oneDNN's GELU epilogue is not equally fast on every ISA, so this is measured
too; without a measurement the two run apart, whose cost is bounded by one pass over the output.

Compute modes (activations, weights): "fp32" (fp32, fp32), "bf16" (bf16, bf16) and "bf16_weights"
(fp32 activations, bf16 weights; the dense layers beside them keep bf16 weights too, so it is
measured against the dense linear on bf16 weights with fp32 activations).

The profile file is JSON (`PROFILE_FORMAT`), `<cache>/cpu_profile.json` by default
(`NN_BLOCKSPARSE_CPU_PROFILE` names another file); it may hold profiles of several machines, ISAs
and thread counts. The one matching this CPU model and ISA is used, at this thread count or else
the nearest one.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import DTYPE_NAMES
from .build import CACHE_ENV, cache_dir, native_isa, write_atomically
from .isa import ISAS, cpu_identity
from .launcher import MODE_DTYPES, NATIVE_BLOCK_SIZES

PROFILE_FORMAT = "nn_blocksparse.cpu_profile/1"
PROFILE_ENV = "NN_BLOCKSPARSE_CPU_PROFILE"
MODES = tuple(MODE_DTYPES)
BLOCK_SIZES = NATIVE_BLOCK_SIZES
REQUIRED_SPEEDUP = 1.1
# Kernel rate over dense rate assumed without a profile. The lowest measured so far is ~0.8 (fp32,
# AVX2 against MKL's AVX2 GEMM); the bf16 weights' modes are lower where dense bf16 runs oneDNN's
# AVX512_BF16 kernels.
DEFAULT_EFFICIENCY = {"fp32": 0.6, "bf16": 0.35, "bf16_weights": 0.35}
_THRESHOLD_STEP = 0.01
# The dense linear's (`dense.py`'s oneDNN) activation dtypes, kept here: dense imports the planner.
GELU_DTYPES = (torch.float32, torch.bfloat16)
GELU_NAMES = tuple(DTYPE_NAMES[dtype] for dtype in GELU_DTYPES)


def compute_mode(activation_dtype: torch.dtype, weight_dtype: torch.dtype) -> str | None:
    """The native kernel's mode for these dtypes, or None (the kernel does not run them)."""
    return next((mode for mode, dtypes in MODE_DTYPES.items() if dtypes == (activation_dtype, weight_dtype)), None)


@dataclass(frozen=True)
class Measurement:
    mode: str
    block_size: int
    density: float
    speedup: float  # dense time / block-sparse time, same shapes and run


@dataclass(frozen=True)
class Profile:
    cpu_model: str
    isa: str
    threads: int
    measurements: tuple[Measurement, ...]
    created: str = ""
    details: dict | None = None  # the calibration's raw timings, kept for reading, not used
    gelu_fusion: dict | None = None  # {"fp32" | "bf16": separate ms / fused ms}, see the module doc

    def efficiency_points(self, mode: str, block_size: int) -> list[tuple[float, float]]:
        """(density, speedup x density) measured for `mode` and `block_size`, ascending in density."""
        return sorted((m.density, m.speedup * m.density) for m in self.measurements
                      if m.mode == mode and m.block_size == block_size)

    def to_json(self) -> dict:
        return {"cpu_model": self.cpu_model, "isa": self.isa, "threads": self.threads, "created": self.created,
                "measurements": [{"mode": m.mode, "block_size": m.block_size, "density": m.density,
                                  "speedup": m.speedup} for m in self.measurements],
                **({"gelu_fusion": self.gelu_fusion} if self.gelu_fusion else {}),
                **({"details": self.details} if self.details else {})}


def _field(entry: dict, name: str, kind, where: str, check=lambda value: True, expected: str = ""):
    value = entry.get(name) if isinstance(entry, dict) else None
    valid = isinstance(value, kind) and not isinstance(value, bool) and check(value)
    if not valid:
        raise ValueError(f"{where}.{name} must be {expected or kind.__name__}, got {value!r}")
    return value


def profile_from_json(entry: dict, where: str = "profile") -> Profile:
    """A `Profile` from its JSON form; a `ValueError` naming the first bad field otherwise."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be an object, got {type(entry).__name__}")
    isa = _field(entry, "isa", str, where, lambda v: v in ISAS, f"one of {ISAS}")
    threads = _field(entry, "threads", int, where, lambda v: v >= 1, "an int >= 1")
    model = _field(entry, "cpu_model", str, where)
    raw = _field(entry, "measurements", list, where, lambda v: len(v) > 0, "a non-empty list")
    measurements = []
    for index, item in enumerate(raw):
        at = f"{where}.measurements[{index}]"
        finite = lambda v: math.isfinite(v)  # noqa: E731
        measurements.append(Measurement(
            _field(item, "mode", str, at, lambda v: v in MODES, f"one of {MODES}"),
            _field(item, "block_size", int, at, lambda v: v in BLOCK_SIZES, f"one of {BLOCK_SIZES}"),
            float(_field(item, "density", numbers.Real, at, lambda v: finite(v) and 0 < v <= 1, "a number in (0, 1]")),
            float(_field(item, "speedup", numbers.Real, at, lambda v: finite(v) and v > 0, "a finite number > 0")),
        ))
    gelu_fusion = entry.get("gelu_fusion")
    if gelu_fusion is not None:
        if not isinstance(gelu_fusion, dict) or not gelu_fusion:
            raise ValueError(f"{where}.gelu_fusion must be a non-empty object, got {gelu_fusion!r}")
        for name in gelu_fusion:
            if name not in GELU_NAMES:
                raise ValueError(f"{where}.gelu_fusion keys must be among {GELU_NAMES}, got {name!r}")
            _field(gelu_fusion, name, numbers.Real, f"{where}.gelu_fusion", lambda v: math.isfinite(v) and v > 0,
                   "a finite number > 0")
        gelu_fusion = {name: float(value) for name, value in gelu_fusion.items()}
    created = entry.get("created", "")
    details = entry.get("details")
    return Profile(model, isa, threads, tuple(measurements), created if isinstance(created, str) else "",
                   details if isinstance(details, dict) else None, gelu_fusion)


def profile_path() -> Path:
    configured = os.environ.get(PROFILE_ENV)
    return Path(configured) if configured else cache_dir() / "cpu_profile.json"


def read_profiles(path: Path) -> list[Profile]:
    """Every profile in a profile file ([] if it does not exist); `ValueError` naming what is wrong."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON profile file ({error})") from error
    if not isinstance(document, dict) or document.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: format must be {PROFILE_FORMAT!r}, got "
                         f"{document.get('format') if isinstance(document, dict) else type(document).__name__!r}")
    entries = document.get("profiles")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: profiles must be a list")
    return [profile_from_json(entry, f"{path.name}: profiles[{i}]") for i, entry in enumerate(entries)]


def write_profile(profile: Profile, path: Path | None = None) -> Path:
    """Add `profile` to the file (replacing the one of the same CPU identity, ISA and threads), atomically."""
    path = Path(path or profile_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        kept = [p for p in read_profiles(path) if (p.cpu_model, p.isa, p.threads) !=
                (profile.cpu_model, profile.isa, profile.threads)]
    except ValueError as error:
        warnings.warn(f"nn_blocksparse: replacing an unreadable profile file: {error}", RuntimeWarning, stacklevel=2)
        kept = []
    document = {"format": PROFILE_FORMAT, "profiles": [p.to_json() for p in [*kept, profile]]}
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(document, indent=1)))
    _fuse_here.cache_clear()
    return path


def matching_profile(profiles, model: str, isa: str | None, threads: int) -> Profile | None:
    """The profile of this CPU model and ISA at `threads`, else at the nearest thread count, else None."""
    candidates = [p for p in profiles if p.cpu_model == model and p.isa == isa]
    if not candidates:
        return None
    return min(candidates, key=lambda p: (abs(p.threads - threads), -p.threads))


@functools.lru_cache(maxsize=4)
def _profiles_at(path: str, modified_ns: int) -> tuple[Profile, ...]:
    try:
        return tuple(read_profiles(Path(path)))
    except ValueError as error:
        warnings.warn(f"nn_blocksparse: ignoring the CPU profile ({error}); using the default", RuntimeWarning,
                      stacklevel=4)
        return ()


def current_profile() -> Profile | None:
    """This machine's profile (CPU identity, native ISA in use, torch's thread count), or None."""
    path = profile_path()
    try:
        modified = path.stat().st_mtime_ns
    except OSError:
        return None
    return matching_profile(_profiles_at(str(path), modified), cpu_identity(), native_isa(), torch.get_num_threads())


_NO_PROFILE = object()


def _efficiency(mode: str, block_size: int, density: float, profile: Profile | None) -> float:
    points = profile.efficiency_points(mode, block_size) if profile is not None else []
    if not points:
        return DEFAULT_EFFICIENCY[mode]
    if density <= points[0][0]:
        return points[0][1] * density / points[0][0]  # the sparsest point's speedup
    for (d0, e0), (d1, e1) in zip(points, points[1:]):
        if density <= d1:
            return e0 + (e1 - e0) * (density - d0) / (d1 - d0)
    return points[-1][1]


def predicted_speedup(density: float, mode: str, block_size: int, profile: Profile | None) -> float:
    """Dense time over block-sparse time the profile predicts at `density` (> 0)."""
    return _efficiency(mode, block_size, density, profile) / density


def threshold_for(mode: str, block_size: int, profile: Profile | None) -> float:
    """The block density up to which `profile` (None: the defaults) predicts block-sparse to win.

    The largest density d such that every density in (0, d] (on a 0.01 grid) is predicted at least
    `REQUIRED_SPEEDUP` faster than dense; 0.0 if none is.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    threshold = 0.0
    for step in range(1, round(1 / _THRESHOLD_STEP) + 1):
        density = step * _THRESHOLD_STEP
        if predicted_speedup(density, mode, block_size, profile) < REQUIRED_SPEEDUP:
            break
        threshold = density
    return threshold


def density_threshold(weight_dtype: torch.dtype = torch.float32, activation_dtype: torch.dtype | None = None,
                      block_size: int = 32, profile: Profile | None = _NO_PROFILE) -> float:
    """The block density up to which block-sparse beats dense here (0.0: never; see the module doc).

    `activation_dtype` defaults to `weight_dtype`; `profile` defaults to this machine's (None: the
    default efficiencies). 0.0 where the native kernel does not run these dtypes in this process.
    """
    mode = compute_mode(activation_dtype or weight_dtype, weight_dtype)
    if mode is None or native_isa() is None:
        return 0.0
    return threshold_for(mode, block_size, current_profile() if profile is _NO_PROFILE else profile)


def use_block_sparse(density: float, weight_dtype: torch.dtype = torch.float32,
                     activation_dtype: torch.dtype | None = None, block_size: int = 32,
                     profile: Profile | None = _NO_PROFILE) -> bool:
    """Whether a weight of this block density should be block-sparse here (see `density_threshold`)."""
    threshold = density_threshold(weight_dtype, activation_dtype, block_size, profile)
    return threshold > 0.0 and density <= threshold


def fuse_dense_gelu(dtype: torch.dtype, profile: Profile | None = _NO_PROFILE) -> bool:
    """Whether the dense linear should fuse GELU into oneDNN's epilogue for `dtype` activations here:
    where `profile` (default: this machine's) measured the fused form faster (see the module doc).

    The dense linear asks on every call, so this machine's answer is kept per thread count and
    profile file (`write_profile` forgets it): finding and reading the profile costs more than a
    small GELU.
    """
    if profile is _NO_PROFILE:
        return _fuse_here(dtype, torch.get_num_threads(), os.environ.get(PROFILE_ENV), os.environ.get(CACHE_ENV))
    if profile is None or not profile.gelu_fusion:
        return False
    return profile.gelu_fusion.get(DTYPE_NAMES.get(dtype), 0.0) > 1.0


@functools.lru_cache(maxsize=16)
def _fuse_here(dtype: torch.dtype, threads: int, profile_env: str | None, cache_env: str | None) -> bool:
    return fuse_dense_gelu(dtype, current_profile())
