"""mLSTM (xLSTM, ``recur/layers/mlstm.py``): the properties from the paper that the conformance
suite cannot know. The layer is compared with a direct transcription of the paper's equations
(unstabilised exponential gates), in float64 where the only differences are summation order
(rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur

from .helpers import D, close, group_norm_heads, randn


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
