"""The torch.library ops of `nn_blocksparse.ops`: schemas, opcheck, launch tables, and what Inductor sees.

opcheck runs each op through the fake-tensor, schema and AOTAutograd (static and dynamic shape) checks
against its real implementation: the CPU path on CPU, the Triton kernel under the interpreter on CPU
or compiled on a GPU. The triton_op form (what a GPU process registers) is traced on CPU too, in a
subprocess without the interpreter, with fake CUDA tensors: the kernel launches are in the graph.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close_to_reference, dense_reference, requires_cuda
from nn_blocksparse.layouts import random_block_sparse_weight
from nn_blocksparse import ops
from nn_blocksparse.block_sparse_matrix import BlockSparseMatrix
from nn_blocksparse.functional import launch_table, single_launch
from nn_blocksparse.kernels.configs import KernelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def case(device, dtype, n=96, k=128, density=0.5, m=19, seed=0):
    weight = random_block_sparse_weight(n, k, 32, density, seed, dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=generator).to(dtype)
    bias = torch.randn(n, generator=generator).to(dtype)
    return x.to(device), weight.to(device), bias.to(device), BlockSparseMatrix.from_dense(weight, 32).to(device)


def test_schemas_are_the_documented_ones():
    assert str(torch.ops.nn_blocksparse.linear_cpu.default._schema) == (
        "nn_blocksparse::linear_cpu(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices, Tensor? bias, "
        "str? activation) -> Tensor")
    assert str(torch.ops.nn_blocksparse.linear_triton.default._schema) == (
        "nn_blocksparse::linear_triton(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices, "
        "Tensor row_order, Tensor[] row_groups, Tensor? bias, str? activation, SymInt[] launch_table) -> Tensor")
    for schema in ("(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices, Tensor? bias, str? activation)",
                   "Tensor[] row_groups, Tensor? bias, str? activation, SymInt[] launch_table) -> Tensor"):
        assert schema in " ".join(ops.__doc__.split())  # the docstring spells them out


def test_launch_table_picks_by_m_bucket_and_a_symbolic_m_takes_its_own_entry():
    small, medium, large = KernelConfig(16, k_blocks=4), KernelConfig(64), KernelConfig(128)
    symbolic = KernelConfig(32, split_k=2)
    table = ops.pack_launch_table([(5, small), (9, medium), (ops.ANY_ROWS, large)], symbolic)
    expected = {1: small, 16: small, 17: small, 32: small, 33: medium, 512: medium, 513: large, 10**7: large}
    assert {m: ops.config_for_rows(table, m) for m in expected} == expected
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    rows = ShapeEnv().create_unbacked_symint()
    assert ops.config_for_rows(table, rows) == symbolic
    for bad in ([], [(5, small)], [(9, medium), (5, small), (ops.ANY_ROWS, large)]):
        with pytest.raises(ValueError, match="ANY_ROWS"):
            ops.pack_launch_table(bad, symbolic)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_layers_launch_table_holds_every_row_grouping_it_uses(dtype):
    # Four block-rows at a time share a column pattern (as in a pruned head): grouping them pads
    # nothing, so at large M the heuristic groups block-rows, in 16-bit dtypes.
    keep = (torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5).repeat_interleave(4, 0)
    weight = torch.randn(512, 256) * keep.repeat_interleave(32, 0).repeat_interleave(32, 1)
    matrix = BlockSparseMatrix.from_dense(weight.to(dtype), 32)
    table, row_groups = launch_table(matrix, dtype, torch.device("cpu"))
    rows_per_program = {ops.config_for_rows(table, 1 << e).rows_per_program for e in range(4, 28)}
    assert len(row_groups) == 5 * len(rows_per_program - {1})
    for rows in rows_per_program - {1}:
        assert ops._grouping(row_groups, rows, matrix.nnz_blocks).rows_per_group == rows
    assert (dtype == torch.float16) == bool(row_groups)  # fp32 keeps one block-row per program


@pytest.mark.parametrize("dtype, bias, activation", [(torch.float32, True, "gelu"), (torch.bfloat16, False, None)])
def test_opcheck_linear_cpu(dtype, bias, activation):
    x, weight, b, matrix = case("cpu", dtype)
    args = (x, matrix.values, matrix.row_offsets, matrix.col_indices, b if bias else None, activation)
    torch.library.opcheck(torch.ops.nn_blocksparse.linear_cpu.default, args)
    y = torch.ops.nn_blocksparse.linear_cpu(*args)
    assert_close_to_reference(y, dense_reference(x, weight, b if bias else None, activation), dtype)


def test_opcheck_attention_cpu():
    from nn_blocksparse.cpu import native_isa

    if native_isa() is None:
        pytest.skip("no native kernel here (the ARM harness checks NEON's attention)")
    qkv = torch.randn(2, 9, 3 * 2 * 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 1, 9)
    mask[0, ..., 5:] = torch.finfo(torch.float32).min
    for attention_mask in (None, mask):
        torch.library.opcheck(torch.ops.nn_blocksparse.attention_cpu.default, (qkv, 2, 8, attention_mask))
    assert torch.ops.nn_blocksparse.attention_cpu(qkv, 2, 8, None).shape == (2, 9, 16)
    with torch.inference_mode():  # the direct eager call is the op's implementation
        assert torch.equal(ops.call_attention_cpu(qkv, 2, 8, mask), torch.ops.nn_blocksparse.attention_cpu(qkv, 2, 8, mask))


def test_eager_cpu_calls_skip_the_op_only_where_nothing_intercepts_ops(monkeypatch):
    """Plain eager calls run the implementation directly (the op's dispatch is slow); a dispatch mode, a
    function mode or fake tensors get the op itself, and the profiler still sees a range named after it."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    x, weight, b, matrix = case("cpu", torch.float32)
    args = (x, matrix.values, matrix.row_offsets, matrix.col_indices, b, "gelu")
    reference = dense_reference(x, weight, b, "gelu")
    calls = []
    real_op = ops.linear_cpu
    monkeypatch.setattr(ops, "linear_cpu", lambda *a: calls.append("op") or real_op(*a))
    with torch.inference_mode():
        assert_close_to_reference(ops.call_linear_cpu(*args), reference, torch.float32)
    assert calls == []  # direct

    class SeesOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.inference_mode(), SeesOps():
        assert_close_to_reference(ops.call_linear_cpu(*args), reference, torch.float32)
    assert calls[0] == "op" and "nn_blocksparse.linear_cpu.default" in calls

    class SeesFunctions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls.clear()
    with torch.inference_mode(), SeesFunctions():
        ops.call_linear_cpu(*args)
    assert calls == ["op"]
    calls.clear()
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args[:5]]
        assert ops.call_linear_cpu(*fake, "gelu").shape == (x.shape[0], weight.shape[0])
    assert calls == ["op"]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler, torch.inference_mode():
        ops.call_linear_cpu(*args)
    assert "nn_blocksparse::linear_cpu" in {event.name for event in profiler.events()}


@pytest.mark.parametrize("config", [KernelConfig(16, k_blocks=2, split_k=2), KernelConfig(32, rows_per_program=2)],
                         ids=["k_blocks-split_k", "row_groups"])
def test_opcheck_linear_triton(kernel_device, config):
    x, weight, bias, matrix = case(kernel_device, torch.float16)
    table, row_groups = single_launch(matrix, config)
    args = (x, matrix.values, matrix.row_offsets, matrix.col_indices, matrix.row_order, row_groups, bias, "gelu",
            table)
    torch.library.opcheck(torch.ops.nn_blocksparse.linear_triton.default, args)
    y = torch.ops.nn_blocksparse.linear_triton(*args)
    assert_close_to_reference(y, dense_reference(x, weight, bias, "gelu"), torch.float16)


def test_the_op_is_opaque_under_the_interpreter_and_a_triton_op_otherwise():
    from nn_blocksparse.kernels.block_sparse_linear import interpreter_enabled

    assert ops.traceable_triton_kernels() == (hasattr(torch.library, "triton_op") and not interpreter_enabled())


# Run without TRITON_INTERPRET: the op is then a triton_op, traced with fake CUDA tensors. Without a GPU,
# Triton has no driver to name the target it generates IR for (to learn what the kernels write), so a
# stand-in names an sm90 GPU; nothing is launched.
TRITON_OP_TRACE = r"""
import torch, triton
from triton.backends.compiler import GPUTarget
if not torch.cuda.is_available():
    class TargetOnly:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
    triton.runtime.driver.set_active(TargetOnly())
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from nn_blocksparse import ops
from nn_blocksparse.kernels.configs import KernelConfig
assert ops.traceable_triton_kernels()
mode = FakeTensorMode(shape_env=ShapeEnv())
def fake(shape, dtype=torch.float16, dynamic=False):
    with FakeTensorMode():
        t = torch.empty(shape, dtype=dtype, device="cuda")
    sizes = [DimDynamic.DYNAMIC if dynamic and i == 0 else DimDynamic.STATIC for i in range(len(shape))]
    return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
weights = [fake((6, 32, 32)), fake((4,), torch.int32), fake((6,), torch.int32), fake((3,), torch.int32)]
table = ops.pack_launch_table([(ops.ANY_ROWS, KernelConfig(64))], KernelConfig(16, split_k=2, k_blocks=4))
for dynamic in (False, True):
    graphs = []
    def keep(gm, inputs):
        graphs.append(gm)
        return gm
    traced = aot_function(lambda x, *w: ops.linear_triton(x, *w, [], None, "gelu", table), fw_compiler=keep,
                          dynamic=dynamic)
    with mode:
        out = traced(fake((64, 128), dynamic=dynamic), *weights)
    assert tuple(out.shape) == (64, 96), out.shape
    launches = [n for n in graphs[0].graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert all(n.kwargs["tensors_to_clone"] == ["out_ptr"] for n in launches), graphs[0].code
    # Static M = 64: the table's entry (one kernel); symbolic M: the symbolic entry (split-K: two kernels).
    assert [n.kwargs["kwargs"].get("SPLIT_K") for n in launches] == ([2, 2] if dynamic else [1]), graphs[0].code
    print("kernels", len(launches))
"""


@pytest.mark.skipif(not hasattr(torch.library, "triton_op"), reason="this torch has no torch.library.triton_op")
def test_the_triton_op_shows_its_kernel_launches_to_the_compiler():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", TRITON_OP_TRACE], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["kernels", "1", "kernels", "2"]


@requires_cuda
def test_inductor_compiles_the_triton_op_into_its_own_code():
    from torch._inductor.utils import run_and_get_code

    from nn_blocksparse import BlockSparseLinear

    x, weight, bias, _ = case("cuda", torch.float16, m=64)
    layer = BlockSparseLinear.from_dense(weight, bias, activation="gelu")
    torch._dynamo.reset()
    with torch.inference_mode():
        y, code = run_and_get_code(torch.compile(layer, fullgraph=True), x)
    assert ops.traceable_triton_kernels()
    assert "_block_sparse_linear_kernel" in "\n".join(code)  # the launch is Inductor's, not an opaque call
    assert_close_to_reference(y, dense_reference(x, weight, bias, "gelu"), torch.float16)
