"""The dense linear beside the block-sparse kernel: `cpu.dense_linear_cpu` (oneDNN where torch has it) and the
`DenseLinear` module hybrid keeps its dense matrices in, against a float64 dense product."""

import copy
import platform

import pytest
import torch
import torch.nn as nn

from helpers import assert_close_to_reference, dense_reference
from nn_blocksparse.cpu import dense
from nn_blocksparse.cpu.dense import dense_linear_cpu, onednn_available
from nn_blocksparse import set_prepack
from nn_blocksparse.dense_linear import DenseLinear

X86_LINUX = platform.machine() in ("x86_64", "AMD64") and platform.system() == "Linux"


def test_onednn_runs_on_x86_linux_builds_of_torch():
    """torch's x86-64 Linux wheels ship oneDNN: the fast path must not silently be the fallback there.

    fp32 everywhere; bf16 where oneDNN itself says this CPU has bf16 kernels (AVX-512 and up: on an
    AVX2-only CPU it has none, and the probe must say so rather than fail later).
    """
    if not X86_LINUX:
        pytest.skip("oneDNN is optional off x86-64 Linux; the fallback is tested below")
    assert onednn_available(torch.float32)
    assert onednn_available(torch.bfloat16) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    layer = DenseLinear(64, 32, activation="gelu")  # parameters, as a module holds them
    x = torch.randn(4, 64)
    with torch.inference_mode():
        assert dense._onednn_runs(x, layer.weight, layer.bias)
    assert not dense._onednn_runs(x, layer.weight, layer.bias)  # gradients wanted: F.linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation, fuse_gelu", [(None, None), ("gelu", None), ("gelu", True), ("gelu", False)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_linear_matches_a_float64_product(dtype, activation, fuse_gelu, with_bias):
    """Either GELU (in oneDNN's epilogue or after it, or as this machine's profile says) is exact GELU."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype) if with_bias else None
    for x in (torch.randn(5, 64, generator=generator), torch.randn(2, 7, 64, generator=generator),
              torch.randn(64, 9, generator=generator).T):  # 2-D, 3-D, strided rows
        x = x.to(dtype)
        y = dense_linear_cpu(x, weight, bias, activation, fuse_gelu=fuse_gelu)
        assert y.dtype == dtype and y.shape == (*x.shape[:-1], 96)
        assert_close_to_reference(y, dense_reference(x.reshape(-1, 64), weight, bias, activation).reshape(y.shape), dtype)


def test_fallbacks_give_the_same_result_and_keep_gradients(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(32, 48, generator=generator), torch.randn(32, generator=generator)
    x = torch.randn(6, 48, generator=generator)
    reference = dense_reference(x, weight, bias, "gelu")
    # Gradients wanted: F.linear, whose backward works.
    leaf = x.clone().requires_grad_()
    y = dense_linear_cpu(leaf, weight, bias, "gelu")
    y.sum().backward()
    assert leaf.grad is not None and leaf.grad.shape == x.shape
    assert_close_to_reference(y.detach(), reference, torch.float32)
    # Turned off, a non-contiguous weight, mixed dtypes: F.linear, same numbers.
    monkeypatch.setenv(dense.ONEDNN_ENV, "0")
    assert not onednn_available(torch.float32)
    assert_close_to_reference(dense_linear_cpu(x, weight, bias, "gelu"), reference, torch.float32)
    monkeypatch.delenv(dense.ONEDNN_ENV)
    transposed = weight.T.contiguous().T
    assert_close_to_reference(dense_linear_cpu(x, transposed, bias, "gelu"), reference, torch.float32)
    with pytest.raises(RuntimeError):  # F.linear's own error for mixed dtypes
        dense_linear_cpu(x.bfloat16(), weight, bias)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # sizes that do not fit: F.linear says so
        dense_linear_cpu(torch.randn(3, 47), weight, bias)
    with pytest.raises(ValueError, match="activation must be one of"):
        dense_linear_cpu(x, weight, bias, "relu")
    assert dense_linear_cpu(torch.randn(0, 48), weight, bias).shape == (0, 32)


def test_dense_linear_is_an_nn_linear_that_reads_its_weight_on_every_call():
    linear = nn.Linear(40, 24)
    layer = DenseLinear.from_tensors(linear.weight.detach(), linear.bias.detach(), activation="gelu")
    assert isinstance(layer, nn.Linear) and layer.activation == "gelu" and "activation=gelu" in repr(layer)
    assert layer.state_dict().keys() == linear.state_dict().keys()
    x = torch.randn(3, 40)
    with torch.inference_mode():
        assert_close_to_reference(layer(x), dense_reference(x, linear.weight, linear.bias, "gelu"), torch.float32)
        layer.weight.mul_(2)  # an in-place change is seen: nothing derived from the weight is kept
        assert_close_to_reference(layer(x), dense_reference(x, 2 * linear.weight, linear.bias, "gelu"), torch.float32)
    copied = copy.deepcopy(layer)
    assert torch.equal(copied.weight, layer.weight) and copied.activation == "gelu"
    plain = DenseLinear(40, 24, bias=False)
    assert plain.activation is None and plain.bias is None
    with pytest.raises(ValueError, match="activation must be one of"):
        DenseLinear(40, 24, activation="tanh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_match_a_float64_product_and_follow_every_change_made_through_the_weight(dtype):
    generator = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    layer = DenseLinear.from_tensors(weight.to(dtype), bias.to(dtype), activation="gelu", prepack=True)
    assert layer.prepack and "prepack=True" in repr(layer)
    x = torch.randn(2, 5, 64, generator=generator).to(dtype)

    def expected():
        return dense_reference(x.reshape(-1, 64), layer.weight.detach(), layer.bias.detach(), "gelu").reshape(2, 5, 48)

    with torch.inference_mode():
        assert_close_to_reference(layer(x), expected(), dtype)
        with torch.no_grad():
            layer.weight.mul_(-1)  # in place through the weight: its version counter moves
        assert_close_to_reference(layer(x), expected(), dtype)
        layer.weight[3].zero_()  # through a view: the same counter
        assert_close_to_reference(layer(x), expected(), dtype)
    layer.load_state_dict({"weight": weight.to(dtype) * 3, "bias": bias.to(dtype)})  # loaded
    with torch.inference_mode():
        assert_close_to_reference(layer(x), expected(), dtype)
    layer.weight = nn.Parameter(torch.randn(48, 64, generator=generator).to(dtype))  # replaced
    with torch.inference_mode():
        assert_close_to_reference(layer(x), expected(), dtype)
    # A write past the version counter is not seen until repack(): why prepacking is opt-in.
    layer.weight.data.copy_(torch.randn(48, 64, generator=generator).to(dtype))
    layer.repack()
    with torch.inference_mode():
        assert_close_to_reference(layer(x), expected(), dtype)
    # Moved to another dtype (param.data swapped: same Parameter, other storage).
    layer.to(torch.float32)
    with torch.inference_mode():
        x = x.float()
        assert_close_to_reference(layer(x), expected(), torch.float32 if dtype == torch.float32 else dtype)
    assert layer.state_dict().keys() == {"weight", "bias"}


def test_prepacked_layers_copy_and_pickle_without_their_packed_weight():
    import pickle

    layer = DenseLinear(32, 16, prepack=True)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        y = layer(x)
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.prepack
        with torch.inference_mode():
            assert torch.equal(copied(x), y)
        with torch.no_grad():
            copied.weight.add_(1)  # the copy has its own weight and packs its own copy of it
        with torch.inference_mode():
            assert torch.equal(layer(x), y)
            assert_close_to_reference(copied(x), dense_reference(x, copied.weight, copied.bias, None), torch.float32)


def test_set_prepack_switches_every_dense_and_block_sparse_linear_of_a_model():
    from nn_blocksparse import BlockSparseLinear

    sparse = BlockSparseLinear.from_dense(torch.randn(16, 32), block_size=16)
    model = nn.Sequential(DenseLinear(32, 32), nn.ReLU(), nn.Sequential(DenseLinear(32, 32, activation="gelu")),
                          sparse, nn.Linear(16, 2))
    assert set_prepack(model) == 3
    assert all(m.prepack for m in model.modules() if isinstance(m, (DenseLinear, BlockSparseLinear)))
    x = torch.randn(2, 32)
    with torch.inference_mode():
        y = model(x)
    assert set_prepack(model, False) == 3
    assert not any(m.prepack for m in model.modules() if isinstance(m, (DenseLinear, BlockSparseLinear)))
    assert all(m._packed._copy._entry is None for m in model.modules() if isinstance(m, DenseLinear))
    assert sparse.prepacked_bytes == 0
    with torch.inference_mode():
        assert torch.equal(model(x), y)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        set_prepack(model, 1)
    with pytest.raises(TypeError, match="prepack must be a bool"):
        DenseLinear(8, 8, prepack="yes")


def test_weights_made_in_inference_mode_are_never_packed():
    """They have no version counter, so an in-place write could not be seen: the plain weight is read."""
    from nn_blocksparse.cpu.dense import PackedWeight

    with torch.inference_mode():
        layer = DenseLinear(16, 8, prepack=True)
        x = torch.randn(2, 16)
        layer(x)
        assert layer._packed._copy._entry is None
        layer.weight.mul_(3)
        assert_close_to_reference(layer(x), dense_reference(x, layer.weight, layer.bias, None), torch.float32)
    packed = PackedWeight()
    weight = torch.randn(8, 16)
    if dense._packing_works(torch.float32):
        assert packed.for_weight(weight) is not weight and packed.for_weight(weight) is packed.for_weight(weight)
    else:
        assert packed.for_weight(weight) is weight


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_bf16_weights_take_fp32_inputs_and_give_fp32(activation):
    """patch_bert's weight_dtype: x rounded to bf16, fp32 accumulation, the output rounded to bf16 and
    returned in fp32; within bf16's rounding of a float64 product of the same bf16 weights."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(40, 64, generator=generator).bfloat16()
    bias = torch.randn(40, generator=generator).bfloat16()
    layer = DenseLinear.from_tensors(weight, bias, activation, prepack=True)
    x = torch.randn(2, 3, 64, generator=generator)
    reference = dense_reference(x.bfloat16().reshape(-1, 64), weight, bias, activation).reshape(2, 3, 40)
    with torch.inference_mode():
        for y in (layer(x), dense_linear_cpu(x, weight, bias, activation)):
            assert y.dtype == torch.float32
            assert_close_to_reference(y, reference, torch.bfloat16)


def test_bf16_weights_off_the_cpu_path_take_fp32_inputs_too(monkeypatch):
    """Where the forward is F.linear (a trace, another device), bf16 weights still take fp32 inputs."""
    generator = torch.Generator().manual_seed(4)
    layer = DenseLinear.from_tensors(torch.randn(24, 32, generator=generator).bfloat16(),
                                     torch.randn(24, generator=generator).bfloat16(), "gelu")
    x = torch.randn(5, 32, generator=generator)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.inference_mode():
        y = layer(x)
    assert y.dtype == torch.float32
    assert_close_to_reference(y, dense_reference(x.bfloat16(), layer.weight, layer.bias, "gelu"), torch.bfloat16)
