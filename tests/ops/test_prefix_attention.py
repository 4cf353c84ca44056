"""``recur.ops.prefix_attention``: attention of one query over every prefix as an RNN (Aaren).

The primitive must equal plain masked softmax attention with a fixed query, its operator must be
associative with the empty state as identity, its modes must agree with the one-token-at-a-time
reference (outputs, final states and gradients), the state must carry exactly across calls, and
scores of magnitude 1000 must stay finite in float32.

Exactness checks run in float64, where the modes differ only in summation order (~1e-15), so
RTOL/ATOL leave orders of magnitude of headroom while catching any real mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.prefix_attention import MODES, combine, prefix_softmax_attention

RTOL, ATOL = 1e-8, 1e-10
FAST = [m for m in MODES if m != "reference"]


def make(B, H, T, dv, *, scale=3.0, init=False, dtype=torch.float64, seed=0):
    """scores [B, H, T] of spread ``scale``, values, and optionally a non-empty initial state."""
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(B, H, T, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, dv, generator=g, dtype=dtype)
    state = None
    if init:  # a genuine state: the one a prefix of 5 tokens leaves
        s0 = scale * torch.randn(B, H, 5, generator=g, dtype=dtype)
        v0 = torch.randn(B, H, 5, dv, generator=g, dtype=dtype)
        _, state = prefix_softmax_attention(s0, v0, mode="reference")
    return s, v, state


def direct(s, v, state=None):
    """Masked softmax attention with a fixed query, from the definition (float64, scores of moderate size).

    A state (m, u, w) stands for earlier tokens whose exp-weights sum to u e^m and whose weighted
    values sum to w e^m.
    """
    T = s.shape[-1]
    weights = s.exp().unsqueeze(-2) * torch.ones(T, T, dtype=s.dtype).tril()  # [B, H, t, i]
    num = weights @ v
    den = weights.sum(-1, keepdim=True)
    if state is not None:
        m, u, w = state
        num = num + (w * m.exp().unsqueeze(-1)).unsqueeze(2)
        den = den + (u * m.exp()).unsqueeze(-1).unsqueeze(-1)
    return num / den


def run(s, v, state, mode, chunk_size=4):
    """Output, final state and the gradients of a loss touching both, w.r.t. every input."""
    args = [s.clone().requires_grad_(True), v.clone().requires_grad_(True)]
    if state is not None:
        args += [t.clone().requires_grad_(True) for t in state]
    o, (m, u, w) = prefix_softmax_attention(args[0], args[1], tuple(args[2:]) or None, mode=mode, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (o, m, u, w))
    grads = torch.autograd.grad(loss, args)
    return (o.detach(), m.detach(), u.detach(), w.detach()), grads


def assert_same(got, want, what):
    for name, a, b in zip(("output", "m", "u", "w"), got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda s: f"{what}, {name}: {s}")
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert torch.isfinite(a).all(), f"{what}: gradient of input {i} is not finite"
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda s: f"{what}, gradient of input {i}: {s}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("init", [False, True])
def test_equals_masked_softmax_attention_with_a_fixed_query(mode, init):
    s, v, state = make(2, 3, 29, 5, init=init, seed=2)
    o, (m, u, w) = prefix_softmax_attention(s, v, state, mode=mode, chunk_size=4)
    torch.testing.assert_close(o, direct(s, v, state), rtol=1e-12, atol=1e-12)
    # the final state is the paper's (m, u, w): running max, sum e^{s - m}, sum e^{s - m} v
    m_want = s.max(-1).values if state is None else torch.maximum(state[0], s.max(-1).values)
    torch.testing.assert_close(m, m_want, rtol=0, atol=0)
    torch.testing.assert_close(w / u.unsqueeze(-1), o[:, :, -1], rtol=1e-12, atol=1e-12)
    assert (u >= 1).all(), "a non-empty state has u >= 1 (the maximum's own term is e^0)"


def test_softmax_attention_from_the_literal_formula():
    """One head, by hand: o_t = sum_i e^{s_i} v_i / sum_i e^{s_i} over i <= t."""
    s = torch.tensor([[[0.5, -1.0, 2.0]]], dtype=torch.float64)
    v = torch.tensor([[[[1.0], [3.0], [-2.0]]]], dtype=torch.float64)
    e = [math.exp(0.5), math.exp(-1.0), math.exp(2.0)]
    want = [1.0, (e[0] + 3 * e[1]) / (e[0] + e[1]), (e[0] + 3 * e[1] - 2 * e[2]) / sum(e)]
    for mode in MODES:
        o, (m, u, w) = prefix_softmax_attention(s, v, mode=mode)
        torch.testing.assert_close(o[0, 0, :, 0], torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=1e-14)
        assert m.item() == 2.0 and u.item() == pytest.approx(sum(e) / math.exp(2.0), rel=1e-14)


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 45), dv=st.integers(1, 6),
    chunk_size=st.integers(1, 9), init=st.booleans(), scale=st.sampled_from([0.1, 3.0, 30.0]),
    mode=st.sampled_from(FAST), seed=st.integers(0, 2**16),
)
def test_fast_modes_equal_reference_forward_and_backward(B, H, T, dv, chunk_size, init, scale, mode, seed):
    s, v, state = make(B, H, T, dv, scale=scale, init=init, seed=seed)
    want = run(s, v, state, "reference", chunk_size)
    assert_same(run(s, v, state, mode, chunk_size), want, f"mode {mode}, T={T}, chunk_size={chunk_size}")


@pytest.mark.parametrize("mode", MODES)
def test_single_token_with_an_initial_state(mode):
    s, v, state = make(2, 2, 1, 3, init=True, seed=5)
    assert_same(run(s, v, state, mode), run(s, v, state, "reference"), f"mode {mode}, T=1")
    o, _ = prefix_softmax_attention(s, v, state, mode=mode)
    torch.testing.assert_close(o, direct(s, v, state), rtol=1e-12, atol=1e-12)


def triple(draw_seed, n, dv, scale, empty=False):
    g = torch.Generator().manual_seed(draw_seed)
    m = scale * torch.randn(n, generator=g, dtype=torch.float64)
    u = 1 + torch.rand(n, generator=g, dtype=torch.float64)
    w = torch.randn(n, dv, generator=g, dtype=torch.float64)
    if empty:
        u, w = torch.zeros_like(u), torch.zeros_like(w)
    return m, u, w


@settings(max_examples=100, deadline=None)
@given(seeds=st.tuples(st.integers(0, 2**16), st.integers(0, 2**16), st.integers(0, 2**16)),
       scale=st.sampled_from([1.0, 50.0, 1000.0]), empties=st.tuples(st.booleans(), st.booleans(), st.booleans()))
def test_combine_is_associative(seeds, scale, empties):
    a, b, c = (triple(sd, 7, 3, scale, e) for sd, e in zip(seeds, empties))
    left, right = combine(combine(a, b), c), combine(a, combine(b, c))
    # the representation (m, u, w) of a non-empty prefix is unique: m is its largest score
    for x, y in zip(left[1:], right[1:]):
        torch.testing.assert_close(x, y, rtol=1e-13, atol=0)
    nonempty = left[1] > 0
    torch.testing.assert_close(left[0][nonempty], right[0][nonempty], rtol=0, atol=0)


@pytest.mark.parametrize("m_empty", [0.0, 500.0, -500.0])
def test_empty_state_is_the_identity_whatever_its_m(m_empty):
    b = triple(3, 5, 4, 1000.0)
    empty = (torch.full((5,), m_empty, dtype=torch.float64), torch.zeros(5, dtype=torch.float64), torch.zeros(5, 4, dtype=torch.float64))
    for got in (combine(empty, b), combine(b, empty)):
        for x, y in zip(got, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    # and as an initial state: the same outputs and gradients as no state at all
    s, v, _ = make(2, 3, 11, 4, scale=300.0, seed=6)
    zero = (torch.full((2, 3), m_empty, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64))
    for mode in MODES:
        (outs, grads), (outs0, grads0) = run(s, v, zero, mode), run(s, v, None, mode)
        for x, y in zip(outs, outs0):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        for x, y in zip(grads, grads0):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert all(torch.isfinite(g).all() for g in grads[2:]), f"mode {mode}: gradient w.r.t. the empty state is not finite"


@pytest.mark.parametrize("mode", MODES)
def test_scores_of_magnitude_1000_stay_finite_in_float32(mode):
    g = torch.Generator().manual_seed(7)
    s = 1000.0 * torch.randn(2, 3, 40, generator=g)
    s[:, :, :3] = torch.tensor([-1000.0, 1000.0, -1000.0])  # extreme scores at the start, the running max jumping
    v = torch.randn(2, 3, 40, 4, generator=g)
    state = (torch.full((2, 3), -1000.0), torch.ones(2, 3), torch.randn(2, 3, 4, generator=g))
    for init in (None, state):
        s_ = s.clone().requires_grad_(True)
        o, (m, u, w) = prefix_softmax_attention(s_, v, init, mode=mode, chunk_size=8)
        assert all(torch.isfinite(t).all() for t in (o, m, u, w)), "non-finite output or state"
        (o.sum() + u.sum() + w.sum()).backward()
        assert torch.isfinite(s_.grad).all(), "non-finite gradient"
        # float64 via the stable definition: softmax over each prefix
        init64 = None if init is None else tuple(t.double() for t in init)
        want, _ = prefix_softmax_attention(s.double(), v.double(), init64, mode="reference")
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_state_carry_across_splits_is_exact(mode):
    s, v, state = make(2, 3, 37, 4, init=True, seed=8)
    o, final = prefix_softmax_attention(s, v, state, mode=mode, chunk_size=8)
    for t in (1, 8, 13, 36):
        o1, mid = prefix_softmax_attention(s[:, :, :t], v[:, :, :t], state, mode=mode, chunk_size=8)
        o2, end = prefix_softmax_attention(s[:, :, t:], v[:, :, t:], mid, mode=mode, chunk_size=8)
        torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, rtol=RTOL, atol=ATOL)
        for a, b in zip(end, final):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_low_precision_is_computed_in_float32():
    s, v, _ = make(1, 2, 9, 4, dtype=torch.float32, seed=9)
    for mode in MODES:
        o, (m, u, w) = prefix_softmax_attention(s.bfloat16(), v.bfloat16(), mode=mode)
        assert o.dtype == m.dtype == u.dtype == w.dtype == torch.bfloat16
        want, _ = prefix_softmax_attention(s.bfloat16().float(), v.bfloat16().float(), mode=mode)
        torch.testing.assert_close(o.float(), want, rtol=1e-2, atol=1e-2)


def test_bad_inputs_raise_clear_errors():
    s, v, state = make(2, 3, 5, 4, init=True)
    with pytest.raises(ValueError, match="mode"):
        prefix_softmax_attention(s, v, mode="chunky")
    with pytest.raises(ValueError, match=r"scores \[batch, heads, time\]"):
        prefix_softmax_attention(s[:, :2], v)
    with pytest.raises(ValueError, match="time >= 1"):
        prefix_softmax_attention(s[:, :, :0], v[:, :, :0])
    with pytest.raises(TypeError, match="floating"):
        prefix_softmax_attention(s.long(), v)
    with pytest.raises(ValueError, match=r"entry w must have shape \(2, 3, 4\)"):
        prefix_softmax_attention(s, v, (state[0], state[1], state[2][..., :3]))
    with pytest.raises(TypeError, match=r"tuple \(m, u, w\)"):
        prefix_softmax_attention(s, v, state[:2])
    with pytest.raises(ValueError, match="chunk_size"):
        prefix_softmax_attention(s, v, mode="chunk", chunk_size=0)
