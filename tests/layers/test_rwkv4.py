"""RWKV-4 time mixing (``recur/layers/rwkv4.py``; its channel mixing is tests/layers/test_channel.py): the properties from the paper that
the conformance suite cannot know. The layers are compared with a direct transcription of the
paper's equations in float64, where modes differ only in summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch

import recur
from recur.layers.rwkv4 import wkv

from .helpers import D, close, randn


def shifted(x, last=None):
    """x_{t-1} for every t (zeros, or ``last``, before the first token)."""
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None]
    return torch.cat([first, x[:, :-1]], dim=1)


def make_rwkv4(seed=0, key_scale=1.0, **options):
    """An RWKV-4 layer in float64 with non-zero keys and receptance (the official init zeroes them)."""
    torch.manual_seed(seed)
    layer = recur.build("rwkv4", d_model=D, **options).double()
    with torch.no_grad():
        layer.key.weight.normal_(0, key_scale / math.sqrt(D))
        layer.receptance.weight.normal_(0, 1 / math.sqrt(D))
    return layer


def direct_wkv(w, u, k, v):
    """The paper's WKV, unstabilised: a double sum over i < t plus the bonus term for t."""
    T = k.shape[1]
    out = []
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp(-(t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        out.append(num / den)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv4_output_is_the_papers_wkv_formula(mode):
    layer = make_rwkv4(key_scale=3.0)
    layer.mode, layer.chunk_size = mode, 4
    x = randn(2, 13, D, seed=2)
    xp = shifted(x)
    mix = lambda mu: x * mu + xp * (1 - mu)  # noqa: E731
    r, k, v = layer.receptance(mix(layer.mix_r)), layer.key(mix(layer.mix_k)), layer.value(mix(layer.mix_v))
    want = layer.output(torch.sigmoid(r) * direct_wkv(layer.time_decay.exp(), layer.time_first, k, v))
    y, state = layer(x)
    close(y, want, f"{mode}: output vs W_o(sigmoid(r) * WKV)")
    close(state["shift"], x[:, -1], "the shift state is the last input")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv4_state_is_the_scaled_numerator_denominator_and_largest_exponent(mode):
    """(aa, bb, pp) = (num e^-pp, den e^-pp, max_i (k_i - (T-1-i) w)): the same in every mode."""
    layer = make_rwkv4(key_scale=3.0)
    layer.mode, layer.chunk_size = mode, 4
    x = randn(2, 11, D, seed=3)
    xp = shifted(x)
    k = layer.key(x * layer.mix_k + xp * (1 - layer.mix_k))
    v = layer.value(x * layer.mix_v + xp * (1 - layer.mix_v))
    w, T = layer.time_decay.exp(), x.shape[1]
    expo = torch.stack([k[:, i] - (T - 1 - i) * w for i in range(T)])  # [T, batch, d]
    _, s = layer(x)
    close(s["pp"], expo.max(0).values, "pp is the largest exponent")
    close(s["aa"] * s["pp"].exp(), (expo.exp() * v.transpose(0, 1)).sum(0), "aa e^pp is the numerator")
    close(s["bb"] * s["pp"].exp(), expo.exp().sum(0), "bb e^pp is the denominator")


def test_rwkv4_chunk_equals_recurrent_with_data_dependent_keys():
    """The conformance suite runs the official init (zero keys); large random keys make the running
    maximum switch between the decayed history and the new key, across chunk boundaries."""
    layer = make_rwkv4(key_scale=8.0)
    layer.chunk_size = 5
    x0, x = randn(2, 7, D, seed=4), randn(2, 31, D, seed=5)
    _, init = layer(x0)
    init = init.detach()
    params = list(layer.parameters())

    def run(mode):
        layer.mode = mode
        xx = x.clone().requires_grad_(True)
        y, s = layer(xx, init)
        loss = (y * randn(*y.shape, seed=6)).sum() + sum((t * randn(*t.shape, seed=7 + i)).sum() for i, (_, t) in enumerate(s.tensors()))
        return y.detach(), s.detach(), torch.autograd.grad(loss, [xx, *params])

    y_ref, s_ref, g_ref = run("recurrent")
    y, s, g = run("chunk")
    close(y, y_ref, "chunk output")
    for key in s_ref:
        close(s[key], s_ref[key], f"chunk final state {key!r}")
    for a, b in zip(g, g_ref):
        close(a, b, "chunk gradient")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("k0", [80.0, 100.0])
def test_rwkv4_wkv_survives_huge_keys_in_float32(mode, k0):
    """k ~ 80-100: e^k is at or beyond float32's range (e^88.7), so the unstabilised float32 sums
    overflow; the stable form stays finite and equals the float64 result. WKV is invariant to a
    common shift of all keys, so the float64 reference is the direct formula with k - k0."""
    B, T = 2, 40
    w = randn(D, seed=8).exp()
    u = randn(D, seed=9)
    k = k0 + 3 * randn(B, T, D, seed=10)
    v = randn(B, T, D, seed=11)
    out, (aa, bb, pp) = wkv(w.log().float(), u.float(), k.float(), v.float(), mode="reference" if mode == "recurrent" else "chunk", chunk_size=8)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(aa).all() and torch.isfinite(bb).all() and torch.isfinite(pp).all()
    close(out.double(), direct_wkv(w, u, k - k0, v), "stable float32 WKV vs float64", rtol=1e-4, atol=1e-5)
    if k0 == 100.0:
        naive = direct_wkv(w.float(), u.float(), k.float(), v.float())
        assert not torch.isfinite(naive).all(), "the unstabilised float32 formula should overflow here"


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv4_layer_with_huge_key_weights_is_finite_in_float32(mode):
    layer = make_rwkv4(key_scale=400.0).float()  # |k| in the hundreds
    layer.mode = mode
    y, s = layer(randn(2, 50, D, seed=12, dtype=torch.float32))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t).all() for _, t in s.tensors())


def test_rwkv4_init_follows_the_official_code():
    layer = recur.build("rwkv4", d_model=D, layer_idx=1, n_layers=4)
    r0, r1 = 1 / 3, 1 - 1 / 4
    i = torch.arange(D, dtype=torch.float64)
    close(layer.time_decay.double(), -5 + 8 * (i / (D - 1)) ** (0.7 + 1.3 * r0), "time_decay", rtol=1e-6, atol=1e-6)
    close(layer.time_first.double(), math.log(0.3) + 0.5 * ((i + 1) % 3 - 1), "time_first", rtol=1e-6, atol=1e-6)
    close(layer.mix_k.double(), (i / D) ** r1, "mu_k", rtol=1e-6, atol=1e-6)
    close(layer.mix_v.double(), (i / D) ** r1 + 0.3 * r0, "mu_v", rtol=1e-6, atol=1e-6)
    close(layer.mix_r.double(), (i / D) ** (0.5 * r1), "mu_r", rtol=1e-6, atol=1e-6)
    assert layer.key.weight.abs().sum() == 0 and layer.receptance.weight.abs().sum() == 0
    assert recur.build("rwkv4", d_model=D, zero_init_output=True).output.weight.abs().sum() == 0
