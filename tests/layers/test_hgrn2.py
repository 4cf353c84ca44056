"""HGRN2 (``recur/layers/hgrn2.py``): the properties from the paper that the conformance suite
cannot know. With key dimension 1 the layer is HGRN's vector recurrence, and its lower bound
grows with depth; float64, rtol 1e-8, atol 1e-10, as the conformance suite.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recur
from recur.models import Backbone

from .helpers import close, randn, rms_norm


def make_hgrn2(seed=0, **options):
    torch.manual_seed(seed)
    layer = recur.build("hgrn2", **{"d_model": 16, **options}).double()
    with torch.no_grad():
        layer.norm_weight.normal_(1.0, 0.2)
    return layer


@pytest.mark.parametrize("depth", [None, (2, 4)])
def test_hgrn2_with_key_dim_1_is_hgrn_vector_recurrence(depth):
    """expand_ratio = 1: every channel is a 1x1 state, and the layer is HGRN's (real) recurrence
    h_t = f_t h_{t-1} + (1 - f_t) i_t, written in closed form
    h_t = sum_{j<=t} (prod_{j<l<=t} f_l) (1 - f_j) i_j + (prod_{l<=t} f_l) h_0, read by o_t."""
    kw = {} if depth is None else {"layer_idx": depth[0], "n_layers": depth[1]}
    layer = make_hgrn2(expand_ratio=1, **kw)
    assert layer.n_heads == 16 and layer.expand_ratio == 1
    gamma = 0.0 if depth is None else depth[0] / depth[1]
    _, s0 = layer(randn(2, 5, 16, seed=5))
    x = randn(2, 23, 16, seed=6)
    f = gamma + (1 - gamma) * torch.sigmoid(layer.f_proj(x))  # [b, t, d]
    i, o = layer.i_proj(x), F.silu(layer.q_proj(x))
    h0 = s0["S"][..., 0, 0]  # [b, d]
    L = torch.log(f).cumsum(1)  # log prod_{l<=t} f_l
    T = x.shape[1]
    decay = torch.exp(L[:, :, None, :] - L[:, None, :, :])  # [b, t, j, d] = prod_{j<l<=t} f_l
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None]
    h = (decay * causal * ((1 - f) * i)[:, None]).sum(2) + torch.exp(L) * h0[:, None]
    want = layer.o_proj(rms_norm(o * h, layer.norm_weight, layer.norm_eps))
    for mode in layer.modes:
        layer.mode = mode
        layer.chunk_size = 8
        y, s = layer(x, s0)
        close(y, want, f"mode {mode}: output")
        close(s["S"][..., 0, 0], h[:, -1], f"mode {mode}: final state")


def test_hgrn2_lower_bound_grows_with_depth():
    """gamma_l = l / n_layers: 0 at the first layer (and standalone), strictly increasing, < 1;
    the forget gate stays in [gamma_l, 1] for any input."""
    backbone = Backbone(d_model=16, n_layers=4, pattern="hgrn2", mlp=None)
    bounds = [m.lower_bound for m in backbone.mixers]
    assert bounds == [0.0, 0.25, 0.5, 0.75]
    assert recur.build("hgrn2", d_model=16).lower_bound == 0.0
    x = randn(2, 9, 16, seed=7, dtype=torch.float32) * 50  # saturating gate pre-activations
    for layer in backbone.mixers:
        f = layer.log_forget(x).exp()
        assert (f >= layer.lower_bound - 1e-6).all() and (f <= 1).all()
        assert f.min() < layer.lower_bound + 1e-3, "a saturated gate should reach the lower bound"
    # deeper layers forget less: the mean gate on the same input increases with depth
    means = [m.log_forget(x).exp().mean().item() for m in backbone.mixers]
    assert means == sorted(means)
