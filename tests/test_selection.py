"""measure_block_sparse: times both forms of a weight and keeps block-sparse only where it is faster."""

import pytest
import torch

from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse.selection import Measurement, measure_block_sparse


def scripted_timer(dense_ms, block_sparse_ms):
    """Returns the given times (dense is timed first), after running each function once."""
    times = [dense_ms, block_sparse_ms]

    def timer(fn, device):
        fn()
        return times.pop(0)

    return timer


def test_the_choice_follows_the_times_with_a_margin():
    weight = random_block_sparse_weight(64, 64, 32, 0.5, seed=0)
    faster = measure_block_sparse(weight, timer=scripted_timer(1.0, 0.5))
    assert faster == Measurement(1.0, 0.5, True) and faster.speedup == 2.0
    # 3% faster is within the 5% margin: the plain dense layer stays.
    assert not measure_block_sparse(weight, timer=scripted_timer(1.0, 0.97)).use_block_sparse
    assert measure_block_sparse(weight, timer=scripted_timer(1.0, 0.97), margin=0.0).use_block_sparse
    assert not measure_block_sparse(weight, timer=scripted_timer(1.0, 2.0)).use_block_sparse


def test_real_times_on_cpu_favour_a_very_sparse_weight():
    """A 3%-dense weight: the native CPU kernel does a thirtieth of the FLOPs, far past any noise
    (without one, the CPU path's pure-torch reference densifies W per call and must lose).

    One torch thread, so that the two timings do not depend on how many other processes (e.g.
    pytest-xdist workers) share the cores.
    """
    weight = random_block_sparse_weight(1024, 1024, 32, 0.03, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measurement = measure_block_sparse(weight, torch.randn(1024), "gelu", backend="cpu", rows=256, repeats=9)
    finally:
        torch.set_num_threads(threads)
    assert measurement.dense_ms > 0 and measurement.block_sparse_ms > 0
    from nn_blocksparse.cpu import native_isa

    if native_isa() is None:
        assert not measurement.use_block_sparse, measurement
    else:
        assert measurement.use_block_sparse and measurement.speedup > 3, measurement


def test_measures_the_triton_kernel_too(kernel_device):
    """On a GPU the compiled kernel is timed; without one the interpreter runs it (times meaningless)."""
    weight = random_block_sparse_weight(64, 64, 32, 0.5, seed=2).to(kernel_device)
    measurement = measure_block_sparse(weight, backend="triton", rows=16, warmup=1, repeats=2)
    assert measurement.dense_ms > 0 and measurement.block_sparse_ms > 0


def test_clear_errors():
    weight = random_block_sparse_weight(64, 64, 32, 0.5, seed=3)
    with pytest.raises(ValueError, match="2-D"):
        measure_block_sparse(weight[0])
    with pytest.raises(ValueError, match="rows"):
        measure_block_sparse(weight, rows=0)
    with pytest.raises(ValueError, match="margin"):
        measure_block_sparse(weight, margin=1.0)


def test_bf16_weights_are_measured_in_both_forms_as_hybrid_builds_them():
    """weight_dtype=bf16: the dense and block-sparse forms both keep bf16 weights and take fp32 x, and
    both compute the same product (to bf16 rounding)."""
    weight = random_block_sparse_weight(64, 96, 32, 0.5, seed=1)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(2))
    outputs = []

    def timer(fn, device):
        outputs.append(fn())
        return 1.0

    measure_block_sparse(weight, bias, rows=8, activation="gelu", timer=timer, weight_dtype=torch.bfloat16)
    dense_out, sparse_out = outputs
    assert dense_out.dtype == sparse_out.dtype == torch.float32
    scale = dense_out.abs().max().item()
    assert (dense_out - sparse_out).abs().max().item() < 2e-2 * max(1.0, scale)
