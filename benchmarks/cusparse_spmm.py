"""cuSPARSE's block-sparse SpMM (BSR and Blocked-ELL) for `y = x @ W^T`, through ctypes. GPU only.

    python -m benchmarks.cusparse_spmm --probe                 # a small product of each format, checked
    python -m benchmarks.cusparse_spmm --shapes 3072x768 --m 2048 --densities 1.0,0.5 [--rep-ms 5]

What reaches cuSPARSE's block-sparse SpMM from Python (read in their sources, torch 2.x and CuPy 14):

- torch: `F.linear` / `torch.addmm` with a `sparse_bsr` weight on CUDA reach `block_sparse_mm`
  (aten/src/ATen/native/sparse/cuda/SparseBlasImpl.cpp), which sends fp16, bf16 and fp32 to
  torch's own Triton kernels (`torch.sparse._triton_ops.bsr_dense_addmm`) and only float64 and
  complex to the legacy `cusparse<t>bsrmm`; the generic `cusparseSpMM` serves CSR there, not BSR.
  (`tools/gpu_diagnosis.py` records which kernels each dtype really launches.)
- CuPy: `cupyx.scipy.sparse` has no BSR matrix, and its cuSPARSE bindings
  (`cupy_backends.cuda.libs.cusparse`) have the generic SpMM with CSR/COO/CSC descriptors but no
  `cusparseCreateBsr`, `cusparseCreateBlockedEll` or `bsrmm`.

So for fp16 neither reaches it, and this module calls the library torch's CUDA build already loaded:
`cusparseCreateBsr` + `cusparseSpMM(CUSPARSE_SPMM_BSR_ALG1)`, and `cusparseCreateBlockedEll` +
`CUSPARSE_SPMM_BLOCKED_ELL_ALG1` (cuSPARSE's tensor-core block format: every block-row padded with
empty slots to the longest one's block count). fp16 operands, fp32 compute. x `[M, K]` row-major
is B = x^T column-major and the output `[M, N]` is C = W x^T column-major, so no copy is made.

A wrong ctypes call can crash a process rather than raise, so `probe()` runs a small checked
product of each format in a child process first; callers use a format only where it passed.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

# cuSPARSE / CUDA enum values (cusparse.h, library_types.h).
CUDA_R_16F, CUDA_R_32F, CUDA_R_16BF = 2, 0, 14
CUSPARSE_INDEX_32I = 2
CUSPARSE_INDEX_BASE_ZERO = 0
CUSPARSE_ORDER_COL, CUSPARSE_ORDER_ROW = 1, 2
CUSPARSE_OPERATION_NON_TRANSPOSE = 0
CUSPARSE_SPMM_BLOCKED_ELL_ALG1, CUSPARSE_SPMM_BSR_ALG1 = 13, 14
VALUE_TYPES = {torch.float16: CUDA_R_16F, torch.bfloat16: CUDA_R_16BF}
FORMATS = ("bsr", "blocked_ell")
PROBE_TIMEOUT_S = 120


class CusparseError(RuntimeError):
    pass


def _find_library_path() -> str:
    """The libcusparse this process already mapped (torch's CUDA build links it), else the wheels' copy."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1]
            if "libcusparse.so" in path and "Lt" not in Path(path).name:
                return path
    except OSError:
        pass
    for directory in sys.path:
        found = sorted(glob.glob(os.path.join(directory, "nvidia", "*", "lib", "libcusparse.so*")))
        if found:
            return found[-1]
    import ctypes.util

    name = ctypes.util.find_library("cusparse")
    if name is None:
        raise CusparseError("libcusparse not found (neither mapped by torch nor in an nvidia/*/lib wheel folder)")
    return name


@lru_cache(maxsize=1)
def _library():
    library = ctypes.CDLL(_find_library_path())
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "cusparseCreate": [ctypes.POINTER(ptr)],
        "cusparseSetStream": [ptr, ptr],
        "cusparseCreateBsr": [ctypes.POINTER(ptr), i64, i64, i64, i64, i64, ptr, ptr, ptr, i32, i32, i32, i32, i32],
        "cusparseCreateBlockedEll": [ctypes.POINTER(ptr), i64, i64, i64, i64, ptr, ptr, i32, i32, i32],
        "cusparseCreateDnMat": [ctypes.POINTER(ptr), i64, i64, i64, ptr, i32, i32],
        "cusparseSpMM_bufferSize": [ptr, i32, i32, ptr, ptr, ptr, ptr, ptr, i32, i32, ctypes.POINTER(ctypes.c_size_t)],
        "cusparseSpMM": [ptr, i32, i32, ptr, ptr, ptr, ptr, ptr, i32, i32, ptr],
        "cusparseDestroySpMat": [ptr],
        "cusparseDestroyDnMat": [ptr],
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    library.cusparseGetErrorString.argtypes = [ctypes.c_int]
    library.cusparseGetErrorString.restype = ctypes.c_char_p
    return library


def _check(status: int, what: str) -> None:
    if status != 0:
        message = _library().cusparseGetErrorString(status)
        raise CusparseError(f"{what}: status {status} ({message.decode() if message else 'unknown'})")


@lru_cache(maxsize=1)
def _handle() -> ctypes.c_void_p:
    handle = ctypes.c_void_p()
    _check(_library().cusparseCreate(ctypes.byref(handle)), "cusparseCreate")
    return handle


@dataclass
class CusparseSpmm:
    """`run()` computes `x @ W^T` into a fresh `[M, N]` tensor with cuSPARSE; the operands stay alive here."""

    format: str
    x: torch.Tensor
    out_features: int
    tensors: tuple  # device arrays the sparse descriptor points into
    sparse: ctypes.c_void_p
    padded_blocks: int  # blocks cuSPARSE multiplies (Blocked-ELL pads every block-row to the longest)

    def run(self) -> torch.Tensor:
        library = _library()
        m, k = self.x.shape
        out = torch.empty(m, self.out_features, dtype=self.x.dtype, device=self.x.device)
        dense_b, dense_c = ctypes.c_void_p(), ctypes.c_void_p()
        value_type = VALUE_TYPES[self.x.dtype]
        _check(library.cusparseCreateDnMat(ctypes.byref(dense_b), k, m, k, self.x.data_ptr(), value_type,
                                           CUSPARSE_ORDER_COL), "cusparseCreateDnMat(x)")
        _check(library.cusparseCreateDnMat(ctypes.byref(dense_c), self.out_features, m, self.out_features,
                                           out.data_ptr(), value_type, CUSPARSE_ORDER_COL), "cusparseCreateDnMat(y)")
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        algorithm = CUSPARSE_SPMM_BSR_ALG1 if self.format == "bsr" else CUSPARSE_SPMM_BLOCKED_ELL_ALG1
        args = (_handle(), CUSPARSE_OPERATION_NON_TRANSPOSE, CUSPARSE_OPERATION_NON_TRANSPOSE, ctypes.byref(alpha),
                self.sparse, dense_b, ctypes.byref(beta), dense_c, CUDA_R_32F, algorithm)
        try:
            _check(library.cusparseSetStream(_handle(), ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)),
                   "cusparseSetStream")
            size = ctypes.c_size_t()
            _check(library.cusparseSpMM_bufferSize(*args, ctypes.byref(size)), "cusparseSpMM_bufferSize")
            workspace = torch.empty(max(int(size.value), 1), dtype=torch.uint8, device=self.x.device)
            _check(library.cusparseSpMM(*args, ctypes.c_void_p(workspace.data_ptr())), "cusparseSpMM")
        finally:
            library.cusparseDestroyDnMat(dense_b)
            library.cusparseDestroyDnMat(dense_c)
        return out


def prepare(format_name: str, x: torch.Tensor, weight: torch.Tensor, block_size: int) -> CusparseSpmm:
    """Descriptors for `x @ weight^T` with `weight` (dense, zero blocks dropped) in `format_name`."""
    if format_name not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format_name!r}")
    if x.device.type != "cuda":
        raise CusparseError("cuSPARSE needs CUDA tensors")
    if x.dtype not in VALUE_TYPES or weight.dtype != x.dtype:
        raise CusparseError(f"fp16/bf16 only here, got x {x.dtype} and W {weight.dtype}")
    from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix

    library = _library()
    n, k = weight.shape
    matrix = BlockSparseMatrix.from_dense(weight, block_size)
    sparse = ctypes.c_void_p()
    value_type = VALUE_TYPES[x.dtype]
    if format_name == "bsr":
        tensors = (matrix.row_offsets.contiguous(), matrix.col_indices.contiguous(), matrix.values.contiguous())
        _check(library.cusparseCreateBsr(ctypes.byref(sparse), n // block_size, k // block_size, matrix.nnz_blocks,
                                         block_size, block_size, *(ctypes.c_void_p(t.data_ptr()) for t in tensors),
                                         CUSPARSE_INDEX_32I, CUSPARSE_INDEX_32I, CUSPARSE_INDEX_BASE_ZERO, value_type,
                                         CUSPARSE_ORDER_ROW), "cusparseCreateBsr")
        padded = matrix.nnz_blocks
    else:
        counts = (matrix.row_offsets[1:] - matrix.row_offsets[:-1]).tolist()
        slots = max(max(counts, default=0), 1)
        columns = torch.full((n // block_size, slots), -1, dtype=torch.int32)
        values = torch.zeros(n // block_size, block_size, slots, block_size, dtype=x.dtype)
        offsets, cols, blocks = matrix.row_offsets.tolist(), matrix.col_indices.cpu(), matrix.values.cpu()
        for row in range(n // block_size):
            for slot, index in enumerate(range(offsets[row], offsets[row + 1])):
                columns[row, slot] = cols[index]
                values[row, :, slot, :] = blocks[index]
        # ellValue: the [N, slots * bs] row-major array of each block-row's blocks side by side.
        tensors = (columns.to(x.device), values.reshape(n, slots * block_size).to(x.device))
        _check(library.cusparseCreateBlockedEll(ctypes.byref(sparse), n, k, block_size, slots * block_size,
                                                ctypes.c_void_p(tensors[0].data_ptr()),
                                                ctypes.c_void_p(tensors[1].data_ptr()), CUSPARSE_INDEX_32I,
                                                CUSPARSE_INDEX_BASE_ZERO, value_type), "cusparseCreateBlockedEll")
        padded = slots * (n // block_size)
    return CusparseSpmm(format_name, x, n, tensors, sparse, padded)


def _self_test() -> dict:
    """One small checked product per format (run in a child by `probe`)."""
    from nn_blocksparse.layouts import random_block_sparse_weight

    from .common import FP16_RELATIVE_TOLERANCE, error_note, relative_error

    device = torch.device("cuda")
    weight = random_block_sparse_weight(256, 192, 32, 0.5, seed=1, dtype=torch.float16, device=device)
    x = torch.randn(96, 192, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=torch.float16)
    reference = x.double() @ weight.double().T
    result = {}
    for name in FORMATS:
        try:
            error = relative_error(prepare(name, x, weight, 32).run(), reference)
            torch.cuda.synchronize()
            result[name] = "ok" if error <= FP16_RELATIVE_TOLERANCE else f"wrong result: relative error {error:.3g}"
        except Exception as failure:  # noqa: BLE001 - reported to the parent
            result[name] = error_note(failure, limit=200)
    return result


@lru_cache(maxsize=1)
def probe() -> dict:
    """`{format: "ok" or why not}`, from a small product in a child process (a crash there is a reason)."""
    if not torch.cuda.is_available():
        return {name: "needs a CUDA GPU" for name in FORMATS}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    try:
        result = subprocess.run([sys.executable, "-m", "benchmarks.cusparse_spmm", "--probe"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {name: f"probe timed out after {PROBE_TIMEOUT_S} s" for name in FORMATS}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        why = f"probe process exited with {result.returncode}: {' '.join(result.stderr.split())[-200:]}"
        return {name: why for name in FORMATS}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    from . import common

    parser = argparse.ArgumentParser(description="cuSPARSE block-sparse SpMM (BSR, Blocked-ELL) on random layouts")
    parser.add_argument("--probe", action="store_true", help="one small checked product per format; prints JSON")
    parser.add_argument("--shapes", default="768x768")
    parser.add_argument("--m", default="2048")
    parser.add_argument("--densities", default="1.0,0.5,0.36")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--rep-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("cusparse_spmm: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.probe:
        print(json.dumps(_self_test()), flush=True)
        return 0
    from nn_blocksparse.layouts import random_block_sparse_weight

    device = torch.device("cuda")
    for (n, k), m, density in ((common.parse_shape(s), m, d) for s in common.parse_list(args.shapes)
                               for m in common.parse_list(args.m, int) for d in common.parse_list(args.densities, float)):
        weight = random_block_sparse_weight(n, k, args.block_size, density, seed=args.seed, dtype=torch.float16,
                                            device=device)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(args.seed + 1)).to(device, torch.float16)
        reference = x.double() @ weight.double().T
        for name in FORMATS:
            row = {"shape": f"{n}x{k}", "m": m, "density": density, "format": name}
            try:
                product = prepare(name, x, weight, args.block_size)
                row["relative_error"] = common.relative_error(product.run(), reference)
                row["time_ms"] = common.time_ms(product.run, device, cuda_graph=True, cuda_rep_ms=args.rep_ms)
                row["padded_blocks"] = product.padded_blocks
            except Exception as failure:  # noqa: BLE001 - a row that says why
                row["error"] = common.error_note(failure, limit=200)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
