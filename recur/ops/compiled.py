"""Compiled CPU kernels (numba) for the elementwise recurrences, with PyTorch autograd.

The diagonal scan h_t = exp(log_a_t) * h_{t-1} + b_t is memory-bound: every element is read
once and written once, with one multiply-add in between. A Python loop over time pays the
interpreter and dispatcher per step, and the two-level chunked form in PyTorch makes several
passes over memory. This kernel makes one pass: threads take (batch row, block of channels)
pairs, and each runs the recurrence over time with the channel block in registers / L1.

Backward (reverse-mode, the adjoint recurrence), with g_t the gradient reaching h_t:
    g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}
    dL/db_t = g_t,   dL/dlog_a_t = g_t * conj(a_t h_{t-1}),   dL/dh0 = conj(a_0) g_0
(conjugates only for complex tensors: PyTorch's convention for complex gradients).

Used by ``recur.ops.scan.diagonal_scan`` for CPU tensors when numba is installed (it is a
dependency of the package); ``RECUR_COMPILED=0`` in the environment, or
``set_enabled(False)``, falls back to the PyTorch path. Both paths are tested against the
reference loop in float64.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:  # numba is a declared dependency; the PyTorch path remains the device-agnostic fallback
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None

_ENABLED = os.environ.get("RECUR_COMPILED", "1") not in ("0", "false", "False")
_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
BLOCK = 256  # channels per work item: a contiguous run that stays in L1 across time steps


def set_enabled(flag: bool) -> None:
    """Turn the compiled kernels on or off (off: every op uses its PyTorch path)."""
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    return _ENABLED and numba is not None


def can_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> bool:
    """True if the compiled scan handles these (already promoted) tensors."""
    return (enabled() and b.device.type == "cpu" and b.dtype in _DTYPES
            and log_a.dtype in (b.dtype, b.real.dtype if b.is_complex() else b.dtype)
            and h0.dtype == b.dtype and b.ndim >= 2)


if numba is not None:

    @njit(parallel=True, cache=True)
    def _forward(log_a, b, h0, out):  # pragma: no cover - compiled
        B, T, C = b.shape
        n_blocks = (C + BLOCK - 1) // BLOCK
        for job in prange(B * n_blocks):
            row = job // n_blocks
            c0 = (job % n_blocks) * BLOCK
            c1 = min(C, c0 + BLOCK)
            la_row = row if log_a.shape[0] > 1 else 0
            h = h0[row, c0:c1].copy()
            for t in range(T):
                la = log_a[la_row, t if log_a.shape[1] > 1 else 0, c0:c1]
                bt = b[row, t, c0:c1]
                o = out[row, t, c0:c1]
                for c in range(c1 - c0):
                    h[c] = np.exp(la[c]) * h[c] + bt[c]
                    o[c] = h[c]

    @njit(parallel=True, cache=True)
    def _backward(log_a, h0, hs, grad_hs, grad_b, grad_la, grad_h0):  # pragma: no cover - compiled
        # grad_la has log_a's broadcast shape expanded to b's: [B, T, C]; the caller reduces it.
        B, T, C = hs.shape
        n_blocks = (C + BLOCK - 1) // BLOCK
        for job in prange(B * n_blocks):
            row = job // n_blocks
            c0 = (job % n_blocks) * BLOCK
            c1 = min(C, c0 + BLOCK)
            n = c1 - c0
            la_row = row if log_a.shape[0] > 1 else 0
            g = np.zeros(n, dtype=hs.dtype)
            a_next = np.zeros(n, dtype=hs.dtype)  # a_{t+1}; zero beyond the end
            for t in range(T - 1, -1, -1):
                la = log_a[la_row, t if log_a.shape[1] > 1 else 0, c0:c1]
                for c in range(n):
                    g[c] = grad_hs[row, t, c0 + c] + np.conj(a_next[c]) * g[c]
                    a_t = np.exp(la[c])
                    h_prev = hs[row, t - 1, c0 + c] if t > 0 else h0[row, c0 + c]
                    grad_b[row, t, c0 + c] = g[c]
                    grad_la[row, t, c0 + c] = g[c] * np.conj(a_t * h_prev)
                    a_next[c] = a_t
            for c in range(n):
                grad_h0[row, c0 + c] = np.conj(a_next[c]) * g[c]


# ---------------------------------------------------------------------------- selective scan
CHECKPOINT = 64  # steps between the states the selective scan's forward keeps for backward
SEL_BLOCK = 16  # channels per work item of the selective scan (each carries N states)


def can_selective_scan(u: torch.Tensor, h0: torch.Tensor) -> bool:
    return enabled() and u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64) and h0.dtype == u.dtype


if numba is not None:

    @njit(parallel=True, cache=True)
    def _sel_forward(u, dt, A, B, C, h0, y, ckpt, h_last):  # pragma: no cover - compiled
        Bsz, T, D = u.shape
        N = A.shape[1]
        n_blocks = (D + SEL_BLOCK - 1) // SEL_BLOCK
        for job in prange(Bsz * n_blocks):
            b = job // n_blocks
            d0 = (job % n_blocks) * SEL_BLOCK
            d1 = min(D, d0 + SEL_BLOCK)
            h = h0[b, d0:d1, :].copy()
            for t in range(T):
                if t % CHECKPOINT == 0:
                    ckpt[b, t // CHECKPOINT, d0:d1, :] = h
                for i in range(d1 - d0):
                    d = d0 + i
                    dtu = dt[b, t, d] * u[b, t, d]
                    acc = 0.0
                    for n in range(N):
                        h[i, n] = np.exp(dt[b, t, d] * A[d, n]) * h[i, n] + dtu * B[b, t, n]
                        acc += C[b, t, n] * h[i, n]
                    y[b, t, d] = acc
            h_last[b, d0:d1, :] = h

    @njit(parallel=True, cache=True)
    def _sel_backward(u, dt, A, B, C, ckpt, gy, gh_last, gu, gdt, gA_part, gB_part, gC_part, gh0):  # pragma: no cover
        Bsz, T, D = u.shape
        N = A.shape[1]
        n_blocks = (D + SEL_BLOCK - 1) // SEL_BLOCK
        n_ckpt = (T + CHECKPOINT - 1) // CHECKPOINT
        for job in prange(Bsz * n_blocks):
            b = job // n_blocks
            blk = job % n_blocks
            d0 = blk * SEL_BLOCK
            d1 = min(D, d0 + SEL_BLOCK)
            nd = d1 - d0
            g = gh_last[b, d0:d1, :].copy()  # adjoint of the state after the current step
            a_next = np.ones((nd, N), dtype=u.dtype)  # a_{t+1}; 1 at the end so the last step adds gh_last
            hbuf = np.empty((CHECKPOINT + 1, nd, N), dtype=u.dtype)
            for k in range(n_ckpt - 1, -1, -1):
                s = k * CHECKPOINT
                e = min(T, s + CHECKPOINT)
                hbuf[0] = ckpt[b, k, d0:d1, :]
                for t in range(s, e):  # recompute the chunk's states
                    for i in range(nd):
                        d = d0 + i
                        dtu = dt[b, t, d] * u[b, t, d]
                        for n in range(N):
                            hbuf[t - s + 1, i, n] = np.exp(dt[b, t, d] * A[d, n]) * hbuf[t - s, i, n] + dtu * B[b, t, n]
                for t in range(e - 1, s - 1, -1):
                    for i in range(nd):
                        d = d0 + i
                        dtd, ud, gyd = dt[b, t, d], u[b, t, d], gy[b, t, d]
                        gdt_acc = 0.0
                        gu_acc = 0.0
                        for n in range(N):
                            g[i, n] = gyd * C[b, t, n] + a_next[i, n] * g[i, n]
                            a_t = np.exp(dtd * A[d, n])
                            h_prev = hbuf[t - s, i, n]
                            gC_part[b, blk, t, n] += gyd * hbuf[t - s + 1, i, n]
                            gdt_acc += g[i, n] * (A[d, n] * a_t * h_prev + B[b, t, n] * ud)
                            gA_part[b, d, n] += g[i, n] * dtd * a_t * h_prev
                            gB_part[b, blk, t, n] += g[i, n] * dtd * ud
                            gu_acc += g[i, n] * dtd * B[b, t, n]
                            a_next[i, n] = a_t
                        gdt[b, t, d] = gdt_acc
                        gu[b, t, d] = gu_acc
            for i in range(nd):
                for n in range(N):
                    gh0[b, d0 + i, n] = a_next[i, n] * g[i, n]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0):
        Bsz, T, D = u.shape
        N = A.shape[1]
        y = torch.empty_like(u)
        ckpt = torch.empty(Bsz, (T + CHECKPOINT - 1) // CHECKPOINT, D, N, dtype=u.dtype)
        h_last = torch.empty_like(h0)
        _set_threads()
        _sel_forward(u.numpy(), dt.numpy(), A.numpy(), B.numpy(), C.numpy(), h0.numpy(), y.numpy(), ckpt.numpy(), h_last.numpy())
        ctx.save_for_backward(u, dt, A, B, C, ckpt)
        return y, h_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh_last):
        u, dt, A, B, C, ckpt = ctx.saved_tensors
        Bsz, T, D = u.shape
        N = A.shape[1]
        n_blocks = (D + SEL_BLOCK - 1) // SEL_BLOCK
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()
        gh_last = torch.zeros(Bsz, D, N, dtype=u.dtype) if gh_last is None else gh_last.contiguous()
        gu, gdt, gh0 = torch.empty_like(u), torch.empty_like(u), torch.empty(Bsz, D, N, dtype=u.dtype)
        gA_part = torch.zeros(Bsz, D, N, dtype=u.dtype)
        gB_part = torch.zeros(Bsz, n_blocks, T, N, dtype=u.dtype)
        gC_part = torch.zeros(Bsz, n_blocks, T, N, dtype=u.dtype)
        _set_threads()
        _sel_backward(u.numpy(), dt.numpy(), A.numpy(), B.numpy(), C.numpy(), ckpt.numpy(), gy.numpy(), gh_last.numpy(),
                      gu.numpy(), gdt.numpy(), gA_part.numpy(), gB_part.numpy(), gC_part.numpy(), gh0.numpy())
        return gu, gdt, gA_part.sum(0), gB_part.sum(1), gC_part.sum(1), gh0


def selective_scan(u, dt, A, B, C, h0):
    """(y, h_last) of Mamba's selective scan, compiled for CPU (see recur.ops.selective)."""
    return _SelectiveScan.apply(*(t.contiguous() for t in (u, dt, A, B, C, h0)))


def _set_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _as_3d(t: torch.Tensor, channels: int) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], channels)


class _Scan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, log_a, b, h0):
        # log_a: [Ba, Ta, C] with Ba in {1, B}, Ta in {1, T}; b: [B, T, C]; h0: [B, C] (contiguous)
        out = torch.empty_like(b)
        _set_threads()
        _forward(log_a.numpy(), b.numpy(), h0.numpy(), out.numpy())
        ctx.save_for_backward(log_a, h0, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        log_a, h0, hs = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_b = torch.empty_like(hs)
        grad_la = torch.empty(hs.shape, dtype=hs.dtype)  # per step, complex if the scan is
        grad_h0 = torch.empty_like(h0)
        _set_threads()
        _backward(log_a.numpy(), h0.numpy(), hs.numpy(), grad_out.numpy(), grad_b.numpy(), grad_la.numpy(), grad_h0.numpy())
        if not log_a.is_complex() and grad_la.is_complex():
            grad_la = grad_la.real
        # reduce over the dimensions log_a was broadcast along
        dims = [d for d in (0, 1) if log_a.shape[d] == 1 and hs.shape[d] != 1]
        if dims:
            grad_la = grad_la.sum(dim=dims, keepdim=True)
        return grad_la, grad_b, grad_h0


def scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """All states h [batch, time, *dims] of h_t = exp(log_a_t) h_{t-1} + b_t (compiled, CPU).

    log_a: [batch or 1, time or 1, *dims] (already promoted to b's precision, real or
    complex); b: [batch, time, *dims]; h0: [batch, *dims], b's dtype.
    """
    C = int(np.prod(b.shape[2:])) if b.ndim > 2 else 1
    la = log_a.expand(log_a.shape[0], log_a.shape[1], *b.shape[2:]).reshape(log_a.shape[0], log_a.shape[1], C)
    hs = _Scan.apply(la.contiguous(), _as_3d(b, C).contiguous(), h0.reshape(b.shape[0], C).contiguous())
    return hs.reshape(b.shape)
