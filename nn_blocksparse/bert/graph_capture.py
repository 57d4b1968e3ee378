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

`CudaGraphForward` does the whole recipe for serving: warm-up on a side stream, capture under
`skip_absent_attention_mask`, then per call one input copy and one graph replay.
"""

from __future__ import annotations

import contextlib

import torch
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


def check_input_ids(input_ids: torch.Tensor, batch: int, seq: int) -> None:
    """What `CudaGraphForward` accepts: integer token ids of exactly the captured shape."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be int64 or int32 token ids, got {input_ids.dtype}")
    if tuple(input_ids.shape) != (batch, seq):
        raise ValueError(f"this graph was captured for input_ids of shape {(batch, seq)}, got {tuple(input_ids.shape)}: "
                         "capture one CudaGraphForward per (batch, seq) served")


class CudaGraphForward:
    """`model(input_ids=...)` for one (batch, seq), captured once in a CUDA graph and replayed.

    Eagerly a BERT-base forward at small batches is bound by the host launching its kernels (on the
    H200: 3.9 ms eagerly, 0.66 ms as a graph replay at 1x128). The capture runs under
    `skip_absent_attention_mask` and passes no attention mask, so the inputs must have no padding:
    serve each (batch, seq) with its own `CudaGraphForward`. Calling it copies `input_ids` into the
    captured input tensor and replays the graph; it returns the model's output object, whose tensors
    the next call overwrites (clone what you keep). The model must be on its CUDA device, in the
    dtype it serves in, in eval mode, and not change afterwards (weights are read at replay time,
    modules are not re-run).
    """

    def __init__(self, model: torch.nn.Module, batch: int, seq: int, warmup: int = 3) -> None:
        parameter = next(model.parameters(), None)
        if parameter is None or parameter.device.type != "cuda":
            device = None if parameter is None else parameter.device
            raise ValueError(f"CudaGraphForward needs a model on a CUDA device, got one on {device}")
        if model.training:
            raise ValueError("CudaGraphForward needs a model in eval mode (dropout cannot be replayed)")
        if not (isinstance(batch, int) and isinstance(seq, int) and batch > 0 and seq > 0):
            raise ValueError(f"batch and seq must be positive ints, got {batch!r} and {seq!r}")
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and seq > limit:
            raise ValueError(f"seq {seq} is longer than the model's max_position_embeddings {limit}")
        self.model, self.batch, self.seq = model, batch, seq
        # A normal tensor even when made under torch.inference_mode(): calls outside it copy into it.
        with torch.inference_mode(False):
            self.input_ids = torch.zeros(batch, seq, dtype=torch.long, device=parameter.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), skip_absent_attention_mask():
            # Warm-up on a side stream (cuBLAS handles, Triton compilation, lazy buffers), as torch's
            # CUDA-graph documentation does it; then the capture itself.
            side = torch.cuda.Stream(parameter.device)
            side.wait_stream(torch.cuda.current_stream(parameter.device))
            with torch.cuda.stream(side):
                for _ in range(max(warmup, 1)):
                    model(input_ids=self.input_ids)
            torch.cuda.current_stream(parameter.device).wait_stream(side)
            with torch.cuda.graph(self.graph):
                self.output = model(input_ids=self.input_ids)

    def __call__(self, input_ids: torch.Tensor):
        check_input_ids(input_ids, self.batch, self.seq)
        self.input_ids.copy_(input_ids)
        self.graph.replay()
        return self.output
