"""The causal FFT convolution equals its direct-sum reference.

Exactness checks run in float64 (complex128), where the two modes differ by FFT rounding,
about eps * log(n) * sum |k||u| ~ 1e-14 for these sizes: RTOL/ATOL leave orders of magnitude
of headroom while catching any misplaced tap or wrapped-around tail (errors of order 1).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.conv import _fast_length, causal_fft_conv

RTOL, ATOL = 1e-8, 1e-10


def randn(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        return torch.complex(torch.randn(*shape, generator=g, dtype=real), torch.randn(*shape, generator=g, dtype=real))
    return torch.randn(*shape, generator=g, dtype=dtype)


def direct(u, k):
    """y[b, t, c] = sum_{s <= t, s < L} k[s, c] u[b, t - s, c], by explicit indices (float64)."""
    B, T, C = u.shape
    y = torch.zeros(B, T, C, dtype=torch.promote_types(u.dtype, k.dtype))
    for t in range(T):
        for s in range(min(t + 1, k.shape[0])):
            y[:, t] += k[s] * u[:, t - s]
    return y


def test_reference_is_the_direct_sum():
    u, k = randn(2, 9, 3, seed=1), randn(5, 3, seed=2)
    torch.testing.assert_close(causal_fft_conv(u, k, mode="reference"), direct(u, k), rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 70), L=st.integers(1, 90), channels=st.sampled_from([(), (1,), (4,), (2, 3)]),
       broadcast=st.booleans(), complex_u=st.booleans(), complex_k=st.booleans(), seed=st.integers(0, 2**16))
def test_fft_equals_reference(B, T, L, channels, broadcast, complex_u, complex_k, seed):
    u = randn(B, T, *channels, dtype=torch.complex128 if complex_u else torch.float64, seed=seed)
    k_channels = channels[1:] if broadcast and channels else channels  # kernel shared along a leading channel dim
    k = randn(L, *k_channels, dtype=torch.complex128 if complex_k else torch.float64, seed=seed + 1)
    y = causal_fft_conv(u, k, mode="fft")
    ref = causal_fft_conv(u, k, mode="reference")
    assert y.shape == u.shape and y.dtype == ref.dtype
    assert y.is_complex() == (complex_u or complex_k)
    torch.testing.assert_close(y, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("L", [1, 7, 40, 100])
def test_fft_gradients_equal_reference(L):
    u0, k0 = randn(2, 40, 3, seed=3), randn(L, 3, seed=4)
    w = randn(2, 40, 3, seed=5)
    grads = {}
    for mode in ("fft", "reference"):
        u, k = u0.clone().requires_grad_(True), k0.clone().requires_grad_(True)
        (causal_fft_conv(u, k, mode=mode) * w).sum().backward()
        grads[mode] = (u.grad, k.grad)
    for a, b in zip(grads["fft"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_no_wrap_around_and_causal():
    """A full-length kernel: changing u[:, t:] leaves y[:, :t] unchanged (a circular convolution of
    length < 2T - 1 would wrap the late inputs onto the early outputs)."""
    T = 64
    k = torch.ones(T, 2, dtype=torch.float64)  # every tap non-zero
    u = randn(1, T, 2, seed=6)
    y = causal_fft_conv(u, k)
    for t in (1, 17, 63):
        u2 = u.clone()
        u2[:, t:] = randn(1, T - t, 2, seed=7 + t) * 1e3
        y2 = causal_fft_conv(u2, k)
        torch.testing.assert_close(y2[:, :t], y[:, :t], rtol=RTOL, atol=ATOL)
    # an impulse at t = 0 reproduces the kernel; a constant input gives running sums
    impulse = torch.zeros(1, T, 2, dtype=torch.float64)
    impulse[:, 0] = 1
    k2 = randn(T, 2, seed=8)
    torch.testing.assert_close(causal_fft_conv(impulse, k2)[0], k2, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(causal_fft_conv(torch.ones(1, T, 2, dtype=torch.float64), k2)[0], k2.cumsum(0),
                               rtol=RTOL, atol=ATOL)


def test_taps_beyond_the_sequence_are_ignored():
    u, k = randn(2, 10, 3, seed=9), randn(50, 3, seed=10)
    torch.testing.assert_close(causal_fft_conv(u, k), causal_fft_conv(u, k[:10]), rtol=0, atol=0)


def test_fft_length_is_smooth_and_long_enough():
    for m in range(1, 500):
        n = _fast_length(m)
        assert n >= m and (n == m or all(_fast_length(j) != j for j in range(m, n)))
        for p in (2, 3, 5):
            while n % p == 0:
                n //= p
        assert n == 1


def test_low_precision_is_computed_in_float32():
    u, k = randn(2, 33, 4, dtype=torch.float32, seed=11), randn(33, 4, dtype=torch.float32, seed=12)
    y = causal_fft_conv(u.bfloat16(), k.bfloat16())
    assert y.dtype == torch.bfloat16
    want = causal_fft_conv(u.bfloat16().float(), k.bfloat16().float(), mode="reference")
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)  # bfloat16 output rounding


def test_bad_inputs_raise_clear_errors():
    u = randn(2, 5, 3)
    with pytest.raises(ValueError, match="mode"):
        causal_fft_conv(u, randn(5, 3), mode="direct")
    with pytest.raises(ValueError, match=r"\[L, \*channels\]"):
        causal_fft_conv(u, randn(5, 4))
    with pytest.raises(ValueError, match=r"\[L, \*channels\]"):
        causal_fft_conv(u, randn(5, 2, 3))
    with pytest.raises(ValueError, match=r"\[batch, time"):
        causal_fft_conv(randn(5), randn(5))
    with pytest.raises(TypeError, match="floating"):
        causal_fft_conv(torch.ones(2, 5, 3, dtype=torch.long), randn(5, 3))
