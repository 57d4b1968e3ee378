"""Long runs keep memory flat: every cache keyed by a shape is bounded.

A server sees every batch size and sequence length. Checked cheaply: no cache in the package
may grow without bound (by introspection), 10,000 calls of a layer over 4,096 (batch, sequence)
shapes, new ones arriving until the end, leave the process's resident memory flat, and so do a
patched model's forwards over known shapes; the Triton path's launch choice stays bounded over
10,000 row counts.
"""

import gc
import importlib
import inspect
import mmap
import pkgutil

import pytest
import torch

import nn_blocksparse
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse import BlockSparseLinear


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def _package_caches():
    for module_info in pkgutil.walk_packages(nn_blocksparse.__path__, "nn_blocksparse."):
        if module_info.name.endswith((".demo", ".aot")):
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            if hasattr(value, "cache_info") and getattr(value, "__module__", None) == module.__name__:
                yield f"{module.__name__}.{name}", value


def test_no_cache_in_the_package_is_unbounded():
    caches = dict(_package_caches())
    assert "nn_blocksparse.kernels.configs.select_config" in caches  # the introspection finds them
    for name, cached in caches.items():
        unbounded = cached.cache_info().maxsize is None
        # An unbounded cache is fine only when there is a single key: no arguments.
        assert not unbounded or not inspect.signature(inspect.unwrap(cached)).parameters, name


def _rows_of_many_shapes(calls: int, seed: int) -> list[tuple[int, int]]:
    """(batch, sequence) pairs, shuffled so that new row counts keep coming until the end."""
    generator = torch.Generator().manual_seed(seed)
    pairs = [(batch, seq) for batch in range(1, 17) for seq in range(1, 257)]
    order = torch.randint(0, len(pairs), (calls,), generator=generator).tolist()
    return [pairs[i] for i in order]


def test_the_resident_memory_probe_sees_an_allocation():
    # Fresh anonymous pages, touched: a heap allocation may reuse pages an earlier test freed (which
    # test ran before depends on how pytest-xdist deals them out), and then adds no resident memory.
    size = 32 * 2**20
    before = _resident_bytes()
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    assert _resident_bytes() - before >= 30 * 2**20
    block.close()


def test_ten_thousand_calls_over_many_shapes_keep_memory_flat(single_intra_op_thread):
    layer = BlockSparseLinear.from_dense(random_block_sparse_weight(32, 64, 16, 0.5, seed=2), torch.zeros(32),
                                         block_size=16)
    shapes = _rows_of_many_shapes(10_000, seed=4)
    assert len({b * s for b, s in shapes[2_000:]} - {b * s for b, s in shapes[:2_000]}) > 50  # new row counts late
    resident = None
    with torch.inference_mode():
        for call, (batch, seq) in enumerate(shapes):
            if call == 2_000:
                gc.collect()
                resident = _resident_bytes()
            layer(torch.ones(batch, seq, 64))
    gc.collect()
    growth = _resident_bytes() - resident
    assert growth < 8 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB over 8,000 calls"
    assert len(layer.matrix._row_groups) <= 3


def test_launch_configurations_and_row_groups_stay_bounded():
    """The Triton path's per-call state, without launching: 10,000 row counts through the config choice."""
    from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
    from nn_blocksparse.functional import launch_config
    from nn_blocksparse.kernels.configs import select_config

    matrix = BlockSparseMatrix.from_dense(random_block_sparse_weight(256, 256, 32, 0.5, seed=3).half(), 32)
    for m in range(1, 10_001):
        launch_config(matrix, torch.float16, m, torch.device("cpu"))
    info = select_config.cache_info()
    assert info.maxsize is not None and info.currsize <= info.maxsize
    assert set(matrix._row_groups) <= {2, 4}  # one table per rows-per-group choice, whatever M


def test_a_patched_model_serving_many_shapes_keeps_memory_flat(single_intra_op_thread):
    """Every call after a first pass over 100 (batch, sequence) shapes: no memory kept per call.

    (New shapes are the layer test's job: torch's own per-shape caches grow the resident memory of
    an unpatched model too, by ~100 MiB until they fill.)"""
    transformers = pytest.importorskip("transformers")
    from nn_blocksparse import patch_bert

    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=50,
        max_position_embeddings=128)).eval()
    patch_bert(model, mode="blocksparse")
    shapes = [(batch, seq) for batch in (1, 2, 3, 4) for seq in range(5, 130, 5)]
    with torch.inference_mode():
        for batch, seq in shapes:
            model(torch.ones(batch, seq, dtype=torch.long))
        gc.collect()
        resident = _resident_bytes()
        for call in range(600):
            batch, seq = shapes[(call * 37) % len(shapes)]
            model(torch.ones(batch, seq, dtype=torch.long))
    gc.collect()
    growth = _resident_bytes() - resident
    assert growth < 4 * 2**20, f"resident memory grew {growth / 2**20:.1f} MiB over 600 forwards"
