"""Compiled CPU kernels (numba) for gated linear attention's chunk decays, with PyTorch autograd.

GLA's chunk form (recur.ops.gated) factors its per-dimension decays through the chunk start:
the queries and keys are scaled by e^{c} and e^{-c}, c the chunk's cumulative log decay. In
PyTorch that is a cumulative sum, the exps and the products, and their backward; here it is one
pass each way (``gla_decays``), with the sums over positions in float64. The formulas,
forward and backward, head the kernels.

Used by ``recur.ops.gated`` for CPU tensors (see ``recur.ops.kernels`` for the switch); the
PyTorch ops are the fallback.
"""

from __future__ import annotations

import numpy as np
import torch

from recur.ops.kernels import _dense, _set_threads, numba

if numba is not None:  # numba is a declared dependency; without it only the PyTorch path runs
    from numba import njit, prange

    from recur.ops.numba_math import fast_exp


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
