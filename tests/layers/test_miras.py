"""Moneta, Yaad and Memora (Miras, ``recur/layers/miras.py``): the properties of each paper's update
that the conformance suite cannot know. Exactness checks in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recur.ops.memory import mlp_forward, mlp_gradients
from recur.ops.miras import huber_bias, lp_bias, lq_retention, miras_memory, miras_state

from .helpers import D, close, make, randn


def memory_weights(seed=0, H=2, d=4, hidden=8):
    return [0.6 * randn(1, H, d, hidden, seed=seed).requires_grad_(True), 0.6 * randn(1, H, hidden, d, seed=seed + 1).requires_grad_(True)]


def per_token_autograd(weights, k, v, loss, gain=None):
    """Gradient of loss(M(k_m) - v_m) w.r.t. every weight, token by token, with autograd: [n, ...] per layer."""
    grads = []
    for m in range(k.shape[2]):
        pred = mlp_forward(weights, k[:, :, m : m + 1], norm=gain)
        grads.append(torch.autograd.grad(loss(pred - v[:, :, m : m + 1], m), weights))
    return [torch.stack(g) for g in zip(*grads)]


def per_token_by_hand(weights, k, v, bias, gain=None):
    inputs, deltas = mlp_gradients(weights, k, v, bias, norm=gain)
    return [torch.stack([h[:, :, m, :, None] * d[:, :, m, None, :] for m in range(k.shape[2])]) for h, d in zip(inputs, deltas)]


# ------------------------------------------------------------------------------- Moneta
def test_moneta_gradient_equals_autograd_of_the_lp_loss():
    """grad_W ||M(k) - v||_3^3 through the whole MLP (residual, optional LayerNorm) = the hand-written backprop of p sign(e)|e|^(p-1)."""
    for gain in (None, randn(2, 4, seed=9).abs() + 0.5):
        weights = memory_weights()
        k, v = randn(1, 2, 5, 4, seed=3), randn(1, 2, 5, 4, seed=4)
        auto = per_token_autograd(weights, k, v, lambda e, m: e.abs().pow(3).sum(), gain)
        hand = per_token_by_hand(weights, k, v, lambda p, t: lp_bias(p, t, p=3.0), gain)
        for a, h in zip(auto, hand):
            close(h, a, f"l_3 gradient (norm={gain is not None})")


def test_moneta_memory_is_the_lq_normalised_accumulator():
    """W = A / (||A||_4^2 + eps) per weight matrix: for eps = 0 the paper's map (an involution,
    ||W||_4 = 1 / ||A||_4); with moneta's eps the memory's l_4 norm is at most 1 / (2 sqrt(eps))."""
    A = randn(3, 2, 4, 8)
    close(lq_retention(lq_retention(A)), A, "involution")
    m = make("moneta")
    _, s = m(randn(1, 3, D))
    for i in range(m.depth):
        A = s[f"P{i}"]
        r = A.abs().pow(4).sum((-2, -1), keepdim=True).pow(0.25)
        close(m._retention()(A), A / (r**2 + m.lq_eps), f"layer {i}")
    huge = 1e30 * randn(1, 1, 4, 8)
    tiny = 1e-30 * randn(1, 1, 4, 8)
    bound = 1 / (2 * m.lq_eps**0.5)
    for A in (huge, tiny, huge.float(), tiny.float()):
        W = lq_retention(A, q=4.0, eps=m.lq_eps)
        assert torch.isfinite(W).all() and W.double().abs().pow(4).sum().pow(0.25) <= bound


# --------------------------------------------------------------------------------- Yaad
def test_yaad_huber_gradient_equals_autograd_of_the_huber_loss_in_both_regimes():
    gain = randn(2, 4, seed=9).abs() + 0.5
    weights = memory_weights(seed=5)
    k, v = randn(1, 2, 6, 4, seed=6), randn(1, 2, 6, 4, seed=7)
    with torch.no_grad():
        err = (mlp_forward(weights, k, norm=gain) - v).norm(dim=-1)  # [1, 2, 6]
    # alternate: thresholds above the error (l2 regime) and below it (l1 regime)
    delta = torch.where(torch.arange(6) % 2 == 0, err * 1.5, err * 0.5)
    regimes = err <= delta
    assert regimes.any() and (~regimes).any()

    def huber(e, m):
        d = delta[:, :, m : m + 1, None]
        small = e.norm(dim=-1, keepdim=True) <= d
        return torch.where(small, 0.5 * (e**2).sum(-1, keepdim=True), d * (e.abs().sum(-1, keepdim=True) - 0.5 * d)).sum()

    auto = per_token_autograd(weights, k, v, huber, gain)
    inputs, deltas = mlp_gradients(weights, k, v, lambda p, t: huber_bias(p, t, delta), norm=gain)
    hand = [torch.stack([h[:, :, m, :, None] * d[:, :, m, None, :] for m in range(6)]) for h, d in zip(inputs, deltas)]
    for a, h in zip(auto, hand):
        close(h, a, "Huber gradient")


def test_yaad_threshold_is_data_dependent_and_positive():
    m = make("yaad")
    x = randn(2, 5, D)
    delta = F.softplus(m.gate_proj(x)[..., 2 * m.n_heads :])
    assert (delta > 0).all() and delta.std() > 0
    close(F.softplus(m.gate_proj.bias[2 * m.n_heads :]), torch.ones(m.n_heads, dtype=torch.float64), "delta starts at 1")


# ------------------------------------------------------------------------------- Memora
def test_memora_rows_stay_on_the_simplex():
    m = make("memora")
    x = 3 * randn(2, 40, D)
    _, s = m(x)
    for i in range(m.depth):
        W = torch.softmax(s[f"P{i}"], dim=-1)
        assert (W > 0).all()
        close(W.sum(-1), torch.ones(W.shape[:-1], dtype=torch.float64), f"layer {i} rows sum to 1")


def test_memora_step_is_the_softmax_of_the_retained_log_memory_minus_the_gradient():
    """One token (b = 1): W_1 = softmax(a log W_0 - eta grad ||M_{W_0}(k) - v||^2), row-wise."""
    H, d, hidden = 2, 4, 6
    logits = [randn(1, H, d, hidden, seed=1), randn(1, H, hidden, d, seed=2)]
    W0 = [torch.softmax(p, -1).requires_grad_(True) for p in logits]
    q, k, v = randn(1, H, 1, d, seed=3), randn(1, H, 1, d, seed=4), randn(1, H, 1, d, seed=5)
    lr, a = torch.full((1, H, 1), 0.3, dtype=torch.float64), torch.full((1, H, 1), 0.8, dtype=torch.float64)
    _, s = miras_memory(q, k, v, lr, a, miras_state(logits), mode="reference", chunk_size=1,
                        bias="l2", retention="kl")
    grads = torch.autograd.grad(((mlp_forward(W0, k) - v) ** 2).sum(), W0)
    for i in range(2):
        expected = torch.softmax(0.8 * torch.log(W0[i].detach()) - 0.3 * grads[i], dim=-1)
        close(torch.softmax(s.params[i], -1), expected, f"layer {i}")
