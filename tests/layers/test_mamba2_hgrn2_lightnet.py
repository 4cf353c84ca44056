"""Mamba-2, HGRN2 and LightNet: the properties from the papers that the conformance suite cannot
know. Each layer is compared with a direct transcription of its paper's recurrence (a Python loop
or a closed form written independently of ``gated_matrix``), in float64 where the only
differences are summation order (rtol 1e-8, atol 1e-10, as the conformance suite).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur
from recur.models.lm import Backbone

RTOL, ATOL = 1e-8, 1e-10


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# ------------------------------------------------------------------------------------ Mamba-2
def make_mamba2(seed=0, **options):
    """A Mamba-2 in float64 with decays spread over (0, 1) (larger dt than the init's [1e-3, 0.1])."""
    torch.manual_seed(seed)
    layer = recur.build("mamba2", **{"d_model": 16, **options}).double()
    with torch.no_grad():
        layer.dt_bias.uniform_(-2.0, 1.0)
        layer.D.normal_(1.0, 0.5)
        layer.norm_weight.normal_(1.0, 0.2)
    return layer


def mamba2_direct(layer, x, conv, S):
    """The paper's SSD recurrence, one head at a time, with B_t, C_t looked up in the head's group:
    S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t x_t^T;  y_t = S_t^T C_t + D_h x_t; then
    out = out_proj(RMSNorm_group(y * silu(z))). S: [batch, heads, d_state, headdim]."""
    H, P, G, N = layer.n_heads, layer.head_dim, layer.n_groups, layer.d_state
    z, xBC, dt_raw = layer.in_proj(x).split([layer.d_inner, layer.conv_dim, H], dim=-1)
    xBC, _ = layer.conv(xBC, conv)
    xs, Bm, Cm = xBC.split([layer.d_inner, G * N, G * N], dim=-1)
    A = -torch.exp(layer.A_log)
    S = S.clone()
    ys = []
    for t in range(x.shape[1]):
        heads = []
        for h in range(H):
            g = h // (H // G)  # heads of a group are contiguous
            dt = F.softplus(dt_raw[:, t, h] + layer.dt_bias[h])  # [batch]
            B_t = Bm[:, t, g * N : (g + 1) * N]
            C_t = Cm[:, t, g * N : (g + 1) * N]
            x_t = xs[:, t, h * P : (h + 1) * P]
            S[:, h] = torch.exp(dt * A[h])[:, None, None] * S[:, h] + dt[:, None, None] * B_t[:, :, None] * x_t[:, None, :]
            heads.append(torch.einsum("bnp,bn->bp", S[:, h], C_t) + layer.D[h] * x_t)
        ys.append(torch.cat(heads, dim=-1))
    y = torch.stack(ys, dim=1) * F.silu(z)
    y = rearrange(y, "b t (g c) -> b t g c", g=G)
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + layer.norm_eps)
    y = rearrange(y, "b t g c -> b t (g c)") * layer.norm_weight
    return layer.out_proj(y), S


@pytest.mark.parametrize("n_groups", [1, 2, 4])
def test_mamba2_ssd_equals_a_direct_loop_of_the_recurrence_with_groups(n_groups):
    """Every mode equals the per-head loop, B/C shared by the heads of each group, from a
    non-zero initial state (conv tail and S), output and final S."""
    layer = make_mamba2(d_model=16, head_dim=8, d_state=6, n_groups=n_groups)  # 4 heads of 8
    assert layer.n_heads == 4
    _, s0 = layer(randn(2, 7, 16, seed=2))
    x = randn(2, 19, 16, seed=3)
    want, S_want = mamba2_direct(layer, x, s0["conv"], s0["S"])
    for mode in layer.modes:
        layer.mode = mode
        layer.chunk_size = 4
        y, s = layer(x, s0)
        close(y, want, f"n_groups={n_groups}, mode {mode}: output")
        close(s["S"], S_want, f"n_groups={n_groups}, mode {mode}: final state")


def test_mamba2_heads_read_only_their_groups_B_and_C():
    """With 2 groups of 2 heads, changing the in-projection rows of group 1's B and C changes the
    gated-normed SSD output of heads 2-3 only (the depthwise conv and the per-group norm keep
    channels apart)."""
    layer = make_mamba2(d_model=16, head_dim=8, d_state=6, n_groups=2)
    x = randn(1, 9, 16, seed=4)
    seen = []
    layer.out_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    layer(x)
    N, d_inner = layer.d_state, layer.d_inner
    B1 = slice(2 * d_inner + N, 2 * d_inner + 2 * N)  # rows of group 1's B in [z, x, B, C, dt]
    C1 = slice(2 * d_inner + 2 * N + N, 2 * d_inner + 4 * N)  # rows of group 1's C
    with torch.no_grad():
        layer.in_proj.weight[B1] += randn(N, 16, seed=5)
        layer.in_proj.weight[C1] -= randn(N, 16, seed=6)
    layer(x)
    before, after = seen
    half = d_inner // 2
    close(after[..., :half], before[..., :half], "heads 0-1 (group 0)")
    assert not torch.allclose(after[..., half:], before[..., half:]), "heads 2-3 must read group 1's B and C"


def test_mamba2_rejects_groups_that_do_not_divide_the_heads():
    with pytest.raises(ValueError, match="n_groups=3 must divide"):
        recur.build("mamba2", d_model=16, head_dim=8, n_groups=3)


def test_mamba2_official_initialisation():
    layer = recur.build("mamba2", d_model=256)
    A = -layer.A_log.exp()
    assert layer.n_heads == 8 and layer.head_dim == 64 and layer.d_state == 64 and layer.d_inner == 512
    assert ((A <= -1) & (A >= -16)).all() and A.std() > 1  # A ~ -U[1, 16]
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-3 * (1 - 1e-6)) & (dt <= 0.1 * (1 + 1e-6))).all()
    assert (layer.D == 1).all() and (layer.norm_weight == 1).all()
    assert layer.in_proj.out_features == 2 * 512 + 2 * 64 + 8 and layer.in_proj.bias is None


# -------------------------------------------------------------------------------------- HGRN2
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


# ----------------------------------------------------------------------------------- LightNet
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
