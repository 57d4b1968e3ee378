"""The CPU block-sparse linear (`nn_blocksparse/cpu/`): every path against a float64 dense reference.

Paths: the native kernel built for every ISA this CPU runs (`ours_<isa>`; AVX2 on an AVX2 machine,
AVX2 and AVX-512 on an AVX-512 one: the same source at two vector widths), and the pure-torch
reference. Modes: fp32; bf16 (x, W and y bf16); bf16 weights with fp32 x and y. Layouts: random
with an empty block-row, dense, all-zero, block-rows long enough to be walked in segments; block
sizes 16/32/64; every tile-height tail and a chunk boundary in M; bias or not; GELU or not. The kernel's build, ISA choice and fallbacks are in
test_cpu_build.py, the ARM variants under qemu there too.

Tolerances, relative to the output's scale (helpers.RELATIVE_TOLERANCE): fp32 1e-5; bf16 8e-3 (the
output's rounding); bf16 weights with fp32 output 1e-5 against a reference that multiplies the
same bf16-rounded x and W (the rounding of x is the mode's definition, not an error).
"""

from __future__ import annotations


import pytest
import torch

from helpers import assert_close_to_reference, dense_reference, run_python
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse import BlockSparseLinear, BlockSparseMatrix
from nn_blocksparse.cpu import block_sparse_linear_cpu, native_isa
from nn_blocksparse.cpu.build import library_for
from nn_blocksparse.cpu.isa import runnable_isas
from nn_blocksparse.cpu.launcher import TRANSPOSED_BLOCKS, native_block_sparse_linear, transpose_blocks
from nn_blocksparse.cpu.reference import block_sparse_linear_reference

PATHS = (*runnable_isas(), "reference")
MODES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
         "bf16_weights": (torch.float32, torch.bfloat16)}  # (x, values)
# Every tail height of the tallest tile (6 rows) and past a chunk of 8 tiles of 3 and of 6 rows.
ROWS = (1, 2, 3, 4, 5, 6, 7, 13, 25, 50)


def run_path(path: str, x, matrix: BlockSparseMatrix, bias, activation):
    arguments = (x, matrix.values, matrix.row_offsets, matrix.col_indices, bias, activation)
    if path == "reference":
        return block_sparse_linear_reference(*arguments)
    return native_block_sparse_linear(library_for(path), *arguments)


def expected_output(x, matrix, bias, activation):
    # The operands the kernel multiplies: x rounded to the weights' dtype where they are bf16.
    return dense_reference(x.to(matrix.dtype), matrix.to_dense(), bias, activation)


def check(path, mode, matrix, rows, bias, activation, seed=0):
    x_dtype, _ = MODES[mode]
    x = torch.randn(rows, matrix.shape[1], generator=torch.Generator().manual_seed(seed)).to(x_dtype)
    y = run_path(path, x, matrix, bias, activation)
    assert y.shape == (rows, matrix.shape[0]) and y.dtype == x_dtype and y.is_contiguous()
    assert_close_to_reference(y, expected_output(x, matrix, bias, activation), x_dtype)
    return y


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("path", PATHS)
def test_every_path_mode_block_size_and_tail(path, mode, block_size):
    _, weight_dtype = MODES[mode]
    n, k = 3 * 64, 4 * 64
    weight = random_block_sparse_weight(n, k, block_size, 0.5, seed=block_size, empty_block_rows=(1,))
    matrix = BlockSparseMatrix.from_dense(weight.to(weight_dtype), block_size)
    bias = torch.randn(n).to(weight_dtype)
    for index, rows in enumerate(ROWS):
        check(path, mode, matrix, rows, bias if index % 2 else None, "gelu" if index % 3 else None, seed=index)
    dense = BlockSparseMatrix.from_dense(random_block_sparse_weight(n, k, block_size, 1.0, seed=1).to(weight_dtype),
                                         block_size)
    check(path, mode, dense, 9, bias, "gelu")
    # Block-rows long enough (K = 6144) to be walked in several segments.
    long_rows = BlockSparseMatrix.from_dense(
        random_block_sparse_weight(64, 6144, block_size, 0.8, seed=2).to(weight_dtype), block_size)
    check(path, mode, long_rows, 7, torch.randn(64).to(weight_dtype), "gelu")
    empty = BlockSparseMatrix.from_dense(torch.zeros(n, k, dtype=weight_dtype), block_size)
    assert empty.nnz_blocks == 0
    y = check(path, mode, empty, 9, bias, None)
    torch.testing.assert_close(y, bias.to(y.dtype).expand(9, n))
    assert torch.count_nonzero(check(path, mode, empty, 9, None, "gelu")) == 0


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("path", PATHS)
def test_widths_that_are_not_a_whole_tile_step_and_no_width_at_all(path, mode):
    # K = 48 at 16x16 blocks: 24 (k, k+1) pairs, a tile step and a half (the AMX kernel repacks x in
    # groups of 16 pairs); K = 0: no input features, the product is the bias.
    _, weight_dtype = MODES[mode]
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(64, 48, 16, 0.7, seed=5).to(weight_dtype), 16)
    check(path, mode, matrix, 37, torch.randn(64).to(weight_dtype), "gelu")
    empty = BlockSparseMatrix.from_dense(torch.zeros(64, 0, dtype=weight_dtype), 16)
    bias = torch.randn(64).to(weight_dtype)
    torch.testing.assert_close(check(path, mode, empty, 5, bias, None), bias.to(MODES[mode][0]).expand(5, 64))


def test_no_input_features_as_a_fresh_process_s_first_call():
    # Each build's scratch buffers are its own and start empty: K = 0 must not read an empty one as a
    # failed allocation (bf16 on AMX sizes its scratch by K).

    result = run_python("""
        import torch
        from nn_blocksparse import BlockSparseMatrix
        from nn_blocksparse.cpu.build import library_for
        from nn_blocksparse.cpu.isa import runnable_isas
        from nn_blocksparse.cpu.launcher import native_block_sparse_linear
        for isa in runnable_isas():
            # bf16 first: the fp32 path allocates scratch. (x, weights): bf16, bf16 weights with fp32 x, fp32.
            for x_dtype, dtype in ((torch.bfloat16,) * 2, (torch.float32, torch.bfloat16), (torch.float32,) * 2):
                matrix = BlockSparseMatrix.from_dense(torch.zeros(64, 0, dtype=dtype), 16)
                bias = torch.randn(64).to(dtype)
                y = native_block_sparse_linear(library_for(isa), torch.randn(5, 0).to(x_dtype), matrix.values,
                                               matrix.row_offsets, matrix.col_indices, bias, None)
                assert torch.equal(y, bias.to(x_dtype).expand(5, 64)), (isa, x_dtype, dtype)
        print("ok", len(runnable_isas()))
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def test_gelu_is_exact_to_fp32_rounding():
    # The epilogue's GELU (erf form) on a sweep, against torch's exact GELU in float64: absolute
    # error within 2.5e-7 * max(1, |v|) (torch's own fp32 GELU: up to 1.6e-7 * max(1, |v|)).
    import ctypes

    v = torch.cat([torch.linspace(-12, 12, 200_001), torch.tensor([-40.0, -13.5, 0.0, 40.0, float("inf"), -float("inf")])])
    expected = torch.nn.functional.gelu(v.double())
    for isa in runnable_isas():
        out = torch.empty_like(v)
        library_for(isa).gelu(ctypes.c_void_p(v.data_ptr()), ctypes.c_void_p(out.data_ptr()), v.numel())
        finite = torch.isfinite(v)
        error = (out.double() - expected).abs()[finite]
        bound = 2.5e-7 * v.double().abs().clamp(min=1)[finite]
        assert (error <= bound).all(), f"{isa}: worst {(error / bound).max().item():.2f}x the bound"
        # inf -> inf, -inf -> NaN (0 * inf), as torch's GELU in float64 (its vectorised fp32 GELU gives NaN
        # for inf too on some CPUs, e.g. with AVX-512).
        torch.testing.assert_close(out[~finite].double(), expected[~finite], equal_nan=True)
        nan = torch.tensor([float("nan")] * 4)
        library_for(isa).gelu(ctypes.c_void_p(nan.data_ptr()), ctypes.c_void_p(out.data_ptr()), 4)
        assert torch.isnan(out[:4]).all()


@pytest.mark.parametrize("mode", list(MODES))
def test_bit_identical_for_any_thread_count(mode):
    x_dtype, weight_dtype = MODES[mode]
    n, k, bs = 256, 512, 32
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(n, k, bs, 0.6, seed=1).to(weight_dtype), bs)
    x, bias = torch.randn(100, k).to(x_dtype), torch.randn(n).to(weight_dtype)
    previous = torch.get_num_threads()
    try:
        for path in PATHS[:-1]:
            outputs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outputs.append(run_path(path, x, matrix, bias, "gelu"))
            assert all(torch.equal(outputs[0], other) for other in outputs[1:]), path
    finally:
        torch.set_num_threads(previous)


def test_python_threads_serving_one_layer_agree_bit_for_bit():
    # Several Python threads calling the same BlockSparseLinear (the path this process picked, and
    # the reference directly) give exactly the single-threaded outputs.
    from concurrent.futures import ThreadPoolExecutor

    layer = BlockSparseLinear.from_dense(random_block_sparse_weight(256, 384, 32, 0.4, seed=3), torch.randn(256),
                                         activation="gelu")
    matrix = layer.matrix
    inputs = [torch.randn(m, 384, generator=torch.Generator().manual_seed(m)) for m in (1, 7, 64, 130) * 3]
    with torch.inference_mode():
        alone = [layer(x) for x in inputs]
        alone_reference = [block_sparse_linear_reference(x, matrix.values, matrix.row_offsets, matrix.col_indices,
                                                         layer.bias, "gelu") for x in inputs]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(layer, inputs))
            together_reference = list(pool.map(lambda x: block_sparse_linear_reference(
                x, matrix.values, matrix.row_offsets, matrix.col_indices, layer.bias, "gelu"), inputs))
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert all(torch.equal(a, b) for a, b in zip(alone_reference, together_reference))


@pytest.mark.skipif("amx_bf16" not in runnable_isas(), reason="needs a CPU with AMX tiles that Linux grants")
def test_amx_kernel_and_torchs_amx_gemm_take_turns_on_the_same_threads():
    # Both load tile configurations into the same OpenMP threads (oneDNN's bf16 GEMM runs on AMX
    # here): each must load its own, never compute with what the other left configured.
    generator = torch.Generator().manual_seed(4)
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(192, 256, 32, 0.5, seed=4).to(torch.bfloat16), 32)
    x = torch.randn(70, 256, generator=generator).to(torch.bfloat16)
    weight = torch.randn(48, 80, generator=generator).to(torch.bfloat16)
    other = torch.randn(33, 80, generator=generator).to(torch.bfloat16)
    expected = expected_output(x, matrix, None, None)
    for _ in range(3):
        assert_close_to_reference(run_path("amx_bf16", x, matrix, None, None), expected, torch.bfloat16)
        assert_close_to_reference(torch.nn.functional.linear(other, weight), other.double() @ weight.double().T,
                                  torch.bfloat16)


@pytest.mark.skipif("amx_bf16" not in runnable_isas(), reason="needs a CPU with AMX tiles that Linux grants")
def test_amx_kernel_takes_a_batch_larger_than_the_scratch_it_keeps():
    # x^T above 64 MiB is allocated for the call alone, not kept in the calling thread's scratch.
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(32, 768, 32, 0.5, seed=6).to(torch.bfloat16), 32)
    x = torch.randn(44_000, 768, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    assert x.numel() * 2 > 64 << 20
    y = run_path("amx_bf16", x, matrix, None, None)
    assert_close_to_reference(y, expected_output(x, matrix, None, None), torch.bfloat16)


@pytest.mark.parametrize("mode", list(MODES))
def test_non_finite_x_reaches_only_the_rows_whose_blocks_read_it(mode):
    x_dtype, weight_dtype = MODES[mode]
    n, k, bs = 256, 256, 32
    weight = random_block_sparse_weight(n, k, bs, 0.4, seed=12)
    blocks = weight.view(n // bs, bs, k // bs, bs)
    blocks[:, :, 3] = 0
    blocks[::2, :, 3] = torch.randn(n // bs // 2, bs, bs)
    matrix = BlockSparseMatrix.from_dense(weight.to(weight_dtype), bs)
    x = torch.randn(40, k).to(x_dtype)
    x[:, 3 * bs + 5] = float("inf")
    for path in PATHS[:-1]:
        y = run_path(path, x, matrix, torch.randn(n).to(weight_dtype), None).view(40, n // bs, bs)
        assert torch.isfinite(y[:, 1::2]).all() and not torch.isfinite(y[:, 0::2]).any(), path


def test_entry_point_checks_what_keeps_the_kernel_in_bounds():
    n, k, bs = 64, 96, 32
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(n, k, bs, 1.0, seed=2), bs)
    x = torch.randn(5, k)
    good = (x, matrix.values, matrix.row_offsets, matrix.col_indices, None, None)

    def call(**changes):
        names = ("x2d", "values", "row_offsets", "col_indices", "bias", "activation")
        arguments = dict(zip(names, good)) | changes
        return block_sparse_linear_cpu(*(arguments[name] for name in names))

    with pytest.raises(ValueError, match="2-D"):
        call(x2d=x[None])
    with pytest.raises(ValueError, match="must divide K"):
        call(x2d=torch.randn(5, k + 16))
    with pytest.raises(ValueError, match="block size"):
        call(values=torch.randn(3, 8, 8), col_indices=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="row_offsets must be a 1-D int32"):
        call(row_offsets=matrix.row_offsets.long())
    with pytest.raises(TypeError, match="col_indices must be a 1-D int32"):
        call(col_indices=matrix.col_indices.long())
    with pytest.raises(ValueError, match="one entry per block"):
        call(col_indices=matrix.col_indices[:-1])
    with pytest.raises(ValueError, match="bias must have shape"):
        call(bias=torch.randn(n + 1))
    with pytest.raises(ValueError, match="activation"):
        call(activation="relu")
    with pytest.raises(TypeError, match="floating point"):
        call(x2d=x.int())
    if native_isa() is not None:
        with pytest.raises(ValueError, match="unit stride"):
            call(x2d=torch.randn(k, 5).t())
        with pytest.raises(ValueError, match="contiguous"):
            call(values=matrix.values.transpose(1, 2))
    assert call(x2d=torch.randn(0, k)).shape == (0, n)
    # fp16 (and any other dtype pair) runs the reference, in fp32, rounded once.
    y = call(x2d=x.half(), values=matrix.values.half())
    assert y.dtype == torch.float16
    assert_close_to_reference(y, dense_reference(x.half(), matrix.to_dense().half()), torch.float16)


def test_runs_on_torchs_own_openmp_runtime():
    # A second OpenMP runtime would bring a second thread team fighting torch's for the cores.
    if native_isa() is None:
        pytest.skip("no native kernel in this process: nothing loaded to check")
    with open("/proc/self/maps", encoding="utf-8") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_first_use_from_many_threads_is_safe_in_a_fresh_process(tmp_path):
    # The native kernel is chosen and built on first use: threads racing to it all get it, once.
    result = run_python("""
        import threading, torch
        from nn_blocksparse import BlockSparseMatrix
        from nn_blocksparse.cpu import block_sparse_linear_cpu, native_isa
        matrix = BlockSparseMatrix.from_dense(torch.randn(64, 96), 32)
        x = torch.randn(9, 96)
        barrier, outputs = threading.Barrier(6), [None] * 6
        def work(i):
            barrier.wait()
            outputs[i] = block_sparse_linear_cpu(x, matrix.values, matrix.row_offsets, matrix.col_indices, None, None)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
        [t.start() for t in threads]; [t.join() for t in threads]
        assert all(torch.equal(outputs[0], y) for y in outputs)
        torch.testing.assert_close(outputs[0].double(), x.double() @ matrix.to_dense().double().T, atol=1e-4, rtol=1e-4)
        print("ISA", native_isa())
    """, NN_BLOCKSPARSE_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr
    built = list((tmp_path / "native").glob("*.so")) if (tmp_path / "native").exists() else []
    assert len(built) == (0 if "ISA None" in result.stdout else 1)


def test_negated_views_are_read_as_their_values():
    # A view with torch's negative bit set holds -x in memory: the native paths read its values.
    weight = random_block_sparse_weight(64, 96, 32, 0.6, seed=5)
    layer = BlockSparseLinear.from_dense(weight, torch.randn(64), block_size=32)
    x = torch.randn(7, 96)
    negated = torch._neg_view(x)
    assert negated.is_neg() and negated.is_contiguous()
    with torch.inference_mode():
        assert_close_to_reference(layer(negated), dense_reference(-x, weight, layer.bias, None), torch.float32)
        matrix = layer.matrix
        y = block_sparse_linear_cpu(negated, torch._neg_view(matrix.values), matrix.row_offsets, matrix.col_indices,
                                    None)
        assert_close_to_reference(y, dense_reference(-x, -weight, None, None), torch.float32)
        # Index tensors too: their memory would be negative offsets and columns, read out of bounds.
        row_offsets, col_indices = torch._neg_view(-matrix.row_offsets), torch._neg_view(-matrix.col_indices)
        assert row_offsets.is_neg() and torch.equal(row_offsets, matrix.row_offsets)
        y = block_sparse_linear_cpu(x, matrix.values, row_offsets, col_indices, None)
        assert_close_to_reference(y, dense_reference(x, weight, None, None), torch.float32)
        twisted = BlockSparseMatrix(matrix.values, row_offsets, col_indices, matrix.row_order, matrix.shape,
                                    matrix.block_size)
        from nn_blocksparse import block_sparse_linear
        assert_close_to_reference(block_sparse_linear(x, twisted), dense_reference(x, weight, None, None),
                                  torch.float32)


@pytest.mark.parametrize("path", PATHS[:-1])
def test_blocks_given_transposed_give_the_stored_layouts_bits(path):
    # values_layout 1 (what BlockSparseLinear(prepack=True) keeps): the same FMA chains in the same
    # order, so the same bits, at every block size, tail, and M past several of its row chunks.
    library = library_for(path)
    for block_size in (16, 32, 64):
        weight = random_block_sparse_weight(3 * 64, 4 * 64, block_size, 0.5, seed=block_size, empty_block_rows=(1,))
        matrix = BlockSparseMatrix.from_dense(weight, block_size)
        transposed = transpose_blocks(matrix.values)
        assert torch.equal(transposed[0], matrix.values[0].t())
        bias = torch.randn(weight.shape[0])
        for index, rows in enumerate((1, 7, 13, 97, 301)):
            x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(index))
            activation = "gelu" if index % 2 else None
            arguments = (matrix.row_offsets, matrix.col_indices, bias, activation)
            stored = native_block_sparse_linear(library, x, matrix.values, *arguments)
            given = native_block_sparse_linear(library, x, transposed, *arguments, layout=TRANSPOSED_BLOCKS)
            assert torch.equal(stored, given), (path, block_size, rows)
            assert_close_to_reference(given, expected_output(x, matrix, bias, activation), torch.float32)
    # fp32 only: the bf16 kernels read their blocks as stored.
    bf16 = matrix.to(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="unsupported values layout"):
        native_block_sparse_linear(library, x.bfloat16(), bf16.values, bf16.row_offsets, bf16.col_indices, None,
                                   None, layout=TRANSPOSED_BLOCKS)
