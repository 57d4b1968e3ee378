"""`measure_block_sparse`: time a weight as a `BlockSparseLinear` against the same dense layer (`DenseLinear`).

Whether zero blocks pay depends on the device more than on the density: on an H200 our kernel
beats cuBLAS on BERT-base shapes only below about 0.2 block density (benchmarks/results/), while
on a 2-core CPU the torch path already wins at 0.6. A fixed density threshold is then wrong on
one machine or the other, so a caller that wants the faster of the two for its weight (the
`"measure"` choice of `patch_bert`) times both, here, on the weight's own device and dtype, at
a representative number of input rows.

Timing is eager, as a module's forward runs (`timing.median_ms`): the median of `repeats` calls
after `warmup` calls, with CUDA events on a GPU (so the host's launch work counts where it is
longer than the kernel) and `time.perf_counter` on CPU. Block-sparse is chosen only when it is at least
`margin` faster, so that noise around equal times keeps the plain dense layer.

Knows nothing of BERT; `BlockSparseLinear` and `DenseLinear` (oneDNN on CPU, GELU fused) are all it builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .dtypes import weight_and_bias_in
from .linear import BlockSparseLinear
from .dense_linear import DenseLinear
from .timing import median_ms

DEFAULT_ROWS = 512  # tokens per call while measuring: batch 4 x seq 128
DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class Measurement:
    """Median milliseconds per call of the two forms of one weight, and the choice they imply."""

    dense_ms: float
    block_sparse_ms: float
    use_block_sparse: bool

    @property
    def speedup(self) -> float:
        """Dense time over block-sparse time (> 1: block-sparse is faster)."""
        return self.dense_ms / self.block_sparse_ms


def measure_block_sparse(weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None,
                         block_size: int = 32, backend: str = "auto", rows: int = DEFAULT_ROWS,
                         margin: float = DEFAULT_MARGIN, warmup: int = 3, repeats: int = 20,
                         timer: Callable[[Callable[[], object], torch.device], float] | None = None,
                         weight_dtype: torch.dtype | None = None) -> Measurement:
    """Time `act(x @ weight^T + bias)` as a `BlockSparseLinear` and as a `DenseLinear` (activation fused).

    `x` is `[rows, in_features]` random, on the weight's device and in its dtype. `timer(fn,
    device)` replaces `timing.median_ms` (tests); it is called for the dense form first. Block-sparse
    is chosen when its time is below `(1 - margin)` x the dense time. `weight_dtype` (CPU: bf16)
    keeps both forms' weights and biases in that dtype, fed the same `x` (mixed precision), as
    `patch_bert(..., weight_dtype=...)` builds them.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    device = weight.device
    timer = timer or (lambda fn, dev: median_ms(fn, dev, warmup, repeats))
    weight = weight.detach()
    bias = bias.detach() if bias is not None else None
    x_dtype = weight.dtype
    weight, bias = weight_and_bias_in(weight, bias, weight_dtype)
    sparse = BlockSparseLinear.from_dense(weight, bias, block_size, activation=activation, backend=backend)
    dense = DenseLinear.from_tensors(weight, bias, activation)  # what hybrid keeps where dense is faster
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, weight.shape[1], generator=generator).to(device=device, dtype=x_dtype)

    with torch.inference_mode():
        dense_ms = timer(lambda: dense(x), device)
        block_sparse_ms = timer(lambda: sparse(x), device)
    return Measurement(dense_ms, block_sparse_ms, block_sparse_ms < (1.0 - margin) * dense_ms)
