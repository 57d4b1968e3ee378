"""`add_layer_norm_cpu`: `layer_norm(x + residual)` on the native kernel, in one pass over the stream.

An encoder layer ends each of its two blocks with a residual add and a layer norm; torch runs them
as two ops that each read and write the residual stream, with a dispatch each, and its bf16 norm is
slower than its fp32 one. `nnbs_add_layer_norm` does both per row: the sum in the dtype of
`x + residual` (rounded to bf16 where both are bf16, as the add in bf16 rounds it), then mean and
variance in fp32 over the sums, then `(s - mean) / sqrt(var + eps) * weight + bias`, rounded once to
that dtype. The avx512_bf16 and amx_bf16 builds round to bf16 with AVX512_BF16's conversion
instruction, which takes a denormal, sum or output, as a zero of its sign; the other builds round
denormals too. The same values as `F.layer_norm(x + residual, ...)` up to the order of the statistics'
additions; bit-identical for any thread count.

`runs_native_add_layer_norm(...)` says whether a call can take this path: plain CPU tensors, `x` and
`residual` of one shape, each fp32 or bf16 (the output of their promoted dtype, as `x + residual`
gives: a bf16 FFN output onto an fp32 residual stream is fp32), contiguous, normalized over the last
dimension only, that dimension a multiple of 4 (8 in bf16), `weight`/`bias` None or contiguous
`[width]` fp32 or the output's dtype (the same where both are given), no gradient wanted, no
tracing, a native kernel here. Everything else computes `F.layer_norm(x + residual, ...)`.
`add_layer_norm_cpu` checks what keeps the kernel in bounds and raises naming it. Knows nothing of
`nn.Module` or BERT.
"""

from __future__ import annotations

import math

import torch

from .build import native_library
from ..block_sparse_matrix import stored
from .launcher import _DTYPE_CODES
from .launcher import PLAIN_TENSORS as _PLAIN

_MESSAGES = {1: "the normalized width must be a multiple of 4 (8 in bf16)", 2: "unsupported dtypes",
             3: "out of memory for the norm's scratch"}
_IO_DTYPES = (torch.float32, torch.bfloat16)


def output_dtype(x: torch.Tensor, residual: torch.Tensor) -> torch.dtype:
    """The dtype of `x + residual` (torch's promotion: fp32 where either is fp32)."""
    return torch.promote_types(x.dtype, residual.dtype)


def _refusal(x, residual, normalized_shape, weight, bias, eps) -> str | None:
    """Why the kernel cannot take these inputs in bounds, or None."""
    if not (isinstance(normalized_shape, (tuple, list, torch.Size))
            and all(isinstance(size, int) for size in normalized_shape)):
        return f"normalized_shape must be a tuple of ints, got {normalized_shape!r}"
    if not (type(x) in _PLAIN and type(residual) in _PLAIN and x.dim() >= 1 and x.is_cpu and residual.is_cpu
            and x.dtype in _IO_DTYPES and residual.dtype in _IO_DTYPES):
        return (f"x and residual must be plain fp32 or bf16 CPU tensors of at least one dimension, got "
                f"{getattr(x, 'dtype', type(x))} and {getattr(residual, 'dtype', type(residual))}")
    if residual.shape != x.shape:
        return f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
    if not (x.is_contiguous() and residual.is_contiguous()):
        return "x and residual must be contiguous"
    width, out_dtype = x.shape[-1], output_dtype(x, residual)
    if tuple(normalized_shape) != (width,):
        return f"the native norm normalizes over the last dimension only ({width}), got {tuple(normalized_shape)}"
    multiple = 8 if out_dtype == torch.bfloat16 else 4
    if width % multiple:
        return f"the normalized width must be a multiple of {multiple} in {out_dtype}, got {width}"
    params = [tensor for tensor in (weight, bias) if tensor is not None]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and not (type(tensor) in _PLAIN and tensor.dtype in _IO_DTYPES and tensor.is_cpu
                                       and tensor.shape == (width,) and tensor.is_contiguous()):
            return (f"{name} must be a contiguous fp32 or bf16 CPU tensor [{width}], got "
                    f"{getattr(tensor, 'dtype', type(tensor))} of shape {tuple(getattr(tensor, 'shape', ()))}")
    if len({tensor.dtype for tensor in params}) > 1:
        return f"weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}"
    if params and params[0].dtype not in (torch.float32, out_dtype):
        return (f"weight and bias must be fp32 or the sum's dtype ({out_dtype}), as torch's layer norm takes, got "
                f"{params[0].dtype}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        return f"eps must be a finite number >= 0, got {eps!r}"
    return None


def runs_native_add_layer_norm(x, residual, normalized_shape, weight, bias, eps) -> bool:
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            tensor is not None and tensor.requires_grad for tensor in (x, residual, weight, bias))):
        return False
    return native_library() is not None and _refusal(x, residual, normalized_shape, weight, bias, eps) is None


def add_layer_norm_cpu(x: torch.Tensor, residual: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5, library=None) -> torch.Tensor:
    """`F.layer_norm(x + residual, normalized_shape, weight, bias, eps)` on the native kernel; call where
    `runs_native_add_layer_norm` holds. `library`: a `build.NativeLibrary` (default: this process's), for
    tests of every ISA."""
    refusal = _refusal(x, residual, normalized_shape, weight, bias, eps)
    if refusal is not None:
        raise ValueError(refusal)
    library = library or native_library()
    if library is None:
        raise RuntimeError("no native CPU kernel here (nn_blocksparse.cpu.native_status() says why)")
    x, residual, weight, bias = stored(x), stored(residual), stored(weight), stored(bias)
    out = torch.empty(x.shape, dtype=output_dtype(x, residual))
    width = x.shape[-1]
    if out.numel() == 0:
        return out
    param_dtype = next((tensor.dtype for tensor in (weight, bias) if tensor is not None), torch.float32)
    code = library.add_layer_norm(
        x.numel() // width, width, x.data_ptr(), _DTYPE_CODES[x.dtype], residual.data_ptr(),
        _DTYPE_CODES[residual.dtype], None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(), _DTYPE_CODES[param_dtype], float(eps), out.data_ptr(),
        _DTYPE_CODES[out.dtype], torch.get_num_threads())
    if code:
        raise RuntimeError(f"native add + layer norm: {_MESSAGES.get(code, f'error {code}')}")
    return out
