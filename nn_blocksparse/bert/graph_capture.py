"""Capturing a BERT forward in a CUDA graph without losing flash attention.

transformers 5 builds the attention mask itself and, while it is "tracing", never skips it:
`torch.cuda.is_current_stream_capturing()` counts as tracing, so a forward captured with no
`attention_mask` at all still materialises a full `[batch, 1, seq, seq]` mask. SDPA cannot run
flash attention with a mask and falls back to its math path, which upcasts fp16 to fp32. On an
H200 (fp16 BERT-base pruned like nn_pruning, 32x384) that made the captured forward take 22.4 ms
against 5.3 ms of GPU time eagerly (`benchmarks/results/graph_check_profile_nvidia-h200.csv`):
24 fp32 GEMMs, a float softmax and mask kernels where the eager forward runs 12 cuDNN flash kernels.

With no padding mask there is nothing to inspect, so skipping the mask is as safe under capture as
it is eagerly, and later transformers releases do just that (5.24 does; 5.17, the GPU machine's,
does not). `skip_absent_attention_mask()` makes any version do it, for the forwards run inside
it: where a mask *is* passed, or local attention applies, nothing changes.
Use it around the capture (`torch.cuda.graph`, `do_bench_cudagraph`); replays need nothing.
Inputs captured without a mask must have no padding, as always for a mask-free forward.
"""

from __future__ import annotations

import contextlib

from transformers import masking_utils

# The transformers function this wraps: whether the SDPA mask may be left out (None = no bias).
_HOOK = "_ignore_bidirectional_mask_sdpa"


@contextlib.contextmanager
def skip_absent_attention_mask():
    """Within this block, transformers' SDPA mask is skipped whenever no attention mask was given."""
    original = getattr(masking_utils, _HOOK, None)
    if original is None:
        raise RuntimeError(f"this transformers version has no masking_utils.{_HOOK}: "
                           "skip_absent_attention_mask needs updating for it")

    def ignore_mask(padding_mask, kv_length, local_attention_size=None, *args, **kwargs):
        if padding_mask is None and (local_attention_size is None or kv_length < local_attention_size):
            return True
        return original(padding_mask, kv_length, local_attention_size, *args, **kwargs)

    setattr(masking_utils, _HOOK, ignore_mask)
    try:
        yield
    finally:
        setattr(masking_utils, _HOOK, original)
