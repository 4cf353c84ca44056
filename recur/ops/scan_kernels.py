"""Compiled CPU kernels (numba) for the diagonal scan, with PyTorch autograd.

The diagonal scan h_t = exp(log_a_t) * h_{t-1} + b_t is memory-bound: every element is read
once and written once, with one multiply-add in between. A Python loop over time pays the
interpreter and dispatcher per step, and the two-level chunked form in PyTorch makes several
passes over memory. This kernel makes one pass: threads take (batch row, run of channels)
pairs, and each runs the recurrence over time, streaming through its rows (``_block``).

Backward (reverse-mode, the adjoint recurrence), with g_t the gradient reaching h_t:
    g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}
    dL/db_t = g_t,   dL/dlog_a_t = g_t * conj(a_t h_{t-1}),   dL/dh0 = conj(a_0) g_0
(conjugates only for complex tensors: PyTorch's convention for complex gradients).

Two kernel pairs (forward, backward): the flat one, with a decay per channel, and the grouped
one, for a decay shared by groups of consecutive channels (a decay per key dimension shared by
a row of a d_k x d_v matrix state), read per group instead of expanded.

Used by ``recur.ops.scan.diagonal_scan``'s chunk mode for CPU tensors (see
``recur.ops.kernels`` for the switch); the PyTorch two-level scan is the fallback.

Also here: ``segment_cumsum``, the cumulative sum restarted at each reset that the chunk forms
use for log decays with resets (``recur.ops.scan.reset_cumsum``), one pass each way in place
of the PyTorch doubling scan's log2(length) steps.
"""

from __future__ import annotations

import numpy as np
import torch

from recur.ops.kernels import _block, _set_threads, enabled, numba

if numba is not None:  # numba is a declared dependency; without it only the PyTorch path runs
    from numba import njit, prange

    from recur.ops.kernels import _work_item
    from recur.ops.numba_math import fast_exp


_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def can_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> bool:
    """True if the compiled scan handles these (already promoted) tensors."""
    return (enabled() and b.device.type == "cpu" and b.dtype in _DTYPES
            and log_a.dtype in (b.dtype, b.real.dtype if b.is_complex() else b.dtype)
            and h0.dtype == b.dtype and b.ndim >= 2)


if numba is not None:

    @njit(parallel=True, cache=True)
    def _forward(log_a, b, h0, out, block):  # pragma: no cover - compiled
        B, T, C = b.shape
        n_blocks = (C + block - 1) // block
        for job in prange(B * n_blocks):
            row, _, _, c0, c1 = _work_item(job, n_blocks, block, C, 1)
            la_row = row if log_a.shape[0] > 1 else 0
            h = h0[row, c0:c1].copy()
            for t in range(T):
                la = log_a[la_row, t if log_a.shape[1] > 1 else 0, c0:c1]
                bt = b[row, t, c0:c1]
                o = out[row, t, c0:c1]
                for c in range(c1 - c0):
                    v = fast_exp(la[c]) * h[c] + bt[c]
                    h[c] = v
                    o[c] = v

    @njit(parallel=True, cache=True)
    def _backward(log_a, h0, hs, grad_hs, grad_b, grad_la, grad_h0, block):  # pragma: no cover - compiled
        # grad_la has log_a's broadcast shape expanded to b's: [B, T, C]; the caller reduces it.
        B, T, C = hs.shape
        n_blocks = (C + block - 1) // block
        for job in prange(B * n_blocks):
            row, _, _, c0, c1 = _work_item(job, n_blocks, block, C, 1)
            n = c1 - c0
            la_row = row if log_a.shape[0] > 1 else 0
            g = np.zeros(n, dtype=hs.dtype)
            a_next = np.zeros(n, dtype=hs.dtype)  # a_{t+1}; zero beyond the end
            for t in range(T - 1, -1, -1):
                la = log_a[la_row, t if log_a.shape[1] > 1 else 0, c0:c1]
                h_prev = hs[row, t - 1, c0:c1] if t > 0 else h0[row, c0:c1]
                gh, gb, gla = grad_hs[row, t, c0:c1], grad_b[row, t, c0:c1], grad_la[row, t, c0:c1]
                for c in range(n):
                    gc = gh[c] + np.conj(a_next[c]) * g[c]
                    a_t = fast_exp(la[c])
                    g[c] = gc
                    gb[c] = gc
                    gla[c] = gc * np.conj(a_t * h_prev[c])
                    a_next[c] = a_t
            for c in range(n):
                grad_h0[row, c0 + c] = np.conj(a_next[c]) * g[c]

    # Grouped variants: log_a has one entry per group of ``rep`` consecutive channels (a decay
    # per key dimension shared by a row of a d_k x d_v matrix state), so it is neither expanded
    # in memory nor exponentiated once per channel.
    @njit(parallel=True, cache=True)
    def _forward_grouped(log_a, b, h0, out, rep, block):  # pragma: no cover - compiled
        B, T, C = b.shape
        G = C // rep
        n_blocks = (G + block - 1) // block
        for job in prange(B * n_blocks):
            row, g0, g1, c0, c1 = _work_item(job, n_blocks, block, G, rep)
            la_row = row if log_a.shape[0] > 1 else 0
            h = h0[row, c0:c1].copy()
            for t in range(T):
                la = log_a[la_row, t if log_a.shape[1] > 1 else 0, g0:g1]
                bt = b[row, t, c0:c1]
                o = out[row, t, c0:c1]
                for gi in range(g1 - g0):
                    # slices and loops from 0 with one store each: LLVM left range(base, base + rep)
                    # scalar (3.3 ms against 1.0 ms at GLA's state pass, [16, 64, 64 x 64])
                    a = fast_exp(la[gi])
                    hg, bg, og = h[gi * rep:(gi + 1) * rep], bt[gi * rep:(gi + 1) * rep], o[gi * rep:(gi + 1) * rep]
                    for r in range(rep):
                        hg[r] = a * hg[r] + bg[r]
                    for r in range(rep):
                        og[r] = hg[r]

    # reassoc: the gradient of each group's log decay is a sum over its channels.
    @njit(parallel=True, cache=True, fastmath={"contract", "reassoc", "nsz"})
    def _backward_grouped(log_a, h0, hs, grad_hs, grad_b, grad_la, grad_h0, rep, block):  # pragma: no cover
        # grad_la: [B, T, G] (log_a's groups, expanded over its broadcast batch/time dims)
        B, T, C = hs.shape
        G = C // rep
        n_blocks = (G + block - 1) // block
        for job in prange(B * n_blocks):
            row, g0, g1, c0, c1 = _work_item(job, n_blocks, block, G, rep)
            la_row = row if log_a.shape[0] > 1 else 0
            g = np.zeros(c1 - c0, dtype=hs.dtype)
            a_next = np.zeros(g1 - g0, dtype=hs.dtype)  # a_{t+1} per group; zero beyond the end
            zero = np.zeros(1, dtype=hs.dtype)[0]
            for t in range(T - 1, -1, -1):
                la = log_a[la_row, t if log_a.shape[1] > 1 else 0, g0:g1]
                h_prev = hs[row, t - 1, c0:c1] if t > 0 else h0[row, c0:c1]
                gh, gb, gla = grad_hs[row, t, c0:c1], grad_b[row, t, c0:c1], grad_la[row, t, g0:g1]
                for gi in range(g1 - g0):
                    a_t = fast_exp(la[gi])
                    an = np.conj(a_next[gi])
                    lo, hi = gi * rep, (gi + 1) * rep
                    gg, ghg, gbg, hpg = g[lo:hi], gh[lo:hi], gb[lo:hi], h_prev[lo:hi]
                    for r in range(rep):
                        gg[r] = ghg[r] + an * gg[r]
                    for r in range(rep):
                        gbg[r] = gg[r]
                    acc = zero
                    for r in range(rep):
                        acc += gg[r] * np.conj(hpg[r])
                    gla[gi] = np.conj(a_t) * acc
                    a_next[gi] = a_t
            for gi in range(g1 - g0):
                an = np.conj(a_next[gi])
                g0h = grad_h0[row, c0 + gi * rep:c0 + (gi + 1) * rep]
                gg = g[gi * rep:(gi + 1) * rep]
                for r in range(rep):
                    g0h[r] = an * gg[r]


def _as_3d(t: torch.Tensor, channels: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], channels)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, b, h0, rep):
        # log_a: [Ba, Ta, C // rep] with Ba in {1, B}, Ta in {1, T}, one entry per group of rep
        # channels; b: [B, T, C]; h0: [B, C] (all contiguous)
        out = torch.empty_like(b)
        _set_threads()
        if rep == 1:
            _forward(log_a.numpy(), b.numpy(), h0.numpy(), out.numpy(), _block(b.shape[0], b.shape[2]))
        else:
            _forward_grouped(log_a.numpy(), b.numpy(), h0.numpy(), out.numpy(), rep, _block(b.shape[0], log_a.shape[2]))
        ctx.save_for_backward(log_a, h0, out)
        ctx.rep = rep
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        log_a, h0, hs = ctx.saved_tensors
        rep = ctx.rep
        grad_out = grad_out.contiguous()
        grad_b = torch.empty_like(hs)
        grad_la = torch.empty(*hs.shape[:2], log_a.shape[2], dtype=hs.dtype)  # per step, complex if the scan is
        grad_h0 = torch.empty_like(h0)
        _set_threads()
        args = (log_a.numpy(), h0.numpy(), hs.numpy(), grad_out.numpy(), grad_b.numpy(), grad_la.numpy(), grad_h0.numpy())
        if rep == 1:
            _backward(*args, _block(hs.shape[0], hs.shape[2]))
        else:
            _backward_grouped(*args, rep, _block(hs.shape[0], log_a.shape[2]))
        if not log_a.is_complex() and grad_la.is_complex():
            grad_la = grad_la.real
        # reduce over the dimensions log_a was broadcast along
        dims = [d for d in (0, 1) if log_a.shape[d] == 1 and hs.shape[d] != 1]
        if dims:
            grad_la = grad_la.sum(dim=dims, keepdim=True)
        return grad_la, grad_b, grad_h0, None


def scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states h [batch, time, *dims] of h_t = exp(log_a_t) h_{t-1} + b_t (compiled, CPU).

    log_a: [batch or 1, time or 1, *dims] (already promoted to b's precision, real or
    complex; b's number of dimensions); b: [batch, time, *dims]; h0: [batch, *dims], b's
    dtype. When log_a is broadcast along trailing dims only (a decay per row of a matrix
    state), the kernels read it per group of channels instead of expanding it.
    """
    dims_a, dims_b = tuple(log_a.shape[2:]), tuple(b.shape[2:])
    C = int(np.prod(dims_b)) if dims_b else 1
    j = len(dims_b)
    while j > 0 and dims_a[j - 1] == 1:
        j -= 1
    rep = int(np.prod(dims_b[j:])) if j < len(dims_b) else 1
    Ba, Ta = log_a.shape[0], log_a.shape[1]
    if rep > 1 and dims_a[:j] == dims_b[:j]:
        la = log_a.reshape(Ba, Ta, C // rep)
    else:
        rep = 1
        la = log_a.expand(Ba, Ta, *dims_b).reshape(Ba, Ta, C)
    hs = _Scan.apply(la.contiguous(), _as_3d(b, C).contiguous(), h0.reshape(b.shape[0], C).contiguous(), rep)
    return hs.reshape(b.shape)


# The cumulative sum along the middle axis of x [M, C, G], restarted at each reset: n [M, C, G]
# counts the resets (non-decreasing along C), and out_i = sum_{j <= i, n_j = n_i} x_j. Backward,
# with dout the gradient reaching out: dx_j = sum_{i >= j, n_i = n_j} dout_i, the same sum run
# backwards. Sums in float64 (as torch.cumsum's for float32 on CPU), restarted from 0 at each
# reset, so a segment's sums never see anything before it.
if numba is not None:

    @njit(parallel=True, cache=True)
    def _segment_cumsum(x, n, out):  # pragma: no cover - compiled
        M, C, G = x.shape
        for m in prange(M):
            acc = np.zeros(G, dtype=np.float64)
            for i in range(C):
                xi, ni, oi = x[m, i], n[m, i], out[m, i]
                for g in range(G):
                    if ni[g] != (n[m, i - 1, g] if i > 0 else 0):
                        acc[g] = 0.0
                    acc[g] += xi[g]
                    oi[g] = acc[g]

    @njit(parallel=True, cache=True)
    def _segment_cumsum_backward(dout, n, dx):  # pragma: no cover - compiled
        M, C, G = dout.shape
        for m in prange(M):
            acc = np.zeros(G, dtype=np.float64)
            for i in range(C - 1, -1, -1):
                di, ni, dxi = dout[m, i], n[m, i], dx[m, i]
                for g in range(G):
                    acc[g] += di[g]
                    dxi[g] = acc[g]
                    if ni[g] != (n[m, i - 1, g] if i > 0 else 0):  # a reset at i: its segment starts here
                        acc[g] = 0.0


class _SegmentCumsum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n):
        out = torch.empty_like(x)
        _set_threads()
        _segment_cumsum(x.numpy(), n.numpy(), out.numpy())
        ctx.save_for_backward(n)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        (n,) = ctx.saved_tensors
        dx = torch.empty_like(dout)
        _set_threads()
        _segment_cumsum_backward(dout.contiguous().numpy(), n.numpy(), dx.numpy())
        return dx, None


def can_segment_cumsum(x: torch.Tensor) -> bool:
    return enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def segment_cumsum(x: torch.Tensor, n: torch.Tensor, dim: int) -> torch.Tensor:
    """sum_{j <= i, n_j = n_i} x_j along ``dim`` (n: the count of resets, x's shape); compiled, CPU."""
    dim = dim % x.ndim
    M, C = int(np.prod(x.shape[:dim])), x.shape[dim]
    as3 = lambda t: t.reshape(M, C, -1).contiguous()  # noqa: E731
    return _SegmentCumsum.apply(as3(x), as3(n.expand(x.shape))).view(x.shape)
