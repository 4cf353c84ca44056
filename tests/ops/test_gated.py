"""The gated matrix-state primitive: every fast mode equals the reference loop.

Exactness checks run in float64, where modes differ only in summation order (~1e-14
relative), so rtol 1e-8 / atol 1e-10 leave ample headroom and still catch any real
mismatch. Decays are drawn in three regimes: typical (logsigmoid of a normal), close
to 0 (log alpha = -30 per step, which underflows exp(cumsum) within a few steps) and
close to 1 (log alpha ~ -1e-4), for all three alpha forms (per key dimension, per
head, none).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.gated import gated_matrix

RTOL, ATOL = 1e-8, 1e-10
FORMS = ("vector", "scalar", "none")
REGIMES = ("typical", "strong", "weak")


def make_inputs(B, H, T, K, V, form, regime, with_state, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g, dtype=dtype)
    k = torch.randn(B, H, T, K, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, V, generator=g, dtype=dtype)
    shape = (B, H, T, K) if form == "vector" else (B, H, T)
    if form == "none":
        log_alpha = None
    elif regime == "typical":
        log_alpha = F.logsigmoid(torch.randn(*shape, generator=g, dtype=dtype) + 2)
    elif regime == "strong":
        log_alpha = -30 + 0.1 * torch.rand(*shape, generator=g, dtype=dtype)
    else:
        log_alpha = -1e-4 * torch.rand(*shape, generator=g, dtype=dtype)
    S0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if with_state else None
    return q, k, v, log_alpha, S0


def run(inputs, mode, chunk_size=64):
    """Outputs, final state and gradients (w.r.t. every input) of a fixed random loss."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    o, S = gated_matrix(*leaves, mode=mode, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(99)
    loss = (o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() + (S * torch.randn(S.shape, generator=g, dtype=S.dtype)).sum()
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present)
    return o.detach(), S.detach(), grads


def assert_runs_close(got, want, what):
    o, S, grads = got
    o_ref, S_ref, grads_ref = want
    torch.testing.assert_close(o, o_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, output: {m}")
    torch.testing.assert_close(S, S_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, final state: {m}")
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, gradient of input {i}: {m}")


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 70),
    K=st.integers(1, 6),
    V=st.integers(1, 5),
    form=st.sampled_from(FORMS),
    regime=st.sampled_from(REGIMES),
    with_state=st.booleans(),
    chunk_size=st.sampled_from([1, 3, 8, 16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_fast_modes_equal_reference_forward_and_backward(B, H, T, K, V, form, regime, with_state, chunk_size, seed):
    inputs = make_inputs(B, H, T, K, V, form, regime, with_state, seed=seed)
    want = run(inputs, "reference")
    assert_runs_close(run(inputs, "chunk", chunk_size), want, f"chunk (chunk_size={chunk_size})")
    assert_runs_close(run(inputs, "parallel"), want, "parallel")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_single_step_equals_reference(form, with_state):
    inputs = make_inputs(2, 2, 1, 4, 3, form, "typical", with_state)
    want = run(inputs, "reference")
    for mode in ("chunk", "parallel"):
        assert_runs_close(run(inputs, mode), want, mode)


@pytest.mark.parametrize("form", ["vector", "scalar"])
@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_strong_decay_stays_finite_in_float32(form, mode):
    """log alpha = -30 per step: the cumulative decay underflows within one chunk, yet
    nothing overflows; forward and gradients stay finite and match float64."""
    inputs = make_inputs(2, 2, 100, 8, 4, form, "strong", True, dtype=torch.float32)
    inputs = (*inputs[:3], torch.full_like(inputs[3], -30.0), inputs[4])
    o, S, grads = run(inputs, mode, chunk_size=64)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(g).all() for g in grads)
    o64, S64, _ = run([t.double() for t in inputs], "reference")
    torch.testing.assert_close(o, o64.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S64.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_state_carry_is_exact(form, mode):
    """Running [0, t) then [t, T) from the returned state equals one run over [0, T)."""
    q, k, v, log_alpha, S0 = make_inputs(2, 2, 45, 4, 3, form, "typical", True)
    o, S = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=8)
    for t in (1, 8, 21, 44):
        head = [x[:, :, :t] if x is not None else None for x in (q, k, v, log_alpha)]
        tail = [x[:, :, t:] if x is not None else None for x in (q, k, v, log_alpha)]
        o1, S1 = gated_matrix(*head, S0, mode=mode, chunk_size=8)
        o2, S2 = gated_matrix(*tail, S1, mode=mode, chunk_size=8)
        torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S2, S, rtol=RTOL, atol=ATOL)


def test_alpha_forms_agree():
    """A per-head decay equals the same decay repeated over d_k; no decay equals log alpha = 0."""
    q, k, v, log_alpha, S0 = make_inputs(2, 3, 30, 4, 5, "scalar", "typical", True)
    for mode in ("reference", "chunk", "parallel"):
        scalar = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=8)
        vector = gated_matrix(q, k, v, log_alpha.unsqueeze(-1).expand(*q.shape), S0, mode=mode, chunk_size=8)
        none = gated_matrix(q, k, v, None, S0, mode=mode, chunk_size=8)
        zeros = gated_matrix(q, k, v, torch.zeros_like(log_alpha), S0, mode=mode, chunk_size=8)
        for a, b in ((scalar, vector), (none, zeros)):
            torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(a[1], b[1], rtol=RTOL, atol=ATOL)


def test_reference_matches_explicit_sum():
    """o_t = sum_{j<=t} (q_t * prod_{j<m<=t} alpha_m) . k_j v_j + (q_t * prod_{m<=t} alpha_m)^T S0."""
    q, k, v, log_alpha, S0 = make_inputs(1, 1, 6, 3, 2, "vector", "typical", True)
    o, _ = gated_matrix(q, k, v, log_alpha, S0, mode="reference")
    c = log_alpha[0, 0].cumsum(0)  # [T, K]
    for t in range(6):
        want = (q[0, 0, t] * c[t].exp()) @ S0[0, 0]
        for j in range(t + 1):
            want = want + ((q[0, 0, t] * (c[t] - c[j]).exp()) @ k[0, 0, j]) * v[0, 0, j]
        torch.testing.assert_close(o[0, 0, t], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_return_their_dtype(dtype):
    q, k, v, log_alpha, S0 = make_inputs(1, 2, 20, 4, 3, "vector", "typical", True, dtype=torch.float32)
    o32, S32 = gated_matrix(q, k, v, log_alpha, S0)
    o, S = gated_matrix(q.to(dtype), k.to(dtype), v.to(dtype), log_alpha, S0.to(dtype))
    assert o.dtype == dtype and S.dtype == dtype
    torch.testing.assert_close(o.float(), o32, rtol=0.05, atol=0.1)


def test_bad_inputs_raise_clear_errors():
    q, k, v, log_alpha, S0 = make_inputs(2, 2, 5, 4, 3, "vector", "typical", True)
    with pytest.raises(ValueError, match=r"\[batch, heads, time, d_k\]"):
        gated_matrix(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k must have"):
        gated_matrix(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must have"):
        gated_matrix(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="log_alpha must have"):
        gated_matrix(q, k, v, log_alpha[..., :2])
    with pytest.raises(ValueError, match="S0 must have"):
        gated_matrix(q, k, v, log_alpha, S0[..., :2])
    with pytest.raises(TypeError, match="floating"):
        gated_matrix(q.long(), k, v)
    with pytest.raises(TypeError, match="dtype"):
        gated_matrix(q, k.float(), v)
    with pytest.raises(ValueError, match="mode"):
        gated_matrix(q, k, v, mode="scan")
    with pytest.raises(ValueError, match="chunk_size"):
        gated_matrix(q, k, v, chunk_size=0)
    assert math.isfinite(gated_matrix(q, k, v, log_alpha, S0)[0].sum().item())
