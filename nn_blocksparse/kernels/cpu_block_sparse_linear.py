"""Native CPU block-sparse linear: builds `cpu_block_sparse_linear.cpp` once, and its launcher.

The C++ kernel (AVX-512, fp32) is compiled on first use with the system C++ compiler into a
per-user cache, keyed by a hash of its source, flags and compiler, and loaded with ctypes: no
torch headers, no build step at install time, about a second to compile.  Where it cannot be
used (not Linux x86-64, no AVX-512, no compiler, `NN_BLOCKSPARSE_NATIVE=0`), `native_status()`
says why and callers keep to their pure-torch path.

Environment:
- `NN_BLOCKSPARSE_NATIVE=0` disables the native kernel (to compare, or to rule it out);
- `NN_BLOCKSPARSE_CACHE_DIR` moves the build cache (default `~/.cache/nn_blocksparse`);
- `CXX` names the compiler (default: the first of c++, g++, clang++ on PATH).

Like the Triton kernels beside it, this file knows nothing of `nn.Module`: it takes raw tensors.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

NATIVE_BLOCK_SIZES = (16, 32, 64)
_SOURCE = Path(__file__).with_name("cpu_block_sparse_linear.cpp")
_ABI_VERSION = 1
# -fopenmp: the library's parallel loop runs on torch's own libgomp (see the .cpp header).
_FLAGS = ("-O3", "-std=c++17", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC")

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_status: str | None = None  # "ok", or why the native kernel is not used


def _cpu_has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def _compiler() -> str | None:
    configured = os.environ.get("CXX")
    if configured:
        return shutil.which(configured) or configured
    return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)


def _cache_dir() -> Path:
    configured = os.environ.get("NN_BLOCKSPARSE_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "nn_blocksparse"


def _build(compiler: str) -> Path:
    """Compile the kernel into the cache (once per source/flags/compiler) and return its path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(_SOURCE.read_bytes() + repr((_FLAGS, version)).encode()).hexdigest()[:16]
    target = _cache_dir() / "native" / f"cpu_block_sparse_linear_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{compiler} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def _load() -> tuple[ctypes.CDLL | None, str]:
    if os.environ.get("NN_BLOCKSPARSE_NATIVE", "1") == "0":
        return None, "disabled by NN_BLOCKSPARSE_NATIVE=0"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return None, f"needs Linux on x86-64 (this is {sys.platform} on {platform.machine()})"
    if not _cpu_has_avx512f():
        return None, "this CPU has no AVX-512"
    compiler = _compiler()
    if compiler is None:
        return None, "no C++ compiler found (install g++ or set CXX)"
    try:
        library = ctypes.CDLL(str(_build(compiler)))
        if library.nnbs_abi_version() != _ABI_VERSION:
            return None, "the cached native library has another ABI version (clear the cache)"
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"could not build or load the native kernel: {error}"
    i64, pointer = ctypes.c_int64, ctypes.c_void_p
    function = library.nnbs_block_sparse_linear_f32
    function.restype = ctypes.c_int
    function.argtypes = [i64, i64, i64, pointer, i64, pointer, pointer, pointer, pointer, pointer, i64, i64]
    return library, "ok"


def native_status() -> str:
    """"ok" when the native kernel is usable, else why not (it is built on the first call)."""
    global _library, _status
    with _lock:
        if _status is None:
            _library, _status = _load()
            if _library is None and _status.startswith("could not"):
                # An AVX-512 CPU that should have had the fast path: say so once, loudly.
                warnings.warn(f"nn_blocksparse: native CPU kernel unavailable, using the slower torch path ({_status})",
                              stacklevel=2)
    return _status


def native_available() -> bool:
    return native_status() == "ok"


def native_block_sparse_linear(
    x2d: torch.Tensor,
    blocks_t: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """`x2d [M, K] @ W^T + bias` -> new `[M, N]` fp32 tensor, W given as transposed BSR blocks.

    `blocks_t[b]` is the b-th stored block (BSR order) transposed: `[bs_in, bs_out]`, fp32,
    contiguous; `row_offsets` / `col_indices` are int64 and must be valid BSR indices for
    `[out_features, K]` (they are not re-checked here: build them with the library).
    """
    if not native_available():
        raise RuntimeError(f"the native CPU kernel is not available: {native_status()}")
    if x2d.dim() != 2 or x2d.device.type != "cpu" or x2d.dtype != torch.float32:
        raise ValueError(f"x2d must be a 2-D fp32 CPU tensor, got {tuple(x2d.shape)} {x2d.dtype} on {x2d.device}")
    if blocks_t.dim() != 3 or blocks_t.shape[1] != blocks_t.shape[2] or blocks_t.shape[1] not in NATIVE_BLOCK_SIZES:
        raise ValueError(f"blocks_t must be [nnz, bs, bs] with bs in {NATIVE_BLOCK_SIZES}, got {tuple(blocks_t.shape)}")
    bs = blocks_t.shape[1]
    if blocks_t.dtype != torch.float32 or not blocks_t.is_contiguous():
        raise ValueError("blocks_t must be contiguous fp32")
    block_rows = out_features // bs
    if out_features % bs or x2d.shape[1] % bs:
        raise ValueError(f"block size {bs} must divide out_features {out_features} and K {x2d.shape[1]}")
    for name, index, length in (("row_offsets", row_offsets, block_rows + 1), ("col_indices", col_indices, blocks_t.shape[0])):
        if index.dtype != torch.int64 or not index.is_contiguous() or tuple(index.shape) != (length,):
            raise ValueError(f"{name} must be contiguous int64 of shape ({length},), got {index.dtype} {tuple(index.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"bias must be contiguous fp32 of shape ({out_features},)")
    if x2d.shape[0] and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m == 0:
        return y
    # ctypes drops the GIL for the call: other Python threads run while the kernel does.
    code = _library.nnbs_block_sparse_linear_f32(
        bs, m, block_rows, x2d.data_ptr(), x2d.stride(0), blocks_t.data_ptr(), row_offsets.data_ptr(),
        col_indices.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
        torch.get_num_threads(),
    )
    if code:
        raise RuntimeError(f"native block-sparse kernel rejected block size {bs}")
    return y
