"""mLSTM (xLSTM) and RWKV-6 (Finch): the properties from the papers that the conformance suite
cannot know. Each model is compared with a direct transcription of its paper's equations
(unstabilised exponential gates for mLSTM, RWKV-6's wkv sum with the bonus for the current
token), in float64 where the only differences are summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur
from recur.models.lm import Backbone

D = 16
RTOL, ATOL = 1e-8, 1e-10


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def group_norm_heads(h, weight, bias, eps):
    """Layer norm over each head's channels: h [batch, time, heads, d]; weight, bias [heads * d]."""
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    h = rearrange((h - mean) / torch.sqrt(var + eps), "b t h d -> b t (h d)")
    return h * weight + (0 if bias is None else bias)


# ------------------------------------------------------------------------------------- mLSTM
def make_mlstm(seed=0, gate_scale=0.5, input_bias=3.0, **options):
    """An mLSTM in float64 with data-dependent gates (the official init zeroes the gate weights)."""
    torch.manual_seed(seed)
    layer = recur.build("mlstm", d_model=D, **options).double()
    with torch.no_grad():
        for gate in (layer.igate, layer.fgate):
            gate.weight.normal_(0, gate_scale)
        layer.igate.bias.normal_(input_bias, 2.0)
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
            proj.weight.mul_(4)  # larger q.k so that |n^T q| falls on both sides of 1
    return layer


def mlstm_direct(layer, x):
    """The paper's mLSTM block with the cell unstabilised: exp(i~) formed directly, zero state.

    Returns the block output and |n_t^T q_t| (to check both branches of max(|n^T q|, 1) occur)."""
    B, T, _ = x.shape
    H, d = layer.n_heads, layer.head_dim
    x_m, z = layer.up_proj(x).chunk(2, dim=-1)
    c, _ = layer.conv(x_m, layer.conv.init_tail(B, dtype=x.dtype))
    q, k, v = layer.q_proj(c), layer.k_proj(c), layer.v_proj(x_m)
    qkv = torch.cat([q, k, v], dim=-1)
    f, i = torch.sigmoid(layer.fgate(qkv)), torch.exp(layer.igate(qkv))  # [batch, time, heads]
    q, k, v = (rearrange(t, "b t (h d) -> b t h d", h=H) for t in (q, k, v))
    k = k / math.sqrt(d)
    C = x.new_zeros(B, H, d, d)  # C [d_v, d_k], as in the paper
    n = x.new_zeros(B, H, d)
    hs, qn = [], []
    for t in range(T):
        C = f[:, t, :, None, None] * C + i[:, t, :, None, None] * v[:, t, :, :, None] * k[:, t, :, None, :]
        n = f[:, t, :, None] * n + i[:, t, :, None] * k[:, t]
        dot = (n * q[:, t]).sum(-1).abs()
        hs.append(torch.einsum("bhvk,bhk->bhv", C, q[:, t]) / torch.clamp(dot, min=1.0)[..., None])
        qn.append(dot)
    h = group_norm_heads(torch.stack(hs, dim=1), layer.norm_weight, None, layer.norm_eps)
    return layer.down_proj((h + layer.skip * c) * F.silu(z)), torch.stack(qn)


def test_mlstm_equals_unstabilized_direct_computation():
    """Every mode equals the paper's equations with exp(i~) formed directly (eps = 0; float64,
    a short sequence with input-gate preactivations up to ~10, where no scaling is needed)."""
    layer = make_mlstm(eps=0.0)
    x = randn(2, 13, D, seed=3)
    want, qn = mlstm_direct(layer, x)
    assert (qn > 1).any() and (qn < 1).any(), "the test should exercise both branches of max(|n^T q|, 1)"
    for mode in layer.modes:
        layer.mode = mode
        layer.chunk_size = 4
        y, state = layer(x)
        close(y, want, f"mode {mode}")
        assert (state["m"] != 0).all(), "the stabiliser should be active"


@pytest.mark.parametrize("shift", [25.0, -30.0, 3.0])
def test_mlstm_output_is_invariant_to_the_stabiliser(shift):
    """(C, n, m) and (C e^-delta, n e^-delta, m + delta) are the same memory: continuing from
    either gives the same outputs and final states that differ by the same rescaling."""
    layer = make_mlstm(eps=0.0)
    _, s = layer(randn(2, 9, D, seed=4))
    shifted = s.replace(C=s["C"] * math.exp(-shift), n=s["n"] * math.exp(-shift), m=s["m"] + shift)
    x = randn(2, 21, D, seed=5)
    for mode in layer.modes:
        layer.mode = mode
        layer.chunk_size = 8
        y, s2 = layer(x, s)
        y_shifted, s2_shifted = layer(x, shifted)
        close(y_shifted, y, f"mode {mode}: output")
        for key in ("C", "n"):
            scale, scale_shifted = s2["m"].exp(), s2_shifted["m"].exp()
            while scale.ndim < s2[key].ndim:
                scale, scale_shifted = scale.unsqueeze(-1), scale_shifted.unsqueeze(-1)
            close(s2_shifted[key] * scale_shifted, s2[key] * scale, f"mode {mode}: unscaled {key}")


@pytest.mark.parametrize("preactivation", [60.0, 200.0])
def test_mlstm_large_input_gates_do_not_overflow_in_float32(preactivation):
    """Input-gate preactivations of 60 (exp ~ 1e26) and 200 (exp overflows float32): all modes
    stay finite, forward and backward, and match float64; the scaled state stays O(1)."""
    layer64 = make_mlstm(gate_scale=0.05)
    with torch.no_grad():
        layer64.igate.bias.fill_(preactivation)
    x = randn(2, 40, D, seed=6)
    want = {}
    for mode in layer64.modes:
        layer64.mode = mode
        want[mode] = layer64(x)
    layer32 = make_mlstm(gate_scale=0.05).float()
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    for mode in layer32.modes:
        layer32.mode = mode
        layer32.chunk_size = 16
        xx = x.float().requires_grad_(True)
        y, s = layer32(xx)
        (y.sum() + s["C"].sum() + s["n"].sum() + s["m"].sum()).backward()
        assert torch.isfinite(y).all() and torch.isfinite(xx.grad).all(), f"mode {mode}: non-finite"
        assert all(torch.isfinite(p.grad).all() for p in layer32.parameters() if p.grad is not None)
        assert s["C"].abs().max() < 1e3 and s["n"].abs().max() < 1e3
        assert (s["m"] > preactivation - 10).all()
        close(y, want[mode][0].float(), f"mode {mode}: float32 vs float64", rtol=1e-3, atol=1e-4)
        layer32.zero_grad()


def test_mlstm_official_initialisation():
    layer = recur.build("mlstm", d_model=32, n_heads=4)
    torch.testing.assert_close(layer.fgate.bias.detach(), torch.linspace(3.0, 6.0, 4))
    assert (layer.fgate.weight == 0).all() and (layer.igate.weight == 0).all()
    assert layer.igate.bias.abs().max() < 1.0
    assert (layer.skip == 1).all() and (layer.norm_weight == 1).all()
    assert layer.inner_dim == 64 and layer.head_dim == 16


# ------------------------------------------------------------------------------------ RWKV-6
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
