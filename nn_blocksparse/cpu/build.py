"""Builds `block_sparse_linear.cpp` for one ISA into a per-user cache, checks it, and loads it.

The kernel is compiled on first use with the system C++ compiler (no torch headers, a few seconds)
into `<cache>/native/nnbs_<isa>_<key>.so`, `key` hashing the source, the flags, the compiler's
version and the ABI. Beside it, `<name>.json` records the key, the ISA and the SHA-256 of the
library. A cached library is loaded only when its record matches the key asked for and its bytes
match the recorded hash, so a truncated file, another ISA's build or an older ABI left under that
name is rebuilt, never loaded; and after loading, the library must report the same ABI, ISA and
key. Builds write to a temporary file and rename it into place, so processes building at once
never load a half-written library.

Trust: the cache directory must be owned by the user and writable by nobody else (it is created
with mode 0700); otherwise the native kernel is not used and `native_status()` says why, since
whoever can write there chooses the code this process runs.

Environment: `NN_BLOCKSPARSE_CACHE_DIR` moves the cache (default `~/.cache/nn_blocksparse`), `CXX`
names the compiler (default: the first of c++, g++, clang++ on PATH).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

from .isa import ARCHITECTURE, FORCED, ISAS, choose_isa, machine, runnable_isas

SOURCE = Path(__file__).with_name("block_sparse_linear.cpp")
HARNESS_SOURCE = Path(__file__).with_name("kernel_harness.cpp")
ABI_VERSION = 6  # the .cpp's NNBS_ABI_VERSION
# -fopenmp: the parallel loop runs on torch's own libgomp (see the .cpp header). -ffp-contract=off:
# every fused multiply-add is an explicit one, the same on every compiler. -fvisibility=hidden: each
# ISA's build keeps its code and scratch buffers to itself when several are loaded (the .cpp exports
# its entry points explicitly).
COMMON_FLAGS = ("-O3", "-std=gnu++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fvisibility=hidden")
ISA_FLAGS = {
    "amx_bf16": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-mamx-tile", "-mamx-bf16"),
    "avx512_bf16": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"),
    "avx512": ("-mavx512f", "-mavx512vl", "-mfma"),  # VL: 256-bit code (bs 16 bf16) may use all 32 registers
    "avx2": ("-mavx2", "-mfma"),
    "neon_bf16": ("-march=armv8.2-a+bf16",),
    "neon": ("-march=armv8-a",),
}
CACHE_ENV = "NN_BLOCKSPARSE_CACHE_DIR"
_RECORD_FORMAT = "nn_blocksparse.native_build/1"
CROSS_COMPILERS = {"aarch64": ("aarch64-linux-gnu-g++",), "x86_64": ("x86_64-linux-gnu-g++",)}


class NativeBuildError(RuntimeError):
    """The native kernel could not be built or loaded here (the message says why)."""


def cache_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "nn_blocksparse"


def compiler_for(isa: str) -> str | None:
    """The C++ compiler for `isa`: `CXX` or the system's for this machine's ISAs, a cross compiler otherwise."""
    if ARCHITECTURE[isa] == machine():
        configured = os.environ.get("CXX")
        if configured:
            return shutil.which(configured) or configured
        return next((found for name in ("c++", "g++", "clang++") if (found := shutil.which(name))), None)
    return next((found for name in CROSS_COMPILERS.get(ARCHITECTURE[isa], ()) if (found := shutil.which(name))), None)


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"cannot run the C++ compiler {compiler!r}: {error}") from error
    if result.returncode:
        raise NativeBuildError(f"{compiler} --version failed: {result.stderr.strip()[-500:]}")
    return result.stdout


def _flags(isa: str, key: str) -> list[str]:
    return [*COMMON_FLAGS, *ISA_FLAGS[isa], f'-DNNBS_ISA="{isa}"', f'-DNNBS_BUILD_KEY="{key}"']


def build_key(isa: str, compiler: str) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(repr((ABI_VERSION, isa, COMMON_FLAGS, ISA_FLAGS[isa], _compiler_version(compiler))).encode())
    return digest.hexdigest()[:16]


def _private_directory(path: Path) -> Path:
    """`path`, created 0700 if missing; refused when another user owns it or may write to it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(
            f"the native build cache {path} is not private (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)}): "
            f"whoever can write there chooses the code this process runs. Make it yours with mode 0700, or set "
            f"{CACHE_ENV} to a private directory")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record_path(library: Path) -> Path:
    return library.with_suffix(".json")


def _is_intact(library: Path, key: str, isa: str) -> bool:
    """Whether `library` is the build of `key` for `isa`, byte for byte, owned by this user (see module doc)."""
    try:
        record = json.loads(_record_path(library).read_text())
        info = library.stat()
        if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        return (isinstance(record, dict) and record.get("format") == _RECORD_FORMAT and record.get("key") == key
                and record.get("isa") == isa and record.get("sha256") == _sha256(library))
    except (OSError, ValueError):
        return False


def write_atomically(target: Path, write) -> None:
    """`write(temporary path)` in target's folder, then rename it onto `target`: readers never see half a file."""
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.close(descriptor)
        write(Path(temporary))
        os.chmod(temporary, 0o600 if target.suffix == ".json" else 0o700)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _compile(compiler: str, flags: list[str], source: Path, output: Path, extra: tuple[str, ...] = ()) -> None:
    command = [compiler, *flags, *extra, str(source), "-o", str(output)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as error:
        raise NativeBuildError(f"{compiler} could not run: {error}") from error
    if result.returncode:
        raise NativeBuildError(f"{' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}")


def build_library(isa: str, compiler: str | None = None, directory: Path | None = None) -> Path:
    """The path of an intact build of the kernel for `isa` in the cache, compiling it if needed.

    Builds for any ISA this machine's compilers target, runnable here or not (the tests compile
    every variant); loading is `load_library`'s job.
    """
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    compiler = compiler or compiler_for(isa)
    if compiler is None:
        raise NativeBuildError(f"no C++ compiler for {isa} found (install g++ or set CXX)")
    key = build_key(isa, compiler)
    directory = _private_directory(directory or cache_dir() / "native")
    library = directory / f"nnbs_{isa}_{key}.so"
    if _is_intact(library, key, isa):
        return library
    if library.exists():
        warnings.warn(f"nn_blocksparse: the cached native library {library} does not match its build record "
                      "(corrupt, foreign or from another build); rebuilding it", RuntimeWarning, stacklevel=2)
    write_atomically(library, lambda temporary: _compile(compiler, _flags(isa, key), SOURCE, temporary,
                                                          ("-shared", "-fPIC")))
    record = {"format": _RECORD_FORMAT, "key": key, "isa": isa, "sha256": _sha256(library)}
    write_atomically(_record_path(library), lambda temporary: temporary.write_text(json.dumps(record)))
    return library


def build_harness(isa: str, output: Path, compiler: str | None = None) -> Path:
    """Compile the kernel's C++ test harness for `isa` into the executable `output` (static on a cross build)."""
    compiler = compiler or compiler_for(isa)
    if compiler is None:
        raise NativeBuildError(f"no C++ compiler for {isa} found")
    static = ("-static",) if ARCHITECTURE[isa] != machine() else ()
    _compile(compiler, _flags(isa, "harness"), HARNESS_SOURCE, output, static)
    return output


_POINTER, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
_LINEAR_ARGUMENTS = [_I64, _I64, _I64, _I64, _POINTER, _I64, _I32, _POINTER, _I32, _I32, _POINTER, _POINTER, _POINTER,
                     _I32, _I32, _POINTER, _I64, _I32, _I32]
_ATTENTION_ARGUMENTS = [_I64, _I64, _I64, _I64, _POINTER, _POINTER, ctypes.c_float, _POINTER, _I32]
_ATTENTION_BF16_ARGUMENTS = [_I64, _I64, _I64, _I64, _POINTER, _I32, _POINTER, ctypes.c_float, _POINTER, _I32]
_ADD_LAYER_NORM_ARGUMENTS = [_I64, _I64, _POINTER, _I32, _POINTER, _I32, _POINTER, _POINTER, _I32, ctypes.c_float,
                             _POINTER, _I32, _I32]


@dataclass(frozen=True)
class NativeLibrary:
    """A loaded, checked build of the kernel: `linear` is `nnbs_block_sparse_linear`, `attention`
    `nnbs_attention`, `attention_bf16` `nnbs_attention_bf16`, `add_layer_norm` `nnbs_add_layer_norm`
    (see the .cpp)."""

    isa: str
    path: Path
    linear: object  # ctypes function; the call releases the GIL
    gelu: object
    attention: object  # nnbs_attention
    attention_bf16: object  # nnbs_attention_bf16 (runs in the amx_bf16 build only)
    add_layer_norm: object  # nnbs_add_layer_norm


def load_library(isa: str) -> NativeLibrary:
    """Build (if needed) and load the kernel for `isa`, which this CPU must run."""
    if isa not in runnable_isas():
        raise NativeBuildError(f"this CPU cannot run the {isa} build (runnable: {runnable_isas() or 'none'})")
    path = build_library(isa)
    try:
        handle = ctypes.CDLL(str(path))
        identity = (handle.nnbs_abi_version(), _text(handle.nnbs_isa), _text(handle.nnbs_build_key))
    except (OSError, AttributeError) as error:
        raise NativeBuildError(f"could not load {path}: {error}") from error
    expected = (ABI_VERSION, isa, path.stem.rsplit("_", 1)[-1])
    if identity != expected:
        raise NativeBuildError(f"{path} reports ABI/ISA/key {identity}, expected {expected}: delete it to rebuild")
    linear = handle.nnbs_block_sparse_linear
    linear.restype, linear.argtypes = ctypes.c_int, _LINEAR_ARGUMENTS
    gelu = handle.nnbs_gelu
    gelu.restype, gelu.argtypes = None, [_POINTER, _POINTER, _I64]
    attention = handle.nnbs_attention
    attention.restype, attention.argtypes = ctypes.c_int, _ATTENTION_ARGUMENTS
    attention_bf16 = handle.nnbs_attention_bf16
    attention_bf16.restype, attention_bf16.argtypes = ctypes.c_int, _ATTENTION_BF16_ARGUMENTS
    add_layer_norm = handle.nnbs_add_layer_norm
    add_layer_norm.restype, add_layer_norm.argtypes = ctypes.c_int, _ADD_LAYER_NORM_ARGUMENTS
    return NativeLibrary(isa, path, linear, gelu, attention, attention_bf16, add_layer_norm)


def _text(function) -> str:
    function.restype = ctypes.c_char_p
    return function().decode()


# ---------------------------------------------------------------------------------- this process's kernel
_lock = threading.RLock()
_loaded: dict[str, NativeLibrary] = {}  # at most one per ISA
_current: tuple[NativeLibrary | None, str] | None = None  # (library, status), decided once


def native_library() -> NativeLibrary | None:
    """The kernel this process runs (chosen and built on the first call, thread-safely), or None."""
    current = _current
    if current is None:
        current = _decide()
    return current[0]


def _decide() -> tuple[NativeLibrary | None, str]:
    global _current
    with _lock:
        if _current is None:
            isa, why = choose_isa()
            library, status = None, why
            # A variant that fails to build (a compiler without AMX, say) gives way to the next one
            # this CPU runs; a variant the environment forced gives way to none.
            candidates = () if why == FORCED else runnable_isas()
            if isa is None:
                fallbacks = []
            else:
                fallbacks = list(candidates[candidates.index(isa):]) if isa in candidates else [isa]
            failures = []
            for candidate in fallbacks:
                try:
                    library, status = library_for(candidate), "ok"
                    break
                except NativeBuildError as error:
                    failures.append(f"could not build or load the native kernel ({candidate}): {error}")
            if failures:
                instead = library.isa if library is not None else "the slow pure-torch reference"
                if library is None:
                    status = failures[-1]
                # A CPU that should have had a faster path: say so once, loudly.
                warnings.warn(f"nn_blocksparse: using {instead}: {'; '.join(failures)}", RuntimeWarning, stacklevel=3)
            _current = (library, status)
        return _current


def library_for(isa: str) -> NativeLibrary:
    """The loaded kernel for `isa` (tests run every variant the CPU runs); built and loaded once."""
    library = _loaded.get(isa)
    if library is None:
        with _lock:
            library = _loaded.get(isa)
            if library is None:
                library = _loaded[isa] = load_library(isa)
    return library


def native_status() -> str:
    """"ok" when the native kernel runs in this process, else why not."""
    return (_current or _decide())[1]


def native_isa() -> str | None:
    """The ISA of the native kernel in use (one of `isa.ISAS`: "amx_bf16", "avx512_bf16", ...), or None."""
    library = native_library()
    return None if library is None else library.isa
