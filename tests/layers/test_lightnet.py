"""LightNet (``recur/layers/lightnet.py``): the properties from the paper that the conformance
suite cannot know. The additive recurrence is compared with a closed form written independently
of ``gated_matrix`` (the normalised cumulative sum), in float64 where the only differences are
summation order (rtol 1e-8, atol 1e-10, as the conformance suite).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

import recur

from .helpers import close, randn, rms_norm


def make_lightnet(seed=0, **options):
    torch.manual_seed(seed)
    layer = recur.build("lightnet", **{"d_model": 16, **options}).double()
    with torch.no_grad():
        layer.k_proj.weight.mul_(3)  # key logits over a wide range, so the normaliser is not uniform
        layer.norm_weight.normal_(1.0, 0.2)
    return layer


def test_lightnet_decay_is_the_ratio_of_consecutive_normalisers():
    """lambda_t = exp(lse_{t-1} - lse_t) and k_t = exp(k~_t - lse_t), with lse the running
    logsumexp written as a loop of logaddexp from z_0."""
    k_raw = randn(2, 3, 17, 5, seed=8) * 4
    z0 = randn(2, 3, 5, seed=9)
    k, log_alpha, z = recur.layers.lightnet.LightNet.additive_decay(k_raw, z0)
    lse, prev = [], z0
    for t in range(k_raw.shape[2]):
        cur = torch.logaddexp(prev, k_raw[:, :, t])
        lse.append(cur)
        prev = cur
    lse = torch.stack(lse, dim=2)
    lse_prev = torch.cat([z0.unsqueeze(2), lse[:, :, :-1]], dim=2)
    close(z, lse, "running logsumexp")
    close(log_alpha.exp(), torch.exp(lse_prev - lse), "decay")
    close(k, torch.exp(k_raw - lse), "normalised key")
    assert (log_alpha <= 0).all() and (k <= 1).all()


def test_lightnet_additive_recurrence_equals_normalised_cumulative_sum():
    """S_t = (exp(z_0) S_0 + sum_{j<=t} exp(k~_j) v_j^T) / (exp(z_0) + sum_{j<=t} exp(k~_j))
    per key dimension (the additive recurrence, normalised), read by q_t; every mode, from a
    non-zero initial state, output and final (S, z)."""
    layer = make_lightnet()
    H, d = layer.n_heads, layer.head_dim
    _, s0 = layer(randn(2, 6, 16, seed=10))
    x = randn(2, 21, 16, seed=11)
    heads = lambda t: rearrange(t, "b t (h d) -> b h t d", h=H)  # noqa: E731
    q, k_raw, v = heads(F.silu(layer.q_proj(x))), heads(layer.k_proj(x)), heads(layer.v_proj(x))
    w0 = s0["z"].exp()  # [b, h, d]
    w = k_raw.exp()  # [b, h, t, d]
    numer = w0[:, :, None, :, None] * s0["S"][:, :, None] + (w[..., None] * v[:, :, :, None, :]).cumsum(2)
    denom = w0[:, :, None, :] + w.cumsum(2)  # [b, h, t, d]
    S = numer / denom[..., None]  # [b, h, t, d_k, d_v]
    o = torch.einsum("bhtk,bhtkv->bhtv", q, S)
    o = rearrange(o, "b h t d -> b t (h d)") * torch.sigmoid(layer.gate_up(layer.gate_down(x)))
    want = layer.o_proj(rms_norm(o, layer.norm_weight, layer.norm_eps))
    for mode in layer.modes:
        layer.mode = mode
        layer.chunk_size = 8
        y, s = layer(x, s0)
        close(y, want, f"mode {mode}: output")
        close(s["S"], S[:, :, -1], f"mode {mode}: final S")
        close(s["z"], denom[:, :, -1].log(), f"mode {mode}: final running logsumexp")


def test_lightnet_zero_state_is_a_unit_weight_sink():
    """From the zero state the normaliser is 1 + sum_j exp(k~_j): the first step's state is
    exp(k~_1) / (1 + exp(k~_1)) v_1^T, not v_1^T."""
    layer = make_lightnet()
    x = randn(1, 1, 16, seed=12)
    _, s = layer(x)
    k1 = rearrange(layer.k_proj(x), "b t (h d) -> b h t d", h=layer.n_heads)[:, :, 0]
    v1 = rearrange(layer.v_proj(x), "b t (h d) -> b h t d", h=layer.n_heads)[:, :, 0]
    close(s["S"], torch.sigmoid(k1)[..., None] * v1[:, :, None, :], "first state")
    close(s["z"], F.softplus(k1), "first running logsumexp log(1 + e^k)")


def test_lightnet_state_stays_a_weighted_mean_over_long_inputs():
    """The normalised state is a convex combination (weights < 1) of the values seen: its
    entries never exceed the largest |v| seen, however long the input."""
    layer = make_lightnet().float()
    layer.mode = "chunk"
    x = randn(1, 3000, 16, seed=13, dtype=torch.float32)
    _, s = layer(x)
    v = rearrange(layer.v_proj(x), "b t (h d) -> b h t d", h=layer.n_heads)
    vmax = v.abs().amax(dim=2)[:, :, None, :]  # [b, h, 1, d_v]
    assert (s["S"].abs() <= vmax + 1e-5).all()
    assert math.isfinite(s["z"].max().item())
