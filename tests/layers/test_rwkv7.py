"""RWKV-7 (Goose, ``recur/layers/rwkv7.py``): the properties from the paper that the conformance
suite cannot know. The layer is compared with a direct transcription of the paper's time mixing
in the paper's own layout (S: [d_v, d_k], row vectors), and reduces to causal linear attention
with a zero learning rate and no decay. Exactness checks run in float64, where the only
differences are summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur
from recur.models import Backbone

from .helpers import D, close, randn


def make_rwkv7(seed=0, **options):
    """An RWKV-7 layer in float64 whose LoRAs are all active (the official init zeroes W1, A1, G1)."""
    torch.manual_seed(seed)
    layer = recur.build("rwkv7", d_model=D, **options).double()
    with torch.no_grad():
        for p in (layer.w1, layer.a1, layer.g1):
            p.normal_(0, 0.3)
        layer.r_k.normal_(0, 0.5)
        layer.norm.bias.normal_(0, 0.1)
    return layer


def rwkv7_paper(layer, x, shift, S0):
    """The paper's time mixing, transcribed: S [d_v, d_k] per head, row vectors.

    S_t = S_{t-1} (diag(w_t) - kappa^_t^T (a_t * kappa^_t)) + v_t^T k~_t;  wkv_t = S_t r_t^T;
    p_t = GroupNorm(wkv_t) + (r_t . (rho * k~_t)) v_t;  y_t = (g_t * p_t) W_o.
    shift: [batch, C] (the input before x[:, 0]); S0: [batch, heads, d_v, d_k]. Returns (y, S).
    """
    H, N = layer.n_heads, layer.head_dim
    B, T, C = x.shape
    lin = lambda t, W: t @ W.T  # noqa: E731  (x W in the paper's row-vector notation)
    S, ys = S0.clone(), []
    prev = shift
    for t in range(T):
        xt = x[:, t]
        xr, xw, xk, xv, xa, xg = (xt + (prev - xt) * layer.mix[i] for i in range(6))
        prev = xt
        r, k, v = lin(xr, layer.receptance.weight), lin(xk, layer.key.weight), lin(xv, layer.value.weight)
        d = layer.w0 + torch.tanh(xw @ layer.w1) @ layer.w2
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(d))
        a = torch.sigmoid(layer.a0 + xa @ layer.a1 @ layer.a2)
        g = torch.sigmoid(xg @ layer.g1) @ layer.g2
        kappa = F.normalize((k * layer.k_k).view(B, H, N), dim=-1)
        k_tilde = k * (1 + (a - 1) * layer.k_a)
        w, a, k_tilde, r, v = (z.view(B, H, N) for z in (w, a, k_tilde, r, v))
        row = lambda z: z[:, :, None, :]  # noqa: E731  [b, h, 1, N]
        transition = torch.diag_embed(w) - row(kappa).transpose(-1, -2) @ row(a * kappa)
        S = S @ transition + row(v).transpose(-1, -2) @ row(k_tilde)
        wkv = (S @ row(r).transpose(-1, -2)).squeeze(-1)  # [b, h, d_v]
        mean, var = wkv.mean(-1, keepdim=True), wkv.var(-1, unbiased=False, keepdim=True)
        normed = ((wkv - mean) / torch.sqrt(var + layer.norm.eps)).reshape(B, C) * layer.norm.weight + layer.norm.bias
        bonus = ((r * layer.r_k * k_tilde).sum(-1, keepdim=True) * v).reshape(B, C)
        ys.append(lin(g * (normed + bonus), layer.output.weight))
    return torch.stack(ys, dim=1), S


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv7_equals_the_papers_update_in_its_own_layout(mode):
    """Every mode equals the transcription above (the paper's [d_v, d_k] state is recur's transposed),
    output and final state, from a non-trivial initial state (token shift and S)."""
    layer = make_rwkv7()
    layer.mode, layer.chunk_size = mode, 8
    _, init = layer(randn(2, 7, D, seed=2))
    x = randn(2, 21, D, seed=3)
    y, state = layer(x, init)
    y_paper, S_paper = rwkv7_paper(layer, x, init["shift"], init["S"].transpose(-1, -2))
    close(y, y_paper, f"{mode}: output vs the paper's equations")
    close(state["S"], S_paper.transpose(-1, -2), f"{mode}: state vs the paper's S transposed")
    close(state["shift"], x[:, -1], f"{mode}: token-shift state")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv7_with_zero_learning_rate_and_no_decay_is_linear_attention(mode):
    """a_t = 0 removes the rank-one term (b = kappa^ * a = 0) and w_t = 1 removes the decay, so
    S_t = sum_{j<=t} k~_j v_j^T and wkv_t = sum_{j<=t} (r_t . k~_j) v_j: causal linear attention.
    sigmoid(-1e4) is exactly 0 in float64, so a0 = w0 = -1e4 gives a = 0 and log w = 0 exactly."""
    layer = make_rwkv7()
    layer.mode, layer.chunk_size = mode, 8
    with torch.no_grad():
        layer.a0.fill_(-1e4)
        layer.w0.fill_(-1e4)
    x = randn(2, 19, D, seed=4)
    y, state = layer(x)
    p, _ = layer.projections(x, torch.zeros(2, D, dtype=x.dtype))
    assert (p["a"] == 0).all() and (p["log_w"] == 0).all()
    r, k, v = (rearrange(p[n], "b t (h d) -> b h t d", h=layer.n_heads) for n in ("r", "k", "v"))
    scores = (r @ k.transpose(-1, -2)).tril()  # causal linear attention, no normalisation
    wkv = rearrange(scores @ v, "b h t d -> b t (h d)")
    normed = layer.norm(wkv.reshape(-1, D)).view_as(wkv)
    bonus = rearrange((r * k * layer.r_k[:, None]).sum(-1, keepdim=True) * v, "b h t d -> b t (h d)")
    close(y, layer.output(p["g"] * (normed + bonus)), f"{mode}: output vs linear attention")
    close(state["S"], k.transpose(-1, -2) @ v, f"{mode}: state vs sum of k~ v^T")


def test_rwkv7_decay_stays_in_the_papers_range():
    """w_t = exp(-e^{-0.5} sigmoid(d_t)) lies in [exp(-e^{-0.5}), 1] = [0.545, 1] whatever the input
    (closed at the ends only where sigmoid saturates in floating point)."""
    layer = make_rwkv7()
    with torch.no_grad():
        layer.w2.mul_(1e3)
    p, _ = layer.projections(100 * randn(3, 50, D, seed=5), torch.zeros(3, D, dtype=torch.float64))
    w = p["log_w"].exp()
    assert w.min() >= math.exp(-math.exp(-0.5)) and w.max() <= 1.0
    assert w.min() < 0.56 and w.max() > 0.99, "the test input should reach both ends of the range"


def test_rwkv7_removal_key_is_a_unit_vector_per_head():
    layer = make_rwkv7()
    p, _ = layer.projections(randn(2, 9, D, seed=6), torch.zeros(2, D, dtype=torch.float64))
    norms = rearrange(p["kappa"], "b t (h d) -> b t h d", h=layer.n_heads).norm(dim=-1)
    close(norms, torch.ones_like(norms), "|kappa^| per head")


def test_rwkv7_initialisation_follows_layer_depth():
    """Backbone passes (layer_idx, n_layers): the GroupNorm scale is ((1 + i) / L)^0.7, the decay
    bias w0 = -6 + 6 (n / (C-1))^(1 + r0^0.3) + 0.5 + 2.5 zz and the token-shift lerps follow
    1 - ramp^(p (1 - i / L)), as in the official code."""
    L = 3
    backbone = Backbone(D, L, "rwkv7", mlp=None)
    n = torch.arange(D, dtype=torch.float64)
    N = backbone.mixers[0].head_dim
    z = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    for i, layer in enumerate(backbone.mixers):
        r0, r1 = i / (L - 1), 1 - i / L
        close(layer.norm.weight.double(), torch.full((D,), ((1 + i) / L) ** 0.7, dtype=torch.float64), "norm scale", atol=1e-6)
        w0 = -6 + 6 * (n / (D - 1)) ** (1 + r0**0.3) + 0.5 + 2.5 * z * z.abs()
        close(layer.w0.double(), w0, f"layer {i}: w0", atol=1e-6)
        close(layer.mix[2].double(), 1 - (n / D) ** (0.7 * r1), f"layer {i}: mu_k", atol=1e-6)
