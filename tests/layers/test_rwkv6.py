"""RWKV-6 (Finch, ``recur/layers/rwkv6.py``): the properties from the paper that the conformance
suite cannot know. The layer is compared with a direct transcription of the paper's wkv sum with
the bonus for the current token, in float64 where the only differences are summation order
(rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur
from recur.models import Backbone

from .helpers import D, close, group_norm_heads, randn


def make_rwkv6(seed=0, **options):
    """An RWKV-6 in float64 with non-zero LoRAs (the official init zeroes their first factor)."""
    torch.manual_seed(seed)
    layer = recur.build("rwkv6", d_model=D, **options).double()
    with torch.no_grad():
        for p in (layer.mix_A, layer.decay_A):
            p.normal_(0, 0.5)
        for p in (layer.mix_B, layer.decay_B):
            p.normal_(0, 0.3)
        layer.bonus.normal_(0, 1.0)
    return layer


def rwkv6_direct(layer, x):
    """The paper's time mixing transcribed: ddlerp token shift, w_t = exp(-exp(d_t)) and
    wkv_t = diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i, o_t = r_t wkv_t."""
    B, T, _ = x.shape
    H, d = layer.n_heads, layer.head_dim
    x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    dx = x_prev - x
    hidden = torch.tanh((x + dx * layer.mu_x) @ layer.mix_A).chunk(5, dim=-1)  # one rank-32 input per branch
    branch = {b: x + dx * (layer.mix_bias[n] + hidden[n] @ layer.mix_B[n]) for n, b in enumerate("wkvrg")}
    r, k, v = layer.receptance(branch["r"]), layer.key(branch["k"]), layer.value(branch["v"])
    g = F.silu(layer.gate(branch["g"]))
    w = torch.exp(-torch.exp(layer.time_decay + torch.tanh(branch["w"] @ layer.decay_A) @ layer.decay_B))
    r, k, v, w = (rearrange(t, "b t (h d) -> b t h d", h=H) for t in (r, k, v, w))
    out = []
    for t in range(T):
        wkv = layer.bonus[None, :, :, None] * k[:, t, :, :, None] * v[:, t, :, None, :]  # [b, h, d_k, d_v]
        for i in range(t):
            decay = torch.ones_like(w[:, 0])
            for j in range(i + 1, t):
                decay = decay * w[:, j]
            wkv = wkv + decay[..., None] * k[:, i, :, :, None] * v[:, i, :, None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", r[:, t], wkv))
    o = group_norm_heads(torch.stack(out, dim=1), layer.norm.weight, layer.norm.bias, layer.norm.eps)
    return layer.output(o * g)


def test_rwkv6_equals_a_direct_loop_of_the_paper_formula():
    layer = make_rwkv6()
    x = randn(2, 11, D, seed=7)
    want = rwkv6_direct(layer, x)
    for mode in layer.modes:
        layer.mode = mode
        layer.chunk_size = 4
        y, _ = layer(x)
        close(y, want, f"mode {mode}")


@pytest.mark.parametrize("layer_idx", [0, 2, 5])
def test_rwkv6_decay_is_in_the_open_unit_interval(layer_idx):
    """w_t = exp(-exp(d_t)) lies strictly in (0, 1) at the official init of every depth (where
    d = time_decay in [-6, -1] gives w in [0.69, 0.9976]) and with trained-looking LoRAs."""
    torch.manual_seed(0)
    layer = recur.build("rwkv6", d_model=D, layer_idx=layer_idx, n_layers=6).double()
    x = 3 * randn(2, 50, D, seed=8)
    last = torch.zeros(2, D, dtype=torch.float64)
    w = layer.projections(x, last)[0]["log_w"].exp()
    assert (w > math.exp(-math.exp(-1)) - 1e-3).all() and (w < math.exp(-math.exp(-6)) + 1e-3).all()
    for seed in range(3):
        w = make_rwkv6(seed).projections(x, last)[0]["log_w"].exp()
        assert (w > 0).all() and (w < 1).all()


def test_rwkv6_depth_dependent_initialisation_from_the_backbone():
    """Backbone passes layer_idx and n_layers: the GroupNorm scale is ((1 + l) / L)^0.7, the
    decay ramp's exponent and the bonus follow l / (L - 1), as in the official code."""
    backbone = Backbone(D, 3, "rwkv6", mlp=None)
    for l, mixer in enumerate(backbone.mixers):
        torch.testing.assert_close(mixer.norm.weight.detach(), torch.full((D,), ((1 + l) / 3) ** 0.7))
        r0 = l / 2
        n = torch.arange(D, dtype=torch.float64) / (D - 1)
        torch.testing.assert_close(mixer.time_decay.detach().double(), -6 + 5 * n ** (0.7 + 1.3 * r0), rtol=1e-6, atol=1e-6)
        zigzag = 0.1 * ((torch.arange(D) + 1) % 3 - 1).double()
        torch.testing.assert_close(mixer.bonus.detach().double().flatten(), r0 * (1 - n) + zigzag, rtol=1e-6, atol=1e-6)


def test_rwkv6_uses_heads_of_size_64():
    assert (recur.build("rwkv6", d_model=256).head_dim, recur.build("rwkv6", d_model=256).n_heads) == (64, 4)
    assert recur.build("rwkv6", d_model=D).n_heads * recur.build("rwkv6", d_model=D).head_dim == D
