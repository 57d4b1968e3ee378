"""The native residual add + layer norm (`cpu.layer_norm.add_layer_norm_cpu`) on every ISA this CPU runs,
against float64 statistics of the rounded sums, and where `norm.add_layer_norm` takes it (otherwise torch)."""

import pytest
import torch
import torch.nn.functional as F

from nn_blocksparse.cpu.build import library_for
from nn_blocksparse.cpu.isa import runnable_isas
from nn_blocksparse.cpu.layer_norm import add_layer_norm_cpu, runs_native_add_layer_norm
from nn_blocksparse.norm import add_layer_norm

ISAS = runnable_isas()
needs_native = pytest.mark.skipif(not ISAS, reason="no native variant runs here (the ARM harness checks NEON)")


def reference(x, residual, weight, bias, eps):
    """float64 layer norm of x + residual rounded to x's dtype (as the add in that dtype rounds it)."""
    sums = (x + residual).double()
    mean = sums.mean(-1, keepdim=True)
    variance = ((sums - mean) ** 2).mean(-1, keepdim=True)
    out = (sums - mean) / torch.sqrt(variance + eps)
    if weight is not None:
        out = out * weight.double()
    if bias is not None:
        out = out + bias.double()
    return out


def inputs(shape, dtype, param_dtype, affine, seed, residual_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    width = shape[-1]
    x = (3 * torch.randn(shape, generator=generator) + 2).to(dtype)  # an offset: the mean matters
    residual = torch.randn(shape, generator=generator).to(residual_dtype or dtype)
    weight = (torch.rand(width, generator=generator) + 0.5).to(param_dtype) if affine else None
    bias = torch.randn(width, generator=generator).to(param_dtype) if affine else None
    return x, residual, weight, bias


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype, residual_dtype, param_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.bfloat16, torch.float32)])  # promoted: fp32
@pytest.mark.parametrize("shape", [(1, 128, 768), (1024, 384), (3, 5, 72), (1, 8), (7, 776)])
def test_native_add_layer_norm_matches_float64(isa, dtype, residual_dtype, param_dtype, shape):
    for affine in (True, False):
        x, residual, weight, bias = inputs(shape, dtype, param_dtype, affine, seed=shape[-1],
                                           residual_dtype=residual_dtype)
        out = add_layer_norm_cpu(x, residual, (shape[-1],), weight, bias, 1e-12, library=library_for(isa))
        out_dtype = torch.promote_types(dtype, residual_dtype)
        assert x.dtype == dtype and residual.dtype == residual_dtype
        assert out.shape == x.shape and out.dtype == out_dtype
        expected = reference(x, residual, weight, bias, 1e-12)
        error = (out.double() - expected).abs()
        if out_dtype == torch.float32:
            assert error.max().item() < 1e-5 * (1 + expected.abs().max().item())
        else:  # one bf16 rounding of the output (2^-9 relative), and fp32 statistics
            assert (error <= expected.abs() * 2.0 ** -8 + 1e-3).all()
        # ... and what torch's add and norm in that dtype give, to their roundings.
        torch_out = F.layer_norm(x + residual, (shape[-1],), weight, bias, 1e-12)
        limit = 1e-5 if out_dtype == torch.float32 else 2.0 ** -7
        assert ((out.double() - torch_out.double()).abs() <= limit * (1 + torch_out.double().abs())).all()


@needs_native
def test_native_add_layer_norm_is_bit_identical_for_any_thread_count():
    before = torch.get_num_threads()
    for dtype in (torch.float32, torch.bfloat16):
        x, residual, weight, bias = inputs((37, 392), dtype, dtype, True, seed=0)
        try:
            outputs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outputs.append(add_layer_norm_cpu(x, residual, (392,), weight, bias, 1e-5))
        finally:
            torch.set_num_threads(before)
        assert all(torch.equal(outputs[0], other) for other in outputs[1:])


@needs_native
def test_native_add_layer_norm_keeps_a_nan_in_its_row():
    x, residual, weight, bias = inputs((4, 64), torch.float32, torch.float32, True, seed=1)
    x[2, 5] = float("nan")
    out = add_layer_norm_cpu(x, residual, (64,), weight, bias, 1e-5)
    assert out[2].isnan().all()  # the row's statistics are NaN
    expected = reference(x, residual, weight, bias, 1e-5)
    keep = torch.tensor([0, 1, 3])
    assert (out[keep].double() - expected[keep]).abs().max().item() < 1e-5


def test_what_takes_the_native_norm_and_what_stays_on_torch():
    x, residual, weight, bias = inputs((2, 9, 64), torch.float32, torch.float32, True, seed=2)
    native = bool(ISAS)
    with torch.inference_mode():
        assert runs_native_add_layer_norm(x, residual, (64,), weight, bias, 1e-5) is native
        assert runs_native_add_layer_norm(x, residual, (64,), None, None, 0.0) is native
    refused = [
        (x, residual.double(), (64,), weight, bias, 1e-5),  # an fp64 residual
        (x, residual[:, :8], (64,), weight, bias, 1e-5),  # another shape
        (x.transpose(0, 1), residual.transpose(0, 1), (64,), weight, bias, 1e-5),  # not contiguous
        (x, residual, (9, 64), weight.expand(9, 64), bias.expand(9, 64), 1e-5),  # over two dimensions
        (x[..., :62], residual[..., :62], (62,), weight[:62], bias[:62], 1e-5),  # width not a multiple of 4
        (x, residual, (64,), weight.half(), bias.half(), 1e-5),  # fp16 parameters
        (x, residual, (64,), weight, bias.bfloat16(), 1e-5),  # mixed parameter dtypes
        (x, residual, (64,), weight.bfloat16(), bias.bfloat16(), 1e-5),  # bf16 parameters on fp32 (torch refuses too)
        (x, residual, (64,), weight, bias, float("nan")),  # eps not a number
        (x.double(), residual.double(), (64,), weight.double(), bias.double(), 1e-5),  # fp64
    ]
    bf16 = x.bfloat16()[..., :60]
    refused.append((bf16, bf16, (60,), None, None, 1e-5))  # bf16 width not a multiple of 8
    refused.append((x, residual, 64, weight, bias, 1e-5))  # not a tuple
    for case in refused:
        with torch.inference_mode():
            assert not runs_native_add_layer_norm(*case)
        with pytest.raises(ValueError):
            add_layer_norm_cpu(*case)
    # Gradients wanted: torch's ops, which record them.
    leaf = x.clone().requires_grad_()
    assert not runs_native_add_layer_norm(leaf, residual, (64,), weight, bias, 1e-5)
    out = add_layer_norm(leaf, residual, (64,), weight, bias, 1e-5)
    out.sum().backward()
    assert leaf.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_layer_norm_is_torchs_layer_norm_of_the_sum(dtype):
    # Whichever path runs (native where it can, torch elsewhere), the same values to rounding.
    for shape, normalized in (((2, 9, 64), (64,)), ((2, 9, 62), (62,)), ((3, 4, 8), (4, 8))):
        x, residual, _, _ = inputs(shape, dtype, dtype, False, seed=3)
        weight = torch.rand(normalized, generator=torch.Generator().manual_seed(4)).to(dtype) + 0.5
        bias = torch.randn(normalized, generator=torch.Generator().manual_seed(5)).to(dtype)
        with torch.inference_mode():
            out = add_layer_norm(x, residual, normalized, weight, bias, 1e-5)
        expected = F.layer_norm(x + residual, normalized, weight, bias, 1e-5)
        limit = 1e-5 if dtype == torch.float32 else 2.0 ** -7
        assert out.shape == expected.shape and out.dtype == dtype
        assert ((out.double() - expected.double()).abs() <= limit * (1 + expected.double().abs())).all()


@needs_native
def test_add_layer_norm_op_traces_with_its_fake():
    from nn_blocksparse import ops

    x, residual, weight, bias = inputs((2, 5, 32), torch.float32, torch.float32, True, seed=6)
    torch.library.opcheck(ops.add_layer_norm_cpu, (x, residual, [32], weight, bias, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


@needs_native
def test_negated_views_are_read_as_their_values():
    x, residual, weight, bias = inputs((3, 64), torch.float32, torch.float32, True, seed=8)
    views = [torch._neg_view(tensor) for tensor in (x, residual, weight, bias)]
    assert all(view.is_neg() and view.is_contiguous() for view in views)
    out = add_layer_norm_cpu(*views[:2], (64,), *views[2:], 1e-5)
    expected = reference(-x, -residual, -weight, -bias, 1e-5)
    assert (out.double() - expected).abs().max().item() < 1e-5


def _close(out, expected, dtype):
    limit = 1e-5 if dtype == torch.float32 else 2.0 ** -7
    return bool(((out.double() - expected).abs() <= limit * (1 + expected.abs())).all())


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reuse_x_writes_the_result_over_x(isa, dtype):
    x, residual, weight, bias = inputs((5, 16, 96), dtype, dtype, True, seed=9)
    expected = reference(x, residual, weight, bias, 1e-5)
    apart = add_layer_norm_cpu(x, residual, (96,), weight, bias, 1e-5, library=library_for(isa))
    version = x._version
    out = add_layer_norm_cpu(x, residual, (96,), weight, bias, 1e-5, library=library_for(isa), reuse_x=True)
    assert out.data_ptr() == x.data_ptr() and out._version > version  # autograd sees the write
    assert torch.equal(out, apart) and _close(out, expected, dtype)
    # residual that is x itself: each row is read whole before it is written.
    y = (3 * torch.randn(7, 64, generator=torch.Generator().manual_seed(10)) + 1).to(dtype)
    expected = reference(y, y, None, None, 1e-5)
    out = add_layer_norm_cpu(y, y, (64,), None, None, 1e-5, library=library_for(isa), reuse_x=True)
    assert out.data_ptr() == y.data_ptr() and _close(out, expected, dtype)


@needs_native
def test_reuse_x_leaves_x_alone_where_writing_over_it_would_change_another_input():
    base = torch.randn(9 * 64, generator=torch.Generator().manual_seed(11))
    cases = {
        "residual overlapping x, shifted a row": (base[64:], base[:-64]),
        "residual overlapping x, shifted an element": (base[1:8 * 64 + 1], base[:8 * 64]),
    }
    for name, (x, residual) in cases.items():
        x, residual = x.view(-1, 64), residual.view(-1, 64)
        expected = reference(x, residual, None, None, 1e-5)
        before = base.clone()
        out = add_layer_norm_cpu(x, residual, (64,), None, None, 1e-5, reuse_x=True)
        assert out.data_ptr() != x.data_ptr() and torch.equal(base, before), name
        assert _close(out, expected, torch.float32), name
    # weight inside x's memory: every row reads it.
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(12)) + 1
    residual = torch.randn(4, 32, generator=torch.Generator().manual_seed(13))
    weight = x[1]
    expected = reference(x, residual, weight, None, 1e-5)
    out = add_layer_norm_cpu(x, residual, (32,), weight, None, 1e-5, reuse_x=True)
    assert out.data_ptr() != x.data_ptr() and _close(out, expected, torch.float32)
    # bf16 x onto an fp32 residual: the fp32 result does not fit x.
    x, residual, weight, bias = inputs((3, 64), torch.bfloat16, torch.float32, True, seed=14,
                                       residual_dtype=torch.float32)
    kept = x.clone()
    out = add_layer_norm_cpu(x, residual, (64,), weight, bias, 1e-5, reuse_x=True)
    assert out.dtype == torch.float32 and torch.equal(x, kept)
    assert _close(out, reference(x, residual, weight, bias, 1e-5), torch.float32)


@needs_native
def test_reuse_x_is_refused_where_the_op_runs():
    # Under a dispatch mode the op runs, and the op mutates nothing: x keeps its values.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x, residual, weight, bias = inputs((4, 64), torch.float32, torch.float32, True, seed=15)
    kept = x.clone()
    with torch.inference_mode(), Passthrough():
        out = add_layer_norm(x, residual, (64,), weight, bias, 1e-5, reuse_x=True)
    assert torch.equal(x, kept) and _close(out, reference(x, residual, weight, bias, 1e-5), torch.float32)


@needs_native
@pytest.mark.parametrize("dtype, residual_dtype, param_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.float32)])
def test_add_layer_norm_kept_for_its_parameters_matches_the_general_path(dtype, residual_dtype, param_dtype):
    from nn_blocksparse.cpu.layer_norm import NativeAddNormCall
    from nn_blocksparse.norm import AddLayerNorm

    kept = AddLayerNorm()
    for seed in (16, 17):  # a second call on the prepared call
        x, residual, weight, bias = inputs((2, 33, 128), dtype, param_dtype, True, seed=seed,
                                           residual_dtype=residual_dtype)
        expected = add_layer_norm_cpu(x, residual, (128,), weight, bias, 1e-6)
        with torch.inference_mode():
            out = kept(x, residual, (128,), weight, bias, 1e-6)
            assert torch.equal(out, expected) and isinstance(kept._prepared[1], NativeAddNormCall)
            reused = kept(x, residual, (128,), weight, bias, 1e-6, reuse_x=True)
        assert torch.equal(reused, expected) and (reused.data_ptr() == x.data_ptr()) == (dtype == reused.dtype)


@needs_native
def test_add_layer_norm_kept_for_its_parameters_sends_what_it_cannot_serve_to_the_general_path():
    import copy
    import pickle

    from nn_blocksparse.norm import AddLayerNorm

    kept = AddLayerNorm()
    x, residual, weight, bias = inputs((3, 8, 64), torch.float32, torch.float32, True, seed=18)
    for args in [
        (x.transpose(0, 1), residual.transpose(0, 1)),  # not contiguous
        (torch._neg_view(x), residual),  # a negated view
        (x[..., :32], residual[..., :32]),  # another width than the parameters'
        (x, residual.double()),  # an fp64 residual onto fp32 parameters
        (x.bfloat16(), residual.bfloat16()),  # bf16 sums with fp32 parameters: served
    ]:
        if args[0].shape[-1] == 64 and args[1].dtype != torch.float64:
            with torch.inference_mode():
                out = kept(*args, (64,), weight, bias, 1e-5)
            expected = F.layer_norm(args[0] + args[1], (64,), weight, bias, 1e-5)
            limit = 1e-5 if out.dtype == torch.float32 else 2.0 ** -7
            assert ((out.double() - expected.double()).abs() <= limit * (1 + expected.double().abs())).all()
        else:
            with pytest.raises(RuntimeError):  # torch's norm refuses these too
                kept(*args, (64,), weight, bias, 1e-5)
    # Parameters of another kind: prepared again (fp64 ones: none, torch computes them).
    with torch.inference_mode():
        out = kept(x.double(), residual.double(), (64,), weight.double(), bias.double(), 1e-5)
    assert kept._prepared[1] is None and out.dtype == torch.float64
    with torch.inference_mode():
        kept(x, residual, (64,), weight, bias, 1e-5)
    assert kept._prepared[1] is not None
    # Gradients wanted: torch's ops, which record them.
    leaf = x.clone().requires_grad_()
    kept(leaf, residual, (64,), weight, bias, 1e-5).sum().backward()
    assert leaf.grad is not None
    # Copies and pickles hold no loaded library: they prepare again.
    for copied in (copy.deepcopy(kept), pickle.loads(pickle.dumps(kept))):
        assert copied._prepared == (None, None)
