"""`self_attention_cpu`: encoder self-attention on the native kernel, straight from a fused QKV projection.

`qkv [B, S, 3 * H * D]` (all Q heads, then K, then V, as `FusedSelfAttention` projects them) gives
`softmax(q k^T / sqrt(D) + mask) v` as `[B, S, H * D]`: the layout the output projection reads, so
neither the heads' split nor their merge is copied. At BERT's sequence lengths it is faster than
SDPA's CPU kernel, whose small GEMMs go through MKL's AVX2 path on AMD CPUs (docs/cpu.md).

`runs_native_attention(...)` says whether a call can take this path: fp32 CPU tensors, `qkv`
contiguous, D a multiple of 4, no dropout, no tracing, a native kernel here, and a mask that is
None or additive over the keys only (`[B, 1, 1, S]`, what a padded batch gives). Everything else
stays on SDPA, which computes the same thing. `self_attention_cpu` checks what keeps the kernel in
bounds (dtype, layout, sizes, mask) and raises naming it. Knows nothing of `nn.Module` or BERT.
"""

from __future__ import annotations

import math

import torch

from .build import native_library
from .launcher import PLAIN_TENSORS as _PLAIN

_MESSAGES = {1: "head size must be a multiple of 4", 3: "out of memory for the attention's scratch"}


def _is_key_mask(attention_mask: torch.Tensor, batch: int, seq: int) -> bool:
    """An additive fp32 CPU mask over the keys, `[B or 1, 1, 1, S]` (not per query, per head, or boolean)."""
    return (type(attention_mask) in _PLAIN and attention_mask.dtype == torch.float32 and attention_mask.is_cpu
            and attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1) and attention_mask.shape[3] == seq
            and attention_mask.shape[0] in (1, batch))


def _refusal(qkv, head_dim, attention_mask) -> str | None:
    """Why the kernel cannot take these inputs in bounds (dtype, layout, head size, mask), or None."""
    if not (type(qkv) in _PLAIN and qkv.dim() == 3 and qkv.dtype == torch.float32 and qkv.is_cpu
            and qkv.is_contiguous()):
        return (f"qkv must be a contiguous fp32 CPU tensor [B, S, 3 * H * D], got "
                f"{getattr(qkv, 'dtype', type(qkv))} of shape {tuple(getattr(qkv, 'shape', ()))}")
    if not (isinstance(head_dim, int) and head_dim > 0 and head_dim % 4 == 0):
        return f"head_dim must be a positive multiple of 4, got {head_dim}"
    if attention_mask is not None and not _is_key_mask(attention_mask, qkv.shape[0], qkv.shape[1]):
        return "the native attention takes no mask or an additive fp32 mask over the keys [B, 1, 1, S]"
    return None


def runs_native_attention(qkv: torch.Tensor, head_dim: int, attention_mask, dropout: float) -> bool:
    if dropout or torch.compiler.is_compiling() or _refusal(qkv, head_dim, attention_mask) is not None:
        return False
    if torch.is_grad_enabled() and qkv.requires_grad:
        return False
    return native_library() is not None


def self_attention_cpu(qkv: torch.Tensor, num_heads: int, head_dim: int,
                       attention_mask: torch.Tensor | None = None, library=None) -> torch.Tensor:
    """`[B, S, H * D]` attention of `qkv [B, S, 3 * H * D]`; call where `runs_native_attention` holds.

    `library`: a `build.NativeLibrary` (default: this process's), for tests of every ISA.
    """
    refusal = _refusal(qkv, head_dim, attention_mask)
    if refusal is not None:
        raise ValueError(refusal)
    if not (isinstance(num_heads, int) and num_heads > 0):
        raise ValueError(f"num_heads must be an int > 0, got {num_heads!r}")
    batch, seq, width = qkv.shape
    if width != 3 * num_heads * head_dim:
        raise ValueError(f"qkv has {width} features, 3 x {num_heads} heads x {head_dim} expected")
    mask = None if attention_mask is None else attention_mask.reshape(-1, seq).expand(batch, seq).contiguous()
    library = library or native_library()
    if library is None:
        raise RuntimeError("no native CPU kernel here (nn_blocksparse.cpu.native_status() says why)")
    out = torch.empty(batch, seq, num_heads * head_dim, dtype=torch.float32)
    if out.numel() == 0:
        return out
    code = library.attention(batch, seq, num_heads, head_dim, qkv.data_ptr(), None if mask is None else mask.data_ptr(),
                             1.0 / math.sqrt(head_dim), out.data_ptr(), torch.get_num_threads())
    if code:
        raise RuntimeError(f"native attention: {_MESSAGES.get(code, f'error {code}')}")
    return out
