"""Causal long convolution over time, channel by channel (depthwise):

    y_t = sum_{s=0}^{min(t, L-1)} k_s * u_{t-s}

    u:      [batch, time, *channels]    real or complex
    kernel: [L, *channels']             channels' broadcastable to channels; any length L
                                        (taps beyond the sequence length never matter)

This is how a time-invariant linear recurrence (S4D, LSSL) runs as one operation: its
impulse response is the kernel. Modes (equal up to rounding):

* ``reference``: the direct sum above, one shifted multiply-add per tap; the oracle.
* ``fft``: the product of discrete Fourier transforms, O(T log T). Circular convolution of
  length n equals the linear one when n >= T + L' - 1 (L' = min(L, T) taps used), so both
  signals are zero-padded to the smallest n >= T + L' - 1 of the form 2^a 3^b 5^c (at most
  2T - 1 for L' = T: no wrap-around of the tail onto the first outputs).

Rounding: the FFT's error is about eps * log(n) * sum |k| |u|, absolute rather than relative to
each output, so outputs much smaller than the inputs' scale carry a larger relative error.
Low-precision inputs (float16/bfloat16) are computed in float32 and cast back.
"""

from __future__ import annotations

import torch

from recur.ops import trace

MODES = ("reference", "fft")

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def causal_fft_conv(u: torch.Tensor, kernel: torch.Tensor, *, mode: str = "fft") -> torch.Tensor:
    """Causal depthwise convolution of ``u`` [batch, time, *channels] with ``kernel`` [L, *channels].

    Returns y [batch, time, *channels], complex if u or kernel is, else in u's dtype.
    """
    if mode not in MODES:
        raise ValueError(f"causal_fft_conv mode must be one of {MODES}, got {mode!r}")
    _check(u, kernel)
    T = u.shape[1]
    real = u.real.dtype if u.is_complex() else u.dtype
    work_real = torch.float32 if real in (torch.float16, torch.bfloat16) else real
    is_complex = u.is_complex() or kernel.is_complex()
    work = _COMPLEX[work_real] if is_complex else work_real
    out = work if is_complex else u.dtype
    k = kernel[:T].to(work)  # taps at lags >= T never reach an output
    k = k.reshape(k.shape[:1] + (1,) * (u.ndim - 1 - k.ndim) + k.shape[1:])  # [L', 1.., *channels']
    x = u.to(work)

    if mode == "reference":
        y = _reference(x, k)
    else:
        y = _fft(x, k, is_complex)
    trace.record(causal_fft_conv, dict(u=u, kernel=kernel, mode=mode), "u", None, y,
                 layout="channels", batched=("u",))
    return y.to(out)


def _check(u, kernel) -> None:
    for name, t in (("u", u), ("kernel", kernel)):
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"causal_fft_conv: {name} must be a floating-point or complex tensor, "
                            f"got {getattr(t, 'dtype', type(t).__name__)}")
    if u.ndim < 2 or u.shape[1] < 1:
        raise ValueError(f"causal_fft_conv: u must have shape [batch, time >= 1, *channels], got {tuple(u.shape)}")
    if kernel.ndim < 1 or kernel.shape[0] < 1:
        raise ValueError(f"causal_fft_conv: kernel must have shape [L >= 1, *channels], got {tuple(kernel.shape)}")
    channels = tuple(u.shape[2:])
    try:
        ok = kernel.ndim - 1 <= len(channels) and torch.broadcast_shapes(kernel.shape[1:], channels) == channels
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"causal_fft_conv: kernel must have shape [L, *channels] with channels broadcastable to "
                         f"u's {channels}, got {tuple(kernel.shape)}")


def _reference(u, k):
    """y_t = sum_s k_s u_{t-s}: one shifted multiply-add per tap."""
    T = u.shape[1]
    y = u * k[0]
    for s, k_s in enumerate(k.unbind(0)[1:], start=1):
        y = y + torch.nn.functional.pad(u[:, : T - s] * k_s, (0, 0) * (u.ndim - 2) + (s, 0))
    return y


def _fft(u, k, is_complex: bool):
    """Linear convolution as a circular one of length n >= T + L' - 1 (no wrap-around)."""
    T, L = u.shape[1], k.shape[0]
    n = _fast_length(T + L - 1)
    if is_complex:
        U = torch.fft.fft(u, n=n, dim=1)
        K = torch.fft.fft(k, n=n, dim=0)
        return torch.fft.ifft(U * K, n=n, dim=1)[:, :T]
    U = torch.fft.rfft(u, n=n, dim=1)
    K = torch.fft.rfft(k, n=n, dim=0)
    return torch.fft.irfft(U * K, n=n, dim=1)[:, :T]


def _fast_length(m: int) -> int:
    """The smallest n >= m whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    n = m
    while True:
        r = n
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return n
        n += 1
