"""IndRNN (``recur/layers/indrnn.py``): properties from the paper that the conformance suite
cannot know. The neurons are independent and the recurrent weight respects the paper's bound.
Exactness checks run in float64, where the only differences are rounding (~1e-15 relative).
"""

from __future__ import annotations

import math

import pytest
import torch

import recur

from .helpers import D, close, make, randn


def test_indrnn_neurons_are_independent():
    """Changing neuron j's input W x_t + b leaves every other neuron's trajectory unchanged."""
    m = make("indrnn")
    _, start = m(randn(2, 5, D, seed=6))
    x = randn(2, 19, D, seed=7)
    y, _ = m(x, start)
    j = 5
    # An input change that moves only neuron j's pre-activation: W delta = 3 e_j.
    e = torch.zeros(D, dtype=torch.float64)
    e[j] = 3.0
    delta = torch.linalg.solve(m.weight.detach(), e)
    x2 = x.clone()
    x2[:, 4:] += delta
    y2, _ = m(x2, start)
    others = [i for i in range(D) if i != j]
    close(y2[..., others], y[..., others], f"neurons other than {j} after changing neuron {j}'s input")
    assert not torch.allclose(y2[..., j], y[..., j]), "neuron j ignores its own input"


def test_indrnn_recurrence_is_elementwise_relu():
    """h_t = relu(W x_t + u * h_{t-1} + b), u a vector: equal to the paper's formula step by step."""
    m = make("indrnn")
    _, start = m(randn(3, 4, D, seed=8))
    x = randn(3, 17, D, seed=9)
    y, state = m(x, start)
    u = m.recurrent_weight
    h, ys = start["h"], []
    for t in range(x.shape[1]):
        h = torch.relu(x[:, t] @ m.weight.T + m.bias + u * h)
        ys.append(h)
    close(y, torch.stack(ys, dim=1), "output vs relu(W x + u * h + b)")
    close(state["h"], h, "final state")


@pytest.mark.parametrize("horizon,gamma,long_memory", [(None, 2.0, False), (100, 2.0, False), (100, 2.0, True), (784, 5.0, True)])
def test_indrnn_recurrent_weight_init_and_bound(horizon, gamma, long_memory):
    """u starts uniform in [0, gamma^(1/T)] ([gamma^(-1/T), gamma^(1/T)] for long memory; the bound is
    1 without a horizon) and |u| < gamma^(1/T) for any value of the trainable parameter."""
    torch.manual_seed(0)
    m = recur.build("indrnn", d_model=512, horizon=horizon, gamma=gamma, long_memory=long_memory)
    high = gamma ** (1 / horizon) if horizon else 1.0
    low = gamma ** (-1 / horizon) if long_memory else 0.0
    assert math.isclose(m.u_max, high, rel_tol=1e-12)
    u = m.recurrent_weight.detach().double()
    assert u.min() >= low - 1e-6 and u.max() <= high, f"init outside [{low}, {high}]: [{u.min()}, {u.max()}]"
    spread = high - low  # uniform over the whole range, not a corner of it (512 draws)
    assert u.min() < low + 0.05 * spread and u.max() > high - 0.05 * spread
    with torch.no_grad():
        m.v.copy_(torch.linspace(-50, 50, 512))
    assert m.recurrent_weight.abs().max() <= high, "the parameterisation lets |u| exceed its bound"


def test_indrnn_long_memory_needs_a_horizon():
    with pytest.raises(ValueError, match="horizon"):
        recur.build("indrnn", d_model=D, long_memory=True)
