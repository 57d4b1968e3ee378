"""Correctness of the CPU block-sparse linear (`nn_blocksparse/cpu_kernels.py`).

Every check compares against `x @ W_dense.T + b` computed in float64, where W_dense is built by
scattering the BSR blocks with plain slicing (independent of the plan's own re-layout).

Tolerances (outputs are O(1): x ~ N(0, 1), W ~ N(0, 1/K)):
- float32: atol = rtol = 1e-4 (fp32 accumulation over K <= 512);
- bfloat16: atol = rtol = 3e-2 (inputs are already bf16; the output is rounded to bf16, 2^-8);
- float16: atol = rtol = 4e-3 (computed in fp32, rounded once to fp16, 2^-11).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nn_blocksparse import cpu_kernels  # noqa: E402
from nn_blocksparse.cpu_kernels import (  # noqa: E402
    CpuBlockSparsePlan,
    build_cpu_plan,
    cpu_block_sparse_linear,
)
from nn_blocksparse.kernels import cpu_block_sparse_linear as native  # noqa: E402
from nn_blocksparse.layouts import random_layout  # noqa: E402

# Every strategy this machine can run: "native" wherever its kernel builds, which
# `test_native_kernel_builds_where_it_should` requires of any Linux x86-64 machine with AVX-512 and a
# compiler (CI's kind), so that it cannot silently drop out of this list there.
STRATEGIES = tuple(s for s in cpu_kernels.STRATEGIES if s != "native" or native.native_available())

TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
    torch.float16: dict(atol=4e-3, rtol=4e-3),
}


def bsr_from_mask(mask: torch.Tensor, block_size: int, dtype=torch.float32, seed: int = 0):
    """BSR arrays for a [N/bs, K/bs] boolean block mask, blocks ~ N(0, 1/K)."""
    generator = torch.Generator().manual_seed(seed)
    block_rows, block_cols = mask.shape
    rows, cols = mask.nonzero(as_tuple=True)  # row-major, so ascending columns within a row
    in_features = block_cols * block_size
    values = torch.randn(len(rows), block_size, block_size, generator=generator) / in_features**0.5
    row_offsets = torch.zeros(block_rows + 1, dtype=torch.int32)
    row_offsets[1:] = torch.cumsum(mask.sum(1), 0)
    return values.to(dtype), row_offsets, cols.to(torch.int32)


def dense_from_bsr(values, row_offsets, col_indices, out_features, in_features, block_size):
    """Scatter the blocks into a dense [N, K] float64 matrix with plain slicing."""
    dense = torch.zeros(out_features, in_features, dtype=torch.float64)
    bs = block_size
    for row in range(out_features // bs):
        for i in range(int(row_offsets[row]), int(row_offsets[row + 1])):
            col = int(col_indices[i])
            dense[row * bs : (row + 1) * bs, col * bs : (col + 1) * bs] = values[i].double()
    return dense


def random_mask(block_rows: int, block_cols: int, density: float, seed: int) -> torch.Tensor:
    return random_layout(block_rows, block_cols, density, seed)


def reference(x, dense_weight, bias):
    y = x.double() @ dense_weight.T
    return y if bias is None else y + bias.double()


def run(x, plan, bias):
    with torch.no_grad():
        return cpu_block_sparse_linear(x, plan, bias)


def check(x, values, row_offsets, col_indices, n, k, bs, bias, strategies=(None, *STRATEGIES)):
    dense_weight = dense_from_bsr(values, row_offsets, col_indices, n, k, bs)
    expected = reference(x, dense_weight, bias)
    outputs = {}
    for strategy in strategies:
        plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy=strategy)
        y = run(x, plan, bias)
        assert y.shape == (x.shape[0], n) and y.dtype == x.dtype and y.is_contiguous()
        torch.testing.assert_close(y.double(), expected, **TOLERANCES[x.dtype], msg=lambda m: f"{plan}: {m}")
        outputs[plan.strategy if strategy is None else strategy] = y
    return outputs


@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
def test_random_layouts_all_strategies(density, block_size):
    n, k = 192, 256
    mask = random_mask(n // block_size, k // block_size, density, seed=int(density * 100) + block_size)
    values, row_offsets, col_indices = bsr_from_mask(mask, block_size)
    bias = torch.randn(n)
    for m in (1, 7, 129):
        x = torch.randn(m, k)
        check(x, values, row_offsets, col_indices, n, k, block_size, bias)
    check(torch.randn(7, k), values, row_offsets, col_indices, n, k, block_size, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dtypes(dtype, with_bias):
    n, k, bs = 128, 256, 32
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.4, seed=3), bs, dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    for m in (1, 7, 129):
        check(torch.randn(m, k).to(dtype), values, row_offsets, col_indices, n, k, bs, bias)


def test_plan_and_input_dtypes_may_differ():
    n, k, bs = 128, 128, 32
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.5, seed=4), bs)
    dense_weight = dense_from_bsr(values, row_offsets, col_indices, n, k, bs)
    for strategy in STRATEGIES:
        plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy=strategy)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x, bias = torch.randn(9, k).to(dtype), torch.randn(n).to(dtype)
            y = run(x, plan, bias)
            assert y.dtype == dtype
            # The plan keeps fp32 weights; bf16 x gets bf16-rounded weights, hence the bf16 budget.
            tol = TOLERANCES[torch.bfloat16 if dtype == torch.bfloat16 else dtype]
            torch.testing.assert_close(y.double(), reference(x, dense_weight, bias), **tol)


@pytest.mark.parametrize(
    "make_x",
    [
        lambda m, k: torch.randn(k, m).t(),  # column-major
        lambda m, k: torch.randn(m, 2 * k)[:, ::2],  # strided columns
        lambda m, k: torch.randn(m + 3, k + 40)[2 : m + 2, 17 : 17 + k],  # window of a larger matrix
    ],
    ids=["transposed", "strided", "window"],
)
def test_non_contiguous_x(make_x):
    n, k, bs = 96, 160, 32
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.5, seed=5), bs)
    for m in (1, 7, 129):
        x = make_x(m, k)
        assert not x.is_contiguous() or m == 1
        check(x, values, row_offsets, col_indices, n, k, bs, torch.randn(n))


@pytest.mark.parametrize("cheap_calls", [False, True], ids=["default_model", "always_group"])
def test_empty_block_rows_and_structured_layouts(cheap_calls, monkeypatch):
    if cheap_calls:
        # Free calls make the planner group every shared column pattern into one unit and use
        # one bucket per distinct length: exercises multi-row units and the no-gather path.
        monkeypatch.setattr(cpu_kernels, "_SECONDS_PER_CHUNK", 0.0)
    n, k, bs = 256, 256, 32
    rows, cols = n // bs, k // bs
    layouts = {
        "empty_rows": random_mask(rows, cols, 0.6, seed=6) & (torch.arange(rows) % 3 != 1)[:, None],
        "whole_rows_kept": (torch.arange(rows) % 3 != 0)[:, None].expand(rows, cols).clone(),
        "whole_cols_kept": (torch.arange(cols) % 2 == 0)[None, :].expand(rows, cols).clone(),
        "contiguous_cols": (torch.arange(cols)[None, :] >= 2).expand(rows, cols) & (torch.arange(rows) >= 3)[:, None],
        "head_tiles": random_mask(rows // 2, cols // 2, 0.5, seed=7).repeat_interleave(2, 0).repeat_interleave(2, 1),
        "one_block": torch.zeros(rows, cols, dtype=torch.bool).index_put_(
            (torch.tensor([5]), torch.tensor([2])), torch.tensor(True)
        ),
    }
    seen_multi_row_units = seen_views_of_x = False
    for name, mask in layouts.items():
        values, row_offsets, col_indices = bsr_from_mask(mask, bs, seed=len(name))
        plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy="gather_bmm")
        seen_multi_row_units |= any(b.rows_per_unit > 1 for b in plan.buckets)
        seen_views_of_x |= any(b.gather_index is None for b in plan.buckets)
        for bias in (torch.randn(n), None):
            for m in (1, 7, 129, 300):  # 300 rows: more than one row tile
                check(torch.randn(m, k), values, row_offsets, col_indices, n, k, bs, bias)
    if cheap_calls:
        assert seen_multi_row_units and seen_views_of_x


def test_block_rows_sharing_a_pattern_share_a_unit_by_default():
    # Head-like structure at a BERT shape: pairs of block-rows with one random pattern each. Judged
    # pattern by pattern a 64-wide unit did not pay for a bucket of its own; judged over the whole
    # plan (12 such units fill common buckets) it does, and the default model must see that.
    n, k, bs = 768, 768, 32
    mask = random_mask(n // bs // 2, k // bs, 0.6, seed=11).repeat_interleave(2, 0)
    values, row_offsets, col_indices = bsr_from_mask(mask, bs)
    plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy="gather_mm")
    assert all(b.rows_per_unit == 2 for b in plan.buckets), plan.describe()
    assert plan.strategy == "gather_mm"
    assert build_cpu_plan(values, row_offsets, col_indices, n, k, bs).strategy != "dense"
    check(torch.randn(40, k), values, row_offsets, col_indices, n, k, bs, torch.randn(n))


def test_strategies_agree_with_each_other():
    n, k, bs = 256, 512, 32
    for density in (0.1, 0.5, 0.95):
        values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, density, seed=8), bs)
        x, bias = torch.randn(65, k), torch.randn(n)
        outputs = check(x, values, row_offsets, col_indices, n, k, bs, bias, strategies=STRATEGIES)
        first, *others = outputs.values()
        for other in others:
            torch.testing.assert_close(other, first, **TOLERANCES[torch.float32])


def test_small_gather_chunks_and_recipe_reuse(monkeypatch):
    # Many chunks per bucket, and the same plan called again with other M / dtypes / bias.
    monkeypatch.setattr(cpu_kernels, "_GATHER_CHUNK_BYTES", 1 << 12)
    cpu_kernels._workspace.recipes.clear()
    n, k, bs = 192, 256, 16
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.3, seed=9), bs)
    plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy="gather_bmm")
    dense_weight = dense_from_bsr(values, row_offsets, col_indices, n, k, bs)
    for m, bias in ((33, torch.randn(n)), (300, None), (33, None), (5, torch.randn(n))):
        x = torch.randn(m, k)
        expected = reference(x, dense_weight, bias)
        torch.testing.assert_close(run(x, plan, bias).double(), expected, **TOLERANCES[torch.float32])
    cpu_kernels._workspace.recipes.clear()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_batched_gemm_chunks_are_multiples_of_the_thread_count(monkeypatch, threads):
    """A batched GEMM gives each unit to one thread: chunks hold a multiple of the thread count (leftover
    units run alone), and every unit of every bucket is covered once, in order. Results do not change."""
    monkeypatch.setattr(cpu_kernels, "_GATHER_CHUNK_BYTES", 5 * 16 * 16 * 33 * 4)  # 5 units of P=16 at M=33
    n, k, bs = 608, 256, 16
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.6, seed=4), bs)
    plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy="gather_bmm")
    chunks = cpu_kernels._chunks(plan, 33, 4, threads=threads)
    assert any(count > 1 for bucket_chunks in chunks for _, count in bucket_chunks)
    for bucket, bucket_chunks in zip(plan.buckets, chunks):
        assert all(count == 1 or count % threads == 0 for _, count in bucket_chunks)
        firsts = [first for first, _ in bucket_chunks]
        assert firsts == sorted(firsts) and sum(count for _, count in bucket_chunks) == bucket.unit_count
        assert all(a + c == b for (a, c), b in zip(bucket_chunks, firsts[1:]))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cpu_kernels._workspace.recipes.clear()
        x = torch.randn(33, k)
        expected = reference(x, dense_from_bsr(values, row_offsets, col_indices, n, k, bs), None)
        torch.testing.assert_close(run(x, plan, None).double(), expected, **TOLERANCES[torch.float32])
    finally:
        torch.set_num_threads(previous)
        cpu_kernels._workspace.recipes.clear()


def test_plan_is_deterministic_and_inspectable():
    n, k, bs = 768, 768, 32
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.36, seed=10), bs)
    plans = [build_cpu_plan(values, row_offsets, col_indices, n, k, bs) for _ in range(2)]
    assert all(isinstance(p, CpuBlockSparsePlan) for p in plans)
    assert plans[0].strategy == plans[1].strategy and plans[0].strategy in STRATEGIES
    assert [(b.rows_per_unit, b.blocks_per_unit, b.unit_count) for b in plans[0].buckets] == [
        (b.rows_per_unit, b.blocks_per_unit, b.unit_count) for b in plans[1].buckets
    ]
    assert plans[0].strategy in plans[0].describe()
    # Full density must never pick a path that the model predicts slower than dense: "native"
    # (predicted ~2x faster than MKL's dense GEMM), else dense itself.
    full = bsr_from_mask(torch.ones(n // bs, k // bs, dtype=torch.bool), bs)
    plan = build_cpu_plan(*full, n, k, bs)
    assert plan.strategy == ("native" if "native" in STRATEGIES else "dense")
    assert plan.estimated_seconds[plan.strategy] <= plan.estimated_seconds["dense"]


def test_without_native_kernel_full_density_falls_back_to_dense(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_native_usable", lambda block_size: False)
    n, k, bs = 768, 768, 32
    full = bsr_from_mask(torch.ones(n // bs, k // bs, dtype=torch.bool), bs)
    assert build_cpu_plan(*full, n, k, bs).strategy == "dense"
    sparse = bsr_from_mask(random_mask(n // bs, k // bs, 0.36, seed=10), bs)
    plan = build_cpu_plan(*sparse, n, k, bs)
    assert plan.strategy in ("gather_bmm", "gather_mm") and "native" not in plan.estimated_seconds


def test_edge_cases():
    n, k, bs = 64, 96, 32
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.5, seed=11), bs)
    plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs)
    assert run(torch.randn(0, k), plan, torch.randn(n)).shape == (0, n)
    with pytest.raises(ValueError):
        run(torch.randn(3, k + 1), plan, None)
    with pytest.raises(RuntimeError, match="inference-only"):
        cpu_block_sparse_linear(torch.randn(3, k, requires_grad=True), plan)
    with pytest.raises(ValueError):
        build_cpu_plan(values, row_offsets, col_indices, n, k, 48)
    # Scratch buffers first created under inference_mode must stay usable outside it.
    cpu_kernels._workspace.buffers.clear()
    cpu_kernels._workspace.recipes.clear()
    sparse_plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy="gather_bmm")
    x = torch.randn(5, k)
    with torch.inference_mode():
        inside = cpu_block_sparse_linear(x, sparse_plan)
    torch.testing.assert_close(run(x, sparse_plan, None), inside)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "dense"])
def test_non_finite_x_stays_in_the_rows_that_read_it(strategy):
    # Padding entries re-read a block-column the unit already reads (against zero weights), so an
    # inf in x reaches only outputs whose block-row has a block in that column.  (The "dense"
    # strategy, like F.linear on the dense weight, turns 0 * inf into NaN everywhere.)
    n, k, bs = 256, 256, 32
    mask = random_mask(n // bs, k // bs, 0.4, seed=12)
    mask[:, 3] = False
    mask[::2, 3] = True
    values, row_offsets, col_indices = bsr_from_mask(mask, bs)
    plan = build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy=strategy)
    x = torch.randn(40, k)
    x[:, 3 * bs + 5] = float("inf")
    y = run(x, plan, torch.randn(n)).view(40, n // bs, bs)
    assert torch.isfinite(y[:, 1::2]).all()


def test_concurrent_threads_use_separate_scratch():
    from concurrent.futures import ThreadPoolExecutor

    n, k, bs = 256, 512, 32
    values, row_offsets, col_indices = bsr_from_mask(random_mask(n // bs, k // bs, 0.3, seed=13), bs)
    dense_weight = dense_from_bsr(values, row_offsets, col_indices, n, k, bs)
    plans = [
        build_cpu_plan(values, row_offsets, col_indices, n, k, bs, strategy=s) for s in STRATEGIES if s != "dense"
    ]
    inputs = [(torch.randn(m, k), torch.randn(n)) for m in (3, 64, 200, 300) for _ in range(3)]

    def work(i):
        x, bias = inputs[i]
        return run(x, plans[i % len(plans)], bias)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(len(inputs))))
    for (x, bias), y in zip(inputs, results):
        torch.testing.assert_close(y.double(), reference(x, dense_weight, bias), **TOLERANCES[torch.float32])
