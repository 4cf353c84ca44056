"""Longhorn (``recur/layers/longhorn.py``): the properties from the paper that the conformance suite
cannot know. The state is compared with the minimiser of its online regression objective, solved
directly as a least-squares problem, and with the official code's diagonal recurrence; it is
checked to never expand. Exactness checks run in float64, where the only differences are
summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recur
from recur import State

from .helpers import D, close, randn


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
