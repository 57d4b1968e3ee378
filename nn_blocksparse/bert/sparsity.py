"""What a BERT keeps: heads per layer and each matrix's block layout, as numbers and as one picture.

`matrix_layouts(model)` reads the six matrices of every layer (query, key, value, attention output,
FFN in, FFN out) of a model patched by `patch_bert` or not (a pruned checkpoint loaded with
`load_pruned_bert`, any transformers BERT); a fused QKV is read back as its three parts.
`plot_sparsity` draws them with the heads per layer in one PNG, the picture nn_pruning's model
cards showed (matplotlib, imported on first use, no pyplot state touched).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..linear import BlockSparseLinear
from ..layouts import block_layout
from .patching import BertSelfAttentionAdapter, bert_layers

MATRICES = ("query", "key", "value", "attention_output", "ffn_in", "ffn_out")
KEPT_COLOR, ZERO_COLOR = "#1f4e79", "#e6e6e6"


@dataclass(frozen=True)
class MatrixLayout:
    """One weight matrix's blocks: `blocks[i, j]` is True where block (i, j) holds a nonzero."""

    layer: int
    name: str
    shape: tuple[int, int]
    block_size: int
    block_sparse: bool  # stored as a BlockSparseLinear (patched), else a dense nn.Linear
    blocks: torch.Tensor

    @property
    def density(self) -> float | None:
        """Fraction of blocks holding a nonzero; None for a matrix with no rows or columns (no heads left)."""
        return self.blocks.float().mean().item() if self.blocks.numel() else None


def _weights(layer: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module storing it, dense weight) for the six matrices of one BertLayer."""
    attention = layer.attention.self
    if isinstance(attention, BertSelfAttentionAdapter):
        qkv = attention.attention.qkv
        parts = zip(("query", "key", "value"), [qkv] * 3, torch.tensor_split(qkv.weight.detach(), 3))
    else:
        parts = [(name, getattr(attention, name), getattr(attention, name).weight.detach())
                 for name in ("query", "key", "value")]
    others = [("attention_output", layer.attention.output.dense), ("ffn_in", layer.intermediate.dense),
              ("ffn_out", layer.output.dense)]
    return [*parts, *[(name, module, module.weight.detach()) for name, module in others]]


def matrix_layouts(model: nn.Module, block_size: int = 32) -> list[MatrixLayout]:
    """Every layer's six matrices, layer by layer in `MATRICES` order.

    A block-sparse matrix is read on its own block grid; a dense one on `block_size`.
    """
    layouts = []
    with torch.no_grad():
        for index, layer in enumerate(bert_layers(model)):
            for name, module, weight in _weights(layer):
                sparse = isinstance(module, BlockSparseLinear)
                size = module.block_size if sparse else block_size
                layouts.append(MatrixLayout(index, name, tuple(weight.shape), size, sparse, block_layout(weight, size, pad_edges=True)))
    return layouts


def plot_sparsity(layouts: list[MatrixLayout], heads: list[int], heads_per_layer_before: int, path: str | Path,
                  title: str = "") -> Path:
    """One PNG: the heads each layer keeps (bars, out of `heads_per_layer_before`), then one row per
    layer with every matrix's blocks (dark: holds a nonzero, light: all zero) and its density."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    num_layers = len(heads)
    figure = Figure(figsize=(1.9 * len(MATRICES), 2.2 + 1.7 * num_layers), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(num_layers + 1, len(MATRICES), height_ratios=[1.4] + [1] * num_layers)
    bars = figure.add_subplot(grid[0, :])
    bars.bar(range(num_layers), heads, color=KEPT_COLOR)
    bars.axhline(heads_per_layer_before, color="gray", linestyle="--", linewidth=1, label="before pruning")
    bars.legend(loc="upper right", fontsize=8)
    bars.set_xticks(range(num_layers))
    bars.set_xlabel("layer")
    bars.set_ylabel("heads kept")
    bars.set_ylim(0, heads_per_layer_before * 1.15)
    bars.yaxis.set_major_locator(MaxNLocator(integer=True))
    bars.set_title(f"{title}{': ' if title else ''}{sum(heads)} of {heads_per_layer_before * num_layers} heads kept")
    colors = ListedColormap([ZERO_COLOR, KEPT_COLOR])
    for layout in layouts:
        axes = figure.add_subplot(grid[layout.layer + 1, MATRICES.index(layout.name)])
        axes.set_xticks([])
        axes.set_yticks([])
        if layout.layer == 0:
            axes.set_title(layout.name, fontsize=9)
        if layout.name == MATRICES[0]:
            axes.set_ylabel(f"layer {layout.layer}")
        if layout.density is None:
            axes.text(0.5, 0.5, "empty", ha="center", va="center", transform=axes.transAxes)
            continue
        axes.imshow(layout.blocks.numpy(), cmap=colors, vmin=0, vmax=1, interpolation="nearest")
        axes.set_xlabel(f"{layout.shape[0]}x{layout.shape[1]}  {layout.density:.0%}", fontsize=8)
    path = Path(path)
    figure.savefig(path)
    return path
