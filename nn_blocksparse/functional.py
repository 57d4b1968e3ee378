"""`block_sparse_linear(x, weight, bias, activation)`: checks the inputs, then picks a backend.

Backends:
- `"triton"`: the Triton kernel (compiled on CUDA tensors; Triton's interpreter on CPU tensors
  when the process runs with `TRITON_INTERPRET=1`, which is how the tests check the kernel on CPU);
- `"cpu"`: the CPU path, `nn_blocksparse.cpu` (the native kernel, else its pure-torch reference);
  `"torch"` is its deprecated old name;
- `"auto"`: Triton on CUDA, cpu on CPU.

On CPU, bf16 weights also take fp32 x (bf16 weights, fp32 activations and output).

Every check runs before any kernel launch and raises a `TypeError`/`ValueError` that names the
problem, so a bad call never reaches Triton.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .block_sparse_matrix import BlockSparseMatrix
from .cpu import block_sparse_linear_cpu
from .kernels import ACTIVATIONS
from .kernels import block_sparse_linear as triton_block_sparse_linear
from .kernels import select_config
from .kernels.block_sparse_linear import interpreter_enabled
from .kernels.configs import KernelConfig, row_groups_considered

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "cpu", "torch")  # "torch": deprecated name of "cpu"
# Offsets inside the kernel are 32-bit.
_MAX_INT32_ELEMENTS = 2**31 - 1


def check_inputs(x: torch.Tensor, weight: BlockSparseMatrix, bias: torch.Tensor | None, activation: str | None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; supported dtypes are {SUPPORTED_DTYPES}")
    mixed = x.dtype == torch.float32 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
    if x.dtype != weight.dtype and not mixed:
        raise TypeError(f"dtype mismatch: x is {x.dtype} but the block-sparse weight is {weight.dtype} "
                        "(on CPU, bf16 weights also take fp32 x)")
    if x.device != weight.device:
        raise ValueError(f"device mismatch: x is on {x.device} but the block-sparse weight is on {weight.device}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has last dimension {x.shape[-1] if x.dim() else None} but the weight expects "
            f"in_features = {weight.shape[1]} (x shape {tuple(x.shape)}, weight shape {weight.shape})"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype not in (x.dtype, weight.dtype):
            raise TypeError(f"dtype mismatch: bias is {bias.dtype} but x is {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"device mismatch: bias is on {bias.device} but x is on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        warnings.warn('backend="torch" is deprecated: it is now named "cpu"', DeprecationWarning, stacklevel=3)
        backend = "cpu"
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f'backend="cpu" runs on CPU tensors, got {device}')
    if backend == "triton" and device.type != "cuda" and not interpreter_enabled():
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {device}); to run it on CPU tensors, start "
            "Python with TRITON_INTERPRET=1 so Triton's interpreter runs the kernel"
        )
    if backend == "triton" and device.type == "cuda" and interpreter_enabled():
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


def _warn_autograd_fallback() -> None:
    # Python's default warning filter already shows this once per call site.
    warnings.warn(
        "nn_blocksparse: x requires grad, so block_sparse_linear falls back to a dense F.linear "
        "(gradients flow to x; the block values stay frozen). Run under torch.inference_mode() or "
        "torch.no_grad() for the block-sparse kernels.",
        stacklevel=3,
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
    """
    check_inputs(x, weight, bias, activation)
    backend = resolve_backend(backend, x.device)
    if backend == "triton" and (x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype)):
        raise TypeError(f"the Triton backend needs x, weight and bias of one dtype, got {x.dtype}, {weight.dtype} "
                        f"and {None if bias is None else bias.dtype}")
    leading_shape = x.shape[:-1]
    n, k = weight.shape
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        # Neither the kernel nor the CPU plan records an autograd graph: rather than return an
        # output that silently blocks gradients, compute the same product densely.
        _warn_autograd_fallback()
        dense_bias = None if bias is None else bias.to(x.dtype)
        return _apply_activation(F.linear(x, weight.to_dense().to(x.dtype), dense_bias), activation)
    x2d = x.reshape(-1, k)
    if x2d.shape[0] and x2d.stride(1) != 1:
        x2d = x2d.contiguous()  # the kernel wants unit stride along K for vector loads

    if backend == "cpu":
        y2d = block_sparse_linear_cpu(x2d, weight.values, weight.row_offsets, weight.col_indices, bias, activation)
        return y2d.reshape(*leading_shape, n)

    if x2d.numel() > _MAX_INT32_ELEMENTS or x2d.shape[0] * n > _MAX_INT32_ELEMENTS:
        raise ValueError(
            f"x ({tuple(x2d.shape)}) or the output ({x2d.shape[0]} x {n}) has more than 2**31 - 1 elements; "
            "split the batch"
        )
    if weight.values.numel() > _MAX_INT32_ELEMENTS:
        raise ValueError(f"the weight stores {weight.values.numel()} values, more than the kernel's 32-bit offsets "
                         "address (2**31 - 1)")
    if config is None:
        config = launch_config(weight, x.dtype, x2d.shape[0], x.device)
    row_groups = weight.row_groups(config.rows_per_program) if config.rows_per_program > 1 else None
    y2d = triton_block_sparse_linear(
        x2d, weight.values, weight.row_offsets, weight.col_indices, weight.row_order,
        n, bias, activation, config, row_groups,
    )
    return y2d.reshape(*leading_shape, n)
