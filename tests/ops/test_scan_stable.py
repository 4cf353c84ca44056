"""The max-stabilised scan (``recur.ops.scan.stabilized_scan``, RWKV-4's WKV recurrence):
its reference loop is the scaled form of the literal recurrence, and the chunked mode equals
the reference, states, stabilisers and gradients included.

Exactness checks run in float64, where the modes differ only in summation order (~1e-14), so
RTOL/ATOL leave orders of magnitude of headroom while catching any real mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_paths import kernels
from recur.ops.scan import stabilized_scan
from resets import RESET_PATTERNS, place_resets, reset_steps, with_resets

RTOL, ATOL = 1e-8, 1e-10


def make_inputs(B, T, mdims, extra, *, constant=False, scale=3.0, init=True, resets=False, dtype=torch.float64, seed=0):
    """log_a [*mdims] or [B, T, *mdims] (<= 0; with ``resets`` a fifth of it -inf, -1e30 or -1e4),
    log_w [B, T, *mdims] of spread ``scale``, v [B, T, *mdims[:-1], extra] sharing the last
    stabiliser dimension (size 1) when extra > 1."""
    g = torch.Generator().manual_seed(seed)
    a_shape = tuple(mdims) if constant else (B, T, *mdims)
    log_a = -2.0 * torch.rand(a_shape, generator=g, dtype=dtype)
    if resets:
        log_a = with_resets(log_a, g)
    log_w = scale * torch.randn(B, T, *mdims, generator=g, dtype=dtype)
    vdims = (*mdims[:-1], extra)
    v = torch.randn(B, T, *vdims, generator=g, dtype=dtype)
    h0 = torch.randn(B, *vdims, generator=g, dtype=dtype) if init else None
    m0 = scale * torch.randn(B, *mdims, generator=g, dtype=dtype) if init else None
    return log_a, log_w, v, h0, m0


def run(args, **kwargs):
    """(h~, m) and the gradients of a loss touching both, w.r.t. every tensor argument."""
    args = [None if a is None else a.clone().requires_grad_(True) for a in args]
    h, m = stabilized_scan(*args, **kwargs)
    g = torch.Generator().manual_seed(1)
    loss = (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum() + (m * torch.randn(m.shape, generator=g, dtype=m.dtype)).sum()
    grads = torch.autograd.grad(loss, [a for a in args if a is not None])
    return h.detach(), m.detach(), grads


def assert_same(got, want):
    (h, m, g), (h_ref, m_ref, g_ref) = got, want
    torch.testing.assert_close(h, h_ref, rtol=RTOL, atol=ATOL, msg=lambda s: f"scaled states: {s}")
    torch.testing.assert_close(m, m_ref, rtol=RTOL, atol=ATOL, msg=lambda s: f"stabilisers: {s}")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert torch.isfinite(a).all(), f"gradient of input {i} is not finite"
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda s: f"gradient of input {i}: {s}")


def literal(log_a, log_w, v, h0, m0):
    """The unscaled recurrence h_t = exp(log_a_t) h_{t-1} + exp(log_w_t) v_t, and the largest term exponent."""
    B, T = v.shape[:2]
    la = log_a.expand(log_w.shape)
    h = torch.zeros(B, *v.shape[2:], dtype=v.dtype) if h0 is None else h0 * m0.exp()
    top = torch.full((B, *log_w.shape[2:]), -math.inf, dtype=v.dtype) if m0 is None else m0
    hs, tops = [], []
    for t in range(T):
        h = la[:, t].exp() * h + log_w[:, t].exp() * v[:, t]
        top = torch.maximum(top + la[:, t], log_w[:, t])  # exponent of the largest term, by definition
        hs.append(h)
        tops.append(top)
    return torch.stack(hs, 1), torch.stack(tops, 1)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
@pytest.mark.parametrize("init", [False, True])
def test_scaled_state_times_exp_m_is_the_literal_recurrence(mode, init):
    args = make_inputs(2, 23, (3, 1), 2, init=init, seed=4)
    h, m = stabilized_scan(*args, mode=mode, chunk_size=5)
    want_h, want_m = literal(*args)
    torch.testing.assert_close(h * m.exp(), want_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m, want_m, rtol=1e-12, atol=1e-12)


def test_from_the_zero_state_m_is_the_largest_term_exponent():
    """m_t = max_j (log_w_j + sum_{j<s<=t} log_a_s): the closed form, independent of the mode."""
    log_a, log_w, v, _, _ = make_inputs(1, 17, (4,), 4, seed=9)
    for mode in ("reference", "chunk"):
        _, m = stabilized_scan(log_a, log_w, v, mode=mode, chunk_size=4)
        for t in range(17):
            terms = torch.stack([log_w[:, j] + log_a[:, j + 1 : t + 1].sum(1) for j in range(t + 1)])
            torch.testing.assert_close(m[:, t], terms.max(0).values, rtol=1e-12, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 40), mdims=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    extra=st.integers(1, 3), chunk_size=st.sampled_from([1, 3, 4, 8, 16, 64]), constant=st.booleans(),
    scale=st.sampled_from([0.5, 3.0, 60.0]), init=st.booleans(), resets=st.booleans(), seed=st.integers(0, 2**16),
)
def test_chunk_equals_reference_forward_and_gradients(B, T, mdims, extra, chunk_size, constant, scale, init, resets, seed):
    mdims = (*mdims, 1) if extra > 1 else tuple(mdims)  # extra > 1: v's last dim shares one stabiliser
    args = make_inputs(B, T, mdims, extra if extra > 1 else mdims[-1], constant=constant, scale=scale, init=init,
                       resets=resets, seed=seed)
    assert_same(run(args, mode="chunk", chunk_size=chunk_size), run(args, mode="reference"))


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_state_carry_is_exact(mode):
    args = make_inputs(2, 30, (3, 1), 2, init=False, seed=2)
    log_a, log_w, v, _, _ = args
    h, m = stabilized_scan(*args, mode=mode, chunk_size=4)
    for t in (1, 7, 29):
        h1, m1 = stabilized_scan(log_a[:, :t], log_w[:, :t], v[:, :t], mode=mode, chunk_size=4)
        h2, m2 = stabilized_scan(log_a[:, t:], log_w[:, t:], v[:, t:], h1[:, -1], m1[:, -1], mode=mode, chunk_size=4)
        torch.testing.assert_close(torch.cat([h1, h2], 1), h, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.cat([m1, m2], 1), m, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_huge_exponents_stay_finite_in_float32(mode):
    """log_w ~ 500 (exp overflows float32 beyond 88): the scaled state is finite and, relative to
    its stabiliser, equals the float64 computation."""
    log_a, log_w, v, _, _ = make_inputs(2, 50, (4, 1), 2, init=False, seed=5)
    log_w = 500 + 20 * log_w
    h, m = stabilized_scan(log_a.float(), log_w.float(), v.float(), mode=mode, chunk_size=8)
    h64, m64 = stabilized_scan(log_a, log_w, v, mode="reference")
    assert torch.isfinite(h).all() and torch.isfinite(m).all()
    assert (h.abs() <= 1e6).all(), "the scaled state should be of the order of the values"
    torch.testing.assert_close(m.double(), m64, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(h.double(), h64, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_zero_weight_inputs_leave_the_zero_state_at_zero(mode):
    """log_w = -inf (weight 0, a mask) from the zero state: h~ = 0, m = -inf, finite gradients."""
    log_a, log_w, v, _, _ = make_inputs(2, 12, (3, 1), 2, init=False, seed=6)
    log_w = log_w.clone()
    log_w[:, :5] = -math.inf
    log_w.requires_grad_(True)
    v.requires_grad_(True)
    h, m = stabilized_scan(log_a, log_w, v, mode=mode, chunk_size=4)
    assert (h[:, :5] == 0).all() and (m[:, :5] == -math.inf).all()
    torch.testing.assert_close(h[:, 5:] * m[:, 5:].exp(), literal(log_a, log_w.detach(), v.detach(), None, None)[0][:, 5:])
    grads = torch.autograd.grad((h * torch.randn_like(h)).sum(), [log_w, v])
    assert all(torch.isfinite(g).all() for g in grads)


def test_bad_shapes_raise_clear_errors():
    log_a, log_w, v, h0, m0 = make_inputs(2, 5, (3, 1), 2)
    with pytest.raises(ValueError, match="log_w must broadcast"):
        stabilized_scan(log_a, log_w, v[..., :1, :].expand(2, 5, 2, 2).contiguous())
    with pytest.raises(ValueError, match="h0 must have shape"):
        stabilized_scan(log_a, log_w, v, h0[:1])
    with pytest.raises(ValueError, match="m0 must have shape"):
        stabilized_scan(log_a, log_w, v, h0, m0[..., 0])
    with pytest.raises(TypeError, match="real floating-point"):
        stabilized_scan(log_a, log_w, v.to(torch.complex128))
    with pytest.raises(ValueError, match="mode"):
        stabilized_scan(log_a, log_w, v, mode="parallel")


# ------------------------------------------------------------------------ resets (log a = -inf)
@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_minimal_reset_gives_the_reference(path):
    """log a = [0, -inf, 0], log w = 0, v = 1 from the zero state: m = [0, 0, 0] and h~ = [1, 1, 2]
    in both modes (the chunked running maximum gave NaN: -inf - (-inf)); gradients equal."""
    log_a = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64).view(1, 3, 1)
    args = (log_a, torch.zeros(1, 3, 1, dtype=torch.float64), torch.ones(1, 3, 1, dtype=torch.float64), None, None)
    with kernels(path == "compiled"):
        want = run(args, mode="reference")
        torch.testing.assert_close((want[0] * want[1].exp()).flatten(), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
        for C in (1, 2, 64):
            assert_same(run(args, mode="chunk", chunk_size=C), want)


@pytest.mark.parametrize("path", ["compiled", "torch"])
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("pattern", RESET_PATTERNS)
def test_resets_at_chosen_steps_equal_reference(pattern, init, path):
    """Resets (and very strong finite decays beside them) at chosen steps: the chunked mode equals
    the reference, and nothing before the last reset changes anything after it, bit for bit."""
    T, C = 29, 8
    log_a, log_w, v, h0, m0 = make_inputs(2, T, (3, 1), 2, init=init, seed=11)
    steps = reset_steps(pattern, T, C)
    log_a = place_resets(log_a, steps, time_dim=1)
    if pattern not in ("all", "every_other"):
        log_a = place_resets(place_resets(log_a, [C + 5], time_dim=1, value=-1e4), [2 * C + 2], time_dim=1, value=-1e30)
    args = (log_a, log_w, v, h0, m0)
    with kernels(path == "compiled"):
        assert_same(run(args, mode="chunk", chunk_size=C), run(args, mode="reference"))
        last = max(steps)
        g = torch.Generator().manual_seed(12)
        changed = [t.clone() for t in (log_a, log_w, v)]
        for t in changed:
            t[:, :last] = torch.randn(t[:, :last].shape, generator=g, dtype=t.dtype)
        changed[0][:, :last] = -changed[0][:, :last].abs()
        for mode in ("reference", "chunk"):
            h, m = stabilized_scan(*args, mode=mode, chunk_size=C)
            h2, m2 = stabilized_scan(*changed, None if h0 is None else 2 * h0, None if m0 is None else m0 - 1,
                                     mode=mode, chunk_size=C)
            assert torch.equal(h[:, last:], h2[:, last:]) and torch.equal(m[:, last:], m2[:, last:]), mode
