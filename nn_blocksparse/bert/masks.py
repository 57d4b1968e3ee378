"""`key_mask(mask)`: transformers' padding mask as the additive key mask the native attention takes.

transformers 5 gives BERT's self-attention a boolean `[B, 1, S, S]` mask (True: attend), each query
row a copy of the sequence's padding, where transformers 4 gave an additive `[B, 1, 1, S]` one. The
native attention takes only masks over the keys, so with the boolean one every padded batch ran on
SDPA. Where every query row of each sequence is the same and each sequence attends at least one key,
the mask is that row, made additive (0 where attended, fp32's minimum elsewhere, as transformers 4
made it for fp32 models; cast to bf16 or fp16 it is -inf, what SDPA makes of a boolean mask): the
same softmax, to the rounding of the scores. Anything else (a causal or per-query
mask, a sequence with every key masked out, whose SDPA output is its own convention) stays as it is,
and so does every mask in a trace (`torch.compile`, `torch.jit.trace`, functorch transforms, dispatch
modes: the checks read the mask's values, which a trace would freeze; traced, the attention runs SDPA
anyway). Only CPU masks: the native attention is the CPU's, and elsewhere the checks would
wait on the device.
"""

from __future__ import annotations

import torch

from ..ops import plain_eager


def key_mask(mask):
    if not (type(mask) is torch.Tensor and mask.is_cpu and mask.dtype == torch.bool and mask.dim() == 4
            and mask.shape[1] == 1 and mask.shape[2] == mask.shape[3] and mask.shape[2] > 0) \
            or torch.jit.is_tracing() or not plain_eager(mask):
        return mask
    keys = mask[:, :, :1, :]
    if not (bool(keys.any(-1).all()) and bool((mask == keys).all())):
        return mask
    return torch.zeros(keys.shape, dtype=torch.float32).masked_fill_(~keys, torch.finfo(torch.float32).min)
