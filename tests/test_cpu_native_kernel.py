"""The native AVX-512 CPU kernel (`nn_blocksparse/kernels/cpu_block_sparse_linear.{cpp,py}`).

Its results through `cpu_kernels` (every layout, dtype and strategy) are checked in
`test_cpu_kernels.py`; here: the launcher itself against a float64 dense matmul (every tile
height, block size and thread count), its input checks, and how it is built, disabled and falls
back.  Tolerances (K <= 512, outputs O(1)): fp32 atol = rtol = 1e-4; bf16 (exact bf16 inputs, fp32
accumulation, y rounded once to bf16, 2^-8) atol = rtol = 1e-2.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from nn_blocksparse.kernels import cpu_block_sparse_linear as native
from nn_blocksparse.layouts import random_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}
# bf16 runs where the CPU has AVX512_BF16 (this project's machines do); fp32 wherever the kernel builds.
NATIVE_DTYPES = native.native_dtypes()


def _avx512_linux_with_compiler() -> bool:
    return (
        sys.platform.startswith("linux")
        and native._cpu_has_avx512f()
        and native._compiler() is not None
        and os.environ.get("NN_BLOCKSPARSE_NATIVE", "1") != "0"
    )


needs_native = pytest.mark.skipif(
    not native.native_available(), reason=f"native CPU kernel unavailable: {native.native_status()}"
)


def test_native_kernel_builds_where_it_should():
    # The machines this project runs on (and CI) have AVX-512 and g++: there the kernel must build,
    # or every "native" test would drop out of the other test files unnoticed.
    if not _avx512_linux_with_compiler():
        pytest.skip("not a Linux x86-64 machine with AVX-512 and a C++ compiler")
    assert native.native_status() == "ok"
    assert (torch.bfloat16 in native.native_dtypes()) == ("avx512_bf16" in native._cpu_flags())


def random_bsr(n, k, bs, density, seed, dtype=torch.float32):
    """(blocks packed for `dtype`, row_offsets, col_indices, dense float64 W) of a random layout."""
    generator = torch.Generator().manual_seed(seed)
    mask = random_layout(n // bs, k // bs, density, generator=generator)
    mask[1] = False  # an empty block-row: its outputs are the bias alone
    rows, cols = mask.nonzero(as_tuple=True)
    values = (torch.randn(len(rows), bs, bs, generator=generator) / k**0.5).to(dtype)
    row_offsets = torch.zeros(n // bs + 1, dtype=torch.int64)
    row_offsets[1:] = torch.cumsum(mask.sum(1), 0)
    dense = torch.zeros(n, k, dtype=torch.float64)
    for value, row, col in zip(values, rows.tolist(), cols.tolist()):
        dense[row * bs : (row + 1) * bs, col * bs : (col + 1) * bs] = value.double()
    return native.pack_blocks(values, dtype), row_offsets, cols.to(torch.int64), dense


def test_pack_blocks_layouts():
    values = torch.randn(3, 32, 32)  # [nnz, bs_out, bs_in]
    fp32 = native.pack_blocks(values, torch.float32)
    assert torch.equal(fp32[1, 5, 7], values[1, 7, 5])  # [b, input feature, output feature]
    bf16 = native.pack_blocks(values, torch.bfloat16)
    assert bf16.shape == (3, 16, 32, 2)
    assert torch.equal(bf16[2, 4, 9], values[2, 9, 8:10].bfloat16())  # [b, input pair, output feature, 2]
    with pytest.raises(ValueError, match="fp32 or bf16"):
        native.pack_blocks(values, torch.float16)


@needs_native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
@pytest.mark.parametrize("bs", native.NATIVE_BLOCK_SIZES)
def test_every_tile_height_and_chunk_end(bs, dtype):
    # The kernel runs tiles of 24 * 16 / bs rows and chunks of 8 tiles; every M up to two tiles
    # plus one exercises each tail height, and 8 tiles + 5 rows a chunk boundary.
    n, k = 3 * 64, 4 * 64
    blocks, row_offsets, col_indices, dense = random_bsr(n, k, bs, 0.5, seed=bs, dtype=dtype)
    rows_per_tile = 24 * 16 // bs
    for m in [*range(1, 2 * rows_per_tile + 2), 8 * rows_per_tile + 5]:
        x, bias = torch.randn(m, k).to(dtype), torch.randn(n)
        for b in (bias, None):
            y = native.native_block_sparse_linear(x, blocks, row_offsets, col_indices, b, n)
            assert y.dtype == dtype and y.shape == (m, n)
            expected = x.double() @ dense.T + (0 if b is None else b.double())
            torch.testing.assert_close(y.double(), expected, **TOLERANCES[dtype], msg=lambda msg: f"M={m}: {msg}")


@needs_native
@pytest.mark.parametrize("dtype", NATIVE_DTYPES)
def test_results_do_not_depend_on_the_thread_count(dtype):
    # Each output tile is summed by one thread in a fixed order: bit-identical for any thread count.
    n, k, bs = 256, 512, 32
    blocks, row_offsets, col_indices, _ = random_bsr(n, k, bs, 0.6, seed=1, dtype=dtype)
    x, bias = torch.randn(100, k).to(dtype), torch.randn(n)
    previous = torch.get_num_threads()
    outputs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(native.native_block_sparse_linear(x, blocks, row_offsets, col_indices, bias, n))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


@needs_native
def test_launcher_rejects_bad_input():
    n, k, bs = 64, 96, 32
    blocks_t, row_offsets, col_indices, _ = random_bsr(n, k, bs, 1.0, seed=2)
    x = torch.randn(5, k)
    call = native.native_block_sparse_linear
    with pytest.raises(ValueError, match="dtype"):
        call(x.double(), blocks_t, row_offsets, col_indices, None, n)
    with pytest.raises(ValueError, match="bs in"):
        call(x, torch.randn(3, 8, 8), row_offsets, col_indices, None, n)
    with pytest.raises(ValueError, match="contiguous torch.float32"):
        call(x, blocks_t.transpose(1, 2), row_offsets, col_indices, None, n)
    if torch.bfloat16 in NATIVE_DTYPES:  # fp32-packed blocks with bf16 x: the wrong layout
        with pytest.raises(ValueError, match="bs/2, bs, 2"):
            call(x.bfloat16(), blocks_t, row_offsets, col_indices, None, n)
    with pytest.raises(ValueError, match="row_offsets"):
        call(x, blocks_t, row_offsets.int(), col_indices, None, n)
    with pytest.raises(ValueError, match="col_indices"):
        call(x, blocks_t, row_offsets, col_indices[:-1], None, n)
    with pytest.raises(ValueError, match="bias"):
        call(x, blocks_t, row_offsets, col_indices, torch.randn(n + 1), n)
    with pytest.raises(ValueError, match="must divide"):
        call(torch.randn(5, k + 16), blocks_t, row_offsets, col_indices, None, n)
    assert call(torch.randn(0, k), blocks_t, row_offsets, col_indices, None, n).shape == (0, n)


@needs_native
def test_runs_on_torchs_own_openmp_runtime():
    # A second OpenMP runtime would bring a second thread team fighting torch's for the cores.
    with open("/proc/self/maps", encoding="utf-8") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300,
    )


# Checks, in a fresh process, that the CPU path still gives correct results without the native
# kernel, and which strategy it chose.
_FALLBACK_CHECK = """
    import warnings
    import torch
    from nn_blocksparse.cpu_kernels import build_cpu_plan, cpu_block_sparse_linear
    from nn_blocksparse.kernels.cpu_block_sparse_linear import native_status
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = native_status()
    print("STATUS", status)
    print("WARNED", any("native CPU kernel unavailable" in str(w.message) for w in caught))
    values = torch.randn(4, 32, 32)
    row_offsets = torch.tensor([0, 2, 2, 4])
    col_indices = torch.tensor([0, 2, 1, 2])
    plan = build_cpu_plan(values, row_offsets, col_indices, 96, 96, 32)
    print("STRATEGY", plan.strategy)
    dense = torch.zeros(96, 96)
    for i, (r, c) in enumerate([(0, 0), (0, 2), (2, 1), (2, 2)]):
        dense[32 * r : 32 * r + 32, 32 * c : 32 * c + 32] = values[i]
    x = torch.randn(7, 96)
    with torch.no_grad():
        torch.testing.assert_close(cpu_block_sparse_linear(x, plan), x @ dense.T, atol=1e-4, rtol=1e-4)
    try:
        build_cpu_plan(values, row_offsets, col_indices, 96, 96, 32, strategy="native")
    except ValueError as error:
        print("FORCED", error)
"""


def test_disabled_by_environment_falls_back_to_torch():
    result = _run_python(_FALLBACK_CHECK, NN_BLOCKSPARSE_NATIVE="0")
    assert result.returncode == 0, result.stderr
    assert "STATUS disabled by NN_BLOCKSPARSE_NATIVE=0" in result.stdout
    assert "WARNED False" in result.stdout  # asked for: no warning
    assert "STRATEGY native" not in result.stdout
    assert "FORCED strategy 'native' cannot run this plan: disabled by NN_BLOCKSPARSE_NATIVE=0" in result.stdout


def test_failed_build_warns_and_falls_back_to_torch(tmp_path):
    if not (sys.platform.startswith("linux") and native._cpu_has_avx512f()):
        pytest.skip("the build is only attempted on Linux x86-64 with AVX-512")
    failing = shutil.which("false")
    result = _run_python(_FALLBACK_CHECK, CXX=failing, NN_BLOCKSPARSE_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "STATUS could not build or load the native kernel" in result.stdout
    assert "WARNED True" in result.stdout  # an AVX-512 machine lost its fast path: say so
    assert "STRATEGY native" not in result.stdout


@needs_native
def test_build_is_cached(tmp_path):
    code = """
        import time
        from nn_blocksparse.kernels.cpu_block_sparse_linear import native_status
        start = time.perf_counter()
        print(native_status(), time.perf_counter() - start)
    """
    first = _run_python(code, NN_BLOCKSPARSE_CACHE_DIR=str(tmp_path))
    second = _run_python(code, NN_BLOCKSPARSE_CACHE_DIR=str(tmp_path))
    assert first.stdout.startswith("ok") and second.stdout.startswith("ok"), first.stderr + second.stderr
    assert len(list((tmp_path / "native").glob("*.so"))) == 1
