"""`block_sparse_linear_cpu`: the CPU block-sparse linear, one pure function of the stored tensors.

It takes W exactly as `BlockSparseMatrix` stores it and keeps nothing between calls (no plan, no
packed copy of the weights, no cache keyed by shapes), so an in-place change of `values` is seen by
the next call, and another module can register it as a `torch.library` op. (A layer that keeps a
copy of its blocks in the kernel's other layout, `transpose_blocks`, does so itself and opt-in:
`NativeLinearCall`, `BlockSparseLinear(prepack=True)`.) After the first call
has chosen and built the native kernel it takes no lock and allocates only the output; it branches
on dtypes and shapes, never on tensor values.

Dtypes (x, values -> y): fp32, fp32 -> fp32; bf16, bf16 -> bf16; fp32, bf16 -> fp32 (bf16 weights
with fp32 activations: x rounded to bf16, fp32 accumulation, fp32 out) run the native kernel where
there is one; every other combination (fp16) and CPUs without a native variant run the pure-torch
reference (`reference.py`), which computes the same thing.
"""

from __future__ import annotations

import torch

from ..block_sparse_matrix import stored
from .build import native_library
from .reference import block_sparse_linear_reference

NATIVE_BLOCK_SIZES = (16, 32, 64)
ACTIVATIONS = (None, "gelu")
_DTYPE_CODES = {torch.float32: 1, torch.bfloat16: 2}
# The kernel's compute modes, by name: (activation dtype, weight dtype) of each.
MODE_DTYPES = {"fp32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
               "bf16_weights": (torch.float32, torch.bfloat16)}
_NATIVE_DTYPES = tuple(MODE_DTYPES.values())
# Tensors the native and oneDNN paths take; subclasses that trace or wrap (fake, functional) keep the
# ops torch dispatches.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_MESSAGES = {1: "unsupported block size", 2: "unsupported dtypes", 3: "out of memory for the kernel's scratch",
             4: "unsupported activation", 5: "unsupported values layout"}
# The kernel's `values_layout`: each block as `BlockSparseMatrix` stores it ([n][k]), or transposed
# ([k][n], `transpose_blocks`: fp32 only), which the fp32 kernel otherwise makes on every call.
STORED_BLOCKS, TRANSPOSED_BLOCKS = 0, 1


def transpose_blocks(values: torch.Tensor) -> torch.Tensor:
    """Each `[bs, bs]` block of `values [nnz, bs, bs]` transposed, contiguous: the `TRANSPOSED_BLOCKS`
    layout, a copy a caller may keep for a weight that does not change (`NativeLinearCall`)."""
    return values.detach().transpose(1, 2).contiguous()


def _check(x2d, values, row_offsets, col_indices, bias, activation) -> None:
    """What keeps the kernel in bounds given validated indices: shapes, dtypes, layouts, devices.

    Written for the common case to cost a few attribute reads; the messages are built only on failure.
    """
    if not isinstance(x2d, torch.Tensor) or x2d.dim() != 2:
        raise ValueError(f"x2d must be a 2-D tensor [M, K], got {getattr(x2d, 'shape', type(x2d))}")
    shape = values.shape if isinstance(values, torch.Tensor) else None
    if shape is None or len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"values must be [nnz, bs, bs], got {getattr(values, 'shape', type(values))}")
    block_size = shape[2]
    if block_size not in NATIVE_BLOCK_SIZES:
        raise ValueError(f"block size must be one of {NATIVE_BLOCK_SIZES}, got {block_size}")
    if x2d.shape[1] % block_size:
        raise ValueError(f"block size {block_size} must divide K = {x2d.shape[1]}")
    for name, index in (("row_offsets", row_offsets), ("col_indices", col_indices)):
        if not isinstance(index, torch.Tensor) or index.dtype != torch.int32 or index.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 tensor, got {getattr(index, 'dtype', type(index))}")
    if row_offsets.shape[0] < 1:
        raise ValueError("row_offsets must hold N/bs + 1 >= 1 entries")
    if col_indices.shape[0] != shape[0]:
        raise ValueError(f"col_indices must have one entry per block ({shape[0]}), got {col_indices.shape[0]}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.dim() != 1
                             or bias.shape[0] != (row_offsets.shape[0] - 1) * block_size):
        raise ValueError(f"bias must have shape ({(row_offsets.shape[0] - 1) * block_size},), "
                         f"got {tuple(getattr(bias, 'shape', ()))}")
    if activation is not None and activation != "gelu":
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if not (x2d.is_cpu and values.is_cpu and row_offsets.is_cpu and col_indices.is_cpu
            and (bias is None or bias.is_cpu)):
        devices = [str(t.device) for t in (x2d, values, row_offsets, col_indices, bias) if t is not None]
        raise ValueError(f"block_sparse_linear_cpu runs on CPU tensors, got x2d, values, indices, bias on {devices}")
    if not (x2d.is_floating_point() and values.is_floating_point()):
        raise TypeError(f"x2d and values must be floating point, got {x2d.dtype} and {values.dtype}")


def block_sparse_linear_cpu(x2d: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                            col_indices: torch.Tensor, bias: torch.Tensor | None = None,
                            activation: str | None = None) -> torch.Tensor:
    """`act(x2d @ W^T + bias)` -> a new `[M, N]` tensor in x2d's dtype, W `[N, K]` stored as BSR blocks.

    `x2d [M, K]` has unit stride along K; `values [nnz, bs, bs]`, int32 `row_offsets [N/bs + 1]` and
    `col_indices [nnz]` are exactly `BlockSparseMatrix`'s, already validated for a `[N, K]` matrix
    (this checks shapes, dtypes and layouts, not index contents); `bias` is `[N]` or None;
    `activation` is None or "gelu" (exact erf form, fused into the kernel's epilogue). Inference
    only: no autograd graph is recorded.
    """
    _check(x2d, values, row_offsets, col_indices, bias, activation)
    x2d, values, bias = stored(x2d), stored(values), stored(bias)
    row_offsets, col_indices = stored(row_offsets), stored(col_indices)
    library = native_library()
    if library is None or (x2d.dtype, values.dtype) not in _NATIVE_DTYPES or (
            bias is not None and bias.dtype not in _DTYPE_CODES):
        return block_sparse_linear_reference(x2d, values, row_offsets, col_indices, bias, activation)
    return native_block_sparse_linear(library, x2d, values, row_offsets, col_indices, bias, activation)


def native_block_sparse_linear(library, x2d: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                               col_indices: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                               layout: int = STORED_BLOCKS) -> torch.Tensor:
    """`block_sparse_linear_cpu` on a given `NativeLibrary` (`build.library_for(isa)`), inputs checked;
    `layout=TRANSPOSED_BLOCKS`: `values` is `transpose_blocks` of the weight's (fp32)."""
    m, k = x2d.shape
    block_size = values.shape[2]
    n = (row_offsets.numel() - 1) * block_size
    if x2d.stride(1) != 1 and k > 1 and m > 1:
        raise ValueError(f"x2d must have unit stride along K, got strides {x2d.stride()}")
    if not (values.is_contiguous() and row_offsets.is_contiguous() and col_indices.is_contiguous()
            and (bias is None or bias.is_contiguous())):
        raise ValueError("values, row_offsets, col_indices and bias must be contiguous")
    y = torch.empty(m, n, dtype=x2d.dtype)
    if m == 0 or n == 0:
        return y
    _run(library, block_size, row_offsets.numel() - 1, x2d, values, _DTYPE_CODES[values.dtype], layout, row_offsets,
         col_indices, bias, 0 if bias is None else _DTYPE_CODES[bias.dtype], 1 if activation == "gelu" else 0, y)
    return y


def _run(library, block_size: int, block_rows: int, x2d, values, w_code: int, layout: int, row_offsets, col_indices,
         bias, bias_code: int, activation_code: int, y) -> None:
    """One `nnbs_block_sparse_linear` call into y (x2d's dtype, [M, N] contiguous), everything checked;
    `layout`: `STORED_BLOCKS`, or `TRANSPOSED_BLOCKS` where `values` is `transpose_blocks` of the weight's."""
    m, k = x2d.shape
    x_code = _DTYPE_CODES[x2d.dtype]
    code = library.linear(
        block_size, m, block_rows, k, x2d.data_ptr(), x2d.stride(0), x_code, values.data_ptr(), w_code, layout,
        row_offsets.data_ptr(), col_indices.data_ptr(), None if bias is None else bias.data_ptr(), bias_code,
        activation_code, y.data_ptr(), y.shape[1], x_code, torch.get_num_threads())
    if code:
        raise RuntimeError(f"native block-sparse kernel: {_MESSAGES.get(code, f'error {code}')}")


class NativeLinearCall:
    """`block_sparse_linear_cpu` for one weight, with what does not change between calls checked once.

    `NativeLinearCall.prepare(values, row_offsets, col_indices, bias, activation, in_features)` checks
    the weight's side as `block_sparse_linear_cpu` does (the indices already validated for
    `[N, in_features]`) and returns None where the native kernel would not run it. Its owner keeps it
    for as long as `NativeLinearCall.key(...)` of its tensors and activation stays the same (shapes,
    dtypes, contiguity, device: a tensor of another kind swapped under its owner through `.data` is
    checked again, not read out of bounds or as another layout), and prepares again otherwise; index
    contents are the owner's matrix's to revalidate (`BlockSparseMatrix.check_unchanged`). Calling it with
    `x [..., in_features]` returns y, or None where it cannot serve x (a dtype the weight does not pair
    with, a tensor subclass, a negated view, gradients wanted, a non-unit stride along K, no rows), and
    the caller takes the general path. The tensors' addresses are read on every call. For a module's forward,
    where the general path's tens of microseconds of Python per call show (the interpreter's caches
    are cold after a kernel that filled L2).

    `transposed=True` (fp32 `values` only, else None is returned) prepares a call whose `values` are
    `transpose_blocks` of the weight's, which the caller keeps and makes again when the weight changes:
    the kernel then skips transposing every block on every call. The results are bit-identical.
    """

    __slots__ = ("library", "block_size", "block_rows", "k", "n", "x_dtypes", "codes")

    @classmethod
    def prepare(cls, values, row_offsets, col_indices, bias, activation, in_features: int, transposed: bool = False):
        if transposed and getattr(values, "dtype", None) != torch.float32:
            return None
        library = native_library()
        # The x dtypes this weight pairs with, and its bias with (of x's dtype or the weight's, as on
        # the general path).
        x_dtypes = tuple(x for x, w in _NATIVE_DTYPES if w == getattr(values, "dtype", None)
                         and (bias is None or getattr(bias, "dtype", None) in (x, w)))
        negated = (values.is_neg() or row_offsets.is_neg() or col_indices.is_neg()
                   or (bias is not None and bias.is_neg()))
        if library is None or not x_dtypes or in_features == 0 or negated:
            return None  # (no input features: the general path returns the bias; negated views: it resolves them)
        _check(torch.empty(0, in_features, dtype=x_dtypes[0]), values, row_offsets, col_indices, bias, activation)
        if not (values.is_contiguous() and row_offsets.is_contiguous() and col_indices.is_contiguous()
                and (bias is None or bias.is_contiguous())):
            return None
        call = cls()
        call.library, call.block_size, call.k = library, values.shape[2], in_features
        call.block_rows = row_offsets.shape[0] - 1
        call.n = call.block_rows * call.block_size
        call.x_dtypes = x_dtypes
        call.codes = (_DTYPE_CODES[values.dtype], TRANSPOSED_BLOCKS if transposed else STORED_BLOCKS,
                      0 if bias is None else _DTYPE_CODES[bias.dtype], 1 if activation == "gelu" else 0)
        return call

    @staticmethod
    def key(values, row_offsets, col_indices, bias, activation) -> tuple:
        """What a call was prepared for: equal keys, the same prepared call."""
        return (values.shape, values.dtype, values.is_contiguous(), values.is_cpu, values.is_neg(),
                row_offsets.shape, row_offsets.is_contiguous(), row_offsets.is_cpu, row_offsets.is_neg(),
                col_indices.shape, col_indices.is_contiguous(), col_indices.is_cpu, col_indices.is_neg(),
                None if bias is None else (bias.shape, bias.dtype, bias.is_contiguous(), bias.is_cpu, bias.is_neg()),
                activation)

    def __call__(self, x, values, row_offsets, col_indices, bias):
        if (type(x) not in PLAIN_TENSORS or x.dtype not in self.x_dtypes or not x.is_cpu or x.dim() < 1
                or x.is_neg() or x.shape[-1] != self.k or (torch.is_grad_enabled() and (
                    x.requires_grad or (bias is not None and bias.requires_grad)))):
            return None  # (gradients wanted: the general path's dense fallback)
        x2d = x if x.dim() == 2 else x.reshape(-1, self.k)
        m = x2d.shape[0]
        if m == 0 or (x2d.stride(1) != 1 and self.k > 1 and m > 1):
            return None
        y = self.launch(x2d, values, row_offsets, col_indices, bias)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.n)

    def launch(self, x2d, values, row_offsets, col_indices, bias) -> torch.Tensor:
        """y `[M, n]` of `x2d`, a plain `[M >= 1, k]` CPU tensor with unit stride along k, of a dtype in
        `x_dtypes`, not a negated view: what `__call__` checks, and a caller that made `x2d` itself
        knows."""
        y = torch.empty(x2d.shape[0], self.n, dtype=x2d.dtype)
        w_code, layout, bias_code, activation_code = self.codes
        _run(self.library, self.block_size, self.block_rows, x2d, values, w_code, layout, row_offsets, col_indices,
             bias, bias_code, activation_code, y)
        return y
