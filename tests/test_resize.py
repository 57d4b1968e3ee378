"""resize.remove_neurons: removed neurons change nothing, and the hidden size can be padded to alignment."""

import pytest
import torch
import torch.nn as nn

from nn_blocksparse.resize import prunable_neurons, remove_neurons


def mlp_with_dead_neurons(hidden: int = 37, width: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    inner, outer = nn.Linear(width, hidden), nn.Linear(hidden, width)
    with torch.no_grad():
        inner.weight.copy_(torch.randn(hidden, width, generator=generator))
        outer.weight.copy_(torch.randn(width, hidden, generator=generator))
        inner.weight[[1, 4, 9]] = 0.0  # input rows gone: constant act(bias) outputs, folded into the bias
        outer.weight[:, [2, 5, 30]] = 0.0  # output columns gone: add nothing
    return inner, outer


@pytest.mark.parametrize("multiple_of", [1, 8, 32])
@pytest.mark.parametrize("activation", [torch.sigmoid, nn.functional.gelu], ids=["sigmoid", "gelu"])
def test_removed_and_padded_neurons_change_nothing(multiple_of, activation):
    inner, outer = mlp_with_dead_neurons()
    neurons = prunable_neurons(inner, outer)
    assert sorted(neurons) == [1, 2, 4, 5, 9, 30]
    new_inner, new_outer = remove_neurons(inner, outer, neurons, activation, multiple_of=multiple_of)
    kept = 37 - 6
    hidden = new_inner.out_features
    assert hidden % multiple_of == 0 and kept <= hidden < kept + multiple_of
    assert new_outer.in_features == hidden
    # Padding neurons are all zero (sigmoid(0) = 0.5 would leak through a nonzero output column).
    assert not new_inner.weight[kept:].any() and not new_inner.bias[kept:].any() and not new_outer.weight[:, kept:].any()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = outer(activation(inner(x))).double()
        resized = new_outer(activation(new_inner(x))).double()
    assert (resized - reference).abs().max().item() < 1e-5
