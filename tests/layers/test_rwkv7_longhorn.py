"""RWKV-7 (Goose) and Longhorn: the properties from the papers that the conformance suite cannot know.

RWKV-7 is compared with a direct transcription of the paper's time mixing in the paper's own
layout (S: [d_v, d_k], row vectors), and reduces to causal linear attention with a zero
learning rate and no decay. Longhorn's state is compared with the minimiser of its online
regression objective, solved directly as a least-squares problem, and with the official code's
diagonal recurrence; its state is checked to never expand. Exactness checks run in float64,
where the only differences are summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

import recur
from recur import State
from recur.models.lm import Backbone

D = 16
RTOL, ATOL = 1e-8, 1e-10


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------- RWKV-7
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


# ------------------------------------------------------------------------------------ Longhorn
def make_longhorn(transition="diagonal", seed=0, **options):
    torch.manual_seed(seed)
    layer = recur.build("longhorn", d_model=D, transition=transition, **options).double()
    with torch.no_grad():
        layer.dt_head.bias.normal_(0, 1.0)  # spread beta over (0, 1)
    return layer


def minimiser(S_prev, k, x, beta):
    """argmin_S ||S - S_prev||_F^2 + sum_d beta_d (S[d] . k - x_d)^2, solved as least squares.

    S_prev: [batch, d_inner, N]; k: [batch, N]; x, beta: [batch, d_inner]. For each (batch, d) the
    objective is || [I; sqrt(beta_d) k^T] s - [S_prev[d]; sqrt(beta_d) x_d] ||^2."""
    B, Dn, N = S_prev.shape
    eye = torch.eye(N, dtype=S_prev.dtype).expand(B, Dn, N, N)
    sb = beta.sqrt()[..., None]  # [b, d, 1]
    A = torch.cat([eye, (sb * k[:, None, :])[..., None, :]], dim=-2)  # [b, d, N + 1, N]
    y = torch.cat([S_prev, sb * x[..., None]], dim=-1)[..., None]  # [b, d, N + 1, 1]
    return torch.linalg.lstsq(A, y).solution.squeeze(-1)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_longhorn_exact_update_is_the_closed_form_minimiser(mode):
    """With transition="exact", each step's state is the minimiser of the online regression
    objective given the previous state: stepping token by token, and one call over the whole
    sequence ends in the same state."""
    layer = make_longhorn("exact")
    layer.mode, layer.chunk_size = mode, 8
    init = State(conv=randn(2, 3, layer.d_inner, seed=7), S=randn(2, layer.d_inner, layer.d_state, seed=8))
    u = randn(2, 13, D, seed=9)
    p, _ = layer.projections(u, init["conv"])
    state, S = init, init["S"]
    for t in range(u.shape[1]):
        _, state = layer(u[:, t : t + 1], state)
        S = minimiser(S, p["k"][:, t], p["x"][:, t], p["beta"][:, t])
        close(state["S"], S, f"{mode}: state after step {t} vs the least-squares minimiser")
    _, whole = layer(u, init)
    close(whole["S"], S, f"{mode}: state after one call vs the chain of minimisers")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_longhorn_default_is_the_official_diagonal_recurrence(mode):
    """The default transition is the official code's: eps = beta / (1 + beta |k|^2),
    S = (1 - eps (x) k^2) * S + (eps x) (x) k, y = (S q + D x) * silu(z), out = out_proj(y)."""
    layer = make_longhorn()
    layer.mode, layer.chunk_size = mode, 8
    init = State(conv=randn(2, 3, layer.d_inner, seed=10), S=randn(2, layer.d_inner, layer.d_state, seed=11))
    u = randn(2, 21, D, seed=12)
    y, state = layer(u, init)
    xz = u @ layer.in_proj.weight.T
    x, z = xz.chunk(2, dim=-1)
    x = F.silu(F.conv1d(torch.cat([init["conv"], x], 1).transpose(1, 2), layer.conv.weight, layer.conv.bias,
                        groups=layer.d_inner).transpose(1, 2))
    dt, k, q = (x @ layer.x_proj.weight.T).split([layer.dt_rank, layer.d_state, layer.d_state], dim=-1)
    beta = torch.sigmoid(dt @ layer.dt_head.weight.T + layer.dt_head.bias)
    eps = beta / (1 + beta * k.square().sum(-1, keepdim=True))
    S, ys = init["S"], []
    for t in range(u.shape[1]):
        forget = 1 - eps[:, t, :, None] * k[:, t, None, :] ** 2
        S = forget * S + (eps[:, t] * x[:, t])[..., None] * k[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", S, q[:, t]))
    out = ((torch.stack(ys, 1) + layer.D * x) * F.silu(z)) @ layer.out_proj.weight.T
    close(y, out, f"{mode}: output vs the official recurrence")
    close(state["S"], S, f"{mode}: final state vs the official recurrence")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_longhorn_transitions_agree_for_axis_aligned_keys(mode):
    """When every key has one non-zero entry, k k^T is diagonal: the default (diagonal) transition
    is then exact, and both equal the chain of least-squares minimisers."""
    exact, diagonal = make_longhorn("exact"), make_longhorn("diagonal")
    for layer in (exact, diagonal):
        layer.mode, layer.chunk_size = mode, 8
    B, T, Dn, N = 2, 17, exact.d_inner, exact.d_state
    g = torch.Generator().manual_seed(13)
    hot = F.one_hot(torch.randint(0, N, (B, T), generator=g), N).double()
    k = hot * 3 * torch.randn(B, T, 1, generator=g, dtype=torch.float64)
    x, q = randn(B, T, Dn, seed=14), randn(B, T, N, seed=15)
    beta, S0 = torch.rand(B, T, Dn, generator=g, dtype=torch.float64), randn(B, Dn, N, seed=16)
    y_exact, S_exact = exact.recurrence(x, k, q, beta, S0)
    y_diag, S_diag = diagonal.recurrence(x, k, q, beta, S0)
    close(y_diag, y_exact, f"{mode}: outputs of the two transitions")
    close(S_diag, S_exact, f"{mode}: states of the two transitions")
    S = S0
    for t in range(T):
        S = minimiser(S, k[:, t], x[:, t], beta[:, t])
    close(S_exact, S, f"{mode}: state vs the chain of minimisers")


@pytest.mark.parametrize("transition", ["diagonal", "exact"])
def test_longhorn_steps_never_expand_the_state(transition):
    """Step by step on large inputs (keys not normalised): the diagonal transition moves every entry
    S[d, n] towards x_d / k_n by a convex combination (weight eps_d k_n^2 in [0, 1)), so
    |S_t[d, n]| <= max(|S_{t-1}[d, n]|, |x_d / k_n|); the exact one is a proximal step, so for the
    point s* = x_d k / |k|^2 of the hyperplane s . k = x_d, |S_t[d] - s*| <= |S_{t-1}[d] - s*|."""
    layer = make_longhorn(transition)
    layer.mode = "recurrent"
    B, Dn, N = 3, layer.d_inner, layer.d_state
    g = torch.Generator().manual_seed(17)
    S = randn(B, Dn, N, seed=18)
    for _ in range(200):
        x = 20 * torch.randn(B, 1, Dn, generator=g, dtype=torch.float64)
        k = 5 * torch.randn(B, 1, N, generator=g, dtype=torch.float64)
        q = torch.randn(B, 1, N, generator=g, dtype=torch.float64)
        beta = torch.rand(B, 1, Dn, generator=g, dtype=torch.float64)
        _, S_next = layer.recurrence(x, k, q, beta, S)
        if transition == "diagonal":
            bound = torch.maximum(S.abs(), (x[:, 0, :, None] / k[:, 0, None, :]).abs())
            assert (S_next.abs() <= bound * (1 + 1e-12)).all()
        else:
            s_star = x[:, 0, :, None] * k[:, 0, None, :] / k[:, 0].square().sum(-1)[:, None, None]
            before, after = (S - s_star).norm(dim=-1), (S_next - s_star).norm(dim=-1)
            assert (after <= before * (1 + 1e-12)).all()
        S = S_next


@pytest.mark.parametrize("transition", ["diagonal", "exact"])
def test_longhorn_state_stays_bounded_over_long_sequences(transition):
    """20k steps of large random input (float32, chunk mode): the state stays finite and does not
    grow with time (a recurrence without forgetting, like linear attention, would grow ~sqrt(t):
    x2.4 from the first quarter to the last)."""
    torch.manual_seed(0)
    layer = recur.build("longhorn", d_model=D, transition=transition)
    g = torch.Generator().manual_seed(19)
    state, peaks = None, []
    with torch.no_grad():
        for _ in range(20):
            _, state = layer(3 * torch.randn(2, 1000, D, generator=g), state)
            assert torch.isfinite(state["S"]).all()
            peaks.append(float(state["S"].abs().max()))
    assert max(peaks[-5:]) <= 1.5 * max(peaks[:5]), f"state grew over time: peaks {peaks}"


def test_longhorn_rejects_an_unknown_transition():
    with pytest.raises(ValueError, match="transition"):
        recur.build("longhorn", d_model=D, transition="full")
