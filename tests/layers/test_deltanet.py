"""DeltaNet's negative-eigenvalue option (Grazzi et al. 2024): beta in (0, 2), every mode exact."""

import pytest
import torch

from tests.layers.helpers import D, close, make, randn


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_negative_eigenvalues_double_beta_and_every_mode_agrees(name):
    layer = make(name, negative_eigenvalues=True)
    plain = make(name)  # same seed: the same weights
    layer.chunk_size = plain.chunk_size = 8
    x = randn(2, 29, D)
    outs = {}
    for mode in layer.modes:
        layer.mode = mode
        x_ = x.clone().requires_grad_()
        y, state = layer(x_)
        y.pow(2).sum().backward()
        outs[mode] = (y, state["S"], x_.grad)
    ref = outs["recurrent"]
    for mode, got in outs.items():
        for a, b, what in zip(got, ref, ("output", "state", "input gradient")):
            close(a, b, f"{name} {mode} {what}")
    with torch.no_grad():
        beta = 2 * torch.sigmoid(layer.b_proj(x))
    assert bool((beta > 1).any()), "the test must reach eigenvalues below 0"
    with torch.no_grad():
        assert not torch.allclose(layer(x)[0], plain(x)[0])  # the option changes the model
    assert "negative_eigenvalues=True" in repr(layer)


def test_negative_eigenvalues_must_be_a_bool():
    with pytest.raises((TypeError, ValueError), match="negative_eigenvalues"):
        make("deltanet", negative_eigenvalues=1)
