"""The Triton kernel against a dense float64 reference: on the GPU, or under the interpreter on CPU."""

import pytest
import torch

from helpers import assert_close_to_reference, dense_reference, requires_cuda
from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
from nn_blocksparse.functional import block_sparse_linear
from nn_blocksparse.kernels import block_sparse_linear as launch_kernel
from nn_blocksparse.kernels.configs import KernelConfig, launchable_configs
from nn_blocksparse.layouts import random_block_sparse_weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_case(device, n, k, block_size, density, m, dtype, seed=0, empty_block_rows=()):
    weight = random_block_sparse_weight(n, k, block_size, density, seed, dtype, empty_block_rows=empty_block_rows).to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=generator).to(dtype).to(device)
    bias = torch.randn(n, generator=generator).to(dtype).to(device)
    return x, weight, bias


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_layouts_every_density_and_dtype(kernel_device, density, dtype):
    x, weight, bias = make_case(kernel_device, 96, 128, 32, density, 37, dtype, seed=int(density * 100))
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    y = block_sparse_linear(x, matrix, bias, backend="triton")
    assert y.dtype == dtype and y.device == x.device
    assert_close_to_reference(y, dense_reference(x, weight, bias), dtype)


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("m", [1, 7, 129])
def test_block_sizes_and_odd_m(kernel_device, block_size, m):
    x, weight, bias = make_case(kernel_device, 128, 192, block_size, 0.5, m, torch.float16, seed=m)
    y = block_sparse_linear(x, BlockSparseMatrix.from_dense(weight, block_size), bias, backend="triton")
    assert_close_to_reference(y, dense_reference(x, weight, bias), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_fused_epilogue_and_split_k(kernel_device, dtype, activation, split_k):
    # Empty block-rows included: their outputs are bias (+GELU) only, in both code paths.
    x, weight, bias = make_case(kernel_device, 128, 256, 32, 0.6, 33, dtype, seed=7, empty_block_rows=(0, 2))
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    config = KernelConfig(block_m=16, split_k=split_k, num_warps=4, num_stages=2)
    y = block_sparse_linear(x, matrix, bias, activation, backend="triton", config=config)
    assert_close_to_reference(y, dense_reference(x, weight, bias, activation), dtype)
    y_no_bias = block_sparse_linear(x, matrix, None, activation, backend="triton", config=config)
    assert_close_to_reference(y_no_bias, dense_reference(x, weight, None, activation), dtype)


def structured_weight(device, dtype, n_block_rows=6, k=256, block_size=32, seed=0):
    """Pairs of block-rows with the same column pattern (as inside a pruned head), the last pair empty."""
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(n_block_rows // 2, k // block_size, generator=generator) < 0.5
    keep = keep.repeat_interleave(2, 0)
    keep[-2:] = False
    mask = keep.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    weight = torch.randn(n_block_rows * block_size, k, generator=generator) / k**0.5
    return (weight * mask).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows_per_program", [2, 4])
@pytest.mark.parametrize("layout", ["random", "structured"])
def test_row_groups_match_dense(kernel_device, dtype, rows_per_program, layout):
    """Several block-rows per program: padded members, padded steps, a partial last group, GELU."""
    if layout == "random":
        # 5 block-rows: the last group is partial for R = 2 and 4; block-row 1 is empty.
        x, weight, bias = make_case(kernel_device, 160, 192, 32, 0.5, 37, dtype, seed=11, empty_block_rows=(1,))
    else:
        x, _, bias = make_case(kernel_device, 192, 256, 32, 1.0, 37, dtype, seed=12)
        weight = structured_weight(kernel_device, dtype)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    if layout == "structured":
        assert dict(matrix.grouping_inflation())[2] == 1.0
    config = KernelConfig(block_m=16, num_warps=4, num_stages=2, rows_per_program=rows_per_program)
    y = block_sparse_linear(x, matrix, bias, "gelu", backend="triton", config=config)
    assert_close_to_reference(y, dense_reference(x, weight, bias, "gelu"), dtype)
    y_no_bias = block_sparse_linear(x, matrix, None, None, backend="triton", config=config)
    assert_close_to_reference(y_no_bias, dense_reference(x, weight), dtype)


@pytest.mark.parametrize("block_size", [16, 64])
def test_row_groups_with_split_k_and_other_block_sizes(kernel_device, block_size):
    x, weight, bias = make_case(kernel_device, 256, 256, block_size, 0.6, 21, torch.float16, seed=block_size)
    matrix = BlockSparseMatrix.from_dense(weight, block_size)
    config = KernelConfig(block_m=16, split_k=2, num_warps=4, num_stages=2, rows_per_program=2)
    y = block_sparse_linear(x, matrix, bias, "gelu", backend="triton", config=config)
    assert_close_to_reference(y, dense_reference(x, weight, bias, "gelu"), torch.float16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_blocks", [2, 4])
@pytest.mark.parametrize("split_k", [1, 2])
def test_several_blocks_per_step_match_dense(kernel_device, dtype, k_blocks, split_k):
    """k_blocks stored blocks per loop step: block-rows of 0..7 blocks, so partial last steps, empty
    rows and splits without a full step all occur; bias + GELU (fused, or in the split-K reduction)."""
    x, weight, bias = make_case(kernel_device, 224, 256, 32, 0.55, 19, dtype, seed=5, empty_block_rows=(2,))
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    counts = (matrix.row_offsets[1:] - matrix.row_offsets[:-1]).tolist()
    assert 0 in counts and any(c % k_blocks for c in counts)
    config = KernelConfig(block_m=16, split_k=split_k, num_warps=4, num_stages=2, k_blocks=k_blocks)
    y = block_sparse_linear(x, matrix, bias, "gelu", backend="triton", config=config)
    assert_close_to_reference(y, dense_reference(x, weight, bias, "gelu"), dtype)


def test_k_blocks_need_one_block_row_per_program():
    with pytest.raises(ValueError, match="k_blocks > 1 needs rows_per_program = 1"):
        KernelConfig(rows_per_program=2, k_blocks=2)
    with pytest.raises(ValueError, match="k_blocks must be one of"):
        KernelConfig(k_blocks=3)
    config = KernelConfig(64, 8, 2, 4, 3, k_blocks=4)
    assert config.as_list() == [64, 8, 2, 4, 3, 1, 4] and KernelConfig.from_list(config.as_list()) == config
    assert len(KernelConfig().as_list()) == 6  # tables without the field stay as they were


def test_row_groups_are_only_derived_where_the_heuristic_may_use_them(kernel_device):
    x, weight, bias = make_case(kernel_device, 128, 128, 32, 0.5, 20, torch.float16)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    assert_close_to_reference(block_sparse_linear(x, matrix, bias, backend="triton"),
                              dense_reference(x, weight, bias), torch.float16)
    assert matrix._row_groups == {}  # M = 20: one block-row per program, nothing to group


def test_launcher_refuses_rows_per_program_without_matching_groups(kernel_device):
    x, weight, _ = make_case(kernel_device, 128, 128, 32, 1.0, 4, torch.float32)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    config = KernelConfig(block_m=16, rows_per_program=4)
    args = (x, matrix.values, matrix.row_offsets, matrix.col_indices, matrix.row_order, 128, None, None, config)
    with pytest.raises(ValueError, match="rows_per_program = 4"):
        launch_kernel(*args)
    with pytest.raises(ValueError, match="rows_per_program = 4"):
        launch_kernel(*args, matrix.row_groups(2))
    assert_close_to_reference(launch_kernel(*args, matrix.row_groups(4)), dense_reference(x, weight), torch.float32)


def test_empty_block_rows_and_fully_empty_matrix(kernel_device):
    x, weight, bias = make_case(kernel_device, 128, 128, 32, 1.0, 20, torch.float32, empty_block_rows=(1, 3))
    y = block_sparse_linear(x, BlockSparseMatrix.from_dense(weight, 32), bias, backend="triton")
    assert_close_to_reference(y, dense_reference(x, weight, bias), torch.float32)
    assert torch.equal(y[:, 32:64], bias[32:64].expand(20, 32))

    zero = torch.zeros_like(weight)
    empty = BlockSparseMatrix.from_dense(zero, 32)
    assert empty.nnz_blocks == 0
    torch.testing.assert_close(block_sparse_linear(x, empty, bias, backend="triton"), bias.expand(20, 128))
    assert torch.count_nonzero(block_sparse_linear(x, empty, None, backend="triton")) == 0


def test_three_d_and_strided_input(kernel_device):
    x, weight, bias = make_case(kernel_device, 64, 96, 32, 0.5, 2 * 5 * 2, torch.float16)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    x3 = x.reshape(2, 10, 96)
    y3 = block_sparse_linear(x3, matrix, bias, backend="triton")
    assert y3.shape == (2, 10, 64)
    assert_close_to_reference(y3, dense_reference(x3, weight, bias), torch.float16)

    # Non-contiguous views: every other row, and a transposed buffer (stride along K != 1).
    every_other = x3[:, ::2, :]
    assert_close_to_reference(block_sparse_linear(every_other, matrix, bias, backend="triton"),
                              dense_reference(every_other, weight, bias), torch.float16)
    transposed = x.T.contiguous().T
    assert transposed.stride(-1) != 1
    assert_close_to_reference(block_sparse_linear(transposed, matrix, bias, backend="triton"),
                              dense_reference(transposed, weight, bias), torch.float16)


def test_zero_rows_of_input(kernel_device):
    _, weight, bias = make_case(kernel_device, 64, 64, 32, 0.5, 1, torch.float32)
    x = torch.empty(0, 64, device=kernel_device)
    assert block_sparse_linear(x, BlockSparseMatrix.from_dense(weight, 32), bias, backend="triton").shape == (0, 64)


def test_nan_and_inf_pass_through(kernel_device):
    """Where a NaN/inf meets a stored block, the output is what dense gives; skipped blocks add exact 0."""
    x, weight, bias = make_case(kernel_device, 64, 64, 32, 1.0, 4, torch.float32)
    weight[:32, 32:] = 0  # block (0, 1) is zero and will not be stored
    x[0, 40] = float("nan")
    x[1, 50] = float("inf")
    y = block_sparse_linear(x, BlockSparseMatrix.from_dense(weight, 32), bias, backend="triton").cpu()
    dense = torch.nn.functional.linear(x.cpu(), weight.cpu(), bias.cpu())
    # Output block-row 1 sees column 40/50 through a stored block: identical to dense.
    assert torch.isnan(y[0, 32:]).all() and torch.isnan(dense[0, 32:]).all()
    assert torch.equal(torch.isinf(y[1, 32:]) | torch.isnan(y[1, 32:]), torch.isinf(dense[1, 32:]) | torch.isnan(dense[1, 32:]))
    # Output block-row 0 never reads columns 32..63: finite, equal to the product without them.
    finite_x = x.cpu().clone()
    finite_x[:, 32:] = 0
    torch.testing.assert_close(y[:2, :32], (finite_x @ weight.cpu().T + bias.cpu())[:2, :32])
    assert torch.isfinite(y[2:]).all()


def _check_every_launchable_config(device, n, k, m, dtype, block_size):
    x, weight, bias = make_case(device, n, k, block_size, 0.5, m, dtype, seed=block_size)
    matrix = BlockSparseMatrix.from_dense(weight, block_size)
    reference = dense_reference(x, weight, bias, "gelu")
    for config in launchable_configs(dtype, block_size):
        y = block_sparse_linear(x, matrix, bias, "gelu", backend="triton", config=config)
        assert_close_to_reference(y, reference, dtype)


# One test per (dtype, block size), so that pytest-xdist spreads the compiles over workers on a GPU.
EVERY_DTYPE_AND_BLOCK_SIZE = pytest.mark.parametrize("dtype, block_size",
                                                     [(d, bs) for d in DTYPES for bs in (16, 32, 64)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, the BERT-shape twin runs every config")
@EVERY_DTYPE_AND_BLOCK_SIZE
def test_every_launchable_config_small_shape(kernel_device, dtype, block_size):
    """Every config `select_config` may pick (the set the AOT check compiles), run and checked.

    The interpreter twin of `test_every_launchable_config_bert_shape_on_gpu`."""
    _check_every_launchable_config(kernel_device, 128, 128, 20, dtype, block_size)


@requires_cuda
@EVERY_DTYPE_AND_BLOCK_SIZE
def test_every_launchable_config_bert_shape_on_gpu(dtype, block_size):
    """GPU only (too slow for the interpreter): a BERT-sized problem through every config."""
    _check_every_launchable_config(torch.device("cuda"), 768, 768, 1000, dtype, block_size)


@pytest.mark.parametrize("config", [KernelConfig(block_m=16, split_k=2, num_warps=4, num_stages=2),
                                    KernelConfig(block_m=16, num_warps=4, num_stages=2, k_blocks=2),
                                    KernelConfig(block_m=16, num_warps=4, num_stages=2, rows_per_program=8)])
def test_dense_walk_computes_what_the_index_tables_do(kernel_device, config):
    """The measurement variant that skips the index loads (dense layouts only), against the reference."""
    x, weight, bias = make_case(kernel_device, 160, 96, 32, 1.0, 21, torch.float16, seed=3)  # 5 block-rows: a partial group
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    groups = matrix.row_groups(config.rows_per_program) if config.rows_per_program > 1 else None
    args = (x, matrix.values, matrix.row_offsets, matrix.col_indices, matrix.row_order, 160, bias, "gelu", config, groups)
    walked = launch_kernel(*args, dense_walk=True)
    assert_close_to_reference(walked, dense_reference(x, weight, bias, "gelu"), torch.float16)
    sparse = BlockSparseMatrix.from_dense(make_case(kernel_device, 160, 96, 32, 0.5, 21, torch.float16)[1], 32)
    with pytest.raises(ValueError, match="dense_walk"):
        launch_kernel(x, sparse.values, sparse.row_offsets, sparse.col_indices, sparse.row_order, 160, None, None,
                      KernelConfig(block_m=16), dense_walk=True)


def test_negated_views_are_read_as_their_values(kernel_device):
    # Views with torch's negative bit hold -x in memory; the compiled kernel reads memory, so they are
    # materialized first (indices included: their memory would be negative offsets and columns).
    # Triton's interpreter already reads them by value: on CPU this is the case's twin, on a GPU its check.
    x, weight, bias = make_case(kernel_device, 64, 128, 32, 0.6, 9, torch.float32, seed=11)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    twisted = BlockSparseMatrix(torch._neg_view(-matrix.values), torch._neg_view(-matrix.row_offsets),
                                torch._neg_view(-matrix.col_indices), matrix.row_order, matrix.shape,
                                matrix.block_size)
    assert twisted.col_indices.is_neg()
    y = block_sparse_linear(torch._neg_view(-x), twisted, torch._neg_view(-bias), backend="triton")
    assert_close_to_reference(y, dense_reference(x, weight, bias), torch.float32)
