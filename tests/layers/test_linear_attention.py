"""linear_attention's feature maps (``recur/layers/linear_attention.py``) (elu+1, identity, relu, Based's Taylor map).

The conformance suite builds only the default map; here every map gets the suite's exactness
checks (every mode equals ``recurrent`` forward and backward with the final state, state carry
at several splits and token by token, honest state size), plus the properties of each map: the
Taylor kernel, the attention form with each normaliser, and a well-defined output when the
normaliser is zero or negative. float64, rtol 1e-8 / atol 1e-10 as the conformance suite.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur
from recur import catalog
from recur.layers.linear_attention import FEATURE_MAPS, taylor_features

from .helpers import D, close, randn


def make(feature_map, seed=0, **options):
    torch.manual_seed(seed)
    layer = recur.build("linear_attention", d_model=D, feature_map=feature_map, **options).double()
    layer.chunk_size = 8  # T = 37 spans several chunks and ends mid-chunk
    return layer


def state_loss(s):
    S = s["S"]
    return (S * randn(*S.shape, seed=100)).sum()


def test_default_feature_map_is_elu_plus_one():
    layer = recur.build("linear_attention", d_model=D)
    assert layer.feature_map == "elu+1" and layer.feature_dim == layer.head_dim == layer.key_dim


def test_unknown_feature_map_is_a_clear_error():
    with pytest.raises(ValueError, match="feature_map must be one of"):
        recur.build("linear_attention", d_model=D, feature_map="softmax")


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_modes_equal_recurrent_forward_and_backward(feature_map):
    layer = make(feature_map)
    _, init = layer(randn(2, 11, D, seed=3))
    init = init.detach()
    x = randn(2, 37, D, seed=4)
    weights = randn(2, 37, D, seed=5)
    params = list(layer.parameters())

    def run(mode):
        layer.mode = mode
        xx = x.clone().requires_grad_(True)
        y, s = layer(xx, init)
        grads = torch.autograd.grad((y * weights).sum() + state_loss(s), [xx, *params])
        return y.detach(), s["S"].detach(), grads

    y_ref, S_ref, g_ref = run("recurrent")
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for mode in layer.modes:
        if mode == "recurrent":
            continue
        y, S, g = run(mode)
        close(y, y_ref, f"{feature_map}, mode {mode}: output")
        close(S, S_ref, f"{feature_map}, mode {mode}: final state")
        for n, a, b in zip(names, g, g_ref):
            close(a, b, f"{feature_map}, mode {mode}: gradient of {n}")


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_state_carry_is_exact(feature_map):
    layer = make(feature_map)
    x = randn(2, 37, D, seed=6)
    for mode in layer.modes:
        layer.mode = mode
        y, s = layer(x)
        for t in (1, 8, 20, 36):
            y1, s1 = layer(x[:, :t])
            y2, s2 = layer(x[:, t:], s1)
            close(torch.cat([y1, y2], dim=1), y, f"{feature_map}, mode {mode}: split at t={t}")
            close(s2["S"], s["S"], f"{feature_map}, mode {mode}: final state after split at t={t}")
        state, ys = None, []
        for t in range(x.shape[1]):
            yt, state = layer(x[:, t : t + 1], state)
            ys.append(yt)
        close(torch.cat(ys, dim=1), y, f"{feature_map}, mode {mode}: token-by-token stepping")
        close(state["S"], s["S"], f"{feature_map}, mode {mode}: final state after stepping")


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_state_size_is_honest_and_follows_the_feature_dim(feature_map):
    for d_model in (16, 64):
        layer = recur.build("linear_attention", d_model=d_model, feature_map=feature_map)
        _, s = layer(torch.randn(2, 5, d_model))
        assert s.num_floats() == layer.state_size(5) == catalog.evaluate_formula(layer, 5)
        want_phi = 1 + 16 + 16**2 if feature_map == "taylor" else layer.head_dim
        assert layer.feature_dim == want_phi
        assert layer.state_size(5) == layer.n_heads * want_phi * (layer.head_dim + 1)


def test_taylor_feature_inner_product_is_second_order_exp():
    """phi(x).phi(y) = 1 + x.y + (x.y)^2 / 2 for any dimension and scale."""
    for d, scale, seed in ((1, 1.0, 0), (3, 0.3, 1), (16, 1.0, 2), (16, 3.0, 3)):
        x, y = randn(50, d, seed=seed) * scale, randn(50, d, seed=seed + 10) * scale
        s = (x * y).sum(-1)
        got = (taylor_features(x) * taylor_features(y)).sum(-1)
        close(got, 1 + s + s**2 / 2, f"d={d}, scale={scale}")
        assert taylor_features(x).shape[-1] == 1 + d + d * d


def attention_form(layer, x):
    """The quadratic form y_t = W_O [sum_{j<=t} K(q_t, k_j) v_j / den(sum_{j<=t} K(q_t, k_j))] with
    the kernel and normaliser written out per map (not through phi for elu+1/relu/identity)."""
    heads = lambda t: rearrange(t, "b t (h d) -> b h t d", h=layer.n_heads)  # noqa: E731
    q, k, v = heads(layer.q_proj(x)), heads(layer.k_proj(x)), heads(layer.v_proj(x))
    if layer.feature_map == "taylor":
        s = q @ k.transpose(-1, -2) / math.sqrt(layer.key_dim)
        K = 1 + s + s**2 / 2  # Based: 2nd-order Taylor expansion of exp(q.k / sqrt(d))
    else:
        f = {"elu+1": lambda t: F.elu(t) + 1, "relu": F.relu, "identity": lambda t: t}[layer.feature_map]
        K = f(q) @ f(k).transpose(-1, -2)
    T = x.shape[1]
    K = K * torch.ones(T, T, dtype=torch.bool).tril()
    n = K.sum(-1, keepdim=True)
    den = n.abs().clamp(min=1.0) if layer.feature_map == "identity" else n + layer.eps
    return layer.o_proj(rearrange((K @ v) / den, "b h t d -> b t (h d)"))


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_recurrence_equals_normalised_attention_form(feature_map):
    layer = make(feature_map)
    x = randn(2, 23, D, seed=7)
    want = attention_form(layer, x)
    for mode in layer.modes:
        layer.mode = mode
        y, _ = layer(x)
        close(y, want, f"{feature_map}, mode {mode}")


def test_identity_normaliser_crosses_zero_without_blowing_up():
    """With phi = identity the kernel sum n_t = q_t . sum_j k_j changes sign; the output divides
    by max(|n_t|, 1), so it stays within |numerator| and is finite at n_t = 0."""
    layer = make("identity")
    x = randn(1, 200, D, seed=8)
    heads = lambda t: rearrange(t, "b t (h d) -> b h t d", h=layer.n_heads)  # noqa: E731
    q, k = heads(layer.q_proj(x)), heads(layer.k_proj(x))
    n = (q * k.cumsum(2)).sum(-1)
    assert (n > 0).any() and (n < 0).any() and (n.abs() < 1).any(), "the test needs a normaliser crossing zero"
    y, _ = layer(x)
    assert torch.isfinite(y).all()
    with torch.no_grad():  # an exactly zero normaliser: q = 0 everywhere
        layer.q_proj.weight.zero_()
        layer.q_proj.bias.zero_()
    y0, _ = layer(x)
    close(y0, layer.o_proj.bias.expand_as(y0), "q = 0: zero attention output")


def test_relu_zero_normaliser_gives_zero_attention_output():
    """relu(q) = 0 makes n_t = 0 and the numerator 0: the attention output is 0, not NaN."""
    layer = make("relu")
    with torch.no_grad():
        layer.q_proj.weight.zero_()
        layer.q_proj.bias.fill_(-1.0)
    x = randn(2, 13, D, seed=9)
    for mode in layer.modes:
        layer.mode = mode
        y, _ = layer(x)
        close(y, layer.o_proj.bias.expand_as(y), f"mode {mode}")


def test_taylor_projects_to_a_low_key_dim():
    layer = recur.build("linear_attention", d_model=64, feature_map="taylor")
    assert layer.key_dim == 16 and layer.q_proj.out_features == layer.n_heads * 16
    layer = recur.build("linear_attention", d_model=64, feature_map="taylor", key_dim=4)
    assert layer.feature_dim == 1 + 4 + 16
