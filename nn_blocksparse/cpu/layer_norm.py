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
`add_layer_norm_cpu` checks what keeps the kernel in bounds and raises naming it. With
`reuse_x=True` the result is written over `x` where `x` has its dtype and no other input shares part
of `x`'s memory (the kernel reads each row whole before writing it, so `residual` may be `x` itself):
a caller whose `x` is a temporary (a linear's output) saves a buffer that would come cold from
memory. Knows nothing of `nn.Module` or BERT.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.graph import increment_version

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


def _parameter_refusal(normalized_shape, weight, bias, eps) -> str | None:
    """Why the kernel cannot take these parameters (whatever the input), or None."""
    if not (isinstance(normalized_shape, (tuple, list, torch.Size)) and len(normalized_shape) == 1
            and all(isinstance(size, int) for size in normalized_shape)):
        return (f"normalized_shape must be a tuple of one int (the native norm normalizes over the last "
                f"dimension only), got {normalized_shape!r}")
    width = normalized_shape[0]
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and not (type(tensor) in _PLAIN and tensor.dtype in _IO_DTYPES and tensor.is_cpu
                                       and tensor.shape == (width,) and tensor.is_contiguous()):
            return (f"{name} must be a contiguous fp32 or bf16 CPU tensor [{width}], got "
                    f"{getattr(tensor, 'dtype', type(tensor))} of shape {tuple(getattr(tensor, 'shape', ()))}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return f"weight and bias must share a dtype, got {weight.dtype} and {bias.dtype}"
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        return f"eps must be a finite number >= 0, got {eps!r}"
    return None


def _parameter_dtype(weight, bias) -> torch.dtype:
    """The dtype the kernel reads the parameters in (fp32 where there are none)."""
    return next((tensor.dtype for tensor in (weight, bias) if tensor is not None), torch.float32)


def _output_refusal(out_dtype: torch.dtype, width: int, param_dtype: torch.dtype) -> str | None:
    """Why the kernel cannot give `out_dtype` rows of `width` with parameters of `param_dtype`, or None."""
    multiple = 8 if out_dtype == torch.bfloat16 else 4
    if width % multiple:
        return f"the normalized width must be a multiple of {multiple} in {out_dtype}, got {width}"
    if param_dtype not in (torch.float32, out_dtype):
        return (f"weight and bias must be fp32 or the sum's dtype ({out_dtype}), as torch's layer norm takes, got "
                f"{param_dtype}")
    return None


def _refusal(x, residual, normalized_shape, weight, bias, eps) -> str | None:
    """Why the kernel cannot take these inputs in bounds, or None."""
    refusal = _parameter_refusal(normalized_shape, weight, bias, eps)
    if refusal is not None:
        return refusal
    if not (type(x) in _PLAIN and type(residual) in _PLAIN and x.dim() >= 1 and x.is_cpu and residual.is_cpu
            and x.dtype in _IO_DTYPES and residual.dtype in _IO_DTYPES):
        return (f"x and residual must be plain fp32 or bf16 CPU tensors of at least one dimension, got "
                f"{getattr(x, 'dtype', type(x))} and {getattr(residual, 'dtype', type(residual))}")
    if residual.shape != x.shape:
        return f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
    if not (x.is_contiguous() and residual.is_contiguous()):
        return "x and residual must be contiguous"
    width = x.shape[-1]
    if tuple(normalized_shape) != (width,):
        return f"the native norm normalizes over the last dimension only ({width}), got {tuple(normalized_shape)}"
    return _output_refusal(output_dtype(x, residual), width, _parameter_dtype(weight, bias))


def runs_native_add_layer_norm(x, residual, normalized_shape, weight, bias, eps) -> bool:
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            tensor is not None and tensor.requires_grad for tensor in (x, residual, weight, bias))):
        return False
    return native_library() is not None and _refusal(x, residual, normalized_shape, weight, bias, eps) is None


def _bytes(tensor: torch.Tensor) -> tuple[int, int]:
    """The [start, end) addresses of a contiguous tensor's elements."""
    start = tensor.data_ptr()
    return start, start + tensor.numel() * tensor.element_size()


def writable_over_x(x: torch.Tensor, residual: torch.Tensor, weight, bias, out_dtype: torch.dtype) -> bool:
    """Whether the kernel may write its output over `x` (contiguous inputs, as the kernel takes them):
    `x` has the output's dtype, and `residual`, `weight` and `bias` share none of its memory, except
    `residual` that is `x`'s very elements (each row is read whole before it is written)."""
    if x.dtype != out_dtype:
        return False
    start, end = _bytes(x)
    for slot, tensor in enumerate((residual, weight, bias)):
        if tensor is None or tensor.numel() == 0:
            continue
        other_start, other_end = _bytes(tensor)
        same_elements = slot == 0 and other_start == start and tensor.dtype == x.dtype  # (x's shape, contiguous)
        if other_start < end and start < other_end and not same_elements:
            return False
    return True


def _result(x, residual, weight, bias, out_dtype: torch.dtype, reuse_x: bool) -> torch.Tensor:
    """The tensor the kernel writes into: `x` itself where asked and `writable_over_x` allows, else a new one."""
    if reuse_x and writable_over_x(x, residual, weight, bias, out_dtype):
        if not x.is_inference():  # (an inference tensor keeps no version counter)
            increment_version(x)  # written through its address, unseen by autograd otherwise
        return x
    return torch.empty(x.shape, dtype=out_dtype)


def _run(library, x, residual, weight, bias, param_dtype: torch.dtype, eps: float, out) -> torch.Tensor:
    """One `nnbs_add_layer_norm` call into `out`, everything checked; returns `out`."""
    width = x.shape[-1]
    if out.numel() == 0:
        return out
    code = library.add_layer_norm(
        x.numel() // width, width, x.data_ptr(), _DTYPE_CODES[x.dtype], residual.data_ptr(),
        _DTYPE_CODES[residual.dtype], None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(), _DTYPE_CODES[param_dtype], eps, out.data_ptr(),
        _DTYPE_CODES[out.dtype], torch.get_num_threads())
    if code:
        raise RuntimeError(f"native add + layer norm: {_MESSAGES.get(code, f'error {code}')}")
    return out


def add_layer_norm_cpu(x: torch.Tensor, residual: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, eps: float = 1e-5, library=None,
                       reuse_x: bool = False) -> torch.Tensor:
    """`F.layer_norm(x + residual, normalized_shape, weight, bias, eps)` on the native kernel; call where
    `runs_native_add_layer_norm` holds. `library`: a `build.NativeLibrary` (default: this process's), for
    tests of every ISA. `reuse_x`: `x` is not needed afterwards, and the result is written over it
    where `writable_over_x` allows (then the result is `x`, its version counter bumped); else a new
    tensor."""
    refusal = _refusal(x, residual, normalized_shape, weight, bias, eps)
    if refusal is not None:
        raise ValueError(refusal)
    library = library or native_library()
    if library is None:
        raise RuntimeError("no native CPU kernel here (nn_blocksparse.cpu.native_status() says why)")
    x, residual, weight, bias = stored(x), stored(residual), stored(weight), stored(bias)
    out = _result(x, residual, weight, bias, output_dtype(x, residual), reuse_x)
    return _run(library, x, residual, weight, bias, _parameter_dtype(weight, bias), float(eps), out)


class NativeAddNormCall:
    """`add_layer_norm_cpu` for one set of parameters, with what does not change between calls checked once.

    `NativeAddNormCall.prepare(normalized_shape, weight, bias, eps)` checks the parameters' side as
    `add_layer_norm_cpu` does and returns None where the native kernel would not take them. Its owner
    keeps it for as long as `NativeAddNormCall.key(...)` of the same arguments stays the same (shapes,
    dtypes, contiguity, device, negated views, eps), and prepares again otherwise. Calling it with
    `(x, residual, weight, bias, reuse_x)` returns the result, or None where it cannot serve these
    inputs (another shape or dtype, a tensor subclass, a negated view, a non-contiguous tensor,
    gradients wanted), and the caller takes the general path; the tensors' addresses are read on every
    call. For a forward that calls the norm again and again right after a GEMM, where the general
    path's checks cost microseconds each with the interpreter's caches cold.
    """

    __slots__ = ("library", "width", "param_dtype", "eps", "pairs")

    @classmethod
    def prepare(cls, normalized_shape, weight, bias, eps):
        library = native_library()
        negated = any(tensor is not None and tensor.is_neg() for tensor in (weight, bias))
        if library is None or negated or _parameter_refusal(normalized_shape, weight, bias, eps) is not None:
            return None
        call = cls()
        call.library, call.width, call.eps = library, normalized_shape[0], float(eps)
        call.param_dtype = _parameter_dtype(weight, bias)
        # The (x, residual) dtypes these parameters and this width take, with the output dtype of each.
        every = {(a, b): torch.promote_types(a, b) for a in _IO_DTYPES for b in _IO_DTYPES}
        call.pairs = {pair: out for pair, out in every.items()
                      if _output_refusal(out, call.width, call.param_dtype) is None}
        return call if call.pairs else None

    @staticmethod
    def key(normalized_shape, weight, bias, eps) -> tuple:
        """What a call was prepared for: equal keys, the same prepared call."""
        return (tuple(normalized_shape), eps,
                None if weight is None else (weight.shape, weight.dtype, weight.is_contiguous(), weight.is_cpu,
                                             weight.is_neg()),
                None if bias is None else (bias.shape, bias.dtype, bias.is_contiguous(), bias.is_cpu, bias.is_neg()))

    def __call__(self, x, residual, weight, bias, reuse_x: bool = False):
        out_dtype = self.pairs.get((x.dtype, residual.dtype))
        if (out_dtype is None or type(x) not in _PLAIN or type(residual) not in _PLAIN or not x.is_cpu
                or not residual.is_cpu or x.dim() < 1 or x.shape != residual.shape or x.shape[-1] != self.width
                or not (x.is_contiguous() and residual.is_contiguous()) or x.is_neg() or residual.is_neg()
                or (torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad
                                                    for tensor in (x, residual, weight, bias)))):
            return None
        return self.launch(x, residual, weight, bias, out_dtype, reuse_x)

    def launch(self, x, residual, weight, bias, out_dtype: torch.dtype, reuse_x: bool) -> torch.Tensor:
        """The kernel on inputs `__call__` would serve, with `out_dtype = pairs[(x.dtype, residual.dtype)]`:
        what `__call__` checks, and a caller that made `x` and `residual` itself knows."""
        out = _result(x, residual, weight, bias, out_dtype, reuse_x)
        return _run(self.library, x, residual, weight, bias, self.param_dtype, self.eps, out)
