"""Capturing a BERT forward in a CUDA graph without losing flash attention.

transformers 5 builds the attention mask itself and, while it is "tracing", never skips it:
`torch.cuda.is_current_stream_capturing()` counts as tracing, so a forward captured with no
`attention_mask` at all still materialises a full `[batch, 1, seq, seq]` mask. SDPA cannot run
flash attention with a mask and falls back to its math path, which upcasts fp16 to fp32. On an
H200 (fp16 BERT-base pruned like nn_pruning, 32x384) that made the captured forward take 22.4 ms
against 5.3 ms of GPU time eagerly (`benchmarks/results/nvidia-h200/graph_check_profile_nvidia-h200.csv`):
24 fp32 GEMMs, a float softmax and mask kernels where the eager forward runs 12 cuDNN flash kernels.

With no padding mask there is nothing to inspect, so skipping the mask is as safe under capture as
it is eagerly, and later transformers releases do just that (5.24 does; 5.17, the GPU machine's,
does not). `skip_absent_attention_mask()` makes any version do it, for the forwards run inside
it: where a mask *is* passed, or local attention applies, nothing changes.
Use it around the capture (`torch.cuda.graph`, `do_bench_cudagraph`); replays need nothing.
Inputs captured without a mask must have no padding, as always for a mask-free forward.

`CudaGraphForward` serves with `nn_blocksparse.cuda_graph.capture_graph` (warm-up on a side
stream, then the capture): capture under `skip_absent_attention_mask`, then per call one
input copy and one graph replay.
"""

from __future__ import annotations

import contextlib
import numbers
import torch
from transformers import masking_utils

from ..cuda_graph import capture_graph

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


def check_token_ids(ids: torch.Tensor, batch: int, seq: int, name: str = "input_ids") -> None:
    """What `CudaGraphForward` accepts: integer ids of exactly the captured shape."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32 ids, got {ids.dtype}")
    if tuple(ids.shape) != (batch, seq):
        raise ValueError(f"this graph was captured for {name} of shape {(batch, seq)}, got {tuple(ids.shape)}: "
                         "capture one CudaGraphForward per (batch, seq) served")


def _positive_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


class CudaGraphForward:
    """`model(input_ids=..., token_type_ids=...)` for one (batch, seq), captured once in a CUDA graph.

    Eagerly a BERT-base forward at small batches is bound by the host launching its kernels (on the
    H200: 3.9 ms eagerly, 0.66 ms as a graph replay at 1x128). The capture runs under
    `skip_absent_attention_mask` and passes no attention mask, so the inputs must have no padding:
    serve each (batch, seq) with its own `CudaGraphForward`. Calling it copies `input_ids` (and
    `token_type_ids`, zeros when not given: question/context pairs need theirs) into the captured
    input tensors and replays the graph; it returns the model's output object, whose tensors the
    next call overwrites (clone what you keep). The model must be on its CUDA device, in the dtype it
    serves in, in eval mode, and not change afterwards (weights are read at replay time, modules
    are not re-run).
    """

    def __init__(self, model: torch.nn.Module, batch: int, seq: int, warmup: int = 3) -> None:
        if not (_positive_int(batch) and _positive_int(seq)):
            raise ValueError(f"batch and seq must be positive ints, got {batch!r} and {seq!r}")
        parameter = next(model.parameters(), None)
        if parameter is None or parameter.device.type != "cuda":
            device = None if parameter is None else parameter.device
            raise ValueError(f"CudaGraphForward needs a model on a CUDA device, got one on {device}")
        if model.training:
            raise ValueError("CudaGraphForward needs a model in eval mode (dropout cannot be replayed)")
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and seq > limit:
            raise ValueError(f"seq {seq} is longer than the model's max_position_embeddings {limit}")
        self.model, self.batch, self.seq = model, int(batch), int(seq)
        self.device = parameter.device
        # Normal tensors even when made under torch.inference_mode(): calls outside it copy into them.
        with torch.inference_mode(False):
            self.input_ids = torch.zeros(batch, seq, dtype=torch.long, device=self.device)
            self.token_type_ids = torch.zeros(batch, seq, dtype=torch.long, device=self.device)
        with torch.inference_mode(), skip_absent_attention_mask():
            self.graph, self.output = capture_graph(
                lambda: model(input_ids=self.input_ids, token_type_ids=self.token_type_ids), self.device, warmup)

    def __call__(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None):
        check_token_ids(input_ids, self.batch, self.seq)
        if token_type_ids is not None:
            check_token_ids(token_type_ids, self.batch, self.seq, "token_type_ids")
        with torch.cuda.device(self.device):
            self.input_ids.copy_(input_ids)
            if token_type_ids is None:
                self.token_type_ids.zero_()
            else:
                self.token_type_ids.copy_(token_type_ids)
            self.graph.replay()
        return self.output
