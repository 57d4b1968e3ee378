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
from nn_blocksparse.dense_linear import DenseLinear

X86_LINUX = platform.machine() in ("x86_64", "AMD64") and platform.system() == "Linux"


def test_onednn_runs_on_x86_linux_builds_of_torch():
    """torch's x86-64 Linux wheels ship oneDNN: the fast path must not silently be the fallback there."""
    if not X86_LINUX:
        pytest.skip("oneDNN is optional off x86-64 Linux; the fallback is tested below")
    assert onednn_available(torch.float32) and onednn_available(torch.bfloat16)
    layer = DenseLinear(64, 32, activation="gelu")  # parameters, as a module holds them
    x = torch.randn(4, 64)
    with torch.inference_mode():
        assert dense._onednn_runs(x, layer.weight, layer.bias)
    assert not dense._onednn_runs(x, layer.weight, layer.bias)  # gradients wanted: F.linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dense_linear_matches_a_float64_product(dtype, activation, with_bias):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(dtype)
    bias = torch.randn(96, generator=generator).to(dtype) if with_bias else None
    for x in (torch.randn(5, 64, generator=generator), torch.randn(2, 7, 64, generator=generator),
              torch.randn(64, 9, generator=generator).T):  # 2-D, 3-D, strided rows
        x = x.to(dtype)
        y = dense_linear_cpu(x, weight, bias, activation)
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
