"""Mamba's selective scan: the compiled CPU pass and the PyTorch blocked fallback both equal the
reference loop in float64 (outputs, final state and every gradient), at the tolerances of
tests/ops/test_scan.py, and state carry across calls is exact."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_paths import kernels
from recur.ops.selective import selective_scan

RTOL, ATOL = 1e-8, 1e-10


def inputs(B, T, D, N, seed, init=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, B_, C = r(B, T, D), r(B, T, N), r(B, T, N)
    dt = torch.rand(B, T, D, generator=g, dtype=dtype) * 0.5
    A = -torch.rand(D, N, generator=g, dtype=dtype) * 4
    h0 = r(B, D, N) if init else None
    return [u, dt, A, B_, C, h0]


def run(args, **kw):
    leaves = [None if a is None else a.clone().requires_grad_(True) for a in args]
    y, h = selective_scan(*leaves, **kw)
    g = torch.Generator().manual_seed(99)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (h * torch.randn(h.shape, generator=g, dtype=h.dtype)).sum()
    grads = torch.autograd.grad(loss, [a for a in leaves if a is not None])
    return y.detach(), h.detach(), grads


@pytest.mark.parametrize("path", ["compiled", "torch"])
@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 150), D=st.integers(1, 40), N=st.integers(1, 6),
       init=st.booleans(), chunk_size=st.sampled_from([2, 3, 8]), seed=st.integers(0, 2**16))
def test_chunk_equals_reference_forward_and_gradients(path, B, T, D, N, init, chunk_size, seed):
    args = inputs(B, T, D, N, seed, init)
    want = run(args, mode="reference")
    with kernels(path == "compiled"):
        got = run(args, mode="chunk", chunk_size=chunk_size)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("path", ["compiled", "torch"])
def test_very_strong_decays_equal_reference(path):
    """dt * A far below exp's underflow (A = -1e4, -1e30 on some channels, dt = 0 on some steps):
    the decay is exactly 0 (a reset), or exactly 1 where dt = 0; outputs, final state and every
    gradient equal the reference, all finite. (A is finite by Mamba's parametrisation,
    A = -exp(A_log): A = -inf would be 0 * -inf in d(dt A)/d dt, NaN in the reference too.)"""
    args = inputs(2, 70, 6, 4, seed=5)
    A = args[2].clone()
    A[0, :2], A[3, 1], A[5] = -1e4, -1e30, -1e30
    dt = args[1].clone()
    dt[:, 10:12] = 0.0
    args[1], args[2] = dt, A
    want = run(args, mode="reference")
    with kernels(path == "compiled"):
        got = run(args, mode="chunk", chunk_size=8)
    for a, b in zip([*got[:2], *got[2]], [*want[:2], *want[2]]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("B,D", [(1, 40), (1, 600), (3, 40)])
def test_compiled_split_across_threads_equals_reference(B, D):
    """With two threads and fewer rows than threads the compiled kernels split the channels
    into work items (at most selective_kernels.SEL_BLOCK wide, the last one partial): the
    split must not change outputs, states or gradients."""
    torch.set_num_threads(2)  # the autouse fixture restores one thread for the next test
    args = inputs(B, 130, D, 5, seed=3)
    want = run(args, mode="reference")
    with kernels(True):
        got = run(args, mode="chunk")
    for a, b in zip([*got[:2], *got[2]], [*want[:2], *want[2]]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_reference_is_the_literal_recurrence():
    u, dt, A, B, C, h = inputs(2, 7, 3, 4, seed=1)
    y, h_last = selective_scan(u, dt, A, B, C, h, mode="reference")
    for t in range(7):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        torch.testing.assert_close(y[:, t], (h * C[:, t, None, :]).sum(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, h, rtol=1e-12, atol=1e-12)


def test_state_carry_is_exact():
    args = inputs(2, 200, 5, 3, seed=2)
    y, h = selective_scan(*args)
    for t in (1, 64, 65, 130):
        first = [a[:, :t] if a.ndim == 3 and a.shape[1] == 200 else a for a in args]
        y1, h1 = selective_scan(*first)
        rest = [a[:, t:] if a.ndim == 3 and a.shape[1] == 200 else a for a in args[:-1]] + [h1]
        y2, h2 = selective_scan(*rest)
        torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(h2, h, rtol=RTOL, atol=ATOL)


def test_bad_shapes_raise_clear_errors():
    u, dt, A, B, C, h = inputs(2, 5, 3, 4, seed=3)
    with pytest.raises(ValueError, match=r"A must have shape \[D=3, N\]"):
        selective_scan(u, dt, A[:2], B, C, h)
    with pytest.raises(ValueError, match="B must have shape"):
        selective_scan(u, dt, A, B[:, :4], C, h)
    with pytest.raises(ValueError, match="mode"):
        selective_scan(u, dt, A, B, C, h, mode="parallel")
