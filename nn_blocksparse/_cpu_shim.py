"""`block_sparse_linear_cpu`: the CPU block-sparse linear as one pure function of the stored tensors.

A stand-in with the signature of the CPU path's entry point (`nn_blocksparse.cpu`, being written
in parallel): `block_sparse_linear_cpu(x2d, values, row_offsets, col_indices, bias, activation)`,
the tensors exactly as `BlockSparseMatrix` stores them (int32 indices), no plan object. It runs
today's `cpu_kernels` path, whose plan it builds on first use and keeps, keyed by the storages and
version counters of the weight tensors: an in-place change of `values` (which bumps its version)
builds a new plan, a dead weight's plan is dropped. `ops.linear_cpu` is its only caller.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from .cpu_kernels import CpuBlockSparsePlan, build_cpu_plan, cpu_block_sparse_linear

# Plans kept at most (one per BlockSparseLinear on CPU; a BERT-base has 72 linear layers).
_MAX_PLANS = 512
_plans: dict[tuple, tuple[tuple[StorageWeakRef, ...], CpuBlockSparsePlan]] = {}
_plans_lock = threading.Lock()


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        return -1


def _identity(tensor: torch.Tensor) -> tuple:
    """What a plan was built from: which storage, where in it, and how many in-place writes it has seen.

    The weak reference keeps the storage's bookkeeping object (not its memory) alive, so its address,
    part of the key, is never reused for another storage while the entry exists.
    """
    return (StorageWeakRef(tensor.untyped_storage()), tensor.storage_offset(), tensor.shape, tensor.stride(),
            tensor.dtype, _version(tensor))


def _plan_for(values: torch.Tensor, row_offsets: torch.Tensor, col_indices: torch.Tensor,
              in_features: int) -> CpuBlockSparsePlan:
    key = tuple(_identity(t) for t in (values, row_offsets, col_indices))
    entry = _plans.get(key)
    if entry is not None:
        return entry[1]
    bs = values.shape[-1]
    plan = build_cpu_plan(values, row_offsets, col_indices, (row_offsets.shape[0] - 1) * bs, in_features, bs)
    with _plans_lock:
        for stale in [k for k, (refs, _) in _plans.items() if any(ref.expired() for ref in refs)]:
            del _plans[stale]
        if len(_plans) >= _MAX_PLANS:
            del _plans[next(iter(_plans))]
        _plans[key] = (tuple(identity[0] for identity in key), plan)
    return plan


def block_sparse_linear_cpu(x2d: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                            col_indices: torch.Tensor, bias: torch.Tensor | None,
                            activation: str | None) -> torch.Tensor:
    """`act(x2d @ W^T + bias)` -> `[M, N]` for W stored as BSR blocks (`values [nnz, bs, bs]`,
    int32 `row_offsets [N/bs + 1]` and `col_indices [nnz]`); activation None or "gelu"."""
    plan = _plan_for(values, row_offsets, col_indices, x2d.shape[1])
    y2d = cpu_block_sparse_linear(x2d, plan, bias)
    return F.gelu(y2d) if activation == "gelu" else y2d
