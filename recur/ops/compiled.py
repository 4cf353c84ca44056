"""Compiled CPU kernels (numba) for the elementwise recurrences, with PyTorch autograd.

The diagonal scan h_t = exp(log_a_t) * h_{t-1} + b_t is memory-bound: every element is read
once and written once, with one multiply-add in between. A Python loop over time pays the
interpreter and dispatcher per step, and the two-level chunked form in PyTorch makes several
passes over memory. This kernel makes one pass: threads take (batch row, run of channels)
pairs, and each runs the recurrence over time, streaming through its rows (``_block``).

Backward (reverse-mode, the adjoint recurrence), with g_t the gradient reaching h_t:
    g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}
    dL/db_t = g_t,   dL/dlog_a_t = g_t * conj(a_t h_{t-1}),   dL/dh0 = conj(a_0) g_0
(conjugates only for complex tensors: PyTorch's convention for complex gradients).

Also here: Mamba's selective scan (``selective_scan``) and the delta rule's batched unit
lower-triangular solves (``unit_lower_solve``). Every ``exp`` is ``numba_math.fast_exp``, which
LLVM vectorises (numba's own ``np.exp`` is a scalar libm call per element).

Used by ``recur.ops.scan.diagonal_scan`` (and the primitives above) for CPU tensors when numba
is installed (it is a dependency of the package); ``RECUR_COMPILED=0`` in the environment, or
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

    from recur.ops.numba_math import fast_exp, fast_sigmoid, fast_tanh
except ImportError:  # pragma: no cover - exercised only on installs without numba
    numba = None

_ENABLED = os.environ.get("RECUR_COMPILED", "1") not in ("0", "false", "False")
_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def set_enabled(flag: bool) -> None:
    """Turn the compiled kernels on or off (off: every op uses its PyTorch path)."""
    global _ENABLED
    _ENABLED = bool(flag)


def enabled() -> bool:
    return _ENABLED and numba is not None


def can_real(t: torch.Tensor) -> bool:
    """True if the compiled kernels handle t: kernels on, a CPU tensor, float32 or float64."""
    return enabled() and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _dense(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """An incoming gradient as a contiguous array for a kernel; zeros where autograd passed None."""
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _no_decay(rows: int, like: torch.Tensor):
    """The kernels' stand-in for an absent decay: a [rows, 0] array (their ``decayed`` is shape[1] > 0)."""
    return like.new_empty(rows, 0).numpy()


def can_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> bool:
    """True if the compiled scan handles these (already promoted) tensors."""
    return (enabled() and b.device.type == "cpu" and b.dtype in _DTYPES
            and log_a.dtype in (b.dtype, b.real.dtype if b.is_complex() else b.dtype)
            and h0.dtype == b.dtype and b.ndim >= 2)


if numba is not None:

    @njit(cache=True)
    def _work_item(job, n_blocks, block, groups, rep):  # pragma: no cover - compiled
        """(row, first and last group, first and last channel) of work item ``job`` when each
        row's ``groups`` groups of ``rep`` channels are cut into runs of ``block`` groups."""
        row = job // n_blocks
        g0 = (job % n_blocks) * block
        g1 = min(groups, g0 + block)
        return row, g0, g1, g0 * rep, g1 * rep

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


def _block(rows: int, channels: int, cap: int | None = None) -> int:
    """Channels per work item: whole rows when there are enough rows to keep every thread busy
    (each item then streams through contiguous memory, which the prefetcher keeps at memory
    speed: measured 12 ms against 42 ms for 256-channel blocks at [8, 4096, 1024]), otherwise
    rows split into as many equal runs (multiples of 16) as the threads need; at most ``cap``."""
    split = -(-numba.get_num_threads() // rows)
    per_item = max(1, channels)
    if split > 1:
        per_item = -(-channels // split)
        per_item = -(-per_item // 16) * 16
    return per_item if cap is None else min(per_item, cap)


# ---------------------------------------------------------------------------- selective scan
CHECKPOINT = 64  # steps between the states the selective scan's forward keeps for backward
SEL_BLOCK = 256  # at most this many channels per work item of the selective scan (each carries N states)


def can_selective_scan(u: torch.Tensor, h0: torch.Tensor) -> bool:
    return can_real(u) and h0.dtype == u.dtype


# The selective-scan kernels keep states as [N, channels] (A as At [N, D]), so every innermost
# loop runs over a work item's contiguous channels: it vectorises (exp included, see
# numba_math), and y_t = sum_n C_t[n] h_t[n, :] accumulates lane-wise with no horizontal sum
# per channel. Two things decide whether LLVM vectorises such a loop: its trip count (a
# 16-lane loop unrolled 4x needs 64+ channels, hence work items of up to 256 channels) and
# the number of arrays it writes (each pair of arrays that may alias costs a run-time check,
# and past a handful LLVM gives up, hence the backward's one-write-per-loop form).
# Measured at B=1, T=4096, D=1024, N=16: forward 24 ms, backward 73 ms, against 260-480 ms and
# ~1 s for the earlier layout with n innermost.
if numba is not None:

    @njit(parallel=True, cache=True, fastmath={"contract"})
    def _sel_forward(u, dt, At, B, C, h0, y, ckpt, h_last, block):  # pragma: no cover - compiled
        # h0, h_last: [batch, N, D]; ckpt: [batch, n_checkpoints, N, D] (state entering each checkpoint)
        Bsz, T, D = u.shape
        N = At.shape[0]
        n_blocks = (D + block - 1) // block
        for job in prange(Bsz * n_blocks):
            b, d0, d1, _, _ = _work_item(job, n_blocks, block, D, 1)
            nd = d1 - d0
            h = h0[b, :, d0:d1].copy()
            acc = np.empty(nd, dtype=u.dtype)
            dtu = np.empty(nd, dtype=u.dtype)
            for t in range(T):
                if t % CHECKPOINT == 0 and ckpt.shape[1] > 0:  # no checkpoints when no gradient is needed
                    ckpt[b, t // CHECKPOINT, :, d0:d1] = h
                dtt, ut = dt[b, t, d0:d1], u[b, t, d0:d1]
                for i in range(nd):
                    dtu[i] = dtt[i] * ut[i]
                    acc[i] = 0.0
                for n in range(N):
                    bn, cn, An, hn = B[b, t, n], C[b, t, n], At[n, d0:d1], h[n]
                    for i in range(nd):
                        v = fast_exp(dtt[i] * An[i]) * hn[i] + dtu[i] * bn
                        hn[i] = v
                        acc[i] += cn * v
                y[b, t, d0:d1] = acc
            h_last[b, :, d0:d1] = h

    # reassoc: lets the per-step sums over channels (the gradients of B_t and C_t) vectorise.
    @njit(parallel=True, cache=True, fastmath={"contract", "reassoc", "nsz"})
    def _sel_backward(u, dt, At, B, C, ckpt, gy, gh_last, gu, gdt, gAt_part, gB_part, gC_part, gh0, block):  # pragma: no cover
        # Per work item, chunk by chunk from the end: recompute the chunk's states and decays
        # from its checkpoint, then run the adjoint g_t = gy_t C_t + a_{t+1} g_{t+1} backwards:
        #   dL/dC_t[n] = sum_d gy_t[d] h_t[n, d]          dL/dB_t[n] = sum_d g_t[n, d] dt_t[d] u_t[d]
        #   dL/dA[d, n] += g_t a_t h_{t-1} dt_t            dL/du_t[d] = dt_t[d] sum_n g_t[n, d] B_t[n]
        #   dL/ddt_t[d] = sum_n g_t a_t h_{t-1} A[d, n] + u_t[d] sum_n g_t[n, d] B_t[n]
        Bsz, T, D = u.shape
        N = At.shape[0]
        n_blocks = (D + block - 1) // block
        n_ckpt = (T + CHECKPOINT - 1) // CHECKPOINT
        for job in prange(Bsz * n_blocks):
            b, d0, d1, _, _ = _work_item(job, n_blocks, block, D, 1)
            blk = job % n_blocks
            nd = d1 - d0
            g = gh_last[b, :, d0:d1].copy()  # adjoint of the state after the current step
            a_next = np.ones((N, nd), dtype=u.dtype)  # a_{t+1}; 1 at the end so the last step adds gh_last
            hbuf = np.empty((CHECKPOINT + 1, N, nd), dtype=u.dtype)  # h_{s-1} .. h_{e-1}
            abuf = np.empty((CHECKPOINT, N, nd), dtype=u.dtype)  # a_s .. a_{e-1}
            gAt = gAt_part[b, :, d0:d1]
            dtu = np.empty(nd, dtype=u.dtype)
            gah = np.empty(nd, dtype=u.dtype)  # g_t a_t h_{t-1} for one n
            sA = np.empty(nd, dtype=u.dtype)  # sum_n g_t a_t h_{t-1} A[:, n]
            sB = np.empty(nd, dtype=u.dtype)  # sum_n g_t[n] B_t[n]
            for k in range(n_ckpt - 1, -1, -1):
                s = k * CHECKPOINT
                e = min(T, s + CHECKPOINT)
                hbuf[0] = ckpt[b, k, :, d0:d1]
                for t in range(s, e):  # recompute the chunk's states and decays
                    dtt, ut = dt[b, t, d0:d1], u[b, t, d0:d1]
                    for n in range(N):
                        bn, An = B[b, t, n], At[n, d0:d1]
                        h_in, h_out, a_out = hbuf[t - s, n], hbuf[t - s + 1, n], abuf[t - s, n]
                        for i in range(nd):
                            a = fast_exp(dtt[i] * An[i])
                            a_out[i] = a
                            h_out[i] = a * h_in[i] + dtt[i] * ut[i] * bn
                for t in range(e - 1, s - 1, -1):
                    tt = t - s
                    dtt, ut, gyt = dt[b, t, d0:d1], u[b, t, d0:d1], gy[b, t, d0:d1]
                    for i in range(nd):
                        dtu[i] = dtt[i] * ut[i]
                        sA[i] = 0.0
                        sB[i] = 0.0
                    for n in range(N):
                        bn, cn = B[b, t, n], C[b, t, n]
                        gn, an, at, An, gAn = g[n], a_next[n], abuf[tt, n], At[n, d0:d1], gAt[n]
                        h_prev, h_now = hbuf[tt, n], hbuf[tt + 1, n]
                        for i in range(nd):
                            gn[i] = gyt[i] * cn + an[i] * gn[i]
                        for i in range(nd):
                            an[i] = at[i]
                        for i in range(nd):
                            gah[i] = gn[i] * at[i] * h_prev[i]
                        for i in range(nd):
                            sA[i] += gah[i] * An[i]
                        for i in range(nd):
                            gAn[i] += gah[i] * dtt[i]
                        for i in range(nd):
                            sB[i] += gn[i] * bn
                        gc = 0.0
                        gb = 0.0
                        for i in range(nd):
                            gc += gyt[i] * h_now[i]
                            gb += gn[i] * dtu[i]
                        gC_part[b, blk, t, n] = gc
                        gB_part[b, blk, t, n] = gb
                    gdt_t, gu_t = gdt[b, t, d0:d1], gu[b, t, d0:d1]
                    for i in range(nd):
                        gdt_t[i] = sA[i] + sB[i] * ut[i]
                    for i in range(nd):
                        gu_t[i] = sB[i] * dtt[i]
            for n in range(N):
                for i in range(nd):
                    gh0[b, n, d0 + i] = a_next[n, i] * g[n, i]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, dt, A, B, C, h0):
        Bsz, T, D = u.shape
        N = A.shape[1]
        At = A.t().contiguous()
        y = torch.empty_like(u)
        n_ckpt = (T + CHECKPOINT - 1) // CHECKPOINT if any(ctx.needs_input_grad) else 0
        ckpt = torch.empty(Bsz, n_ckpt, N, D, dtype=u.dtype)
        h_last = torch.empty(Bsz, N, D, dtype=u.dtype)
        _set_threads()
        block = _block(Bsz, D, SEL_BLOCK)
        _sel_forward(u.numpy(), dt.numpy(), At.numpy(), B.numpy(), C.numpy(), h0.transpose(1, 2).contiguous().numpy(),
                     y.numpy(), ckpt.numpy(), h_last.numpy(), block)
        ctx.save_for_backward(u, dt, At, B, C, ckpt)
        return y, h_last.transpose(1, 2).contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gh_last):
        u, dt, At, B, C, ckpt = ctx.saved_tensors
        Bsz, T, D = u.shape
        N = At.shape[0]
        _set_threads()
        block = _block(Bsz, D, SEL_BLOCK)
        n_blocks = (D + block - 1) // block
        gy = _dense(gy, u)
        gh_last = torch.zeros(Bsz, N, D, dtype=u.dtype) if gh_last is None else gh_last.transpose(1, 2).contiguous()
        gu, gdt, gh0 = torch.empty_like(u), torch.empty_like(u), torch.empty(Bsz, N, D, dtype=u.dtype)
        gAt_part = torch.zeros(Bsz, N, D, dtype=u.dtype)
        gB_part = torch.empty(Bsz, n_blocks, T, N, dtype=u.dtype)
        gC_part = torch.empty(Bsz, n_blocks, T, N, dtype=u.dtype)
        _sel_backward(u.numpy(), dt.numpy(), At.numpy(), B.numpy(), C.numpy(), ckpt.numpy(), gy.numpy(), gh_last.numpy(),
                      gu.numpy(), gdt.numpy(), gAt_part.numpy(), gB_part.numpy(), gC_part.numpy(), gh0.numpy(), block)
        return gu, gdt, gAt_part.sum(0).t(), gB_part.sum(1), gC_part.sum(1), gh0.transpose(1, 2)


def selective_scan(u, dt, A, B, C, h0):
    """(y, h_last) of Mamba's selective scan, compiled for CPU (see recur.ops.selective)."""
    return _SelectiveScan.apply(*(t.contiguous() for t in (u, dt, A, B, C, h0)))


def _set_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


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


# -------------------------------------------------------------- unit lower-triangular solves
# X = (I + L)^{-1} R for a batch of small systems, L strictly lower triangular (its diagonal and
# upper part are ignored): the delta rule's UT transform within each chunk. By forward
# substitution, row by row, X_i = R_i - sum_{j<i} L_ij X_j, each row an axpy over the
# right-hand sides' columns (vectorised); no copies to LAPACK's column-major layout. Backward,
# with G the gradient reaching X:  dR = (I + L)^{-T} G  (back substitution with L^T) and
# dL = -strict_lower(dR X^T).
def can_tri_solve(L: torch.Tensor, R: torch.Tensor) -> bool:
    return can_real(R) and L.dtype == R.dtype


if numba is not None:

    @njit(parallel=True, cache=True, fastmath={"contract"})
    def _lower_solve(L, R, X):  # pragma: no cover - compiled
        M, C, D = R.shape
        for m in prange(M):
            for i in range(C):
                xi, ri = X[m, i], R[m, i]
                for d in range(D):
                    xi[d] = ri[d]
                for j in range(i):
                    lij, xj = L[m, i, j], X[m, j]
                    for d in range(D):
                        xi[d] -= lij * xj[d]

    @njit(parallel=True, cache=True, fastmath={"contract"})
    def _upper_solve_transposed(L, G, Y):  # pragma: no cover - compiled
        # Y = (I + L)^{-T} G: back substitution, Y_i = G_i - sum_{j>i} L_ji Y_j
        M, C, D = G.shape
        for m in prange(M):
            for i in range(C - 1, -1, -1):
                yi, gi = Y[m, i], G[m, i]
                for d in range(D):
                    yi[d] = gi[d]
                for j in range(i + 1, C):
                    lji, yj = L[m, j, i], Y[m, j]
                    for d in range(D):
                        yi[d] -= lji * yj[d]


class _UnitLowerSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, L, R):
        X = torch.empty_like(R)
        _set_threads()
        _lower_solve(L.numpy(), R.numpy(), X.numpy())
        ctx.save_for_backward(L, X)
        return X

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, G):
        L, X = ctx.saved_tensors
        dR = torch.empty_like(X)
        _set_threads()
        _upper_solve_transposed(L.numpy(), G.contiguous().numpy(), dR.numpy())
        dL = torch.bmm(dR, X.transpose(1, 2)).tril_(-1).neg_() if ctx.needs_input_grad[0] else None
        return dL, dR


def unit_lower_solve(L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(I + strict_lower(L))^{-1} R for L [..., C, C] and R [..., C, D] (compiled, CPU)."""
    batch = R.shape[:-2]
    L3 = L.expand(*batch, *L.shape[-2:]).reshape(-1, *L.shape[-2:]).contiguous()
    X = _UnitLowerSolve.apply(L3, R.reshape(-1, *R.shape[-2:]).contiguous())
    return X.reshape(R.shape)


# ------------------------------------------------------------------ delta-rule chunk masks
# The delta rule's chunk form (recur.ops.delta) weighs the C x C blocks KK = K K^T and QK = Q K^T
# of each chunk by beta and by the decays D_ij = e^{g_i - g_j} (g the cumulative log decay):
#     A_ij = beta_i KK_ij D_ij  (j < i),     P_ij = QK_ij D_ij  (j <= i),     0 elsewhere.
# In PyTorch that is six passes over [.., C, C] tensors forward (the differences, the mask, the
# exp, the products, the triangle) and about fifteen backward; here it is one pass each way.
# Backward, with dA and dP the gradients reaching A and P (D = 1 without decay):
#     dKK_ij = dA_ij beta_i D_ij (j < i),    dQK_ij = dP_ij D_ij (j <= i),
#     dbeta_i = sum_j dA_ij KK_ij D_ij,
#     X_ij = dKK_ij KK_ij + dQK_ij QK_ij  (each term's derivative in g_i - g_j is the term itself),
#     dg_i = sum_j X_ij - sum_j X_ji.
if numba is not None:

    @njit(cache=True, error_model="numpy", fastmath={"contract"}, inline="always")
    def _decay_row(g, i, decayed, D):  # pragma: no cover - compiled
        # D[j] = e^{g_i - g_j} for j <= i (1 without decay); D[j] for j > i is left alone
        if decayed:
            for j in range(i + 1):
                D[j] = fast_exp(g[i] - g[j])
        else:
            for j in range(i + 1):
                D[j] = 1.0

    @njit(cache=True, error_model="numpy", fastmath={"contract"}, inline="always")
    def _mask_row(b, x, y, D, i, out_x, out_y):  # pragma: no cover - compiled
        # row i of strict_lower(b x D) and lower(y D); one store per loop, every loop from 0:
        # the forms LLVM vectorises
        C = x.shape[0]
        for j in range(i):
            out_x[j] = b * x[j] * D[j]
        for j in range(C - i):
            out_x[i + j] = 0.0
        for j in range(i + 1):
            out_y[j] = y[j] * D[j]
        for j in range(C - i - 1):
            out_y[i + 1 + j] = 0.0

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract"})
    def _delta_masks(KK, QK, g, beta, A, P):  # pragma: no cover - compiled
        M, C, _ = KK.shape
        decayed = g.shape[1] > 0
        for m in prange(M):
            D = np.empty(C, dtype=KK.dtype)
            for i in range(C):
                _decay_row(g[m], i, decayed, D)
                _mask_row(beta[m, i], KK[m, i], QK[m, i], D, i, A[m, i], P[m, i])

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})
    def _delta_masks_backward(KK, QK, g, beta, dA, dP, dKK, dQK, dg, dbeta):  # pragma: no cover - compiled
        M, C, _ = KK.shape
        decayed = g.shape[1] > 0
        zero = np.zeros(1, dtype=KK.dtype)[0]
        for m in prange(M):
            D = np.empty(C, dtype=KK.dtype)
            X = np.empty(C, dtype=KK.dtype)
            col = np.zeros(C, dtype=KK.dtype)  # sum_i X_ij
            for i in range(C):
                _decay_row(g[m], i, decayed, D)
                b, kk, qk, da, dp, dkk, dqk = beta[m, i], KK[m, i], QK[m, i], dA[m, i], dP[m, i], dKK[m, i], dQK[m, i]
                _mask_row(b, da, dp, D, i, dkk, dqk)  # dKK, dQK: the same masks and scalings
                db = zero
                for j in range(i):
                    db += da[j] * kk[j] * D[j]
                dbeta[m, i] = db
                for j in range(i + 1):
                    X[j] = dkk[j] * kk[j] + dqk[j] * qk[j]
                row = zero
                for j in range(i + 1):
                    row += X[j]
                dg[m, i] = row
                for j in range(i + 1):
                    col[j] += X[j]
            for i in range(C):
                dg[m, i] -= col[i]


class _DeltaMasks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, KK, QK, g, beta):
        A, P = torch.empty_like(KK), torch.empty_like(QK)
        g_np = _no_decay(KK.shape[0], KK) if g is None else g.numpy()
        _set_threads()
        _delta_masks(KK.numpy(), QK.numpy(), g_np, beta.numpy(), A.numpy(), P.numpy())
        ctx.save_for_backward(KK, QK, beta, *(() if g is None else (g,)))
        return A, P

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA, dP):
        KK, QK, beta, *g = ctx.saved_tensors
        dA, dP = _dense(dA, KK), _dense(dP, QK)
        dKK, dQK = torch.empty_like(KK), torch.empty_like(QK)
        dg, dbeta = torch.empty_like(beta), torch.empty_like(beta)
        g_np = _no_decay(KK.shape[0], KK) if not g else g[0].numpy()
        _set_threads()
        _delta_masks_backward(KK.numpy(), QK.numpy(), g_np, beta.numpy(), dA.numpy(), dP.numpy(),
                              dKK.numpy(), dQK.numpy(), dg.numpy(), dbeta.numpy())
        return dKK, dQK, (dg if g else None), dbeta


def delta_masks(KK: torch.Tensor, QK: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor):
    """(A, P) of the delta rule's chunk form (see above) for KK, QK [..., C, C], g (cumulative
    log decay, or None: no decay) and beta [..., C]; compiled, CPU."""
    C = KK.shape[-1]
    A, P = _DeltaMasks.apply(KK.reshape(-1, C, C).contiguous(), QK.reshape(-1, C, C).contiguous(),
                             None if g is None else g.reshape(-1, C).contiguous(), beta.reshape(-1, C).contiguous())
    return A.view(KK.shape), P.view(QK.shape)


# ------------------------------------------------------------- delta-rule chunk inputs
# The per-position scalings of the delta rule's chunk form, for g the cumulative log decay
# within each chunk (ending at g_last):
#     Rw_i = beta_i e^{g_i} k_i,   Rv_i = beta_i v_i,   Qd_i = e^{g_i} q_i,   Kd_i = e^{g_last - g_i} k_i,
#     cd = e^{g_last}                       (without decay: Rw_i = beta_i k_i and Rv_i only)
# Backward, with <.,.> over the feature dim:
#     dq_i = e^{g_i} dQd_i,   dk_i = beta_i e^{g_i} dRw_i + e^{g_last - g_i} dKd_i,   dv_i = beta_i dRv_i,
#     dbeta_i = e^{g_i} <dRw_i, k_i> + <dRv_i, v_i>,
#     dg_i = e^{g_i} (beta_i <dRw_i, k_i> + <dQd_i, q_i>) - e^{g_last - g_i} <dKd_i, k_i>,
#     dg_last += sum_i e^{g_last - g_i} <dKd_i, k_i> + e^{g_last} dcd.
# One pass each way instead of about 6 PyTorch ops forward and 20 backward (measured at
# B=4 H=4 T=4096 d=64: 12 ms forward and 43 ms forward+backward in PyTorch).
if numba is not None:

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract"})
    def _delta_inputs(q, k, v, beta, g, Rw, Rv, Qd, Kd, cd):  # pragma: no cover - compiled
        M, C, Dk = k.shape
        Dv = v.shape[2]
        decayed = g.shape[1] > 0
        one = np.ones(1, dtype=k.dtype)[0]
        for m in prange(M):
            for i in range(C):
                b = beta[m, i]
                eg = fast_exp(g[m, i]) if decayed else one
                bw = b * eg
                ki, rw = k[m, i], Rw[m, i]
                for j in range(Dk):
                    rw[j] = bw * ki[j]
                vi, rv = v[m, i], Rv[m, i]
                for j in range(Dv):
                    rv[j] = b * vi[j]
                if decayed:
                    er = fast_exp(g[m, C - 1] - g[m, i])
                    qi, qd, kd = q[m, i], Qd[m, i], Kd[m, i]
                    for j in range(Dk):
                        qd[j] = eg * qi[j]
                    for j in range(Dk):
                        kd[j] = er * ki[j]
            if decayed:
                cd[m] = fast_exp(g[m, C - 1])

    @njit(cache=True, fastmath={"contract", "reassoc"}, inline="always")
    def _dot(a, b):  # pragma: no cover - compiled
        acc = np.zeros(1, dtype=a.dtype)[0]
        for j in range(a.shape[0]):
            acc += a[j] * b[j]
        return acc

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})
    def _delta_inputs_backward(q, k, v, beta, g, dRw, dRv, dQd, dKd, dcd, dq, dk, dv, dbeta, dg):  # pragma: no cover - compiled
        M, C, Dk = k.shape
        Dv = v.shape[2]
        decayed = g.shape[1] > 0
        zero = np.zeros(1, dtype=k.dtype)[0]
        for m in prange(M):
            last = zero  # sum_i e^{g_last - g_i} <dKd_i, k_i>
            for i in range(C):
                b = beta[m, i]
                ki, dki, drw = k[m, i], dk[m, i], dRw[m, i]
                vi, dvi, drv = v[m, i], dv[m, i], dRv[m, i]
                rwk, rvv = _dot(drw, ki), _dot(drv, vi)
                for j in range(Dv):
                    dvi[j] = b * drv[j]
                if decayed:
                    eg = fast_exp(g[m, i])
                    er = fast_exp(g[m, C - 1] - g[m, i])
                    qi, dqi, dqd, dkd = q[m, i], dq[m, i], dQd[m, i], dKd[m, i]
                    qq, kk = _dot(dqd, qi), _dot(dkd, ki)
                    for j in range(Dk):
                        dqi[j] = eg * dqd[j]
                    bw = b * eg
                    for j in range(Dk):
                        dki[j] = bw * drw[j] + er * dkd[j]
                    dbeta[m, i] = eg * rwk + rvv
                    dg[m, i] = eg * (b * rwk + qq) - er * kk
                    last += er * kk
                else:
                    for j in range(Dk):
                        dki[j] = b * drw[j]
                    dbeta[m, i] = rwk + rvv
            if decayed:
                dg[m, C - 1] += last + fast_exp(g[m, C - 1]) * dcd[m]


class _DeltaInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g):
        decayed = g is not None
        Rw, Rv = torch.empty_like(k), torch.empty_like(v)
        Qd, Kd = (torch.empty_like(q), torch.empty_like(k)) if decayed else (k[:0], k[:0])
        cd = beta.new_empty(beta.shape[0]) if decayed else beta[:0, 0]
        g_np = g.numpy() if decayed else _no_decay(beta.shape[0], beta)
        _set_threads()
        _delta_inputs(q.numpy(), k.numpy(), v.numpy(), beta.numpy(), g_np, Rw.numpy(), Rv.numpy(), Qd.numpy(),
                      Kd.numpy(), cd.numpy())
        ctx.save_for_backward(q, k, v, beta, *((g,) if decayed else ()))
        return (Rw, Rv, Qd, Kd, cd) if decayed else (Rw, Rv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dRw, dRv, *decay_grads):
        q, k, v, beta, *g = ctx.saved_tensors
        dRw, dRv = _dense(dRw, k), _dense(dRv, v)
        if g:
            dQd, dKd, dcd = _dense(decay_grads[0], q), _dense(decay_grads[1], k), _dense(decay_grads[2], beta[:, 0])
            dq, dg, g_np = torch.empty_like(q), torch.empty_like(beta), g[0].numpy()
        else:
            dQd = dKd = k[:0]
            dcd, dq, dg, g_np = beta[:0, 0], k[:0], beta[:0], _no_decay(beta.shape[0], beta)
        dk, dv, dbeta = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta)
        _set_threads()
        _delta_inputs_backward(q.numpy(), k.numpy(), v.numpy(), beta.numpy(), g_np, dRw.numpy(), dRv.numpy(),
                               dQd.numpy(), dKd.numpy(), dcd.numpy(), dq.numpy(), dk.numpy(), dv.numpy(),
                               dbeta.numpy(), dg.numpy())
        return (dq if g else None), dk, dv, dbeta, (dg if g else None)


def delta_inputs(q, k, v, beta, g):
    """(Rw, Rv, Qd, Kd, cd) of the delta rule's chunk form (see above) for q, k [..., C, d_k],
    v [..., C, d_v], beta and g (cumulative log decay) [..., C]; (Rw, Rv) when g is None.
    Compiled, CPU."""
    lead, C = k.shape[:-2], k.shape[-2]
    flat = lambda t: t.reshape(-1, *t.shape[len(lead):]).contiguous()  # noqa: E731
    outs = _DeltaInputs.apply(flat(q), flat(k), flat(v), flat(beta), None if g is None else flat(g))
    shapes = (k.shape, v.shape, q.shape, k.shape, lead)
    return tuple(o.view(s) for o, s in zip(outs, shapes))


# ---------------------------------------------------- gated linear attention chunk decays
# GLA's chunk form with per-dimension decays factored through the chunk start (recur.ops.gated):
# with c_i = sum_{j<=i} g_j the chunk's cumulative log decay (per key dimension), cq_i = c_i, or
# c_{i-1} (c_{-1} = 0) when the output reads the state before the update, and c_last = c_{C-1}:
#     Qd_i = q_i e^{cq_i},   Ki_i = k_i e^{-c_i},   Ke_i = k_i e^{c_last - c_i}   (and c_last)
# Backward, elementwise per dimension, with dc_i the gradient reaching c_i and dg_i = sum_{i'>=i} dc_i':
#     dq_i = dQd_i e^{cq_i},   dk_i = dKi_i e^{-c_i} + dKe_i e^{c_last - c_i},
#     dc_i = -dKi_i Ki_i - dKe_i Ke_i  (+ dQd_i Qd_i to c_i, or dQd_{i+1} Qd_{i+1} when reading before),
#     dc_last = dclast + sum_i dKe_i Ke_i.
# One pass each way in place of the cumulative sum, the exps, the products and their backward.
if numba is not None:

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract"})
    def _gla_decays(q, k, g, before, Qd, Ki, Ke, c_last):  # pragma: no cover - compiled
        # c accumulates in float64, as torch.cumsum does for float32 on CPU: near the factoring
        # limit e^{-c} magnifies the error of a float32 running sum (2.5x less accurate outputs)
        M, C, D = k.shape
        for m in prange(M):
            acc = np.zeros(D, dtype=np.float64)
            c = np.zeros(D, dtype=k.dtype)  # acc rounded
            e = np.ones(D, dtype=k.dtype)  # e^{c}: of the previous step until updated
            for i in range(C):
                qi, ki, gi, qd, kin = q[m, i], k[m, i], g[m, i], Qd[m, i], Ki[m, i]
                if before:  # e^{c_{i-1}}, from the previous step (e^0 = 1 at the chunk start)
                    for j in range(D):
                        qd[j] = qi[j] * e[j]
                for j in range(D):
                    acc[j] += gi[j]
                for j in range(D):
                    c[j] = acc[j]
                for j in range(D):
                    e[j] = fast_exp(c[j])
                if not before:
                    for j in range(D):
                        qd[j] = qi[j] * e[j]
                for j in range(D):
                    kin[j] = ki[j] / e[j]
            cl = c_last[m]
            for j in range(D):
                cl[j] = c[j]
            for i in range(C):  # e is e^{c_last} now
                kin, ke = Ki[m, i], Ke[m, i]
                for j in range(D):
                    ke[j] = kin[j] * e[j]

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract"})
    def _gla_decays_backward(q, k, g, before, dQd, dKi, dKe, dcl, dq, dk, dg):  # pragma: no cover - compiled
        # the sums over positions (c, and the reverse sum giving dg) accumulate in float64
        M, C, D = k.shape
        one = np.ones(1, dtype=k.dtype)[0]
        for m in prange(M):
            ecs = np.empty((C, D), dtype=k.dtype)  # e^{c_i}, each exp taken once
            acc = np.zeros(D, dtype=np.float64)
            c = np.empty(D, dtype=k.dtype)
            for i in range(C):
                gi, ei = g[m, i], ecs[i]
                for j in range(D):
                    acc[j] += gi[j]
                for j in range(D):
                    c[j] = acc[j]
                for j in range(D):
                    ei[j] = fast_exp(c[j])
            ecl = ecs[C - 1]
            last = np.zeros(D, dtype=np.float64)  # the gradient reaching c_last
            for j in range(D):
                last[j] = dcl[m, j]
            for i in range(C):
                ki, dke, ei = k[m, i], dKe[m, i], ecs[i]
                for j in range(D):
                    last[j] += dke[j] * ki[j] * ecl[j] / ei[j]
            r = np.zeros(D, dtype=np.float64)  # sum over i' >= i of dc_i'
            einv = np.empty(D, dtype=k.dtype)
            for i in range(C - 1, -1, -1):
                qi, ki, ei, dqd, dki, dke = q[m, i], k[m, i], ecs[i], dQd[m, i], dKi[m, i], dKe[m, i]
                dqi, dkk, dgi = dq[m, i], dk[m, i], dg[m, i]
                for j in range(D):
                    einv[j] = one / ei[j]
                for j in range(D):  # the keys' terms (Ki_i = k_i e^{-c_i}, Ke_i = Ki_i e^{c_last})
                    r[j] -= (dki[j] + dke[j] * ecl[j]) * ki[j] * einv[j]
                for j in range(D):
                    dkk[j] = (dki[j] + dke[j] * ecl[j]) * einv[j]
                if before:  # Qd_{i+1} = q_{i+1} e^{c_i}; Qd_i = q_i e^{c_{i-1}}
                    if i + 1 < C:
                        qn, dqn = q[m, i + 1], dQd[m, i + 1]
                        for j in range(D):
                            r[j] += dqn[j] * qn[j] * ei[j]
                    if i > 0:
                        ep = ecs[i - 1]
                        for j in range(D):
                            dqi[j] = dqd[j] * ep[j]
                    else:
                        for j in range(D):
                            dqi[j] = dqd[j]
                else:
                    for j in range(D):
                        r[j] += dqd[j] * qi[j] * ei[j]
                    for j in range(D):
                        dqi[j] = dqd[j] * ei[j]
                if i == C - 1:
                    for j in range(D):
                        r[j] += last[j]
                for j in range(D):
                    dgi[j] = r[j]


class _GLADecays(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, g, before):
        Qd, Ki, Ke = torch.empty_like(q), torch.empty_like(k), torch.empty_like(k)
        c_last = k.new_empty(k.shape[0], k.shape[2])
        _set_threads()
        _gla_decays(q.numpy(), k.numpy(), g.numpy(), before, Qd.numpy(), Ki.numpy(), Ke.numpy(), c_last.numpy())
        ctx.save_for_backward(q, k, g)
        ctx.before = before
        return Qd, Ki, Ke, c_last

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dQd, dKi, dKe, dcl):
        q, k, g = ctx.saved_tensors
        dQd, dKi, dKe = _dense(dQd, q), _dense(dKi, k), _dense(dKe, k)
        dcl = _dense(dcl, k[:, 0])
        dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
        _set_threads()
        _gla_decays_backward(q.numpy(), k.numpy(), g.numpy(), ctx.before, dQd.numpy(), dKi.numpy(), dKe.numpy(),
                             dcl.numpy(), dq.numpy(), dk.numpy(), dg.numpy())
        return dq, dk, dg, None


def gla_decays(q, k, g, before: bool):
    """(Qd, Ki, Ke, c_last) of GLA's factored chunk form (see above) for q, k, g [..., C, d_k];
    c_last [..., 1, d_k]. Compiled, CPU."""
    lead = k.shape[:-2]
    flat = lambda t: t.reshape(-1, *t.shape[-2:]).contiguous()  # noqa: E731
    Qd, Ki, Ke, c_last = _GLADecays.apply(flat(q), flat(k), flat(g), bool(before))
    return Qd.view(q.shape), Ki.view(k.shape), Ke.view(k.shape), c_last.view(*lead, 1, k.shape[-1])


# -------------------------------------------------------------------------- LSTM / GRU gates
# The elementwise part of one LSTM or GRU step (recur.ops.cells), forward and backward, on
# [rows, gates * d] slices (rows = streams x batch): one call in place of 8-14 PyTorch ops,
# each of which costs more in dispatch than the arithmetic at these sizes. The recurrent
# matmul stays in torch (oneDNN / MKL). Single-threaded: a step is ~16k elements.
#
# Written for LLVM's vectoriser (measured at B=16, d=256: 12 us a step instead of 32): every
# inner loop runs j over range(n) from 0, with gate offsets in the index (a loop over
# range(2d, 3d) stayed scalar), and stores into one array; a loop that reads one gate of a row
# and writes another gate of the same row is not vectorised, so such values go through
# another array first.
if numba is not None:

    # Each kernel takes whole [time, rows, .] arrays and the step t: indexing in Python (and
    # converting a slice per argument) cost more per step than the arithmetic.
    @njit(cache=True, error_model="numpy", fastmath={"contract"})
    def lstm_step(v, gates, cs, hs, t):  # pragma: no cover - compiled
        # gates[t] holds u[t] (input projections); adds v = h_{t-1} W_hh^T and activates in place
        # (i, f, g, o); writes cs[t + 1], hs[t + 1]
        a_t, c_prev, c_new, h_new = gates[t], cs[t], cs[t + 1], hs[t + 1]
        R, G = a_t.shape
        d = G // 4
        for r in range(R):
            vr, ar, cp, cn, hn = v[r], a_t[r], c_prev[r], c_new[r], h_new[r]
            for j in range(2 * d):
                ar[j] = fast_sigmoid(ar[j] + vr[j])
            for j in range(d):
                ar[2 * d + j] = fast_tanh(ar[2 * d + j] + vr[2 * d + j])
            for j in range(d):
                ar[3 * d + j] = fast_sigmoid(ar[3 * d + j] + vr[3 * d + j])
            for j in range(d):
                cn[j] = ar[d + j] * cp[j] + ar[j] * ar[2 * d + j]
            for j in range(d):
                hn[j] = ar[3 * d + j] * fast_tanh(cn[j])

    @njit(cache=True, error_model="numpy", fastmath={"contract"})
    def lstm_step_backward(gates, cs, gy, dh, dc, dgates, t):  # pragma: no cover - compiled
        # dh [rows, d] in: the gradient reaching h_t from step t+1 (gy[t], or gy[0] = zeros, the
        # output's is added in place); dc in/out: the gradient reaching c_t, then c_{t-1};
        # writes dgates[t]
        a_t, c_prev, c_new, g_t, dg_t = gates[t], cs[t], cs[t + 1], gy[min(t, gy.shape[0] - 1)], dgates[t]
        R, G = a_t.shape
        d = G // 4
        one = np.ones(1, dtype=gates.dtype)[0]
        for r in range(R):
            ar, cp, cn, g_out, dhr, dcr, dgr = a_t[r], c_prev[r], c_new[r], g_t[r], dh[r], dc[r], dg_t[r]
            for j in range(d):
                dhr[j] += g_out[j]
            for j in range(d):
                tc = fast_tanh(cn[j])
                dcr[j] += dhr[j] * ar[3 * d + j] * (one - tc * tc)
            for j in range(d):
                dgr[j] = dcr[j] * ar[2 * d + j] * ar[j] * (one - ar[j])
            for j in range(d):
                dgr[d + j] = dcr[j] * cp[j] * ar[d + j] * (one - ar[d + j])
            for j in range(d):
                dgr[2 * d + j] = dcr[j] * ar[j] * (one - ar[2 * d + j] * ar[2 * d + j])
            for j in range(d):
                dgr[3 * d + j] = dhr[j] * fast_tanh(cn[j]) * ar[3 * d + j] * (one - ar[3 * d + j])
            for j in range(d):
                dcr[j] *= ar[d + j]

    @njit(cache=True, error_model="numpy", fastmath={"contract"})
    def gru_step(v, gates, vn, hs, t):  # pragma: no cover - compiled
        # gates[t] holds u[t] = W_ih x_t + b_ih; with v = W_hh h_{t-1} + b_hh [rows, 3d], activates
        # it in place (r, z, n); writes vn[t] (v's n part, which r scales) and hs[t + 1]
        h_prev, a_t, vn_t, h_new = hs[t], gates[t], vn[t], hs[t + 1]
        R, G = a_t.shape
        d = G // 3
        for r in range(R):
            vr, hp, ar, vnr, hn = v[r], h_prev[r], a_t[r], vn_t[r], h_new[r]
            for j in range(2 * d):
                ar[j] = fast_sigmoid(ar[j] + vr[j])
            for j in range(d):
                vnr[j] = vr[2 * d + j]
            for j in range(d):  # n goes through h_new: it reads r from the same row of gates
                hn[j] = fast_tanh(ar[2 * d + j] + ar[j] * vnr[j])
            for j in range(d):
                ar[2 * d + j] = hn[j]
            for j in range(d):
                hn[j] = hn[j] + ar[d + j] * (hp[j] - hn[j])

    @njit(cache=True, error_model="numpy", fastmath={"contract"})
    def gru_step_backward(gates, vn, hs, gy, dh, du, dv, dhz, t):  # pragma: no cover - compiled
        # writes du[t] = d(pre-activations of u), dv[t] = d(v) and dhz = (dh + gy[t]) z, the
        # direct path to h_{t-1}
        a_t, vn_t, h_prev, g_t, du_t, dv_t = gates[t], vn[t], hs[t], gy[min(t, gy.shape[0] - 1)], du[t], dv[t]
        R, G = a_t.shape
        d = G // 3
        one = np.ones(1, dtype=gates.dtype)[0]
        for r in range(R):
            ar, vnr, hp, g_out, dhr, dur, dvr, dhzr = a_t[r], vn_t[r], h_prev[r], g_t[r], dh[r], du_t[r], dv_t[r], dhz[r]
            for j in range(d):
                rr, z, n = ar[j], ar[d + j], ar[2 * d + j]
                dh_j = dhr[j] + g_out[j]
                dn = dh_j * (one - z) * (one - n * n)
                dz = dh_j * (hp[j] - n) * z * (one - z)
                dr = dn * vnr[j] * rr * (one - rr)
                dur[j] = dr
                dur[d + j] = dz
                dur[2 * d + j] = dn
                dvr[j] = dr
                dvr[d + j] = dz
                dvr[2 * d + j] = dn * rr
                dhzr[j] = dh_j * z
