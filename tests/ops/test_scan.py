"""The diagonal linear scan: the chunked two-level scan and Heinsen's log-space scan equal
the sequential reference.

Exactness checks run in float64, where modes differ only in summation order (~1e-14;
the log-space scan ~|sum log a| * 1e-16), so RTOL/ATOL leave orders of magnitude of
headroom while catching any real mismatch.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.scan import diagonal_scan, log_space_scan, reset_cumsum
from resets import RESET_PATTERNS, place_resets, reset_steps, with_resets

RTOL, ATOL = 1e-8, 1e-10

# Real part of log a per step: typical, decay ~0 (a ~ e^-30, products underflow within a
# chunk), decay ~1 (a ~ 1 - 1e-4, the state integrates over the whole sequence), and typical
# with a fifth of the entries resets (-inf, -1e30, -1e4: a = 0 exactly).
DECAYS = {"typical": (-1.0, 0.0), "near0": (-31.0, -29.0), "near1": (-2e-4, 0.0), "reset": (-1.0, 0.0)}
# Shapes of log_a relative to b: [batch, time, *dims]
FORMS = ("full", "constant", "shared", "per_step", "per_row", "per_key")


def log_a_shape(form, B, T, dims):
    return {
        "full": (B, T, *dims),
        "constant": tuple(dims),  # time-invariant, as LRU's lambda
        "shared": (T, *dims),  # the same decays for every row of the batch
        "per_step": (B, T) + (1,) * len(dims),  # one decay per step for all channels
        "per_row": (B, 1, *dims),  # time-invariant, different for each row
        # one decay per leading channel, shared along the rest (a matrix state's rows decaying
        # per key dimension: the compiled scan's grouped kernels)
        "per_key": (B, T, dims[0]) + (1,) * (len(dims) - 1),
    }[form]


def make_inputs(B, T, dims, form="full", decay="typical", complex_a=False, complex_b=False, init=True,
                dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = DECAYS[decay]
    shape = log_a_shape(form, B, T, dims)
    log_a = lo + (hi - lo) * torch.rand(shape, generator=g, dtype=dtype)
    if decay == "reset":
        log_a = with_resets(log_a, g)
    if complex_a:
        log_a = torch.complex(log_a, math.pi * (2 * torch.rand(shape, generator=g, dtype=dtype) - 1))
    cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    b = torch.randn(B, T, *dims, generator=g, dtype=cdtype if complex_b else dtype)
    h0 = torch.randn(B, *dims, generator=g, dtype=cdtype if complex_b else dtype) if init else None
    return log_a, b, h0


def loss_of(*tensors, seed=1):
    """A scalar touching every element (real and imaginary parts) of the given tensors."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for t in tensors:
        r = torch.view_as_real(t) if t.is_complex() else t
        total = total + (r * torch.randn(r.shape, generator=g, dtype=r.dtype)).sum()
    return total


def run(fn, args, **kwargs):
    """Outputs and gradients of a loss touching all of them, w.r.t. every tensor argument."""
    args = [None if a is None else a.clone().requires_grad_(True) for a in args]
    h, h_last = fn(*args, **kwargs)
    grads = torch.autograd.grad(loss_of(h, h_last), [a for a in args if a is not None])
    return h.detach(), h_last.detach(), grads


def assert_same(got, want, rtol=RTOL, atol=ATOL):
    (h, h_last, g), (h_ref, h_last_ref, g_ref) = got, want
    torch.testing.assert_close(h, h_ref, rtol=rtol, atol=atol, msg=lambda m: f"states: {m}")
    torch.testing.assert_close(h_last, h_last_ref, rtol=rtol, atol=atol, msg=lambda m: f"last state: {m}")
    assert len(g) == len(g_ref)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"gradient of input {i}: {m}")


def assert_chunk_equals_reference(args, chunk_size):
    ref = run(diagonal_scan, args, mode="reference")
    assert_same(run(diagonal_scan, args, mode="chunk", chunk_size=chunk_size), ref)


# ------------------------------------------------------------------------ diagonal_scan


@settings(max_examples=80, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 40), dims=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    chunk_size=st.sampled_from([1, 3, 4, 8, 16, 64]), form=st.sampled_from(FORMS), decay=st.sampled_from(sorted(DECAYS)),
    complex_a=st.booleans(), complex_b=st.booleans(), init=st.booleans(), seed=st.integers(0, 2**16),
)
def test_chunk_equals_reference_forward_and_gradients(B, T, dims, chunk_size, form, decay, complex_a, complex_b, init, seed):
    args = make_inputs(B, T, dims, form, decay, complex_a, complex_b, init, seed=seed)
    assert_chunk_equals_reference(args, chunk_size)


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("init", [False, True])
@pytest.mark.parametrize("complex_a", [False, True])
def test_single_step_chunk_equals_reference(decay, init, complex_a):
    assert_chunk_equals_reference(make_inputs(2, 1, [3], decay=decay, complex_a=complex_a, init=init), chunk_size=8)


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("T", [63, 64, 65, 130])
def test_partial_last_chunk_equals_reference(decay, T):
    assert_chunk_equals_reference(make_inputs(2, T, [4, 2], decay=decay, seed=T), chunk_size=64)


def test_reference_is_the_literal_recurrence():
    log_a, b, h = make_inputs(2, 9, [3], complex_a=True)
    hs, h_last = diagonal_scan(log_a, b, h, mode="reference")
    want = []
    for t in range(b.shape[1]):
        h = torch.exp(log_a[:, t]) * h + b[:, t]
        want.append(h)
    torch.testing.assert_close(hs, torch.stack(want, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["constant", "shared", "per_step", "per_row"])
@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_broadcast_log_a_equals_its_expansion(form, mode):
    log_a, b, h0 = make_inputs(3, 21, [4, 2], form=form, complex_a=True)
    got = diagonal_scan(log_a, b, h0, mode=mode, chunk_size=8)
    want = diagonal_scan(log_a.expand(b.shape).clone(), b, h0, mode="reference")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL)


def test_complex_decay_with_real_input_gives_a_complex_state():
    log_a, b, _ = make_inputs(2, 5, [3], complex_a=True)
    for mode in ("reference", "chunk"):
        h, h_last = diagonal_scan(log_a, b, mode=mode, chunk_size=2)
        assert h.dtype == h_last.dtype == torch.complex128
    h, _ = diagonal_scan(log_a.real, b, torch.zeros(2, 3, dtype=torch.complex128))
    assert h.dtype == torch.complex128


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_state_carry_is_exact(mode):
    log_a, b, h0 = make_inputs(2, 29, [3], complex_a=True, complex_b=True)
    h, h_last = diagonal_scan(log_a, b, h0, mode=mode, chunk_size=8)
    for t in (1, 8, 13, 28):
        h1, s1 = diagonal_scan(log_a[:, :t], b[:, :t], h0, mode=mode, chunk_size=8)
        h2, s2 = diagonal_scan(log_a[:, t:], b[:, t:], s1, mode=mode, chunk_size=8)
        torch.testing.assert_close(torch.cat([h1, h2], dim=1), h, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(s2, h_last, rtol=RTOL, atol=ATOL)


def test_chunk_size_does_not_change_the_result():
    log_a, b, h0 = make_inputs(2, 50, [3], complex_a=True)
    h, h_last = diagonal_scan(log_a, b, h0, chunk_size=64)
    for C in (1, 7, 16, 50):
        hc, hc_last = diagonal_scan(log_a, b, h0, chunk_size=C)
        torch.testing.assert_close(hc, h, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(hc_last, h_last, rtol=RTOL, atol=ATOL)


def test_decays_that_underflow_to_zero_stay_exact():
    """a = exp(-800) is 0 in float64: the chunk form must not divide by cumulative products."""
    log_a, b, h0 = make_inputs(2, 23, [3], decay="near0")
    log_a = log_a.clone()
    log_a[:, 5] = -800.0
    assert_chunk_equals_reference((log_a, b, h0), chunk_size=8)
    h, h_last, grads = run(diagonal_scan, (log_a, b, h0), mode="chunk", chunk_size=8)
    assert all(torch.isfinite(t).all() for t in (h, h_last, *grads))


@pytest.mark.parametrize("complex_a", [False, True])
def test_float32_near_zero_decays_stay_finite_and_accurate(complex_a):
    """log a = -30 per step: cumulative products underflow in float32 within a chunk."""
    args64 = make_inputs(2, 200, [4], decay="near0", complex_a=complex_a)
    args32 = [t.to(torch.complex64 if t.is_complex() else torch.float32) for t in args64]
    h_ref = diagonal_scan(*args64, mode="reference")[0]
    h, h_last, grads = run(diagonal_scan, args32, mode="chunk", chunk_size=64)
    assert all(torch.isfinite(torch.view_as_real(t) if t.is_complex() else t).all() for t in (h, h_last, *grads))
    # float32 rounding (eps ~ 6e-8) on O(1) values: tolerances at float32 resolution
    torch.testing.assert_close(h.to(h_ref.dtype), h_ref, rtol=1e-5, atol=1e-6)


def test_bfloat16_is_computed_in_float32_and_returned_in_bfloat16():
    log_a, b, h0 = make_inputs(2, 40, [3], decay="near1", dtype=torch.float32)
    h, h_last = diagonal_scan(log_a, b.bfloat16(), h0.bfloat16(), chunk_size=8)
    assert h.dtype == h_last.dtype == torch.bfloat16
    h_ref, _ = diagonal_scan(log_a, b.bfloat16().float(), h0.bfloat16().float(), mode="reference")
    torch.testing.assert_close(h.float(), h_ref, rtol=1e-2, atol=1e-2)  # bfloat16 output rounding


def test_bad_arguments_raise_clear_errors():
    log_a, b, h0 = make_inputs(2, 5, [3])
    with pytest.raises(ValueError, match="mode"):
        diagonal_scan(log_a, b, mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        diagonal_scan(log_a, b, chunk_size=0)
    with pytest.raises(ValueError, match="broadcast"):
        diagonal_scan(log_a[:, :, :2], b)
    with pytest.raises(ValueError, match=r"h0 must have shape \[batch, \*dims\]"):
        diagonal_scan(log_a, b, h0[:1])
    with pytest.raises(TypeError, match="floating"):
        diagonal_scan(log_a, b.long())
    with pytest.raises(ValueError, match="time"):
        diagonal_scan(log_a[0, 0], b[0, 0])


# ------------------------------------------------------------------------ log_space_scan


def log_inputs(B, T, dims, form="full", decay="typical", h0="random", dtype=torch.float64, seed=0):
    """(log_a, log_b, log_h0) with h0 = 'random' (positive), 'zero' (log -inf) or 'none'."""
    log_a, _, _ = make_inputs(B, T, dims, form, decay, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    log_b = torch.randn(B, T, *dims, generator=g, dtype=dtype)
    log_h0 = {
        "random": torch.randn(B, *dims, generator=g, dtype=dtype),
        "zero": torch.full((B, *dims), -math.inf, dtype=dtype),
        "none": None,
    }[h0]
    return log_a, log_b, log_h0


def linear_reference(log_a, log_b, log_h0=None):
    """The same recurrence in linear space through the sequential reference (autograd through exp)."""
    h0 = None if log_h0 is None else log_h0.exp()
    return diagonal_scan(log_a, log_b.exp(), h0, mode="reference")


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 40), dims=st.lists(st.integers(1, 4), min_size=1, max_size=2),
    form=st.sampled_from(FORMS), decay=st.sampled_from(sorted(DECAYS)), h0=st.sampled_from(["random", "zero", "none"]),
    seed=st.integers(0, 2**16),
)
def test_log_space_equals_reference_forward_and_gradients(B, T, dims, form, decay, h0, seed):
    args = log_inputs(B, T, dims, form, decay, h0, seed=seed)
    # Heinsen's form adds and subtracts a*_t = cumsum(log a), so its absolute error is
    # about |a*| * eps (the op's docstring): the absolute tolerance scales with max |a*|
    # (a factor 1 for typical decays, ~1e3 for log a = -30 over 40 steps, still ~1e-7).
    log_a = args[0]
    cum = reset_cumsum(log_a.expand(B, T, *dims), 1)[0].abs().max().item() if T else 0.0  # resets restart it
    assert_same(run(log_space_scan, args), run(linear_reference, args), atol=ATOL * max(1.0, cum))


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("h0", ["random", "zero", "none"])
def test_single_step_log_space_equals_reference(decay, h0):
    args = log_inputs(2, 1, [3], decay=decay, h0=h0)
    assert_same(run(log_space_scan, args), run(linear_reference, args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_space_zero_initial_state_has_finite_gradients(dtype):
    """h0 = 0 is log h0 = -inf: forward equals 'no initial state', gradients are finite (0 for log_h0)."""
    log_a, log_b, log_h0 = log_inputs(2, 17, [3], h0="zero", dtype=dtype)
    h, h_last, (ga, gb, gh0) = run(log_space_scan, (log_a, log_b, log_h0))
    h_none, _, (ga_none, gb_none) = run(log_space_scan, (log_a, log_b))
    assert all(torch.isfinite(t).all() for t in (h, h_last, ga, gb, gh0))
    assert (gh0 == 0).all()
    torch.testing.assert_close(h, h_none, rtol=0, atol=0)
    torch.testing.assert_close(ga, ga_none, rtol=0, atol=0)
    torch.testing.assert_close(gb, gb_none, rtol=0, atol=0)


def test_log_space_state_carry_is_exact():
    log_a, log_b, log_h0 = log_inputs(2, 29, [3])
    h, h_last = log_space_scan(log_a, log_b, log_h0)
    for t in (1, 8, 13, 28):
        h1, s1 = log_space_scan(log_a[:, :t], log_b[:, :t], log_h0)
        h2, s2 = log_space_scan(log_a[:, t:], log_b[:, t:], s1.log())
        torch.testing.assert_close(torch.cat([h1, h2], dim=1), h, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(s2, h_last, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("decay", sorted(DECAYS))
def test_log_space_float32_stays_finite_and_accurate(decay):
    """Strong decays make a* = cumsum(log a) large (-6000 here) without overflow in log space."""
    args64 = log_inputs(2, 200, [4], decay=decay, h0="zero")
    args32 = [t.float() for t in args64]
    h_ref = linear_reference(*args64)[0]
    h, h_last, grads = run(log_space_scan, args32)
    assert all(torch.isfinite(t).all() for t in (h, h_last, *grads))
    # relative error ~ |a*| * eps32: up to 6000 * 6e-8 ~ 4e-4 for the near-0 decays
    rtol = 1e-3 if decay == "near0" else 1e-4
    torch.testing.assert_close(h.double(), h_ref, rtol=rtol, atol=1e-6)


def test_log_space_bad_arguments_raise_clear_errors():
    log_a, log_b, log_h0 = log_inputs(2, 5, [3])
    with pytest.raises(ValueError, match="broadcast"):
        log_space_scan(log_a[:, :, :2], log_b)
    with pytest.raises(ValueError, match=r"log_h0 must have shape \[batch, \*dims\]"):
        log_space_scan(log_a, log_b, log_h0[:1])
    with pytest.raises(TypeError, match="real floating"):
        log_space_scan(log_a.to(torch.complex128), log_b)


# ------------------------------------------------------------------------ resets (log a = -inf)


@pytest.mark.parametrize("complex_a", [False, True])
def test_minimal_reset_gives_the_reference(complex_a, kernel_path):
    """log a = [0, -inf, 0], b = 1: h = [1, 1, 2] in both modes, gradients equal (and finite)."""
    log_a = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64).view(1, 3, 1)
    if complex_a:
        log_a = torch.complex(log_a, torch.full_like(log_a, 0.5))
    args = (log_a, torch.ones(1, 3, 1, dtype=torch.float64), None)
    ref = run(diagonal_scan, args, mode="reference")
    if not complex_a:
        torch.testing.assert_close(ref[0].flatten(), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    for C in (1, 2, 64):
        got = run(diagonal_scan, args, mode="chunk", chunk_size=C)
        assert all(torch.isfinite(t).all() for t in (got[0], *got[2]))
        assert_same(got, ref)


@pytest.mark.parametrize("form", ["full", "per_step", "per_key"])
@pytest.mark.parametrize("pattern", RESET_PATTERNS)
def test_resets_at_chosen_steps_equal_reference(pattern, form, kernel_path):
    log_a, b, h0 = make_inputs(2, 37, [3, 2], form, seed=5)
    log_a = place_resets(log_a, reset_steps(pattern, 37, 16), time_dim=1)
    assert_chunk_equals_reference((log_a, b, h0), chunk_size=16)


def test_log_space_minimal_reset_gives_the_reference():
    """log a = [0, -inf, 0], log b = 0: h = [1, 1, 2] (Heinsen's form gave NaN: -inf - (-inf))."""
    log_a = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64).view(1, 3, 1)
    for log_h0 in (None, torch.zeros(1, 1, dtype=torch.float64)):
        args = (log_a, torch.zeros(1, 3, 1, dtype=torch.float64), log_h0)
        got, want = run(log_space_scan, args), run(linear_reference, args)
        first = 1.0 if log_h0 is None else 2.0  # h0 = 1 reaches the first step only
        torch.testing.assert_close(got[0].flatten(), torch.tensor([first, 1.0, 2.0], dtype=torch.float64))
        assert all(torch.isfinite(t).all() for t in (got[0], *got[2]))
        assert_same(got, want)


@pytest.mark.parametrize("h0", ["random", "zero", "none"])
@pytest.mark.parametrize("pattern", RESET_PATTERNS)
def test_log_space_resets_at_chosen_steps_equal_reference(pattern, h0):
    log_a, log_b, log_h0 = log_inputs(2, 37, [3], decay="typical", h0=h0, seed=6)
    log_a = place_resets(log_a, reset_steps(pattern, 37, 16), time_dim=1)
    if pattern not in ("all", "every_other"):
        log_a = place_resets(place_resets(log_a, [21], time_dim=1, value=-1e4), [34], time_dim=1, value=-1e30)
    assert_same(run(log_space_scan, (log_a, log_b, log_h0)), run(linear_reference, (log_a, log_b, log_h0)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reset_at", [0, 15, 16, 21])
def test_nothing_leaks_across_a_reset(reset_at, dtype, kernel_path):
    """After a reset the state is exactly the write of that step: other inputs before it leave
    every later state identical, bit for bit (diagonal scan in both modes, and log-space scan)."""
    log_a, b, h0 = make_inputs(2, 40, [3], dtype=dtype, seed=7)
    log_a = place_resets(log_a, [reset_at], time_dim=1)
    g = torch.Generator().manual_seed(8)
    la2, b2 = log_a.clone(), b.clone()
    la2[:, :reset_at] = -torch.rand(la2[:, :reset_at].shape, generator=g, dtype=dtype)
    b2[:, :reset_at] = torch.randn(b2[:, :reset_at].shape, generator=g, dtype=dtype)
    for mode in ("reference", "chunk"):
        h, _ = diagonal_scan(log_a, b, h0, mode=mode, chunk_size=16)
        h2, _ = diagonal_scan(la2, b2, 3 * h0, mode=mode, chunk_size=16)
        assert torch.equal(h[:, reset_at:], h2[:, reset_at:]), mode
    h, _ = log_space_scan(log_a, b, h0.abs().log())
    h2, _ = log_space_scan(la2, b2, h0.abs().log() + 1)
    assert torch.equal(h[:, reset_at:], h2[:, reset_at:]), "log_space_scan"


@pytest.mark.parametrize("dim", [1, -1])
def test_reset_cumsum_and_segment_scans_equal_their_loops(dim, kernel_path):
    """``reset_cumsum``'s sums restart after each reset (the reset adding 0) and count the resets;
    the segmented running max and log-sum-exp restart the same way; gradients by gradcheck
    (the compiled segmented sum on CPU, the PyTorch doubling scan elsewhere)."""
    from recur.ops.scan import log_zero, segment_cummax, segment_logcumsumexp

    g = torch.Generator().manual_seed(9)
    log_a = with_resets(-torch.rand(3, 21, 4, generator=g, dtype=torch.float64), g, p=0.3)
    log_a[0, 0], log_a[1, -1], log_a[2] = -math.inf, -1e30, -math.inf  # first, last, every step
    x = torch.randn(3, 21, 4, generator=g, dtype=torch.float64)
    if dim == -1:
        log_a, x = log_a.transpose(1, 2).contiguous(), x.transpose(1, 2).contiguous()
    c, n = reset_cumsum(log_a, dim)
    assert n.dtype == torch.int32
    la, xs, cs, ns = (t.movedim(dim, 1) for t in (log_a, x, c, n))
    run_c, run_n = torch.zeros_like(la[:, 0]), torch.zeros_like(ns[:, 0])
    run_max, run_lse = torch.full_like(xs[:, 0], -math.inf), torch.full_like(xs[:, 0], -math.inf)
    mx, lse = segment_cummax(x, n, dim).movedim(dim, 1), segment_logcumsumexp(x, n, dim).movedim(dim, 1)
    for t in range(la.shape[1]):
        reset = la[:, t] < log_zero(torch.float64)
        run_n = run_n + reset
        run_c = torch.where(reset, 0.0, run_c + la[:, t])
        run_max = torch.where(reset, xs[:, t], torch.maximum(run_max, xs[:, t]))
        run_lse = torch.where(reset, xs[:, t], torch.logaddexp(run_lse, xs[:, t]))
        torch.testing.assert_close(cs[:, t], run_c, rtol=1e-14, atol=1e-14)
        assert torch.equal(ns[:, t], run_n.to(torch.int32))
        assert torch.equal(mx[:, t], run_max)
        torch.testing.assert_close(lse[:, t], run_lse, rtol=1e-14, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: reset_cumsum(t, dim)[0], (log_a.clone().requires_grad_(),))
    assert reset_cumsum(log_a.clamp(min=-1.0), dim)[1] is None  # no reset: the plain cumulative sum


def test_resets_trace_without_a_graph_break():
    """While torch.compile traces, ``reset_cumsum`` takes its reset-aware form unconditionally (no
    data-dependent branch): a whole log-space scan with resets compiles as one graph and
    equals the eager run."""
    log_a, log_b, log_h0 = log_inputs(2, 37, [3], h0="random", seed=10)
    log_a = place_resets(log_a, [0, 15, 16, 30], time_dim=1)
    fn = lambda a, b, h: log_space_scan(a, b, h)[0]  # noqa: E731
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(log_a, log_b, log_h0)
    torch.testing.assert_close(got, fn(log_a, log_b, log_h0), rtol=RTOL, atol=ATOL)
