"""`set_prepack`: switch every layer of a model to keep (or drop) the weight layouts its CPU kernel reads.

A `DenseLinear` with `prepack=True` keeps oneDNN's packed copy of its weight; an fp32
`BlockSparseLinear` keeps its blocks transposed, as the native kernel reads them. Either way the
layer's weights take twice their memory and the forward skips rearranging them on every call; the
copies are made on first use and again when a weight changes (`cpu.derived_copy`). For serving a
model whose weights are fixed; what `patch_bert(..., prepack=True)` does at patch time.
"""

from __future__ import annotations

import torch.nn as nn

from .dense_linear import DenseLinear
from .linear import BlockSparseLinear


def set_prepack(model: nn.Module, enabled: bool = True) -> int:
    """Set `prepack` on every `DenseLinear` and `BlockSparseLinear` in `model` (e.g. a loaded patched model,
    for serving); returns how many there are. Disabling drops their kept copies."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    layers = [module for module in model.modules() if isinstance(module, (DenseLinear, BlockSparseLinear))]
    for layer in layers:
        layer.prepack = enabled
        if not enabled:
            layer.repack()
    return len(layers)
