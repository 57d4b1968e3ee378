"""Which instruction set the native CPU kernel runs: this CPU's features and `NN_BLOCKSPARSE_ISA`.

The kernel source compiles to one variant per ISA (`ISAS`, best first within each architecture):
`"amx_bf16"` (AVX-512 with bf16 on AMX tiles), `"avx512_bf16"` (AVX-512 with vdpbf16ps), `"avx512"`,
`"avx2"` (AVX2 + FMA) on x86-64, and
`"neon_bf16"` (BFDOT) and `"neon"` on aarch64. The best variant this CPU can run is chosen, read
from the kernel's view of the CPU (`/proc/cpuinfo`, Linux); `NN_BLOCKSPARSE_ISA` picks another:

- a lower variant the CPU runs (`NN_BLOCKSPARSE_ISA=avx2` on an AVX-512 machine), to test or compare;
- `none`: no native kernel (the pure-torch reference), like `NN_BLOCKSPARSE_NATIVE=0`;
- a variant the CPU lacks, or an unknown name: a warning, and the best variant the CPU runs instead
  (never an illegal instruction).
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys
import warnings

ISAS = ("amx_bf16", "avx512_bf16", "avx512", "avx2", "neon_bf16", "neon")
ARCHITECTURE = {"amx_bf16": "x86_64", "avx512_bf16": "x86_64", "avx512": "x86_64", "avx2": "x86_64",
                "neon_bf16": "aarch64", "neon": "aarch64"}
# CPU features (as /proc/cpuinfo names them) each variant's instructions need.
REQUIRED_FEATURES = {
    "amx_bf16": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma", "amx_tile", "amx_bf16"}),
    "avx512_bf16": frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma"}),
    "avx512": frozenset({"avx512f", "avx512vl", "fma"}),
    "avx2": frozenset({"avx2", "fma"}),
    "neon_bf16": frozenset({"asimd", "bf16"}),
    "neon": frozenset({"asimd"}),
}
ISA_ENV = "NN_BLOCKSPARSE_ISA"
FORCED = f"forced by {ISA_ENV}"  # choose_isa's reason when the environment's variant runs
NATIVE_ENV = "NN_BLOCKSPARSE_NATIVE"


def machine() -> str:
    """"x86_64", "aarch64", or what `platform.machine()` says."""
    name = platform.machine().lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(name, name)


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[tuple[str, str], ...]:
    """The (key, value) lines of the first processor in /proc/cpuinfo, or () where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            lines = []
            for line in cpuinfo:
                if not line.strip():
                    if lines:
                        break
                    continue
                key, _, value = line.partition(":")
                lines.append((key.strip().lower(), value.strip()))
            return tuple(lines)
    except OSError:
        return ()


def cpu_features() -> frozenset[str]:
    """Instruction-set features of this CPU: the x86 "flags" or ARM "Features" line of /proc/cpuinfo."""
    for key, value in _cpuinfo():
        if key in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    """This CPU's model name (x86 "model name"; ARM implementer and part numbers), for profiles and CSVs."""
    fields = dict(_cpuinfo())
    if fields.get("model name"):
        return fields["model name"]
    if "cpu implementer" in fields:
        return f"arm {fields['cpu implementer']} part {fields.get('cpu part', '?')}"
    return platform.processor() or machine() or "unknown CPU"


def cpu_identity() -> str:
    """What tells CPUs apart in a calibrated profile: the model name and, on x86, the family and model
    numbers (a virtual machine may name every generation alike, e.g. "AMD EPYC" on Zen 1 and Zen 4)."""
    fields = dict(_cpuinfo())
    if fields.get("cpu family") and fields.get("model"):
        return f"{cpu_model()} (family {fields['cpu family']} model {fields['model']})"
    return cpu_model()


@functools.lru_cache(maxsize=1)
def os_grants_tiles() -> bool:
    """Whether Linux lets this process use AMX's tile registers, which it grants only on request
    (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked once; the grant is the process's)."""
    if machine() != "x86_64" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0  # SYS_arch_prctl on x86-64, ARCH_REQ_XCOMP_PERM, XTILEDATA
    except (OSError, AttributeError):
        return False


def missing_for(isa: str) -> list[str]:
    """What this machine lacks to run `isa` (CPU features, or the OS's grant of AMX tiles); [] if nothing."""
    if not sys.platform.startswith("linux"):
        return ["Linux"]
    missing = sorted(REQUIRED_FEATURES[isa] - cpu_features())
    if not missing and "amx_tile" in REQUIRED_FEATURES[isa] and not os_grants_tiles():
        missing = ["the OS's grant of AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM; Linux 5.16 or later)"]
    return missing


def runnable_isas() -> tuple[str, ...]:
    """The variants this CPU runs, best first (Linux only: features come from /proc/cpuinfo)."""
    if not sys.platform.startswith("linux"):
        return ()
    arch = machine()
    return tuple(isa for isa in ISAS if ARCHITECTURE[isa] == arch and not missing_for(isa))


def choose_isa() -> tuple[str | None, str]:
    """(the variant to run or None, why): the environment's choice where the CPU runs it, else the best.

    The environment is read first: a process that turns the kernel off, or forces a variant it
    runs, never asks Linux for AMX's tile state (a grant it keeps for good, and that enlarges every
    signal frame).
    """
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None, f"disabled by {NATIVE_ENV}=0"
    requested = os.environ.get(ISA_ENV, "").strip().lower()
    if requested == "none":
        return None, f"disabled by {ISA_ENV}=none"
    if requested in ("", "auto"):
        runnable = runnable_isas()
        if runnable:
            return runnable[0], "the best this CPU runs"
        return None, f"no native variant for this CPU ({machine()}; the kernel needs AVX2 + FMA or NEON)"
    if requested not in ISAS:
        problem = f"{ISA_ENV}={requested!r} is not one of {ISAS + ('none', 'auto')}"
    elif ARCHITECTURE[requested] != machine():
        problem = f"{ISA_ENV}={requested} needs an {ARCHITECTURE[requested]} CPU; this one lacks it (it is {machine()})"
    elif missing := missing_for(requested):
        problem = f"{ISA_ENV}={requested} needs what this machine lacks ({', '.join(missing)})"
    else:
        return requested, FORCED
    runnable = runnable_isas()
    best = runnable[0] if runnable else None
    instead = best or "the pure-torch reference"
    warnings.warn(f"nn_blocksparse: {problem}; using {instead} instead", RuntimeWarning, stacklevel=3)
    return best, f"{problem}; using {instead}"
