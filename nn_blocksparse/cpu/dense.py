"""`dense_linear_cpu`: the dense linear the CPU path runs beside the block-sparse kernel, through oneDNN.

torch's fp32 `F.linear` runs MKL's sgemm, which on AMD CPUs takes its AVX2 code path even where the
CPU has AVX-512; oneDNN (`torch.ops.mkldnn._linear_pointwise`, the linear Inductor's CPU backend
calls) picks its kernels by the CPU's instruction set, reads the weight as it lies unless given a
`PackedWeight` (below; so by default an in-place change of the weight is seen by the next call)
and can fuse GELU (exact erf form) into its epilogue: it does where this machine's calibrated
profile measured that faster than `F.gelu` after the linear (`planner.fuse_dense_gelu`). It is
what hybrid's dense matrices run, and what the planner and `selection` compare the native kernel
with: the dense baseline a CPU user can have.

`PackedWeight` holds oneDNN's blocked copy of one weight (`torch.ops.mkldnn._reorder_linear_weight`),
which `dense_linear_cpu(..., packed=...)` reads instead of the plain weight: oneDNN otherwise
reorders the plain weight on every call. It is made on first use and made again when the weight
changes, as far as the tensor can tell (`derived_copy.DerivedCopy`, which says what it cannot see):
hence opt-in (`DenseLinear(prepack=True)`).

oneDNN runs where torch has the op, the inputs are plain CPU tensors of one dtype (fp32 or bf16),
the weight is contiguous and non-empty, the sizes fit (else `F.linear` says what is wrong) and no
gradient is wanted (the op records no autograd graph); it is probed
once per dtype against `F.linear`. Everywhere else, and with `NN_BLOCKSPARSE_ONEDNN=0`, it is
`F.linear` then GELU: the same result to rounding.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .derived_copy import DerivedCopy
from .launcher import PLAIN_TENSORS
from .planner import GELU_DTYPES, fuse_dense_gelu

ONEDNN_ENV = "NN_BLOCKSPARSE_ONEDNN"
ACTIVATIONS = (None, "gelu")
_DTYPES = GELU_DTYPES  # what oneDNN runs here; the planner names them too (it cannot import this module)
_ATTRIBUTES = {None: ("none", ""), "gelu": ("gelu", "none")}  # oneDNN post-op, algorithm ("none": erf GELU)


@functools.lru_cache(maxsize=len(_DTYPES))
def _probe(dtype: torch.dtype) -> bool:
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator).to(dtype) for shape in ((3, 32), (16, 32), (16,)))
    try:
        with torch.no_grad():
            y = op(x, weight, bias, "gelu", [], "none")
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    expected = F.gelu(F.linear(x.double(), weight.double(), bias.double()))
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return y.shape == expected.shape and y.dtype == dtype and bool((y.double() - expected).abs().max() < tolerance)


@functools.lru_cache(maxsize=len(_DTYPES))
def _packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed weights exist here and give what the plain weight gives, for this dtype."""
    reorder = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
    if reorder is None or not _probe(dtype):
        return False
    generator = torch.Generator().manual_seed(1)
    x, weight = (torch.randn(shape, generator=generator).to(dtype) for shape in ((3, 32), (16, 32)))
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._linear_pointwise(x, reorder(weight, None), None, "none", [], "")
            plain = torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return packed.shape == plain.shape and bool((packed.double() - plain.double()).abs().max() < 1e-3)


def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether `dense_linear_cpu` runs oneDNN for this dtype in this process."""
    return os.environ.get(ONEDNN_ENV, "1") != "0" and dtype in _DTYPES and _probe(dtype)


def _onednn_runs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if not (type(x) in PLAIN_TENSORS and type(weight) in PLAIN_TENSORS and x.is_cpu and weight.is_cpu
            and x.dtype == weight.dtype and weight.is_contiguous() and weight.dim() == 2 and x.dim() >= 1
            and x.shape[-1] == weight.shape[1] and x.numel() > 0 and weight.numel() > 0):
        return False
    if bias is not None and not (type(bias) in PLAIN_TENSORS and bias.dtype == x.dtype and bias.is_contiguous()):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return False
    return onednn_available(x.dtype)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


class PackedWeight:
    """oneDNN's packed copy of one weight, kept between calls (see the module docstring).

    Not copied with its owner (`copy.deepcopy` and pickling give an empty one: oneDNN's opaque
    tensors have no storage to copy); it is packed again on the next call.
    """

    __slots__ = ("_copy",)

    def __init__(self) -> None:
        self._copy = DerivedCopy(_pack)

    def clear(self) -> None:
        """Forget the packed copy: the next call packs the weight as it lies."""
        self._copy.clear()

    def for_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of `weight` (a contiguous 2-D CPU tensor oneDNN takes), packing it if this one
        is not of this tensor, storage, shape and version; `weight` itself where nothing is kept."""
        if not _packing_works(weight.dtype):
            return weight
        packed = self._copy.of(weight)
        return weight if packed is None else packed

    def __reduce__(self):
        return PackedWeight, ()  # copies and pickles are empty


def takes_bf16_weights(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 activations against bf16 weights (`patch_bert`'s `weight_dtype`): computed in bf16, returned in fp32."""
    return x.dtype == torch.float32 and weight.dtype == torch.bfloat16


def dense_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     activation: str | None = None, packed: PackedWeight | None = None,
                     fuse_gelu: bool | None = None, bf16_output: bool = False) -> torch.Tensor:
    """`act(x @ weight^T + bias)`, `act` None or "gelu" (exact): oneDNN where it runs (module docstring), else
    `F.linear` then `F.gelu`. `packed`: where oneDNN runs, it reads this copy of `weight` instead.
    `fuse_gelu`: GELU in oneDNN's epilogue (True) or `F.gelu` after it (False); None: as this
    machine's profile says (`planner.fuse_dense_gelu`).

    fp32 `x` with a bf16 `weight` (and bias): x is rounded to bf16, the product accumulated in fp32 and
    rounded to bf16 (oneDNN's bf16 output), then returned in fp32; with `bf16_output`, returned as it
    is (the same values, without the copy: for a consumer that rounds its input to bf16 anyway).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if takes_bf16_weights(x, weight):
        y = dense_linear_cpu(x.to(torch.bfloat16), weight, bias, activation, packed, fuse_gelu)
        return y if bf16_output else y.to(torch.float32)
    if _onednn_runs(x, weight, bias):
        operand = weight if packed is None else packed.for_weight(weight)
        apart = activation == "gelu" and not (fuse_dense_gelu(x.dtype) if fuse_gelu is None else fuse_gelu)
        attribute, algorithm = _ATTRIBUTES[None if apart else activation]
        y = torch.ops.mkldnn._linear_pointwise(x, operand, bias, attribute, [], algorithm)
        return F.gelu(y) if apart else y
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y
