"""The block-sparse linear forward as `torch.library` ops, so that torch.compile and torch.export see it.

Two ops, one per backend, each taking the weight's tensors as `BlockSparseMatrix` stores them plus
static arguments; their fake (meta) implementations give the output's shape, `[M, N]`, without
reading any data, so the modules that call them trace without a graph break and under dynamic shapes:

- `nn_blocksparse::linear_cpu(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices,
  Tensor? bias, str? activation) -> Tensor`: the CPU path (`block_sparse_linear_cpu`), opaque to
  the compiler.
- `nn_blocksparse::attention_cpu(Tensor qkv, int num_heads, int head_dim, Tensor? attention_mask,
  bool bf16_products=False) -> Tensor`:
  the native CPU self-attention (`cpu.attention.self_attention_cpu`) of a fused `[B, S, 3 * H * D]`
  projection, `[B, S, H * D]` out; called only where `runs_native_attention` holds (never in a trace).
- `nn_blocksparse::add_layer_norm_cpu(Tensor x, Tensor residual, SymInt[] normalized_shape, Tensor? weight,
  Tensor? bias, float eps) -> Tensor`: `layer_norm(x + residual)` on the native kernel
  (`cpu.layer_norm.add_layer_norm_cpu`), out in x's shape and the dtype of `x + residual`; called only
  where `runs_native_add_layer_norm` holds (never in a trace).
- `nn_blocksparse::linear_triton(Tensor x, Tensor values, Tensor row_offsets, Tensor col_indices,
  Tensor row_order, Tensor[] row_groups, Tensor? bias, str? activation, SymInt[] launch_table) -> Tensor`:
  the Triton kernel, through the launcher `kernels.block_sparse_linear`. Where torch has
  `torch.library.triton_op` and the kernel is compiled (not Triton's interpreter), it is a triton_op:
  Inductor then sees the kernel itself (`wrap_triton`) and can schedule it with what surrounds it.
  Otherwise it is an opaque `custom_op` with the same schema (under `TRITON_INTERPRET=1` Triton
  runs the kernel on CPU tensors, which a traced kernel cannot).

`x` is `[M, K]` with unit stride along K, `activation` None or "gelu". The launch configuration
depends on M, which a compiled graph may leave symbolic, so `linear_triton` takes the module's whole
`launch_table` (static ints, `pack_launch_table`): a `KernelConfig` per range of M, and one for a
symbolic M. The op picks the entry for the M it runs with; only a trace with a symbolic M (a
dynamic-shape compile of the triton_op) takes the symbolic entry, which adds no guard on M.
`row_groups` holds the index tables of every row grouping the table's configurations use, five
tensors per grouping (`RowGroups` order: step_offsets, step_cols, step_blocks, group_rows,
group_order), precomputed with the table.

In plain eager mode the callers reach the CPU ops through `call_linear_cpu` / `call_attention_cpu` /
`call_add_layer_norm_cpu`, which call the implementations directly (see there); everything that
intercepts ops still gets the ops.

Inference only: no op has an autograd formula (`functional.block_sparse_linear` computes
densely when gradients are needed), and none checks its inputs beyond what the launchers do;
`functional.check_inputs` runs first.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .cpu import block_sparse_linear_cpu
from .cpu.attention import self_attention_cpu
from .cpu.layer_norm import add_layer_norm_cpu as _add_layer_norm_cpu
from .cpu.launcher import PLAIN_TENSORS
from .kernels import block_sparse_linear as triton_block_sparse_linear
from .kernels.block_sparse_linear import interpreter_enabled
from .kernels.configs import KernelConfig, m_bucket
from .row_groups import RowGroups

NAMESPACE = "nn_blocksparse"
_ROW_GROUP_TABLES = 5  # tensors per grouping, in RowGroups' field order


# ---------------------------------------------------------------------------------- launch tables
_CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(KernelConfig))


def _config_ints(config: KernelConfig) -> list[int]:
    """A config's fields as the ints a `SymInt[]` carries: the kernel by its `kernel_index`."""
    return [config.kernel_index if name == "kernel" else getattr(config, name) for name in _CONFIG_FIELDS]
_ENTRY = 1 + len(_CONFIG_FIELDS)  # one range: its last M bucket (as a power of two), then the config
ANY_ROWS = 62  # the last range's bucket exponent: any M above the one before


def bucket_exponent(rows: int) -> int:
    """log2 of `configs.m_bucket(rows)`, the power-of-two bucket launch configurations are chosen by."""
    return m_bucket(rows).bit_length() - 1


def pack_launch_table(ranges: Sequence[tuple[int, KernelConfig]], symbolic: KernelConfig) -> list[int]:
    """The `launch_table` argument: `ranges` is `[(last bucket exponent, config), ...]` ascending, the
    last covering `ANY_ROWS`; `symbolic` serves an M the trace leaves symbolic."""
    if not ranges or ranges[-1][0] != ANY_ROWS or any(a[0] >= b[0] for a, b in zip(ranges, ranges[1:])):
        raise ValueError(f"ranges must ascend and end at ANY_ROWS ({ANY_ROWS}), got {[r for r, _ in ranges]}")
    table = _config_ints(symbolic)
    for last_exponent, config in ranges:
        table += [last_exponent, *_config_ints(config)]
    return table


def config_for_rows(launch_table: Sequence[int], rows) -> KernelConfig:
    """The entry of `launch_table` for `rows` rows of x (an int, or a torch.SymInt while tracing)."""
    if isinstance(rows, torch.SymInt):
        return KernelConfig(*launch_table[: len(_CONFIG_FIELDS)])
    exponent = bucket_exponent(rows)
    for start in range(len(_CONFIG_FIELDS), len(launch_table), _ENTRY):
        if exponent <= launch_table[start]:
            return KernelConfig(*launch_table[start + 1 : start + _ENTRY])
    raise ValueError(f"launch table without an entry for M = {rows}: {list(launch_table)}")


def flatten_row_groups(groups: Sequence[RowGroups]) -> list[torch.Tensor]:
    """The `row_groups` argument for these groupings."""
    return [tensor for g in groups for tensor in (g.step_offsets, g.step_cols, g.step_blocks, g.group_rows,
                                                     g.group_order)]


def _grouping(row_groups: Sequence[torch.Tensor], rows_per_program: int, nnz_blocks: int) -> RowGroups | None:
    if rows_per_program == 1:
        return None
    for start in range(0, len(row_groups), _ROW_GROUP_TABLES):
        step_offsets, step_cols, step_blocks, group_rows, group_order = row_groups[start : start + _ROW_GROUP_TABLES]
        # R is implied by the shapes: R members per group.
        if group_rows.shape[0] == rows_per_program * group_order.shape[0]:
            return RowGroups(rows_per_program, group_rows, step_offsets, step_cols, step_blocks, group_order,
                             nnz_blocks)
    raise ValueError(f"the launch table asks for {rows_per_program} rows per program, but no row groups of that "
                     "size were given")


# ---------------------------------------------------------------------------------- linear_cpu
# Schemas are inferred from the annotations (the module docstring spells them out; tests hold them to it).
@torch.library.custom_op(f"{NAMESPACE}::linear_cpu", mutates_args=(), device_types="cpu")
def linear_cpu(x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
               bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    return block_sparse_linear_cpu(x, values, row_offsets, col_indices, bias, activation)


def _output_like(x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], (row_offsets.shape[0] - 1) * values.shape[-1])


@linear_cpu.register_fake
def _linear_cpu_fake(x, values, row_offsets, col_indices, bias, activation):
    return _output_like(x, values, row_offsets)


# ---------------------------------------------------------------------------------- attention_cpu
@torch.library.custom_op(f"{NAMESPACE}::attention_cpu", mutates_args=(), device_types="cpu")
def attention_cpu(qkv: torch.Tensor, num_heads: int, head_dim: int, attention_mask: torch.Tensor | None,
                  bf16_products: bool = False) -> torch.Tensor:
    return self_attention_cpu(qkv, num_heads, head_dim, attention_mask, bf16_products=bf16_products)


@attention_cpu.register_fake
def _attention_cpu_fake(qkv, num_heads, head_dim, attention_mask, bf16_products=False):
    return qkv.new_empty(qkv.shape[0], qkv.shape[1], num_heads * head_dim)


# ---------------------------------------------------------------------------------- add_layer_norm_cpu
@torch.library.custom_op(f"{NAMESPACE}::add_layer_norm_cpu", mutates_args=(), device_types="cpu")
def add_layer_norm_cpu(x: torch.Tensor, residual: torch.Tensor, normalized_shape: Sequence[int],
                       weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _add_layer_norm_cpu(x, residual, normalized_shape, weight, bias, eps)


@add_layer_norm_cpu.register_fake
def _add_layer_norm_cpu_fake(x, residual, normalized_shape, weight, bias, eps):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, residual.dtype))


# ---------------------------------------------------------------------------------- eager CPU calls
# A custom op's eager dispatch (the C++ dispatcher calling back into Python, under
# torch._dynamo.disable) cost tens to over a hundred microseconds a call in interleaved runs at BERT's
# sizes, the more the larger the call: several percent of a block-sparse linear (bench_kernel's `ours`
# against `ours_<isa>`). So plain eager calls run the implementation directly. Traces, fake or
# functorch-wrapped tensors and active dispatch or function modes get the op, so that whatever
# intercepts ops still sees it; under the profiler the direct call is a range named after the op.
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on these tensors may run an op's implementation directly (`direct`).

    A loop rather than a generator: this runs before every native call, after kernels that left the
    interpreter's caches cold."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    for tensor in tensors:
        if tensor is not None and (type(tensor) not in PLAIN_TENSORS or _is_wrapped(tensor)):
            return False
    return True


def direct(name: str, function, *args):
    """`function(*args)` in place of the op `name`; under the profiler, in a range named after the op."""
    if torch._C._autograd._profiler_enabled():
        with torch.autograd.profiler.record_function(f"{NAMESPACE}::{name}"):
            return function(*args)
    return function(*args)


def call_linear_cpu(x, values, row_offsets, col_indices, bias, activation) -> torch.Tensor:
    """`linear_cpu`, called directly in plain eager mode (above)."""
    if plain_eager(x, values, row_offsets, col_indices, bias):
        return direct("linear_cpu", block_sparse_linear_cpu, x, values, row_offsets, col_indices, bias, activation)
    return linear_cpu(x, values, row_offsets, col_indices, bias, activation)


def call_attention_cpu(qkv, num_heads: int, head_dim: int, attention_mask, bf16_products: bool = False) -> torch.Tensor:
    """`attention_cpu`, called directly in plain eager mode (above)."""
    if plain_eager(qkv, attention_mask):
        return direct("attention_cpu", self_attention_cpu, qkv, num_heads, head_dim, attention_mask, None,
                      bf16_products)
    return attention_cpu(qkv, num_heads, head_dim, attention_mask, bf16_products)


def call_add_layer_norm_cpu(x, residual, normalized_shape, weight, bias, eps: float,
                            reuse_x: bool = False) -> torch.Tensor:
    """`add_layer_norm_cpu`, called directly in plain eager mode (above). `reuse_x` (the result may be
    written over x) only there: the op, which whatever intercepts ops sees, mutates nothing."""
    if plain_eager(x, residual, weight, bias):
        return direct("add_layer_norm_cpu", _add_layer_norm_cpu, x, residual, normalized_shape, weight, bias, eps,
                      None, reuse_x)  # (None: this process's library)
    return add_layer_norm_cpu(x, residual, normalized_shape, weight, bias, eps)


# ---------------------------------------------------------------------------------- linear_triton
def _linear_triton(x: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
                   row_order: torch.Tensor, row_groups: list[torch.Tensor], bias: torch.Tensor | None,
                   activation: str | None, launch_table: list[int]) -> torch.Tensor:
    config = config_for_rows(launch_table, x.shape[0])
    groups = _grouping(row_groups, config.rows_per_program, values.shape[0])
    out_features = (row_offsets.shape[0] - 1) * values.shape[-1]
    return triton_block_sparse_linear(x, values, row_offsets, col_indices, row_order, out_features, bias, activation,
                                      config, groups)


def traceable_triton_kernels() -> bool:
    """Whether `linear_triton` is a `triton_op` (its kernel visible to Inductor) rather than an opaque op."""
    return hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton") and not interpreter_enabled()


if traceable_triton_kernels():
    # The function is its own fake: traced with fake tensors, it allocates the output and records the launch.
    linear_triton = torch.library.triton_op(f"{NAMESPACE}::linear_triton", _linear_triton, mutates_args=())
else:
    linear_triton = torch.library.custom_op(f"{NAMESPACE}::linear_triton", _linear_triton, mutates_args=())

    @linear_triton.register_fake
    def _linear_triton_fake(x, values, row_offsets, col_indices, row_order, row_groups, bias, activation,
                            launch_table):
        return _output_like(x, values, row_offsets)


__all__ = ["ANY_ROWS", "bucket_exponent", "call_attention_cpu", "call_linear_cpu", "config_for_rows",
           "flatten_row_groups", "linear_cpu", "linear_triton", "pack_launch_table", "traceable_triton_kernels"]
