"""Compiled CPU kernels (numba) for the delta rule's chunk form, with PyTorch autograd.

Three steps of the chunk form (recur.ops.delta), each on a batch of small per-chunk blocks:

* ``unit_lower_solve``: X = (I + L)^{-1} R, L strictly lower triangular (the UT transform
  within each chunk), by forward substitution, and its backward by back substitution;
* ``delta_masks``: the C x C blocks K K^T and Q K^T weighed by beta and by the decays
  e^{g_i - g_j}, masked to their lower triangles;
* ``delta_inputs``: the per-position scalings (the solves' right-hand sides, the decayed
  queries and keys, the chunk decay).

Compiled because each is elementwise work over small blocks: the solve avoids LAPACK's batched
solve and its copies to column-major (3x faster here), and the masks and scalings are one pass
each way instead of 6-20 PyTorch ops. The formulas, forward and backward, head each section.

Used by ``recur.ops.delta`` for CPU tensors (see ``recur.ops.kernels`` for the switch); the
PyTorch ops are the fallback.
"""

from __future__ import annotations

import numpy as np
import torch

from recur.ops.kernels import _dense, _set_threads, can_real, numba

if numba is not None:  # numba is a declared dependency; without it only the PyTorch path runs
    from numba import njit, prange

    from recur.ops.numba_math import fast_exp


def _no_decay(rows: int, like: torch.Tensor):
    """The kernels' stand-in for an absent decay: a [rows, 0] array (their ``decayed`` is shape[1] > 0)."""
    return like.new_empty(rows, 0).numpy()


def _resets(n: torch.Tensor | None, rows: int):
    """The kernels' count of resets [rows, C] (int32), or a [rows, 0] stand-in when there is none."""
    return torch.empty(rows, 0, dtype=torch.int32).numpy() if n is None else n.numpy()


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
# With resets (recur.ops.scan.reset_cumsum: g skips them, n counts them), D_ij = 0 for j before
# the last reset s_i <= i: each row's decays start at s_i (0 without a reset in the chunk).
# In PyTorch that is six passes over [.., C, C] tensors forward (the differences, the mask, the
# exp, the products, the triangle) and about fifteen backward; here it is one pass each way.
# Backward, with dA and dP the gradients reaching A and P (D = 1 without decay):
#     dKK_ij = dA_ij beta_i D_ij (j < i),    dQK_ij = dP_ij D_ij (j <= i),
#     dbeta_i = sum_j dA_ij KK_ij D_ij,
#     X_ij = dKK_ij KK_ij + dQK_ij QK_ij  (each term's derivative in g_i - g_j is the term itself),
#     dg_i = sum_j X_ij - sum_j X_ji.
if numba is not None:

    @njit(cache=True, error_model="numpy", fastmath={"contract"}, inline="always")
    def _decay_row(g, i, s, decayed, D):  # pragma: no cover - compiled
        # D[j] = e^{g_i - g_j} for s <= j <= i, 0 for j < s (a reset at s); 1 without decay;
        # D[j] for j > i is left alone
        if decayed:
            for j in range(s):
                D[j] = 0.0
            for j in range(i + 1 - s):
                D[s + j] = fast_exp(g[i] - g[s + j])
        else:
            for j in range(i + 1):
                D[j] = 1.0

    @njit(cache=True, inline="always")
    def _segment_start(n, i, s):  # pragma: no cover - compiled
        # the last reset at or before step i, given s, the one at or before step i - 1 (0: none)
        if n.shape[0] > 0 and n[i] != (n[i - 1] if i > 0 else 0):
            return i
        return s

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
    def _delta_masks(KK, QK, g, n, beta, A, P):  # pragma: no cover - compiled
        M, C, _ = KK.shape
        decayed = g.shape[1] > 0
        for m in prange(M):
            D = np.empty(C, dtype=KK.dtype)
            s = 0
            for i in range(C):
                s = _segment_start(n[m], i, s)
                _decay_row(g[m], i, s, decayed, D)
                _mask_row(beta[m, i], KK[m, i], QK[m, i], D, i, A[m, i], P[m, i])

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})
    def _delta_masks_backward(KK, QK, g, n, beta, dA, dP, dKK, dQK, dg, dbeta):  # pragma: no cover - compiled
        M, C, _ = KK.shape
        decayed = g.shape[1] > 0
        zero = np.zeros(1, dtype=KK.dtype)[0]
        for m in prange(M):
            D = np.empty(C, dtype=KK.dtype)
            X = np.empty(C, dtype=KK.dtype)
            col = np.zeros(C, dtype=KK.dtype)  # sum_i X_ij
            s = 0
            for i in range(C):
                s = _segment_start(n[m], i, s)
                _decay_row(g[m], i, s, decayed, D)
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
    def forward(ctx, KK, QK, g, beta, n):
        A, P = torch.empty_like(KK), torch.empty_like(QK)
        g_np = _no_decay(KK.shape[0], KK) if g is None else g.numpy()
        _set_threads()
        _delta_masks(KK.numpy(), QK.numpy(), g_np, _resets(n, KK.shape[0]), beta.numpy(), A.numpy(), P.numpy())
        ctx.save_for_backward(KK, QK, beta, *(() if g is None else (g,)))
        ctx.n = n
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
        _delta_masks_backward(KK.numpy(), QK.numpy(), g_np, _resets(ctx.n, KK.shape[0]), beta.numpy(), dA.numpy(),
                              dP.numpy(), dKK.numpy(), dQK.numpy(), dg.numpy(), dbeta.numpy())
        return dKK, dQK, (dg if g else None), dbeta, None


def delta_masks(KK: torch.Tensor, QK: torch.Tensor, g: torch.Tensor | None, beta: torch.Tensor,
                n: torch.Tensor | None = None):
    """(A, P) of the delta rule's chunk form (see above) for KK, QK [..., C, C], g (cumulative
    log decay, or None: no decay), beta [..., C] and n, g's count of resets [..., C] (None: no
    reset; see ``recur.ops.scan.reset_cumsum``); compiled, CPU."""
    C = KK.shape[-1]
    flat = lambda t: None if t is None else t.reshape(-1, C).contiguous()  # noqa: E731
    A, P = _DeltaMasks.apply(KK.reshape(-1, C, C).contiguous(), QK.reshape(-1, C, C).contiguous(),
                             flat(g), flat(beta), None if g is None else flat(n))
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
# With resets (n counts them, g skips them: recur.ops.scan.reset_cumsum), e^{g_i} is 0 after the
# chunk's first reset (n_i > 0) and e^{g_last - g_i} before its last (n_i < n_last), in both passes.
# One pass each way instead of about 6 PyTorch ops forward and 20 backward (measured at
# B=4 H=4 T=4096 d=64: 12 ms forward and 43 ms forward+backward in PyTorch).
if numba is not None:

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract"})
    def _delta_inputs(q, k, v, beta, g, n, Rw, Rv, Qd, Kd, cd):  # pragma: no cover - compiled
        M, C, Dk = k.shape
        Dv = v.shape[2]
        decayed = g.shape[1] > 0
        reset = n.shape[1] > 0
        one = np.ones(1, dtype=k.dtype)[0]
        zero = np.zeros(1, dtype=k.dtype)[0]
        for m in prange(M):
            n_last = n[m, C - 1] if reset else 0
            for i in range(C):
                b = beta[m, i]
                eg = fast_exp(g[m, i]) if decayed else one
                if reset and n[m, i] != 0:
                    eg = zero
                bw = b * eg
                ki, rw = k[m, i], Rw[m, i]
                for j in range(Dk):
                    rw[j] = bw * ki[j]
                vi, rv = v[m, i], Rv[m, i]
                for j in range(Dv):
                    rv[j] = b * vi[j]
                if decayed:
                    er = fast_exp(g[m, C - 1] - g[m, i])
                    if reset and n[m, i] != n_last:
                        er = zero
                    qi, qd, kd = q[m, i], Qd[m, i], Kd[m, i]
                    for j in range(Dk):
                        qd[j] = eg * qi[j]
                    for j in range(Dk):
                        kd[j] = er * ki[j]
            if decayed:
                cd[m] = fast_exp(g[m, C - 1]) if n_last == 0 else zero

    @njit(cache=True, fastmath={"contract", "reassoc"}, inline="always")
    def _dot(a, b):  # pragma: no cover - compiled
        acc = np.zeros(1, dtype=a.dtype)[0]
        for j in range(a.shape[0]):
            acc += a[j] * b[j]
        return acc

    @njit(parallel=True, cache=True, error_model="numpy", fastmath={"contract", "reassoc"})
    def _delta_inputs_backward(q, k, v, beta, g, n, dRw, dRv, dQd, dKd, dcd, dq, dk, dv, dbeta, dg):  # pragma: no cover
        M, C, Dk = k.shape
        Dv = v.shape[2]
        decayed = g.shape[1] > 0
        reset = n.shape[1] > 0
        zero = np.zeros(1, dtype=k.dtype)[0]
        for m in prange(M):
            n_last = n[m, C - 1] if reset else 0
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
                    if reset:
                        if n[m, i] != 0:
                            eg = zero
                        if n[m, i] != n_last:
                            er = zero
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
                dg[m, C - 1] += last + (fast_exp(g[m, C - 1]) if n_last == 0 else zero) * dcd[m]


class _DeltaInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, n):
        decayed = g is not None
        Rw, Rv = torch.empty_like(k), torch.empty_like(v)
        Qd, Kd = (torch.empty_like(q), torch.empty_like(k)) if decayed else (k[:0], k[:0])
        cd = beta.new_empty(beta.shape[0]) if decayed else beta[:0, 0]
        g_np = g.numpy() if decayed else _no_decay(beta.shape[0], beta)
        _set_threads()
        _delta_inputs(q.numpy(), k.numpy(), v.numpy(), beta.numpy(), g_np, _resets(n, beta.shape[0]), Rw.numpy(),
                      Rv.numpy(), Qd.numpy(), Kd.numpy(), cd.numpy())
        ctx.save_for_backward(q, k, v, beta, *((g,) if decayed else ()))
        ctx.n = n
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
        _delta_inputs_backward(q.numpy(), k.numpy(), v.numpy(), beta.numpy(), g_np, _resets(ctx.n, beta.shape[0]),
                               dRw.numpy(), dRv.numpy(), dQd.numpy(), dKd.numpy(), dcd.numpy(), dq.numpy(), dk.numpy(),
                               dv.numpy(), dbeta.numpy(), dg.numpy())
        return (dq if g else None), dk, dv, dbeta, (dg if g else None), None


def delta_inputs(q, k, v, beta, g, n=None):
    """(Rw, Rv, Qd, Kd, cd) of the delta rule's chunk form (see above) for q, k [..., C, d_k],
    v [..., C, d_v], beta and g (cumulative log decay) [..., C]; (Rw, Rv) when g is None. n:
    g's count of resets [..., C] (None: no reset; see ``recur.ops.scan.reset_cumsum``).
    Compiled, CPU."""
    lead, C = k.shape[:-2], k.shape[-2]
    flat = lambda t: t.reshape(-1, *t.shape[len(lead):]).contiguous()  # noqa: E731
    outs = _DeltaInputs.apply(flat(q), flat(k), flat(v), flat(beta), None if g is None else flat(g),
                              None if g is None or n is None else flat(n))
    shapes = (k.shape, v.shape, q.shape, k.shape, lead)
    return tuple(o.view(s) for o, s in zip(outs, shapes))
