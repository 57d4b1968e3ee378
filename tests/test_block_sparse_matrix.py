"""BlockSparseMatrix: dense round trip, which blocks count as zero, torch BSR interop, errors."""

import pytest
import torch

from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
def test_dense_round_trip_and_density(block_size, density):
    weight = random_block_sparse_weight(128, 192, block_size, density, seed=3)
    matrix = BlockSparseMatrix.from_dense(weight, block_size)
    assert torch.equal(matrix.to_dense(), weight)
    blocks = weight.reshape(128 // block_size, block_size, 192 // block_size, block_size)
    expected_nnz = int((blocks != 0).any(dim=3).any(dim=1).sum())
    assert matrix.nnz_blocks == expected_nnz
    assert matrix.density == pytest.approx(expected_nnz / ((128 // block_size) * (192 // block_size)))
    # Indices the kernel relies on: offsets ascending, columns ascending inside each row, heaviest rows first.
    offsets = matrix.row_offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == matrix.nnz_blocks and offsets == sorted(offsets)
    for r in range(matrix.block_rows):
        cols = matrix.col_indices[offsets[r]:offsets[r + 1]].tolist()
        assert cols == sorted(set(cols))
    counts = [offsets[r + 1] - offsets[r] for r in matrix.row_order.tolist()]
    assert counts == sorted(counts, reverse=True)
    assert sorted(matrix.row_order.tolist()) == list(range(matrix.block_rows))


def test_block_with_one_nonzero_is_kept_and_nan_is_not_zero():
    weight = torch.zeros(64, 64)
    weight[40, 3] = 1e-30  # a single tiny value keeps block (1, 0)
    weight[5, 60] = float("nan")  # NaN is not zero: block (0, 1) is kept
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    assert matrix.nnz_blocks == 2
    assert matrix.row_offsets.tolist() == [0, 1, 2]
    assert matrix.col_indices.tolist() == [1, 0]
    assert torch.equal(matrix.to_dense().isnan(), weight.isnan())
    assert matrix.to_dense()[40, 3] == 1e-30


def test_empty_rows_and_empty_matrix():
    weight = random_block_sparse_weight(96, 64, 32, 1.0, empty_block_rows=(1,))
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    assert matrix.row_offsets.tolist() == [0, 2, 2, 4]
    empty = BlockSparseMatrix.from_dense(torch.zeros(96, 64), 32)
    assert empty.nnz_blocks == 0 and empty.density == 0.0
    assert torch.equal(empty.to_dense(), torch.zeros(96, 64))
    assert empty.values.shape == (0, 32, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_bsr_interop(dtype):
    weight = random_block_sparse_weight(128, 64, 32, 0.5, seed=1, dtype=dtype)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    bsr = matrix.to_bsr()
    assert bsr.layout == torch.sparse_bsr
    assert torch.equal(bsr.to_dense(), weight)
    again = BlockSparseMatrix.from_bsr(bsr)
    assert torch.equal(again.to_dense(), weight)
    assert torch.equal(again.col_indices, matrix.col_indices)
    # torch's own conversion keeps explicit zero blocks; they stay legal (and exact).
    from_torch = BlockSparseMatrix.from_bsr(weight.to_sparse_bsr((32, 32)))
    assert torch.equal(from_torch.to_dense(), weight)


def test_cast_and_move_keep_int32_indices():
    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(64, 64, 32, 0.5), 32)
    half = matrix.to(dtype=torch.float16)
    assert half.dtype == torch.float16 and half.col_indices.dtype == torch.int32
    assert torch.equal(half.to_dense(), matrix.to_dense().half())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseMatrix.from_dense(torch.randn(64, 64), 24)
    with pytest.raises(ValueError, match="divide"):
        BlockSparseMatrix.from_dense(torch.randn(64, 48), 32)
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseMatrix.from_dense(torch.randn(64), 32)
    with pytest.raises(TypeError, match="floating"):
        BlockSparseMatrix.from_dense(torch.ones(64, 64, dtype=torch.int64), 32)
    with pytest.raises(ValueError, match="sparse_bsr"):
        BlockSparseMatrix.from_bsr(torch.randn(64, 64))
    good = BlockSparseMatrix.from_dense(torch.randn(64, 64), 32)
    with pytest.raises(ValueError, match="row_offsets"):
        BlockSparseMatrix(good.values, good.row_offsets[:-1], good.col_indices, good.row_order, (64, 64), 32)
