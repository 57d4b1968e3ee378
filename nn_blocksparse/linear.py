"""`BlockSparseLinear`: a drop-in `nn.Linear` whose weight is stored as nonzero blocks.

Same forward signature and attributes as `nn.Linear` (`in_features`, `out_features`, `bias`,
and `weight`, which reads back the dense matrix). On CUDA the Triton kernel runs; on CPU the
native kernel of `nn_blocksparse.cpu`, which reads the stored blocks themselves (no second copy:
in-place changes of `values` are seen by the next call). On CPU, bf16 `values` also take fp32
input (and give fp32 output). Inference only: there is no backward through the kernels.

Saved with safetensors (`save` / `load`, or any state dict): no pickle anywhere. The number of
stored blocks is part of the weights, so loading a state dict resizes the block buffers.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .block_sparse_matrix import INDEX_DTYPE, BlockSparseMatrix
from .functional import BACKENDS, block_sparse_linear
from .kernels import ACTIVATIONS

_BLOCK_TENSORS = ("values", "row_offsets", "col_indices", "row_order")


class BlockSparseLinear(nn.Module):
    """`y = act(x @ W^T + b)` with W `[out_features, in_features]` kept as nonzero blocks.

    `activation` (None or "gelu") is fused into the kernel epilogue; `backend` is "auto",
    "triton" or "cpu" ("torch" is its deprecated old name; see `nn_blocksparse.functional`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 32,
                 activation: str | None = None, backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "torch":
            warnings.warn('backend="torch" is deprecated: it is now named "cpu"', DeprecationWarning, stacklevel=2)
            backend = "cpu"
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.activation = activation
        self.backend = backend
        # An all-zero weight until blocks are set: a valid matrix, every block-row empty.
        empty = BlockSparseMatrix.from_dense(
            torch.zeros(out_features, in_features, device=device, dtype=dtype or torch.float32), block_size
        )
        self._set_matrix(empty)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=empty.dtype),
                                 requires_grad=False) if bias else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = 32,
                   activation: str | None = None, backend: str = "auto") -> "BlockSparseLinear":
        matrix = BlockSparseMatrix.from_dense(weight, block_size)
        module = cls(weight.shape[1], weight.shape[0], bias=bias is not None, block_size=block_size,
                     activation=activation, backend=backend, device=weight.device, dtype=weight.dtype)
        module._set_matrix(matrix)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 32, activation: str | None = None,
                    backend: str = "auto") -> "BlockSparseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight.detach(), linear.bias, block_size, activation, backend)

    def _set_matrix(self, matrix: BlockSparseMatrix) -> None:
        self.values = nn.Parameter(matrix.values, requires_grad=False)
        self.register_buffer("row_offsets", matrix.row_offsets)
        self.register_buffer("col_indices", matrix.col_indices)
        self.register_buffer("row_order", matrix.row_order)
        self._matrix = None

    # ------------------------------------------------------------------ views
    @property
    def matrix(self) -> BlockSparseMatrix:
        """The weight as a `BlockSparseMatrix` over this module's tensors (kept, with its row groups)."""
        tensors = (self.values, self.row_offsets, self.col_indices, self.row_order)
        cached = self._matrix
        if cached is None or any(a is not b for a, b in zip(tensors, (cached.values, cached.row_offsets,
                                                                       cached.col_indices, cached.row_order))):
            cached = BlockSparseMatrix(*tensors, (self.out_features, self.in_features), self.block_size)
            self._matrix = cached
        return cached

    @property
    def weight(self) -> torch.Tensor:
        """The dense `[out_features, in_features]` weight (a fresh tensor, for reading)."""
        return self.matrix.to_dense()

    @property
    def density(self) -> float:
        return self.matrix.density

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, density={self.density:.3f}, activation={self.activation}")

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(input, self.matrix, self.bias, self.activation, self.backend)

    # ------------------------------------------------------------------ state
    def _apply(self, fn, *args, **kwargs):
        self._matrix = None  # it holds the tensors of the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The stored block count differs from one weight to the next: adopt the incoming shapes.
        for name in _BLOCK_TENSORS:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                replacement = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
                if name == "values":
                    self.values = nn.Parameter(replacement, requires_grad=False)
                else:
                    setattr(self, name, replacement)
        self._matrix = None  # indices may be overwritten in place: derived row groups go too
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.row_offsets.dtype != INDEX_DTYPE:
            error_msgs.append(f"{prefix}row_offsets must be {INDEX_DTYPE}")

    def config_dict(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "block_size": self.block_size, "activation": self.activation}

    def save(self, path: str | Path) -> None:
        """Write weights and shape metadata to one `.safetensors` file."""
        tensors = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"nn_blocksparse.BlockSparseLinear": json.dumps(self.config_dict())})

    @classmethod
    def load(cls, path: str | Path, device=None, backend: str = "auto") -> "BlockSparseLinear":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        if "nn_blocksparse.BlockSparseLinear" not in metadata:
            raise ValueError(f"{path} is not a BlockSparseLinear file (no nn_blocksparse metadata)")
        config = json.loads(metadata["nn_blocksparse.BlockSparseLinear"])
        tensors = load_file(str(path), device=str(device) if device is not None else "cpu")
        module = cls(config["in_features"], config["out_features"], bias=config["bias"],
                     block_size=config["block_size"], activation=config["activation"], backend=backend,
                     device=device, dtype=tensors["values"].dtype)
        module.load_state_dict(tensors)
        return module
