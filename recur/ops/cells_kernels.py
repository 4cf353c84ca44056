"""Compiled CPU kernels (numba) for the gate arithmetic of one LSTM or GRU step.

The LSTM and GRU loops of recur.ops.cells (formulas, forward and backward, in that module's
docstring) run per step one recurrent matmul, in torch, and the gates' activations and state
update: ``lstm_step``, ``gru_step`` and their backward steps compute the latter in one call
each, because at the size of one step the PyTorch ops cost more in dispatch than in arithmetic.

Used by ``recur.ops.cells`` for CPU tensors (see ``recur.ops.kernels`` for the switch); the
PyTorch ops are the fallback.
"""

from __future__ import annotations

import numpy as np

from recur.ops.kernels import numba

if numba is not None:  # numba is a declared dependency; without it only the PyTorch path runs
    from numba import njit

    from recur.ops.numba_math import fast_sigmoid, fast_tanh


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
