"""Mamba-2 (``recur/layers/mamba2.py``): the properties from the paper that the conformance suite
cannot know. The layer is compared with a direct transcription of the paper's SSD recurrence (a
Python loop written independently of ``gated_matrix``), in float64 where the only differences
are summation order (rtol 1e-8, atol 1e-10, as the conformance suite).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur

from .helpers import close, randn


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
