"""`block_sparse_linear(x, weight, bias, activation)`: checks the inputs, then runs a backend's op.

Backends:
- `"triton"`: the Triton kernel (compiled on CUDA tensors; Triton's interpreter on CPU tensors
  when the process runs with `TRITON_INTERPRET=1`, which is how the tests check the kernel on CPU);
- `"cpu"`: the CPU path, `nn_blocksparse.cpu` (the native kernel, else its pure-torch reference);
  `"torch"` is its deprecated old name;
- `"auto"`: Triton on CUDA, cpu on CPU.

On CPU, bf16 weights also take fp32 x (bf16 weights, fp32 activations and output).

Each backend is a `torch.library` op (`ops.py`), so the same call runs eagerly, under torch.compile
and in torch.export. Every check here reads only shapes, dtypes and devices, and runs before any
kernel launch, raising a `TypeError`/`ValueError` that names the problem, so a bad call never
reaches Triton; nothing reads tensor data on the way to the op.
"""

from __future__ import annotations

import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops
from .dtypes import SUPPORTED_DTYPES
from .block_sparse_matrix import MAX_KERNEL_ELEMENTS, BlockSparseMatrix, bsr_to_dense, stored
from .kernels import ACTIVATIONS, select_config
from .kernels.block_sparse_linear import interpreter_enabled
from .kernels.configs import KernelConfig, row_groups_considered
from .row_groups import RowGroups

BACKENDS = ("auto", "triton", "cpu", "torch")  # "torch": deprecated name of "cpu"
# Fixed per process, when Triton decorates the kernels (at import); read once so that a compiled
# forward does not trace the cached function that answers it.
_INTERPRETER = interpreter_enabled()


def check_inputs(x: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None,
                 activation: str | None) -> None:
    """x against a block-sparse weight `shape` `[N, K]` stored in `values` (its dtype and device)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported dtypes are {SUPPORTED_DTYPES}")
    mixed = x.dtype == torch.float32 and values.dtype == torch.bfloat16 and x.device.type == "cpu"
    if x.dtype != values.dtype and not mixed:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but the block-sparse weight is {values.dtype} "
                        "(on CPU, bf16 weights also take fp32 x)")
    if x.device != values.device:
        raise ValueError(f"device mismatch: x is on {x.device} but the block-sparse weight is on {values.device}")
    n, k = shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x has last dimension {x.shape[-1] if x.dim() else None} but the weight expects "
            f"in_features = {k} (x shape {tuple(x.shape)}, weight shape {tuple(shape)})"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype not in (x.dtype, values.dtype):
            raise TypeError(f"dtype mismatch: bias is {bias.dtype} but x is {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"device mismatch: bias is on {bias.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _warn_caller(message: str, category: type[Warning]) -> None:
    """Warn at the first frame outside this package: there Python's default filters show a
    DeprecationWarning to the user, whichever library function the call came through."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith("nn_blocksparse"):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def backend_name(backend: str) -> str:
    """`backend` checked, its deprecated alias ("torch") resolved to "cpu"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        _warn_caller('backend="torch" is deprecated: it is now named "cpu"', DeprecationWarning)
        return "cpu"
    return backend


def runs_triton(backend: str, device: torch.device) -> bool:
    """Whether `backend` (a `backend_name`) runs the Triton kernel for tensors on `device`."""
    return backend == "triton" or (backend == "auto" and device.type == "cuda")


def resolve_backend(backend: str, device: torch.device) -> str:
    backend = backend_name(backend)
    if backend == "auto":
        return "triton" if runs_triton(backend, device) else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f'backend="cpu" runs on CPU tensors, got {device}')
    if backend == "triton" and device.type != "cuda" and not _INTERPRETER:
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {device}); to run it on CPU tensors, start "
            "Python with TRITON_INTERPRET=1 so Triton's interpreter runs the kernel"
        )
    if backend == "triton" and device.type == "cuda" and _INTERPRETER:
        raise ValueError("TRITON_INTERPRET=1 is set: the interpreter only runs on CPU tensors, move x to CPU")
    if backend == "triton" and device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton backend runs on CUDA (or CPU under the interpreter), not on {device}")
    return backend


def launch_config(weight: BlockSparseMatrix, dtype: torch.dtype, m: int, device: torch.device) -> KernelConfig:
    """The launch configuration the Triton backend picks for `m` rows of x: tuned, else heuristic."""
    # Grouping padding is derived (once per matrix) only where the heuristic would use it: not
    # for fp32 or small M, e.g. batch-1 serving.
    inflation = weight.grouping_inflation() if row_groups_considered(dtype, m) else ()
    n, k = weight.shape
    return select_config(dtype, weight.block_size, n, k, m, weight.nnz_blocks, device, inflation)


# A trace that leaves M symbolic (torch.compile with dynamic shapes, on the triton_op) launches the
# configuration chosen for this many rows (batch 4 x seq 128), whatever M is at run time.
SYMBOLIC_ROWS = 512
# M buckets a launch table spans: 16 .. 2**27 rows (beyond, M x N would overflow 32-bit offsets).
_LARGEST_BUCKET_EXPONENT = 27

Launch = tuple[list[int], list[torch.Tensor]]  # (ops' launch_table, its row_groups tensors)


def launch_table(weight: BlockSparseMatrix, dtype: torch.dtype, device: torch.device) -> Launch:
    """What `ops.linear_triton` needs to launch this weight at any M: the configuration of every M
    bucket (ranges of equal configurations merged) and of a symbolic M, and the row groups they use.

    Derived once (BlockSparseLinear: at construction, load and `.to()`), so that no forward reads
    the weight's indices on the host."""
    configs = {exponent: launch_config(weight, dtype, 1 << exponent, device)
               for exponent in range(ops.bucket_exponent(1), _LARGEST_BUCKET_EXPONENT + 1)}
    ranges: list[tuple[int, KernelConfig]] = []
    for exponent, config in configs.items():
        if ranges and ranges[-1][1] == config:
            ranges[-1] = (exponent, config)
        else:
            ranges.append((exponent, config))
    ranges[-1] = (ops.ANY_ROWS, ranges[-1][1])
    symbolic = configs[ops.bucket_exponent(SYMBOLIC_ROWS)]  # SYMBOLIC_ROWS is a bucket's own M
    grouped = sorted(({config.rows_per_program for _, config in ranges} | {symbolic.rows_per_program}) - {1})
    return ops.pack_launch_table(ranges, symbolic), ops.flatten_row_groups([weight.row_groups(r) for r in grouped])


def single_launch(weight: BlockSparseMatrix, config: KernelConfig) -> Launch:
    """`launch_table`'s result for one configuration at every M."""
    groups: list[RowGroups] = [weight.row_groups(config.rows_per_program)] if config.rows_per_program > 1 else []
    return ops.pack_launch_table([(ops.ANY_ROWS, config)], config), ops.flatten_row_groups(groups)


def _warn_autograd_fallback() -> None:
    # Python's default warning filter already shows this once per call site. Dynamo cannot trace
    # warnings.warn: a compiled forward falls back the same way, silently.
    if not torch.compiler.is_compiling():
        warnings.warn(
            "nn_blocksparse: x requires grad, so block_sparse_linear falls back to a dense F.linear "
            "(gradients flow to x; the block values stay frozen). Run under torch.inference_mode() or "
            "torch.no_grad() for the block-sparse kernels.",
            stacklevel=4,
        )


def _apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.gelu(y) if activation == "gelu" else y


def block_sparse_linear(
    x: torch.Tensor,
    weight: BlockSparseMatrix,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """`act(x @ W^T + bias)` for x of shape `[..., K]` and a block-sparse W of shape `[N, K]`.

    `config` overrides the tuned launch configuration (Triton backend; its `rows_per_program`
    groups block-rows through `weight.row_groups`, which the matrix caches).
    NaN and inf in x reach every output whose stored blocks read them; all-zero blocks are
    skipped, so outputs that only meet them there stay finite (dense would give 0 * NaN = NaN).
    Inference only: when x requires grad, the product is computed densely so gradients flow.
    For torch.compile, use `BlockSparseLinear`, whose launch configurations are derived once.
    """
    if not isinstance(weight, BlockSparseMatrix):
        # Only a BlockSparseMatrix carries the validation the kernels rely on.
        raise TypeError(f"weight must be a BlockSparseMatrix, got {type(weight).__name__}")
    if not torch.compiler.is_compiling():
        weight.check_unchanged()  # indices modified in place since validation are validated again

    def launch(rows: int) -> Launch:
        return single_launch(weight, config or launch_config(weight, x.dtype, rows, x.device))

    return block_sparse_linear_tensors(x, weight.values, weight.row_offsets, weight.col_indices, weight.row_order,
                                       weight.shape, bias, activation, backend, launch)


def block_sparse_linear_tensors(
    x: torch.Tensor,
    values: torch.Tensor,
    row_offsets: torch.Tensor,
    col_indices: torch.Tensor,
    row_order: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None,
    activation: str | None,
    backend: str,
    launch: Callable[[int], Launch],
) -> torch.Tensor:
    """`block_sparse_linear` on a weight's stored tensors (`BlockSparseMatrix` fields, already
    validated); `launch(rows)` gives the Triton backend its `Launch` for `rows` rows of x."""
    check_inputs(x, values, shape, bias, activation)
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and (x.dtype != values.dtype or (bias is not None and bias.dtype != x.dtype)):
        raise TypeError(f"the Triton backend needs x, weight and bias of one dtype, got {x.dtype}, {values.dtype} "
                        f"and {None if bias is None else bias.dtype}")
    n, k = shape
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        # Neither the kernel nor the CPU path records an autograd graph: rather than return an
        # output that silently blocks gradients, compute the same product densely.
        _warn_autograd_fallback()
        dense_bias = None if bias is None else bias.to(x.dtype)
        dense = bsr_to_dense(values, row_offsets, col_indices, shape).to(x.dtype)
        return _apply_activation(F.linear(x, dense, dense_bias), activation)
    if k == 0:  # no input features (a layer whose heads were all pruned): the product is the bias
        y = x.new_zeros(*x.shape[:-1], n) if bias is None else bias.to(x.dtype).expand(*x.shape[:-1], n).clone()
        return _apply_activation(y, activation)
    x2d = x.reshape(-1, k)
    if x2d.shape[0] and x2d.stride(1) != 1:
        x2d = x2d.contiguous()  # the kernels want unit stride along K for vector loads
    if backend == "cpu":
        y2d = ops.call_linear_cpu(x2d, values, row_offsets, col_indices, bias, activation)
        return y2d.reshape(*x.shape[:-1], n)

    if x2d.numel() > MAX_KERNEL_ELEMENTS or x2d.shape[0] * n > MAX_KERNEL_ELEMENTS:
        raise ValueError(
            f"x ({tuple(x2d.shape)}) or the output ({x2d.shape[0]} x {n}) has more than 2**31 - 1 elements; "
            "split the batch"
        )
    table, row_groups = launch(x2d.shape[0])
    if not torch.compiler.is_compiling():  # a trace materializes views itself (and cannot ask is_neg)
        x2d, values, row_offsets, col_indices, row_order, bias = (
            stored(tensor) for tensor in (x2d, values, row_offsets, col_indices, row_order, bias))
    y2d = ops.linear_triton(x2d, values, row_offsets, col_indices, row_order, row_groups, bias, activation, table)
    return y2d.reshape(*x.shape[:-1], n)
