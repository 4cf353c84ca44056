"""recur.ops.miras: the chunk form equals the reference loop in float64 (forward, gradients,
final state) for every attentional bias x retention, at any split and any mini-batch phase;
the reference loop equals a naive loop written from the definition with autograd gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.memory import mlp_forward
from recur.ops.miras import (
    BIASES,
    RETENTIONS,
    MirasState,
    huber_bias,
    kl_retention,
    lp_bias,
    lq_retention,
    miras_memory,
    miras_state,
)

RTOL, ATOL = 1e-8, 1e-10
VARIANTS = [("lp", "lq"), ("huber", "l2"), ("l2", "kl"), ("l2", "l2")]


def inputs(B=2, H=2, T=11, d=4, hidden=6, seed=0, norm=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, T, d), r(B, H, T, d), r(B, H, T, d)
    lr = torch.rand(B, H, T, generator=g, dtype=torch.float64) * 0.3
    retain = 0.5 + 0.5 * torch.rand(B, H, T, generator=g, dtype=torch.float64)
    aux = 2 * torch.rand(B, H, T, generator=g, dtype=torch.float64)  # Huber thresholds: both regimes occur
    weights = (0.5 * r(B, H, d, hidden), 0.5 * r(B, H, hidden, d))
    gain = (torch.rand(H, d, generator=g, dtype=torch.float64) + 0.5) if norm else None
    return q, k, v, lr, retain, aux, weights, gain


def run(mode, q, k, v, lr, retain, aux, state, gain, bias, retention, b):
    return miras_memory(q, k, v, lr, retain, state, mode=mode, chunk_size=b, bias=bias, retention=retention,
                        aux=aux, norm=gain)


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def naive(q, k, v, lr, retain, aux, weights, gain, bias, retention, b):
    """The definition with autograd: per token, the gradient of the bias' loss at the mini-batch-start memory."""
    losses = {
        "l2": lambda e, d: (e**2).sum(),
        "lp": lambda e, d: (e.abs() ** 3).sum(),
        "huber": lambda e, d: 0.5 * (e**2).sum() if e.norm() <= d else d * e.abs().sum(),
    }
    R = RETENTIONS[retention]
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for bi in range(B):
        for h in range(H):
            P = [w[bi, h].clone() for w in weights]
            for t in range(T):
                if t % b == 0:
                    anchor = [R(p).detach().requires_grad_(True) for p in P]
                pred = mlp_forward([a[None, None] for a in anchor], k[bi, h, t][None, None, None],
                                   norm=None if gain is None else gain[h : h + 1])[0, 0, 0]
                grads = torch.autograd.grad(losses[bias](pred - v[bi, h, t], aux[bi, h, t]), anchor)
                P = [retain[bi, h, t] * p - lr[bi, h, t] * gr for p, gr in zip(P, grads)]
                W = [R(p)[None, None] for p in P]
                out[bi, h, t] = mlp_forward(W, q[bi, h, t][None, None, None], norm=None if gain is None else gain[h : h + 1])[0, 0, 0]
    return out


@pytest.mark.parametrize("bias,retention", VARIANTS)
def test_reference_equals_the_definition_with_autograd_gradients(bias, retention):
    q, k, v, lr, retain, aux, weights, gain = inputs(B=1, T=7)
    o, _ = run("reference", q, k, v, lr, retain, aux, miras_state(weights), gain, bias, retention, 3)
    close(o, naive(q, k, v, lr, retain, aux, weights, gain, bias, retention, 3), f"{bias}/{retention}")


@pytest.mark.parametrize("bias,retention", VARIANTS)
@pytest.mark.parametrize("b", [1, 4, 16])
def test_chunk_equals_reference_forward_state_and_gradients(bias, retention, b):
    q, k, v, lr, retain, aux, weights, gain = inputs()
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, lr, retain, *weights, gain)]
    results = {}
    for mode in ("reference", "chunk"):
        q_, k_, v_, lr_, r_, w1, w2, g_ = leaves
        o, s = run(mode, q_, k_, v_, lr_, r_, aux, miras_state((w1, w2)), g_, bias, retention, b)
        loss = (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() + sum((p**2).sum() for p in s.params)
        grads = torch.autograd.grad(loss, leaves)
        results[mode] = (o, s, grads)
    (o1, s1, g1), (o2, s2, g2) = results["reference"], results["chunk"]
    close(o2, o1, "output")
    for a, c in zip(s2.params + s2.anchor, s1.params + s1.anchor):
        close(a, c, "state")
    assert torch.equal(s1.count, s2.count)
    for name, a, c in zip(("q", "k", "v", "lr", "retain", "W1", "W2", "gain"), g2, g1):
        close(a, c, f"grad {name}")


@settings(deadline=None, max_examples=12)
@given(split=st.integers(0, 11), b=st.integers(1, 6), variant=st.sampled_from(VARIANTS),
       modes=st.tuples(st.sampled_from(["reference", "chunk"]), st.sampled_from(["reference", "chunk"])))
def test_state_carry_is_exact_at_any_split_and_mini_batch_phase(split, b, variant, modes):
    q, k, v, lr, retain, aux, weights, gain = inputs()
    bias, retention = variant
    full, s_full = run("reference", q, k, v, lr, retain, aux, miras_state(weights), gain, bias, retention, b)
    cut = lambda t, a, z: t[:, :, a:z]  # noqa: E731
    o1, s1 = run(modes[0], *(cut(t, 0, split) for t in (q, k, v, lr, retain, aux)), miras_state(weights), gain, bias, retention, b)
    o2, s2 = run(modes[1], *(cut(t, split, None) for t in (q, k, v, lr, retain, aux)), s1, gain, bias, retention, b)
    close(torch.cat([o1, o2], dim=2), full, "output")
    for a, c in zip(s2.params + s2.anchor, s_full.params + s_full.anchor):
        close(a, c, "state")


def test_rows_at_different_mini_batch_phases_run_independently():
    q, k, v, lr, retain, aux, weights, gain = inputs()
    states = []
    for rows, pre in ((slice(0, 1), 2), (slice(1, 2), 3)):
        _, s = run("reference", *(t[rows, :, :pre] for t in (q, k, v, lr, retain, aux)),
                   miras_state(tuple(w[rows] for w in weights)), gain, "lp", "lq", 4)
        states.append(s)
    mixed = MirasState(tuple(torch.cat(p) for p in zip(*(s.params for s in states))),
                       tuple(torch.cat(p) for p in zip(*(s.anchor for s in states))), torch.cat([s.count for s in states]))
    for mode in ("reference", "chunk"):
        o, _ = run(mode, q, k, v, lr, retain, aux, mixed, gain, "lp", "lq", 4)
        for i, s in enumerate(states):
            oi, _ = run("reference", *(t[i : i + 1] for t in (q, k, v, lr, retain, aux)), s, gain, "lp", "lq", 4)
            close(o[i : i + 1], oi, f"{mode} row {i}")


def test_lp_bias_is_the_gradient_of_the_lp_loss():
    e = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 7, dtype=torch.float64)
    for p in (1.5, 3.0, 4.0):
        (g,) = torch.autograd.grad((e - target).abs().pow(p).sum(), e)
        close(lp_bias(e, target, p=p), g, f"p={p}")


def test_huber_bias_is_the_gradient_of_the_huber_loss_in_both_regimes():
    e = torch.randn(6, 5, dtype=torch.float64)
    norms = e.norm(dim=-1)
    delta = torch.where(torch.arange(6) % 2 == 0, norms * 2, norms / 2)  # even rows small-error, odd rows large
    pred = e.clone().requires_grad_(True)
    target = torch.zeros_like(e)
    loss = sum(0.5 * (pred[i] ** 2).sum() if i % 2 == 0 else delta[i] * (pred[i].abs().sum() - 0.5 * delta[i]) for i in range(6))
    (g,) = torch.autograd.grad(loss, pred)
    close(huber_bias(pred, target, delta), g, "huber")


def test_lq_retention_is_an_involution_for_q4_and_kl_rows_are_distributions():
    P = torch.randn(3, 4, 5, dtype=torch.float64)
    close(lq_retention(lq_retention(P)), P, "lq twice")
    W = lq_retention(P)
    close(W.abs().pow(4).sum((-2, -1)).pow(0.25), P.abs().pow(4).sum((-2, -1)).pow(-0.25), "||W||_4 = 1 / ||P||_4")
    S = kl_retention(P)
    assert (S > 0).all()
    close(S.sum(-1), torch.ones(3, 4, dtype=torch.float64), "rows sum to 1")


def test_bad_arguments_raise_clear_errors():
    q, k, v, lr, retain, aux, weights, gain = inputs()
    with pytest.raises(ValueError, match="attentional bias"):
        run("chunk", q, k, v, lr, retain, aux, miras_state(weights), gain, "nope", "l2", 4)
    with pytest.raises(ValueError, match="retention"):
        run("chunk", q, k, v, lr, retain, aux, miras_state(weights), gain, "l2", "nope", 4)
    with pytest.raises(ValueError, match="needs its threshold"):
        run("chunk", q, k, v, lr, retain, None, miras_state(weights), gain, "huber", "l2", 4)
    with pytest.raises(ValueError, match=r"lr must be \[batch"):
        run("chunk", q, k, v, lr[:, :, :3], retain, aux, miras_state(weights), gain, "l2", "l2", 4)
    assert set(BIASES) >= {"l2", "lp", "huber"} and set(RETENTIONS) >= {"l2", "lq", "kl"}
