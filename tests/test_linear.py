"""BlockSparseLinear: drop-in for nn.Linear on both backends, safetensors round trip, bad input."""

import pytest
import torch
import torch.nn as nn

from helpers import RELATIVE_TOLERANCE, assert_close_to_reference, dense_reference
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse import BlockSparseLinear, block_sparse_linear
from nn_blocksparse.cuda_graph import capture_graph
from nn_blocksparse.kernels.configs import KernelConfig


def make_linear(n=96, k=128, density=0.4, block_size=32, dtype=torch.float32, seed=0, bias=True):
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(random_block_sparse_weight(n, k, block_size, density, seed))
    return linear.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_from_linear_matches_nn_linear(kernel_device, dtype, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    linear = make_linear(dtype=dtype).to(device)
    sparse = BlockSparseLinear.from_linear(linear, block_size=32, backend=backend)
    assert (sparse.in_features, sparse.out_features) == (128, 96)
    assert torch.equal(sparse.weight, linear.weight.detach())
    assert torch.equal(sparse.bias, linear.bias)
    x = torch.randn(2, 9, 128).to(dtype).to(device)
    assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, linear.bias), dtype)


def test_cpu_path_reads_the_stored_values_so_changes_are_never_stale():
    # No second copy of the weights on CPU: in-place edits, deep copies, casts and state dicts are
    # all seen by the next call.
    import copy

    linear = make_linear()
    sparse = BlockSparseLinear.from_linear(linear)
    x = torch.randn(5, 128)
    with torch.inference_mode():
        assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, linear.bias), torch.float32)
    with torch.no_grad():
        sparse.values.mul_(2.0)
    with torch.inference_mode():
        assert_close_to_reference(sparse(x), dense_reference(x, 2 * linear.weight, linear.bias), torch.float32)
    twin = copy.deepcopy(sparse)
    with torch.no_grad():
        twin.values.zero_()
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), linear.bias.detach().expand(5, -1))
        assert_close_to_reference(sparse(x), dense_reference(x, 2 * linear.weight, linear.bias), torch.float32)
    sparse.load_state_dict(BlockSparseLinear.from_linear(linear).state_dict())
    with torch.inference_mode():
        assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, linear.bias), torch.float32)
        assert sparse.to(torch.float16)(x.half()).dtype == torch.float16


def test_cpu_forward_calls_the_kernel_directly_and_follows_every_change(monkeypatch):
    # Plain eager CPU calls skip the general path's per-call checks (NativeLinearCall), yet follow a
    # new activation, a replaced bias and tensors swapped through `.data`, as the general path does.
    from nn_blocksparse import functional, linear as linear_module
    from nn_blocksparse.cpu import native_isa

    if native_isa() is None:
        pytest.skip("no native kernel here: the general path runs")
    linear = make_linear()
    sparse = BlockSparseLinear.from_linear(linear)
    x = torch.randn(2, 3, 128)

    def general_path(*args):
        raise AssertionError("took the general path")

    with torch.inference_mode(), monkeypatch.context() as patch:
        patch.setattr(linear_module, "block_sparse_linear_tensors", general_path)
        assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, linear.bias), torch.float32)
        sparse.activation = "gelu"
        expected = torch.nn.functional.gelu(dense_reference(x, linear.weight, linear.bias))
        assert_close_to_reference(sparse(x), expected, torch.float32)
        sparse.activation = None
        bias = torch.randn(linear.out_features)
        sparse.bias = nn.Parameter(bias, requires_grad=False)
        assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, bias), torch.float32)
    # A bias that is a buffer, or computed by a parametrization, is read as the general path reads it.
    del sparse.bias
    sparse.register_buffer("bias", bias.clone())
    with torch.inference_mode():
        assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, bias), torch.float32)
    del sparse.bias
    sparse.bias = nn.Parameter(bias.clone(), requires_grad=False)

    class Doubled(nn.Module):
        def forward(self, tensor):
            return 2 * tensor

    torch.nn.utils.parametrize.register_parametrization(sparse, "bias", Doubled())
    with torch.inference_mode():
        assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, 2 * bias), torch.float32)
    torch.nn.utils.parametrize.remove_parametrizations(sparse, "bias")
    # A bias of neither x's dtype nor the weight's: refused, as on the general path.
    with torch.no_grad():
        sparse.bias.data = sparse.bias.data.to(torch.bfloat16)
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse(x)
    with torch.no_grad():
        sparse.bias.data = bias.clone()
    # Gradients wanted (of x, or of the bias): the general path's dense fallback and its warning.
    with pytest.warns(UserWarning):
        assert sparse(x.clone().requires_grad_()).requires_grad
    sparse.bias.requires_grad_(True)
    with pytest.warns(UserWarning):
        sparse(x).sum().backward()
    assert sparse.bias.grad is not None and sparse.bias.grad.abs().sum() > 0
    sparse.bias.requires_grad_(False)
    # Another layout swapped in past the module's checks: read as the general path reads it.
    with torch.no_grad():
        sparse.values.data = sparse.values.data.transpose(1, 2).contiguous().transpose(1, 2)
    assert not sparse.values.is_contiguous()
    with pytest.raises(ValueError, match="contiguous"):
        sparse(x)
    # Index contents swapped in through `.data` (no version counter sees it): validated again, refused.
    original = sparse.col_indices.data
    with torch.no_grad():
        sparse.col_indices.data = torch.full_like(original, 10**8)
    with pytest.raises(ValueError):
        sparse(x)
    with torch.no_grad():
        sparse.col_indices.data = original
    # Fewer stored blocks swapped in past the module's checks: refused, never read out of bounds.
    with torch.no_grad():
        sparse.values.data = sparse.values.data[:1].clone()
    with pytest.raises(ValueError, match="one entry per block"):
        sparse(x)


def test_prepacked_layer_gives_the_plain_layers_bits_and_follows_every_change_made_through_values():
    # prepack=True keeps each block transposed for the fp32 CPU kernel: the same bits as reading the
    # stored blocks, made again whenever values change as far as the tensor can tell.
    import copy

    from nn_blocksparse.cpu import native_isa

    linear = make_linear(n=96, k=128, density=0.5, seed=3)
    plain = BlockSparseLinear.from_linear(linear, activation="gelu")
    packed = BlockSparseLinear.from_linear(linear, activation="gelu", prepack=True)
    assert packed.prepack and not plain.prepack and "prepack=True" in repr(packed)
    x = torch.randn(3, 40, 128)

    def expected(layer):
        return torch.nn.functional.gelu(dense_reference(x, layer.weight, layer.bias))

    def kept(layer):
        return layer.prepacked_bytes > 0

    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
        assert_close_to_reference(packed(x), expected(packed), torch.float32)
        assert kept(packed) == (native_isa() is not None) and not kept(plain)
        assert packed.prepacked_bytes in (0, packed.values.numel() * packed.values.element_size())
        with torch.no_grad():
            packed.values.mul_(-1)  # in place: the version counter moves
        assert_close_to_reference(packed(x), expected(packed), torch.float32)
        packed.values[2].zero_()  # through a view: the same counter
        assert_close_to_reference(packed(x), expected(packed), torch.float32)
    packed.load_state_dict(BlockSparseLinear.from_linear(make_linear(n=96, k=128, density=0.3, seed=4)).state_dict())
    with torch.inference_mode():
        assert_close_to_reference(packed(x), expected(packed), torch.float32)
    twin = copy.deepcopy(packed)  # its own values, and no copy of the original's transposed blocks
    assert not kept(twin)
    with torch.no_grad():
        twin.values.add_(1)
    with torch.inference_mode():
        assert_close_to_reference(twin(x), expected(twin), torch.float32)
        assert_close_to_reference(packed(x), expected(packed), torch.float32)
    # A write past the version counter is seen after repack(): why prepacking is opt-in.
    packed.values.data.copy_(torch.randn(packed.values.shape))
    packed.repack()
    assert not kept(packed)
    with torch.inference_mode():
        assert_close_to_reference(packed(x), expected(packed), torch.float32)
        # bf16 blocks are read as stored (the bf16 kernels take them so): nothing is kept for them.
        packed.to(torch.bfloat16)
        rounded = torch.nn.functional.gelu(dense_reference(x.bfloat16(), packed.weight, packed.bias))
        assert_close_to_reference(packed(x), rounded, torch.bfloat16)
        assert not kept(packed)
    with pytest.raises(TypeError, match="prepack must be a bool"):
        BlockSparseLinear(32, 32, prepack=1)


def test_a_layer_made_in_inference_mode_keeps_no_transposed_blocks():
    # Its values have no version counter, so an in-place write could not be seen: they are read as stored.
    with torch.inference_mode():
        sparse = BlockSparseLinear.from_linear(make_linear(), prepack=True)
        x = torch.randn(4, 128)
        sparse(x)
        assert sparse.prepacked_bytes == 0
        sparse.values.mul_(3)
        assert_close_to_reference(sparse(x), dense_reference(x, sparse.weight, sparse.bias), torch.float32)


def test_bf16_weights_take_fp32_input_on_cpu():
    # Mixed precision: bf16 values and bias, fp32 x and y; x is rounded to bf16 inside the kernel.
    linear = make_linear()
    sparse = BlockSparseLinear.from_linear(linear, activation="gelu").to(torch.bfloat16)
    x = torch.randn(3, 7, 128)
    with torch.inference_mode():
        y = sparse(x)
    assert y.dtype == torch.float32 and y.shape == (3, 7, 96)
    expected = dense_reference(x.bfloat16(), sparse.weight, sparse.bias, "gelu")
    assert_close_to_reference(y, expected, torch.float32)
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse(x.half())


def test_torch_backend_name_is_a_deprecated_alias_of_cpu():
    # The warnings point at this file, the caller's: where Python's default filters show them.
    with pytest.warns(DeprecationWarning, match="cpu") as caught:
        sparse = BlockSparseLinear.from_linear(make_linear(), backend="torch")
    assert sparse.backend == "cpu" and caught[0].filename == __file__
    x = torch.randn(4, 128)
    with pytest.warns(DeprecationWarning, match="cpu") as caught:
        y = block_sparse_linear(x, sparse.matrix, sparse.bias, backend="torch")
    assert caught[0].filename == __file__
    torch.testing.assert_close(y, sparse(x))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_gelu_is_fused(kernel_device, backend):
    device = kernel_device if backend == "triton" else torch.device("cpu")
    linear = make_linear().to(device)
    sparse = BlockSparseLinear.from_linear(linear, activation="gelu", backend=backend)
    x = torch.randn(7, 128, device=device)
    assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, linear.bias, "gelu"), torch.float32)


def test_matrix_and_its_row_groups_are_kept_until_the_weights_change(kernel_device):
    linear = make_linear(n=128, density=0.5)
    sparse = BlockSparseLinear.from_linear(linear, backend="triton").to(kernel_device)
    matrix = sparse.matrix
    groups = matrix.row_groups(2)
    assert sparse.matrix is matrix and sparse.matrix.row_groups(2) is groups  # not rebuilt per forward
    # Weights with the same block count loaded in place (rows reversed: same nnz, other layout):
    # the indices change under the same tensors, so the groups must be derived again.
    other = make_linear(n=128, density=0.5)
    with torch.no_grad():
        other.weight.copy_(linear.weight.flip(0))
    replacement = BlockSparseLinear.from_linear(other).to(kernel_device)
    assert replacement.values.shape == sparse.values.shape
    sparse.load_state_dict(replacement.state_dict())
    assert sparse.matrix is not matrix
    x = torch.randn(6, 128, device=kernel_device)
    config = KernelConfig(block_m=16, rows_per_program=2)
    y = block_sparse_linear(x, sparse.matrix, sparse.bias, backend="triton", config=config)
    assert_close_to_reference(y, dense_reference(x, other.weight, other.bias), torch.float32)


def test_safetensors_round_trip_is_exact(tmp_path):
    sparse = BlockSparseLinear.from_linear(make_linear(dtype=torch.float16), activation="gelu")
    file = tmp_path / "layer.safetensors"
    sparse.save(file)
    loaded = BlockSparseLinear.load(file)
    assert loaded.activation == "gelu" and loaded.block_size == 32
    for name, tensor in sparse.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(3, 128).half()
    assert torch.equal(loaded(x), sparse(x))
    # Loading a state dict into a module with another block count adopts the stored blocks.
    other = BlockSparseLinear(128, 96, block_size=32, dtype=torch.float16)
    other.load_state_dict(sparse.state_dict())
    assert torch.equal(other.weight, sparse.weight)
    with pytest.raises(ValueError, match="not a BlockSparseLinear"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        BlockSparseLinear.load(tmp_path / "other.safetensors")


def test_no_bias_and_empty_weight():
    linear = make_linear(bias=False, density=0.0)
    sparse = BlockSparseLinear.from_linear(linear)
    assert sparse.bias is None and sparse.density == 0.0
    assert torch.equal(sparse(torch.randn(4, 128)), torch.zeros(4, 96))


def test_bad_input_names_the_problem():
    sparse = BlockSparseLinear.from_linear(make_linear())
    with pytest.raises(TypeError, match="dtype mismatch"):
        sparse(torch.randn(4, 128, dtype=torch.float16))
    with pytest.raises(TypeError, match="dtype"):
        sparse(torch.ones(4, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="in_features = 128"):
        sparse(torch.randn(4, 100))
    with pytest.raises(ValueError, match="device mismatch"):
        sparse(torch.randn(4, 128, device="meta"))
    with pytest.raises(ValueError, match="divide"):
        BlockSparseLinear.from_linear(nn.Linear(100, 64), block_size=32)
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseLinear.from_linear(nn.Linear(96, 96), block_size=24)
    with pytest.raises(ValueError, match="activation"):
        BlockSparseLinear.from_linear(nn.Linear(64, 64), activation="relu")
    with pytest.raises(ValueError, match="backend"):
        BlockSparseLinear.from_linear(nn.Linear(64, 64), backend="cuda")
    with pytest.raises(TypeError, match="nn.Linear"):
        BlockSparseLinear.from_linear(nn.Conv1d(4, 4, 1))


def test_strided_input_works_and_nan_propagates():
    linear = make_linear(density=1.0)
    sparse = BlockSparseLinear.from_linear(linear)
    x = torch.randn(128, 10).T  # stride along K is 10
    assert_close_to_reference(sparse(x), dense_reference(x, linear.weight, linear.bias), torch.float32)
    x = torch.randn(3, 128)
    x[1, 5] = float("nan")
    y = sparse(x)
    dense = linear(x)
    assert torch.equal(torch.isnan(y), torch.isnan(dense))  # density 1: exactly the dense NaN pattern
    assert torch.isfinite(y[[0, 2]]).all()


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    # In a fresh process without TRITON_INTERPRET, the kernel cannot run on CPU tensors.
    import os
    import subprocess
    import sys

    script = (
        "import torch; from nn_blocksparse import BlockSparseLinear;"
        "m = BlockSparseLinear.from_dense(torch.randn(64, 64), backend='triton');"
        "m(torch.randn(2, 64))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


def test_tolerances_are_meaningful():
    # The dtype tolerances must be tighter than the error of skipping one real block.
    assert RELATIVE_TOLERANCE[torch.float32] < 1e-4 and RELATIVE_TOLERANCE[torch.bfloat16] < 1e-2


def test_grad_mode_falls_back_to_dense_so_gradients_flow():
    linear = make_linear()
    sparse = BlockSparseLinear.from_linear(linear)
    x = torch.randn(4, 128, requires_grad=True)
    with pytest.warns(UserWarning, match="falls back to a dense"):
        y = sparse(x)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    linear(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    with torch.inference_mode():
        assert_close_to_reference(sparse(x.detach()), dense_reference(x.detach(), linear.weight, linear.bias),
                                  torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the eager twins above run on CPU")
@pytest.mark.parametrize("m", [16, 512])  # split-K (a partial-sum buffer inside the graph), and row tiles
def test_replays_in_a_cuda_graph(m):
    """Serving with CUDA graphs (what the README recommends): a captured forward, replayed on new input,
    matches the dense reference."""
    linear = make_linear(768, 768, density=0.5, dtype=torch.float16, seed=m).cuda()
    layer = BlockSparseLinear.from_linear(linear, activation="gelu")
    generator = torch.Generator().manual_seed(m)
    x = torch.randn(m, 768, generator=generator).half().cuda()
    with torch.no_grad():
        layer(x)  # first call outside the graph: compiles, picks the config, derives row groups
        graph, y = capture_graph(lambda: layer(x), x.device, warmup=1)
        new_x = torch.randn(m, 768, generator=generator).half()
        x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
    assert_close_to_reference(y, dense_reference(new_x, linear.weight, linear.bias, "gelu"), torch.float16)


def _saved_layer(tmp_path, **overrides):
    """A saved layer's tensors and metadata, with `overrides` applied, written to a new file."""
    import json

    from safetensors.torch import save_file

    layer = BlockSparseLinear.from_linear(make_linear(density=0.6), activation="gelu")
    tensors = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    metadata = {"nn_blocksparse.BlockSparseLinear": json.dumps(layer.config_dict())}
    for name, value in overrides.items():
        if name == "metadata":
            metadata = value
        elif value is None:
            del tensors[name]
        else:
            tensors[name] = value(tensors[name]) if callable(value) else value
    file = tmp_path / "layer.safetensors"
    save_file(tensors, str(file), metadata=metadata)
    return layer, file


def _with(index, value):
    def transform(tensor):
        tensor[index] = value
        return tensor
    return transform


@pytest.mark.parametrize("overrides, error, message", [
    ({"col_indices": _with(0, 4)}, ValueError, r"col_indices\[0\] = 4 is outside \[0, 4\)"),
    ({"row_offsets": _with(1, 10**5)}, ValueError, "row_offsets must be non-decreasing"),
    ({"row_order": _with(0, 7)}, ValueError, r"row_order\[0\] = 7 is outside"),
    ({"row_order": lambda t: t.to(torch.int64)}, TypeError, "row_order must be torch.int32"),
    ({"values": lambda t: t.to(torch.int16)}, TypeError, "values must be a floating point"),
    ({"bias": lambda t: t[:-1]}, ValueError, "bias must be torch.float32 of shape"),
    ({"bias": None}, ValueError, "expected the tensors"),
    ({"extra": torch.zeros(2)}, ValueError, "expected the tensors"),
    ({"metadata": {"nn_blocksparse.BlockSparseLinear": "{not json"}}, ValueError, "not valid JSON"),
    ({"metadata": {"nn_blocksparse.BlockSparseLinear": "[1, 2]"}}, ValueError, "must have the fields"),
    ({"metadata": {"nn_blocksparse.BlockSparseLinear": '{"in_features": 128}'}}, ValueError, "must have the fields"),
    ({"metadata": {"nn_blocksparse.BlockSparseLinear": '{"in_features": "128", "out_features": 96, "bias": true, '
                   '"block_size": 32, "activation": null}'}}, TypeError, "'in_features' must be int"),
    ({"metadata": {"nn_blocksparse.BlockSparseLinear": '{"in_features": 1099511627776, "out_features": 96, '
                   '"bias": true, "block_size": 32, "activation": null}'}}, ValueError, "32-bit offsets"),
    ({"metadata": {"nn_blocksparse.BlockSparseLinear": '{"in_features": 128, "out_features": 96, "bias": true, '
                   '"block_size": 32, "activation": "relu"}'}}, ValueError, "activation must be one of"),
    ({"metadata": {"nn_blocksparse.BlockSparseLinear": '{"in_features": 128, "out_features": 192, "bias": true, '
                   '"block_size": 32, "activation": null}'}}, ValueError, "row_offsets must be 1-D with 7 entries"),
    ({"metadata": {}}, ValueError, "not a BlockSparseLinear file"),
])
def test_a_crafted_file_is_refused_naming_the_field(tmp_path, overrides, error, message):
    _, file = _saved_layer(tmp_path, **overrides)
    with pytest.raises(error, match=message):
        BlockSparseLinear.load(file)


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    _, file = _saved_layer(tmp_path)
    data = file.read_bytes()
    for cut in (4, 40, len(data) // 2, len(data) - 1):
        file.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            BlockSparseLinear.load(file)
    file.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        BlockSparseLinear.load(file)


def test_a_bad_state_dict_is_refused_before_anything_changes():
    layer = BlockSparseLinear.from_linear(make_linear(density=0.5))
    x = torch.randn(3, 128)
    before = layer(x)
    good = BlockSparseLinear.from_linear(make_linear(density=0.8, seed=1)).state_dict()
    for name, value, error, message in (
            ("col_indices", _with(-1, 9), ValueError, r"col_indices\[\d+\] = 9 is outside"),
            ("row_offsets", lambda t: t.to(torch.int64), TypeError, "row_offsets must be torch.int32"),
            ("row_order", lambda t: t.flip(0)[:-1], ValueError, "row_order must be 1-D"),
            ("values", lambda t: t[:-1], ValueError, "col_indices must be 1-D"),
            ("bias", lambda t: t.int(), TypeError, "bias must be a floating point"),
            ("bias", lambda t: t[:3], ValueError, r"bias must have shape \(96,\)")):
        state = dict(good)
        state[name] = value(state[name].clone())
        with pytest.raises(error, match=message):
            layer.load_state_dict(state)
        assert torch.equal(layer(x), before)  # nothing was copied
    # Only values, same block count: a valid partial load.
    layer.load_state_dict({"values": layer.values * 2}, strict=False)
    assert_close_to_reference(layer(x), 2 * (before - layer.bias) + layer.bias, torch.float32)


def test_indices_modified_in_place_are_caught_before_the_kernel(kernel_device):
    for backend, device in (("cpu", torch.device("cpu")), ("triton", kernel_device)):
        layer = BlockSparseLinear.from_linear(make_linear(density=0.5), backend=backend).to(device)
        x = torch.randn(3, 128, device=device)
        layer(x)
        with torch.no_grad():
            layer.col_indices[0] = 1000
        with pytest.raises(ValueError, match=r"col_indices\[0\] = 1000 is outside"):
            layer(x)


def test_a_loaded_layer_runs_on_both_backends(tmp_path, kernel_device):
    """Loaded tensors are the layer's own memory (safetensors' buffers cannot be resized, which
    the Triton interpreter needs)."""
    linear = make_linear(density=0.5)
    BlockSparseLinear.from_linear(linear).save(tmp_path / "layer.safetensors")
    x = torch.randn(4, 128)
    for backend, device in (("cpu", torch.device("cpu")), ("triton", kernel_device)):
        layer = BlockSparseLinear.load(tmp_path / "layer.safetensors", device=device, backend=backend)
        assert layer.values.untyped_storage().resizable()
        assert_close_to_reference(layer(x.to(device)), dense_reference(x, linear.weight, linear.bias), torch.float32)
