"""Resizing: cut what pruning emptied out of dense matrices, exactly (nn_pruning's "dense" optimize).

Knows nothing of BERT: it works on heads of a multi-head attention (Q/K/V/O `nn.Linear`s) and
on the hidden neurons of a two-layer MLP. A piece is removed only when the result is provably
unchanged, and whatever constant a removed piece still added is folded into the next bias:

- a head whose V rows are all zero outputs its V bias at every position (softmax rows sum to
  1), so it adds the constant `O[:, head] @ b_v[head]` to the attention output: removed, and
  that constant goes into O's bias; a head whose O columns are all zero adds nothing: removed;
- an MLP neuron whose output column is zero adds nothing; one whose input row is zero adds the
  constant `act(b_in[j]) * W_out[:, j]`, folded into the output bias.

The hidden size left can be rounded up (`multiple_of`) with all-zero neurons (zero input row and
bias, zero output column: they add nothing whatever the activation). On a GPU this matters more
than the few FLOPs: an fp16 matrix whose rows are not a multiple of 16 bytes (e.g. 1225 kept
neurons) falls off cuBLAS's fast kernels, whose TMA loads need 16-byte-aligned strides. On an H200
such FFNs make the resized BERT-base slower than the unresized one, padding to a multiple of 8 makes
it faster, and 16 to 128 gain nothing over 8 (the measurement, with CUDA graphs:
`benchmarks/results/nvidia-h200/ffn_alignment_cudagraph_nvidia-h200.csv`). On CPU it changes nothing measurable.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def _rows_are_zero(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[groups] bool: group g of rows (weight split evenly by rows) is all zero."""
    if groups == 0:  # a layer with every head pruned: reshape(0, -1) would be ambiguous
        return torch.zeros(0, dtype=torch.bool, device=weight.device)
    return (weight.reshape(groups, -1) == 0).all(dim=1)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, layer_type: type = nn.Linear, **options) -> nn.Linear:
    """A `layer_type` (an `nn.Linear`, built with `options`) holding copies of `weight` and `bias`."""
    linear = layer_type(weight.shape[1], weight.shape[0], bias=bias is not None,
                        device=weight.device, dtype=weight.dtype, **options)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def prunable_heads(value: nn.Linear, output: nn.Linear, num_heads: int) -> list[int]:
    """Heads whose removal (with bias folding) leaves the attention output unchanged."""
    v_empty = _rows_are_zero(value.weight.detach(), num_heads)
    o_empty = _rows_are_zero(output.weight.detach().T.contiguous(), num_heads)
    return [h for h in range(num_heads) if bool(v_empty[h] or o_empty[h])]


def remove_heads(query: nn.Linear, key: nn.Linear, value: nn.Linear, output: nn.Linear, num_heads: int,
                 heads: list[int]) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """New Q, K, V, O without `heads` (with no `heads`, the same four modules); the constant each
    removed head added goes into O's bias."""
    if not heads:
        return query, key, value, output
    head_dim = query.out_features // num_heads
    kept = [h for h in range(num_heads) if h not in set(heads)]
    kept_features = torch.tensor([h * head_dim + i for h in kept for i in range(head_dim)], dtype=torch.long,
                                 device=query.weight.device)
    removed_features = torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)],
                                    dtype=torch.long, device=query.weight.device)

    def keep_rows(linear: nn.Linear) -> nn.Linear:
        bias = linear.bias.detach()[kept_features] if linear.bias is not None else None
        return linear_from(linear.weight.detach()[kept_features], bias)

    o_weight = output.weight.detach()
    o_bias = output.bias.detach().clone() if output.bias is not None else None
    if value.bias is not None:
        constant = o_weight[:, removed_features].double() @ value.bias.detach()[removed_features].double()
        if o_bias is None:
            o_bias = torch.zeros(output.out_features, dtype=o_weight.dtype, device=o_weight.device)
        o_bias = (o_bias.double() + constant).to(o_weight.dtype)
    return keep_rows(query), keep_rows(key), keep_rows(value), linear_from(o_weight[:, kept_features], o_bias)


def prunable_neurons(inner: nn.Linear, outer: nn.Linear) -> list[int]:
    """Hidden neurons of `outer(act(inner(x)))` whose removal (with bias folding) changes nothing."""
    in_empty = (inner.weight.detach() == 0).all(dim=1)
    out_empty = (outer.weight.detach() == 0).all(dim=0)
    return torch.nonzero(in_empty | out_empty).flatten().tolist()


def remove_neurons(inner: nn.Linear, outer: nn.Linear, neurons: list[int],
                   activation: Callable[[torch.Tensor], torch.Tensor],
                   multiple_of: int = 1) -> tuple[nn.Linear, nn.Linear]:
    """New inner/outer without `neurons`; a removed neuron's constant output goes into outer's bias.

    The hidden size left is rounded up to a multiple of `multiple_of` with all-zero neurons."""
    device = inner.weight.device
    removed = torch.tensor(sorted(neurons), dtype=torch.long, device=device)
    keep = torch.ones(inner.out_features, dtype=torch.bool, device=device)
    keep[removed] = False
    out_weight = outer.weight.detach()
    out_bias = outer.bias.detach().clone() if outer.bias is not None else None
    if inner.bias is not None and len(neurons):
        constant_activations = activation(inner.bias.detach()[removed].float()).double()
        constant = out_weight[:, removed].double() @ constant_activations
        if out_bias is None:
            out_bias = torch.zeros(outer.out_features, dtype=out_weight.dtype, device=device)
        out_bias = (out_bias.double() + constant).to(out_weight.dtype)
    inner_weight, outer_weight = inner.weight.detach()[keep], out_weight[:, keep]
    inner_bias = inner.bias.detach()[keep] if inner.bias is not None else None
    padding = -inner_weight.shape[0] % multiple_of
    if padding:
        inner_weight = torch.cat([inner_weight, inner_weight.new_zeros(padding, inner_weight.shape[1])])
        outer_weight = torch.cat([outer_weight, outer_weight.new_zeros(outer_weight.shape[0], padding)], dim=1)
        if inner_bias is not None:
            inner_bias = torch.cat([inner_bias, inner_bias.new_zeros(padding)])
    return linear_from(inner_weight, inner_bias), linear_from(outer_weight, out_bias)
