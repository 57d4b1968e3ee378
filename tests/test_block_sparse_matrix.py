"""BlockSparseMatrix: dense round trip, which blocks count as zero, torch BSR interop, errors."""

import pytest
import torch

from nn_blocksparse import block_sparse_linear
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


def _valid_tensors():
    """A 4x3-block matrix (bs 32) with an empty block-row: values, row_offsets, col_indices, row_order."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0], [0, 1, 1]], dtype=torch.bool)
    weight = torch.randn(128, 96) * mask.repeat_interleave(32, 0).repeat_interleave(32, 1)
    matrix = BlockSparseMatrix.from_dense(weight, 32)
    assert matrix.row_offsets.tolist() == [0, 2, 4, 4, 6] and matrix.col_indices.tolist() == [0, 1, 0, 2, 1, 2]
    return {"values": matrix.values, "row_offsets": matrix.row_offsets, "col_indices": matrix.col_indices,
            "row_order": matrix.row_order}


def _replaced(tensors, name, transform):
    changed = dict(tensors)
    changed[name] = transform(tensors[name].clone())
    return changed


def _set(index, value):
    def transform(tensor):
        tensor[index] = value
        return tensor
    return transform


# (field, transform, error type, message the error must hold)
INVALID_FIELDS = [
    ("row_offsets", _set(0, 1), ValueError, r"row_offsets\[0\] must be 0"),
    ("row_offsets", _set(-1, 1), ValueError, r"row_offsets\[-1\] must equal the number of stored blocks"),
    ("row_offsets", _set(1, 10**6), ValueError, "row_offsets must be non-decreasing"),
    ("row_offsets", lambda t: t.to(torch.int64), TypeError, "row_offsets must be torch.int32"),
    ("row_offsets", lambda t: t[:-1], ValueError, "row_offsets must be 1-D with 5 entries"),
    ("col_indices", _set(0, 3), ValueError, r"col_indices\[0\] = 3 is outside \[0, 3\)"),
    ("col_indices", _set(0, -1), ValueError, r"col_indices\[0\] = -1 is outside"),
    ("col_indices", _set(1, 0), ValueError, r"block-row 0 has col_indices\[1\] = 0 after col_indices\[0\] = 0"),
    ("col_indices", _set(3, 0), ValueError, r"block-row 1 has col_indices\[3\] = 0 after"),
    ("col_indices", lambda t: t.float(), TypeError, "col_indices must be torch.int32"),
    ("col_indices", lambda t: t[:-1], ValueError, "col_indices must be 1-D"),
    ("row_order", _set(0, 4), ValueError, r"row_order\[0\] = 4 is outside \[0, 4\)"),
    ("row_order", lambda t: torch.zeros_like(t), ValueError, "row_order must be a permutation"),
    ("row_order", lambda t: t.reshape(2, 2), ValueError, "row_order must be 1-D"),
    ("values", lambda t: t.to(torch.int32), TypeError, "values must be a floating point tensor"),
    ("values", lambda t: t[:, :16], ValueError, r"values must be \[nnz, 32, 32\]"),
    ("values", lambda t: t.transpose(1, 2), ValueError, "values must be contiguous"),
    ("values", lambda t: t[:-1], ValueError, "col_indices must be 1-D with 5 entries"),
    ("values", lambda t: t.tolist(), TypeError, "values must be a torch.Tensor"),
    ("values", lambda t: t.to_sparse(), TypeError, "values must be a dense"),
    ("col_indices", lambda t: torch.stack([t, t], 1)[:, 0], ValueError, "col_indices must be contiguous"),
]


@pytest.mark.parametrize("name, transform, error, message", INVALID_FIELDS,
                         ids=[f"{case[0]}-{case[3][:30]}" for case in INVALID_FIELDS])
def test_every_invariant_is_checked_and_named(name, transform, error, message):
    tensors = _replaced(_valid_tensors(), name, transform)
    with pytest.raises(error, match=message):
        BlockSparseMatrix(**tensors, shape=(128, 96), block_size=32)


def test_shape_block_size_and_devices_are_checked():
    tensors = _valid_tensors()
    BlockSparseMatrix(**tensors, shape=(128, 96), block_size=32)
    for shape, error, message in (((128, 64), ValueError, r"col_indices\[\d+\] = 2 is outside"),
                                  ((96, 96), ValueError, "row_offsets must be 1-D with 4 entries"),
                                  ((128, 100), ValueError, "divide"), ((128,), ValueError, "shape must be"),
                                  ((128.0, 96), TypeError, "two ints"), ((2**32, 96), ValueError, "32-bit")):
        with pytest.raises(error, match=message):
            BlockSparseMatrix(**tensors, shape=shape, block_size=32)
    with pytest.raises(ValueError, match="block_size must be one of"):
        BlockSparseMatrix(**tensors, shape=(128, 96), block_size=True)
    with pytest.raises(ValueError, match="on one device"):
        BlockSparseMatrix(**{**tensors, "row_order": tensors["row_order"].to("meta")}, shape=(128, 96), block_size=32)


def test_meta_tensors_are_checked_for_structure_only():
    tensors = {name: tensor.to("meta") for name, tensor in _valid_tensors().items()}
    matrix = BlockSparseMatrix(**tensors, shape=(128, 96), block_size=32)
    assert matrix.device.type == "meta"
    with pytest.raises(ValueError, match="row_offsets must be 1-D"):
        BlockSparseMatrix(**{**tensors, "row_offsets": tensors["row_offsets"][:-1]}, shape=(128, 96), block_size=32)


def test_fields_cannot_be_rebound_and_moves_are_validated():
    matrix = BlockSparseMatrix(**_valid_tensors(), shape=(128, 96), block_size=32)
    with pytest.raises(AttributeError):
        matrix.col_indices = torch.zeros_like(matrix.col_indices)
    assert torch.equal(matrix.to("cpu").to_dense(), matrix.to_dense())


def test_indices_modified_in_place_are_validated_again():
    matrix = BlockSparseMatrix(**_valid_tensors(), shape=(128, 96), block_size=32)
    groups = matrix.row_groups(2)
    assert not matrix.check_unchanged()
    matrix.col_indices[0] = 99  # out of range
    with pytest.raises(ValueError, match=r"col_indices\[0\] = 99"):
        matrix.row_groups(2)
    with pytest.raises(ValueError, match=r"col_indices\[0\] = 99"):
        block_sparse_linear(torch.randn(2, 96), matrix)
    # A valid in-place change (another permutation) is accepted, and the derived groups rebuilt.
    matrix.col_indices.copy_(_valid_tensors()["col_indices"])
    matrix.row_order.copy_(matrix.row_order.flip(0))
    assert matrix.check_unchanged() and not matrix.check_unchanged()
    assert matrix.row_groups(2) is not groups


def test_empty_matrix_allocates_nothing_dense():
    empty = BlockSparseMatrix.empty((2**20, 2**20), 64, torch.float16)  # a dense one would be 2 TiB
    assert empty.nnz_blocks == 0 and empty.row_order.tolist()[:3] == [0, 1, 2] and empty.dtype == torch.float16
    assert torch.equal(BlockSparseMatrix.empty((64, 32), 32).to_dense(), torch.zeros(64, 32))


def test_from_bsr_refuses_indices_a_cast_would_wrap():
    bsr = torch.eye(64).to_sparse_bsr((32, 32))
    crow, col = bsr.crow_indices().clone(), bsr.col_indices().clone()
    col[0] = 2**32  # int32(2**32) would be 0: a valid-looking, wrong index
    wrapped = torch.sparse_bsr_tensor(crow, col, bsr.values(), size=(64, 64), check_invariants=False)
    with pytest.raises(ValueError, match="col_indices holds values in"):
        BlockSparseMatrix.from_bsr(wrapped)
