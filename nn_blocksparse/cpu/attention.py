"""`self_attention_cpu`: encoder self-attention on the native kernel, straight from a fused QKV projection.

`qkv [B, S, 3 * H * D]` (all Q heads, then K, then V, as `FusedSelfAttention` projects them) gives
`softmax(q k^T / sqrt(D) + mask) v` as `[B, S, H * D]`: the layout the output projection reads, so
neither the heads' split nor their merge is copied. At BERT's sequence lengths it is faster than
SDPA's CPU kernel, whose small GEMMs go through MKL's AVX2 path on AMD CPUs (docs/cpu.md).

bf16 runs on AMX tiles where the kernel in use is the amx_bf16 build (`nnbs_attention_bf16`:
scores and softmax in fp32, the probabilities rounded to bf16 for P V, as SDPA's bf16 path rounds
them), for D a multiple of 32; elsewhere bf16 stays on SDPA. `bf16_products=True` asks the same of
fp32 qkv (a model with bf16 weights and fp32 activations, whose linears round their inputs to bf16
too): q, k, v and the probabilities rounded to bf16 for the two products only, the softmax, sums
and output fp32; where the tiles do not run it, the fp32 kernel (exact) runs instead.

`runs_native_attention(...)` says whether a call can take this path: fp32 (or, on AMX, bf16) CPU
tensors, `qkv` contiguous, D a multiple of 4 (32 in bf16), no dropout, no tracing, a native kernel
here, and a mask that is None or additive over the keys only (`[B, 1, 1, S]`, what a padded batch
gives; fp32, or bf16 with bf16 qkv). Everything else stays on SDPA, which computes the same thing.
`self_attention_cpu` checks what keeps the kernel in bounds (dtype, layout, sizes, mask) and raises
naming it. Knows nothing of `nn.Module` or BERT.
"""

from __future__ import annotations

import math

import torch

from .build import native_library
from ..block_sparse_matrix import stored
from .launcher import _DTYPE_CODES
from .launcher import PLAIN_TENSORS as _PLAIN

_MESSAGES = {1: "unsupported head size", 2: "no bf16 attention in this build (or no AMX tile state granted)",
             3: "out of memory for the attention's scratch"}


BF16_ISAS = ("amx_bf16",)  # the builds whose attention takes bf16 (on AMX tiles)


def _runs_bf16(library) -> bool:
    """Whether `library` runs bf16 attention."""
    return library is not None and library.isa in BF16_ISAS


def _is_key_mask(attention_mask: torch.Tensor, dtype: torch.dtype, batch: int, seq: int) -> bool:
    """An additive CPU mask over the keys, `[B or 1, 1, 1, S]` (not per query, per head, or boolean), in
    fp32 or the row's `dtype`."""
    return (type(attention_mask) in _PLAIN and attention_mask.dtype in (torch.float32, dtype) and attention_mask.is_cpu
            and attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1) and attention_mask.shape[3] == seq
            and attention_mask.shape[0] in (1, batch))


def _refusal(qkv, head_dim, attention_mask, library) -> str | None:
    """Why `library`'s kernel cannot take these inputs in bounds (dtype, layout, head size, mask), or None."""
    dtypes = {torch.float32: "fp32", torch.bfloat16: "bf16"} if _runs_bf16(library) else {torch.float32: "fp32"}
    if not (type(qkv) in _PLAIN and qkv.dim() == 3 and qkv.dtype in dtypes and qkv.is_cpu and qkv.is_contiguous()):
        return (f"qkv must be a contiguous {' or '.join(dtypes.values())} CPU tensor [B, S, 3 * H * D] here, got "
                f"{getattr(qkv, 'dtype', type(qkv))} of shape {tuple(getattr(qkv, 'shape', ()))}")
    multiple = 32 if qkv.dtype == torch.bfloat16 else 4
    if not (isinstance(head_dim, int) and head_dim > 0 and head_dim % multiple == 0):
        return f"head_dim must be a positive multiple of {multiple} in {qkv.dtype}, got {head_dim}"
    if attention_mask is not None and not _is_key_mask(attention_mask, qkv.dtype, qkv.shape[0], qkv.shape[1]):
        return ("the native attention takes no mask or an additive mask over the keys [B, 1, 1, S] (fp32, or "
                "qkv's dtype)")
    return None


def runs_native_attention(qkv: torch.Tensor, head_dim: int, attention_mask, dropout: float) -> bool:
    if dropout or torch.compiler.is_compiling() or (torch.is_grad_enabled() and qkv.requires_grad):
        return False
    library = native_library()
    return library is not None and _refusal(qkv, head_dim, attention_mask, library) is None


def _on_tiles(qkv, head_dim, bf16_products: bool, library) -> bool:
    """Whether the call runs `nnbs_attention_bf16` (bf16 qkv, or fp32 with `bf16_products`, on AMX)."""
    return qkv.dtype == torch.bfloat16 or (bf16_products and _runs_bf16(library) and head_dim % 32 == 0)


def self_attention_cpu(qkv: torch.Tensor, num_heads: int, head_dim: int,
                       attention_mask: torch.Tensor | None = None, library=None,
                       bf16_products: bool = False) -> torch.Tensor:
    """`[B, S, H * D]` attention of `qkv [B, S, 3 * H * D]`; call where `runs_native_attention` holds.

    `library`: a `build.NativeLibrary` (default: this process's), for tests of every ISA.
    `bf16_products`: fp32 qkv with the products' inputs rounded to bf16 where the tiles run (module
    docstring).
    """
    library = library or native_library()
    refusal = _refusal(qkv, head_dim, attention_mask, library)  # (without a library: what fp32 takes)
    if refusal is not None:
        raise ValueError(refusal)
    if library is None:
        raise RuntimeError("no native CPU kernel here (nn_blocksparse.cpu.native_status() says why)")
    if not (isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(f"num_heads must be an int > 0, got {num_heads!r}")
    batch, seq, width = qkv.shape
    if width != 3 * num_heads * head_dim:
        raise ValueError(f"qkv has {width} features, 3 x {num_heads} heads x {head_dim} expected")
    return attention_launch(library, stored(qkv), num_heads, head_dim, attention_mask, bf16_products)


def attention_launch(library, qkv: torch.Tensor, num_heads: int, head_dim: int, attention_mask,
                     bf16_products: bool) -> torch.Tensor:
    """`self_attention_cpu` on inputs it takes, checked by the caller: `self_attention_cpu` checks them;
    a caller that made `qkv` itself knows it is a contiguous `[B, S, 3 * num_heads * head_dim]` plain
    CPU tensor of a dtype `library` runs (no negated view), and must check `attention_mask` (None, or
    one `_is_key_mask` accepts; a negated view is resolved here) and `head_dim` (as `_refusal`)."""
    batch, seq, _ = qkv.shape
    mask = (None if attention_mask is None
            else stored(attention_mask).reshape(-1, seq).expand(batch, seq).to(torch.float32).contiguous())
    out = torch.empty(batch, seq, num_heads * head_dim, dtype=qkv.dtype)
    if out.numel() == 0:
        return out
    mask_pointer = None if mask is None else mask.data_ptr()
    scale, threads = 1.0 / math.sqrt(head_dim), torch.get_num_threads()
    if _on_tiles(qkv, head_dim, bf16_products, library):
        code = library.attention_bf16(batch, seq, num_heads, head_dim, qkv.data_ptr(), _DTYPE_CODES[qkv.dtype],
                                      mask_pointer, scale, out.data_ptr(), threads)
    else:
        code = library.attention(batch, seq, num_heads, head_dim, qkv.data_ptr(), mask_pointer, scale, out.data_ptr(),
                                 threads)
    if code:
        raise RuntimeError(f"native attention: {_MESSAGES.get(code, f'error {code}')}")
    return out
