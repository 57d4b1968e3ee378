"""`BlockSparseLinear`: a drop-in `nn.Linear` whose weight is stored as nonzero blocks.

Same forward signature and attributes as `nn.Linear` (`in_features`, `out_features`, `bias`,
and `weight`, which reads back the dense matrix). On CUDA the Triton kernel runs; on
CPU the native kernel of `nn_blocksparse.cpu`, which reads the stored blocks themselves (no
second copy: in-place changes of `values` are seen by the next call); on CPU, bf16 `values` also
take fp32 input (and give fp32 output). With `prepack=True` (for serving; `set_prepack`) an fp32
layer's CPU forward keeps each block transposed (`cpu.launcher.transpose_blocks`), which the kernel
otherwise makes on every call: the blocks' memory twice, the same results bit for bit, made again
when `values` changes as far as the tensor can tell (`cpu.derived_copy`; after a write that bypasses
its version counter, call `repack()`). Both are `torch.library` ops (`ops.py`), and what the
forward needs beyond the stored tensors (the Triton launch table and row groups) is derived at
construction, load and `.to()`, so the forward reads no tensor data on the host: it compiles
(`torch.compile(fullgraph=True)`, dynamic shapes) and exports. Inference only: there is no backward
through the kernels (inputs that need gradients take a dense fallback).

Saved with safetensors (`save` / `load`, or any state dict): no pickle anywhere. The number of
stored blocks is part of the weights, so loading a state dict resizes the block buffers. The
weight is a validated `BlockSparseMatrix` (`check_block_sparse_matrix`), built at construction,
`load`, `load_state_dict` and `.to()`; a file or state dict that fails validation is refused
before anything is changed. The forward only reads that matrix.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from .block_sparse_matrix import BlockSparseMatrix, check_block_sparse_matrix
from .cpu.derived_copy import DerivedCopy
from .cpu.launcher import NativeLinearCall, transpose_blocks
from .functional import Launch, backend_name, block_sparse_linear_tensors, launch_table, resolve_backend, runs_triton
from .kernels import ACTIVATIONS
from .ops import direct, plain_eager

_BLOCK_TENSORS = ("values", "row_offsets", "col_indices", "row_order")
_METADATA_KEY = "nn_blocksparse.BlockSparseLinear"
# The fields of a saved layer's metadata and the types they must have.
_CONFIG_FIELDS = {"in_features": int, "out_features": int, "bias": bool, "block_size": int,
                  "activation": (str, type(None))}


class BlockSparseLinear(nn.Module):
    """`y = act(x @ W^T + b)` with W `[out_features, in_features]` kept as nonzero blocks.

    `activation` (None or "gelu") is fused into the kernel epilogue; `backend` is "auto",
    "triton" or "cpu" ("torch" is its deprecated old name; see `nn_blocksparse.functional`);
    `prepack`: keep the transposed blocks the fp32 CPU kernel reads (module docstring).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block_size: int = 32,
                 activation: str | None = None, backend: str = "auto", device=None, dtype=None,
                 prepack: bool = False) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if not isinstance(prepack, bool):
            raise TypeError(f"prepack must be a bool, got {prepack!r}")
        self.prepack = prepack
        self._transposed = DerivedCopy(transpose_blocks)
        backend = backend_name(backend)
        for name, features in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(features, bool) or not isinstance(features, numbers.Integral):
                raise TypeError(f"{name} must be an int, got {features!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.activation = activation
        self.backend = backend
        # An all-zero weight until blocks are set: a valid matrix, every block-row empty.
        empty = BlockSparseMatrix.empty((out_features, in_features), block_size, dtype or torch.float32, device)
        self._set_matrix(empty)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=empty.dtype),
                                 requires_grad=False) if bias else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, block_size: int = 32,
                   activation: str | None = None, backend: str = "auto", prepack: bool = False) -> "BlockSparseLinear":
        matrix = BlockSparseMatrix.from_dense(weight, block_size)
        module = cls(weight.shape[1], weight.shape[0], bias=bias is not None, block_size=block_size,
                     activation=activation, backend=backend, device=weight.device, dtype=weight.dtype,
                     prepack=prepack)
        module._set_matrix(matrix)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 32, activation: str | None = None,
                    backend: str = "auto", prepack: bool = False) -> "BlockSparseLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight.detach(), linear.bias, block_size, activation, backend, prepack)

    def _set_matrix(self, matrix: BlockSparseMatrix) -> None:
        self.values = nn.Parameter(matrix.values, requires_grad=False)
        self.register_buffer("row_offsets", matrix.row_offsets)
        self.register_buffer("col_indices", matrix.col_indices)
        self.register_buffer("row_order", matrix.row_order)
        self._matrix = matrix
        self._prepare()

    def _block_tensors(self) -> tuple[torch.Tensor, ...]:
        # Read from the module's dicts, not by attribute: nn.Module.__getattr__ costs microseconds a
        # name, and the forward reads all four on every call.
        buffers = self._buffers
        return self._parameters["values"], buffers["row_offsets"], buffers["col_indices"], buffers["row_order"]

    def _refresh_matrix(self) -> None:
        """Validate this module's tensors as a new matrix (after a load or a move); derived tables go."""
        self._matrix = None
        self._matrix = BlockSparseMatrix(*self._block_tensors(), (self.out_features, self.in_features),
                                         self.block_size)
        self._prepare()

    # ------------------------------------------------------------------ views
    @property
    def matrix(self) -> BlockSparseMatrix:
        """The weight as a validated `BlockSparseMatrix` over this module's tensors, kept with its row
        groups. Validated again only where a tensor was replaced or an index modified in place."""
        cached = self._matrix
        values, row_offsets, col_indices, row_order = self._block_tensors()
        if (cached is None or values is not cached.values or row_offsets is not cached.row_offsets
                or col_indices is not cached.col_indices or row_order is not cached.row_order):
            self._refresh_matrix()
        elif cached.check_unchanged():
            self._prepare()  # the launch table's row groups came from the old indices
        return self._matrix

    @property
    def weight(self) -> torch.Tensor:
        """The dense `[out_features, in_features]` weight (a fresh tensor, for reading)."""
        return self.matrix.to_dense()

    @property
    def density(self) -> float:
        return self.matrix.density

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, density={self.density:.3f}, activation={self.activation}, "
                f"prepack={self.prepack}")

    @property
    def prepacked_bytes(self) -> int:
        """Bytes of the transposed blocks kept now (`prepack=True`; 0 before the first CPU forward, for
        bf16 blocks and for values made under `torch.inference_mode`, which are read as stored)."""
        kept = self._transposed.kept()
        return 0 if kept is None else kept.numel() * kept.element_size()

    def repack(self) -> None:
        """Forget the kept transposed blocks (`prepack=True`): the next CPU forward transposes `values` as
        they lie. For a write to `values` that bypasses its version counter (`.data`, a NumPy view)."""
        self._transposed.clear()

    # ------------------------------------------------------------------ forward
    def _prepare(self) -> None:
        """Derive what the forward needs beyond the validated matrix, for its device and dtype: for
        the Triton backend, the launch table and row groups (`functional.launch_table`)."""
        device = self.values.device
        self._launch = None
        # ((backend, transposed, key), NativeLinearCall or None): the CPU forward's direct call.
        self._native = None
        self._transposed.clear()  # (derived from the tensors this replaces)
        if device.type in ("cuda", "cpu") and runs_triton(self.backend, device):
            self._launch = launch_table(self._matrix, self.values.dtype, device)

    def native_call(self) -> tuple | None:
        """`(NativeLinearCall, values, row_offsets, col_indices, bias)`: the CPU forward's direct call into
        the native kernel and the tensors to give it, or None where it does not apply. Call after
        `matrix` (the forward's revalidation), in eager mode; the tensors are the plain ones
        `plain_eager` accepts only where it says so."""
        if "parametrizations" in self._modules:
            return None  # parametrized tensors are computed on access: the general path reads them
        values, row_offsets, col_indices, _ = self._block_tensors()
        bias = self.bias  # a Parameter, a buffer or None, as the general path reads it
        kernel_values = None
        if self.prepack and values.dtype == torch.float32 and values.is_cpu and values.is_contiguous():
            kernel_values = self._transposed.of(values)  # None for an inference tensor
        transposed = kernel_values is not None
        key = (self.backend, transposed,
               NativeLinearCall.key(values, row_offsets, col_indices, bias, self.activation))
        native = self._native
        if native is None or native[0] != key:
            call = None
            if values.device.type == "cpu" and resolve_backend(self.backend, values.device) == "cpu":
                call = NativeLinearCall.prepare(values, row_offsets, col_indices, bias, self.activation,
                                                self.in_features, transposed)
            native = self._native = (key, call)
        if native[1] is None:
            return None
        return native[1], kernel_values if transposed else values, row_offsets, col_indices, bias

    def _native_forward(self, input: torch.Tensor) -> torch.Tensor | None:
        """The CPU forward straight into the native kernel (`NativeLinearCall`), or None where it does not
        apply: what `block_sparse_linear_tensors` would compute, without its per-call checks of the weight."""
        prepared = self.native_call()
        if prepared is None or not plain_eager(input, *prepared[1:]):
            return None
        return direct("linear_cpu", prepared[0], input, *prepared[1:])

    def _launch_for(self, rows: int) -> Launch:
        if self._launch is None:
            raise ValueError(f"this layer's weight is on {self.values.device}, where the Triton backend does not run")
        return self._launch  # the table serves every M

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            # Eagerly, tensors replaced by assignment or indices modified in place are validated
            # (and derived from) again. A trace (torch.compile, torch.export) stands its own tensors
            # in for the stored ones: what was validated and prepared for those holds.
            self.matrix  # noqa: B018 - the property revalidates
            if input.is_cpu:
                y = self._native_forward(input)
                if y is not None:
                    return y
        return block_sparse_linear_tensors(input, self.values, self.row_offsets, self.col_indices, self.row_order,
                                           (self.out_features, self.in_features), self.bias, self.activation,
                                           self.backend, self._launch_for)

    # ------------------------------------------------------------------ state
    def __getstate__(self):
        # Copies and pickles leave the direct native call behind (it holds the loaded library's
        # functions); the copy makes its own on first use.
        state = dict(super().__getstate__())
        state["_native"] = None
        return state

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        self._refresh_matrix()  # new tensors (device, dtype): validated again, derived tables redone
        return result

    def _check_incoming(self, state_dict, prefix: str) -> None:
        """Refuse (before anything is copied) block tensors or a bias that do not form a valid weight
        with the tensors they replace (a partial load keeps the others)."""
        where = prefix.rstrip(".") or "BlockSparseLinear"
        incoming = {name: state_dict.get(prefix + name) for name in _BLOCK_TENSORS}
        if any(tensor is not None for tensor in incoming.values()):
            device = self.values.device
            candidate = [tensor if tensor is None or not isinstance(tensor, torch.Tensor) else tensor.to(device)
                         for tensor in incoming.values()]
            candidate = [current if tensor is None else tensor
                         for tensor, current in zip(candidate, self._block_tensors())]
            try:
                check_block_sparse_matrix(*candidate, (self.out_features, self.in_features), self.block_size)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{where}: {err}") from None
        bias = state_dict.get(prefix + "bias")
        if bias is not None and self.bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                raise TypeError(f"{where}: bias must be a floating point "
                                f"tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"{where}: bias must have shape "
                                 f"({self.out_features},), got {tuple(bias.shape)}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self._check_incoming(state_dict, prefix)
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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._refresh_matrix()  # indices overwritten in place: derived tables go too

    def config_dict(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "block_size": self.block_size, "activation": self.activation}

    def save(self, path: str | Path) -> None:
        """Write weights and shape metadata to one `.safetensors` file."""
        tensors = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(tensors, str(path), metadata={_METADATA_KEY: json.dumps(self.config_dict())})

    @classmethod
    def load(cls, path: str | Path, device=None, backend: str = "auto") -> "BlockSparseLinear":
        """Read a file written by `save`. The file is validated whole on the CPU (metadata fields and
        types, tensor names, the block tensors by `check_block_sparse_matrix`, the bias) before any
        module is built: a crafted or corrupted file raises `ValueError`/`TypeError` naming the problem."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                config = _config_from_metadata(f.metadata() or {}, path)
                expected = set(_BLOCK_TENSORS) | ({"bias"} if config["bias"] else set())
                if set(f.keys()) != expected:
                    raise ValueError(f"{path}: expected the tensors {sorted(expected)}, got {sorted(f.keys())}")
                # Copied into memory of our own: safetensors' tensors have storage that cannot be resized,
                # which Triton's interpreter (among others) needs.
                tensors = {name: f.get_tensor(name).clone() for name in sorted(expected)}
        except SafetensorError as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        shape = (config["out_features"], config["in_features"])
        try:
            matrix = BlockSparseMatrix(*(tensors[name] for name in _BLOCK_TENSORS), shape, config["block_size"])
        except (TypeError, ValueError) as err:
            raise type(err)(f"{path}: {err}") from None
        bias = tensors.get("bias")
        if bias is not None and (bias.dtype != matrix.dtype or tuple(bias.shape) != (shape[0],)):
            raise ValueError(f"{path}: bias must be {matrix.dtype} of shape ({shape[0]},) like values, got "
                             f"{bias.dtype} of shape {tuple(bias.shape)}")
        module = cls(config["in_features"], config["out_features"], bias=config["bias"],
                     block_size=config["block_size"], activation=config["activation"], backend=backend,
                     dtype=matrix.dtype)
        module._set_matrix(matrix)
        if bias is not None:
            module.bias = nn.Parameter(bias, requires_grad=False)
        return module.to(device) if device is not None else module


def _config_from_metadata(metadata: dict, path) -> dict:
    """The layer configuration stored in a `BlockSparseLinear` file, its fields and types checked."""
    if _METADATA_KEY not in metadata:
        raise ValueError(f"{path} is not a BlockSparseLinear file (no nn_blocksparse metadata)")
    try:
        config = json.loads(metadata[_METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {_METADATA_KEY} metadata is not valid JSON ({err})") from None
    if not isinstance(config, dict) or set(config) != set(_CONFIG_FIELDS):
        fields = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: the {_METADATA_KEY} metadata must have the fields {sorted(_CONFIG_FIELDS)}, "
                         f"got {fields}")
    for name, kind in _CONFIG_FIELDS.items():
        value = config[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise TypeError(f"{path}: metadata field {name!r} must be {getattr(kind, '__name__', 'str or null')}, "
                            f"got {value!r:.60}")
    return config
