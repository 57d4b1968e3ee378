"""`capture_graph`: one call captured as a CUDA graph, the way torch's documentation does it.

Knows nothing of BERT or of our modules: the recipe that `bert.CudaGraphForward`, the benchmarks
and the CUDA-graph tests share.
"""

from __future__ import annotations

from typing import Callable

import torch


def capture_graph(fn: Callable[[], object], device: torch.device, warmup: int = 3):
    """(graph, output): one call of `fn` captured as a CUDA graph on `device` (whichever GPU is
    current), after `warmup` calls on a side stream (cuBLAS handles, Triton compilation, lazy
    buffers), as torch's CUDA-graph documentation does it. `output` is what the captured call
    returned: its tensors are rewritten by every replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        with torch.cuda.graph(graph, stream=torch.cuda.Stream(device)):
            output = fn()
    return graph, output
