"""Native CPU block-sparse linear: builds `cpu_block_sparse_linear.cpp` once, and its launcher.

The C++ kernel (AVX-512: fp32, and bf16 on CPUs with AVX512_BF16) is compiled on first use with the system C++ compiler into a
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
import functools
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


@functools.lru_cache(maxsize=None)  # read once: the launcher asks on every call
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _cpu_has_avx512f() -> bool:
    return "avx512f" in _cpu_flags()


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
    for function in (library.nnbs_block_sparse_linear_f32, library.nnbs_block_sparse_linear_bf16):
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


def native_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes the native kernel computes in here: fp32, and bf16 where the CPU has AVX512_BF16."""
    if not native_available():
        return ()
    return (torch.float32, torch.bfloat16) if "avx512_bf16" in _cpu_flags() else (torch.float32,)


def pack_blocks(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """BSR blocks `[nnz, bs_out, bs_in]` in the kernel's layout for `dtype`.

    fp32: each block transposed, `[nnz, bs_in, bs_out]` (a row: bs outputs of one input feature).
    bf16: `[nnz, bs_in / 2, bs_out, 2]`, input features in pairs (what vdpbf16ps multiplies).
    """
    if dtype == torch.float32:
        return values.to(torch.float32).transpose(1, 2).contiguous()
    if dtype == torch.bfloat16:
        nnz, bs_out, bs_in = values.shape
        pairs = values.to(torch.bfloat16).reshape(nnz, bs_out, bs_in // 2, 2)
        return pairs.permute(0, 2, 1, 3).contiguous()
    raise ValueError(f"the native kernel computes in fp32 or bf16, not {dtype}")


def native_block_sparse_linear(
    x2d: torch.Tensor,
    blocks: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """`x2d [M, K] @ W^T + bias` -> new `[M, N]` tensor in x2d's dtype (fp32 or bf16).

    `blocks` are W's stored blocks in BSR order, laid out by `pack_blocks` for x2d's dtype; `bias`
    is fp32; `row_offsets` / `col_indices` are int64 and must be valid BSR indices for
    `[out_features, K]` (they are not re-checked here: build them with the library).  bf16
    accumulates in fp32 and rounds y once.
    """
    if not native_available():
        raise RuntimeError(f"the native CPU kernel is not available: {native_status()}")
    if x2d.dim() != 2 or x2d.device.type != "cpu" or x2d.dtype not in native_dtypes():
        raise ValueError(f"x2d must be a 2-D CPU tensor of dtype {native_dtypes()}, got {tuple(x2d.shape)} "
                         f"{x2d.dtype} on {x2d.device}")
    bf16 = x2d.dtype == torch.bfloat16
    bs = blocks.shape[2] if blocks.dim() >= 3 else None
    expected = (bs // 2, bs, 2) if bf16 else (bs, bs)
    if bs not in NATIVE_BLOCK_SIZES or tuple(blocks.shape[1:]) != expected:
        raise ValueError(f"blocks must be [nnz, {'bs/2, bs, 2' if bf16 else 'bs, bs'}] (pack_blocks) with bs in "
                         f"{NATIVE_BLOCK_SIZES}, got {tuple(blocks.shape)}")
    if blocks.dtype != x2d.dtype or not blocks.is_contiguous():
        raise ValueError(f"blocks must be contiguous {x2d.dtype}, like x2d")
    block_rows = out_features // bs
    if out_features % bs or x2d.shape[1] % bs:
        raise ValueError(f"block size {bs} must divide out_features {out_features} and K {x2d.shape[1]}")
    for name, index, length in (("row_offsets", row_offsets, block_rows + 1), ("col_indices", col_indices, blocks.shape[0])):
        if index.dtype != torch.int64 or not index.is_contiguous() or tuple(index.shape) != (length,):
            raise ValueError(f"{name} must be contiguous int64 of shape ({length},), got {index.dtype} {tuple(index.shape)}")
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous() or tuple(bias.shape) != (out_features,)):
        raise ValueError(f"bias must be contiguous fp32 of shape ({out_features},)")
    if x2d.shape[0] and x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    m = x2d.shape[0]
    y = torch.empty(m, out_features, dtype=x2d.dtype)
    if m == 0:
        return y
    kernel = _library.nnbs_block_sparse_linear_bf16 if bf16 else _library.nnbs_block_sparse_linear_f32
    # ctypes drops the GIL for the call: other Python threads run while the kernel does.
    code = kernel(
        bs, m, block_rows, x2d.data_ptr(), x2d.stride(0), blocks.data_ptr(), row_offsets.data_ptr(),
        col_indices.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(), out_features,
        torch.get_num_threads(),
    )
    if code:
        raise RuntimeError(f"native block-sparse kernel rejected block size {bs}")
    return y
