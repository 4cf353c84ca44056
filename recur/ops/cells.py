"""Fused LSTM and GRU loops with hand-written backpropagation through time.

The classic cells are sequential by nature: per step, one small recurrent matmul and a handful
of elementwise gate operations. Under autograd every one of those operations becomes a graph
node whose backward the engine dispatches one by one, and the recurrent weight's gradient is
accumulated as T small matmuls. Here the forward loop runs without a graph, keeping only the
activated gates and the cell states, and the backward loop is written out:

LSTM (gate order i, f, g, o as torch.nn.LSTM; u_t = W_ih x_t + b_ih + b_hh precomputed):
    i, f, o = sigmoid(.), g = tanh(.)  of  u_t + h_{t-1} W_hh^T
    c_t = f c_{t-1} + i g ;  h_t = o tanh(c_t)
  backward, with dh, dc the gradients reaching h_t, c_t:
    dc += dh o (1 - tanh^2 c_t)
    d(pre-activations) = [dc g i (1-i), dc c_{t-1} f (1-f), dc i (1-g^2), dh tanh(c_t) o (1-o)]
    dc_{t-1} = dc f ;  dh_{t-1} = d(pre) W_hh  (+ the output gradient of step t-1)

GRU (gate order r, z, n as torch.nn.GRU; u_t = W_ih x_t + b_ih, v_t = h_{t-1} W_hh^T + b_hh):
    r, z = sigmoid(u_t[r,z] + v_t[r,z]) ;  n = tanh(u_t[n] + r v_t[n]) ;  h_t = (1 - z) n + z h_{t-1}
  backward:
    d(pre n) = dh (1 - z) (1 - n^2) ;  d(pre z) = dh (h_{t-1} - n) z (1 - z)
    d(pre r) = d(pre n) v_t[n] r (1 - r)
    du = [d(pre r), d(pre z), d(pre n)] ;  dv = [d(pre r), d(pre z), d(pre n) r]
    dh_{t-1} = dh z + dv W_hh

The weight gradients are one batched matmul over all steps after the loop (sum_t h_{t-1}^T dv_t),
not T small ones. On CPU (float32) the per-step recurrent matmuls use oneDNN with W_hh packed once
per loop (``_Matmul``) and the gate arithmetic is one compiled call per step (recur.ops.cells_kernels). Shapes: u [time, streams, batch, gates * d] (streams: directions x heads of a
layer, run side by side), w [streams, d, gates * d] (W_hh^T per stream), b [streams, 1, gates * d],
h0, c0 [streams, batch, d]. The plain autograd loops (``lstm_reference``, ``gru_reference``) are
the oracles the tests hold these to; double backward is not supported (use the references).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from recur.ops import cells_kernels, kernels


# ----------------------------------------------------------------------------- references
def lstm_reference(u, w, h, c):
    """The LSTM recurrence under autograd: (ys [time, streams, batch, d], h_T, c_T)."""
    ys = []
    for u_t in u.unbind(0):  # unbind: indexing u[t] in a loop would make backward quadratic in T
        i, f, g, o = torch.baddbmm(u_t, h, w).chunk(4, dim=-1)
        c = torch.addcmul(torch.sigmoid(f) * c, torch.sigmoid(i), torch.tanh(g))
        h = torch.sigmoid(o) * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys), h, c


def gru_reference(u, w, b, h):
    """The GRU recurrence under autograd: (ys [time, streams, batch, d], h_T)."""
    d, ys = h.shape[-1], []
    for u_t in u.unbind(0):
        v_t = torch.baddbmm(b, h, w)
        r, z = torch.sigmoid(u_t[..., : 2 * d] + v_t[..., : 2 * d]).chunk(2, dim=-1)
        n = torch.tanh(torch.addcmul(u_t[..., 2 * d :], r, v_t[..., 2 * d :]))
        h = torch.lerp(n, h, z)  # (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys), h


# --------------------------------------------------------------------------------- LSTM
class _LSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w, h0, c0, overwrite_u):
        T, d = u.shape[0], h0.shape[-1]
        gates = _gate_buffer(u, overwrite_u)  # u, then the activated i, f, g, o (contiguous)
        hs = _touched((T + 1, *h0.shape), u)
        cs = _touched((T + 1, *c0.shape), u)
        hs[0], cs[0] = h0, c0
        recurrent = _Matmul(w, h0.shape[1])
        fused = kernels.can_real(u)  # CPU: the gate arithmetic of a step in one compiled call
        if fused:
            g_np, c_np, h_np = _rows(gates), _rows(cs), _rows(hs)
        for t in range(T):
            v = recurrent(hs[t])
            if fused:
                cells_kernels.lstm_step(_rows(v)[0], g_np, c_np, h_np, t)
            else:
                a = gates[t].add_(v)
                a[..., : 2 * d].sigmoid_()
                a[..., 2 * d : 3 * d].tanh_()
                a[..., 3 * d :].sigmoid_()
                i, f, g, o = a.unflatten(-1, (4, d)).unbind(-2)
                torch.addcmul(f * cs[t], i, g, out=cs[t + 1])
                torch.mul(o, torch.tanh(cs[t + 1]), out=hs[t + 1])
        ctx.save_for_backward(w, gates, hs, cs)
        return hs[1:], hs[T].clone(), cs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys, grad_h, grad_c):
        w, gates, hs, cs = ctx.saved_tensors
        T, d = gates.shape[0], hs.shape[-1]
        dgates = _touched(gates.shape, gates)
        dh = torch.zeros_like(hs[0]) if grad_h is None else grad_h.clone()
        dc = torch.zeros_like(cs[0]) if grad_c is None else grad_c.clone()
        recurrent = _Matmul(w.transpose(1, 2), hs.shape[2])
        fused = kernels.can_real(gates)
        if fused:  # dc is updated in place through dc_np; dh is the matmul's (contiguous) output
            gy = torch.zeros_like(hs[:1]) if grad_ys is None else grad_ys.contiguous()
            dh, dc = dh.contiguous(), dc.contiguous()
            g_np, c_np, gy_np, dc_np, dg_np = _rows(gates), _rows(cs), _rows(gy), _rows(dc)[0], _rows(dgates)
        for t in range(T - 1, -1, -1):
            if fused:
                cells_kernels.lstm_step_backward(g_np, c_np, gy_np, _rows(dh)[0], dc_np, dg_np, t)
            else:
                if grad_ys is not None:
                    dh += grad_ys[t]
                i, f, g, o = gates[t].unflatten(-1, (4, d)).unbind(-2)
                tc = torch.tanh(cs[t + 1])
                dc += dh * o * (1 - tc * tc)
                di, df, dg, do = dgates[t].unflatten(-1, (4, d)).unbind(-2)
                torch.mul(dc * g, i * (1 - i), out=di)
                torch.mul(dc * cs[t], f * (1 - f), out=df)
                torch.mul(dc * i, 1 - g * g, out=dg)
                torch.mul(dh * tc, o * (1 - o), out=do)
                dc = dc * f
            dh = recurrent(dgates[t])
        dw = _weight_grad(hs[:-1], dgates) if ctx.needs_input_grad[1] else None
        return dgates, dw, dh, dc, None


class _Matmul:
    """x_s @ w_s per stream s for the fixed w [streams, k, n] (plus bias [streams, 1, n]) of one
    loop: x [streams, rows, k] -> [streams, rows, n], contiguous.

    For CPU float32 with the compiled kernels on, oneDNN's linear with w packed once for the
    loop (its blocked layout, as oneDNN's own RNN primitive does): at [16, 256] x [256, 1024]
    57 us a step against 82-93 us for bmm. Otherwise (CUDA, float64, no oneDNN) bmm.
    """

    def __init__(self, w: torch.Tensor, rows: int, bias: torch.Tensor | None = None):
        self.w, self.bias, self.packed = w, bias, None
        if _can_pack(w):  # oneDNN's linear computes x W^T with W [n, k]: pack each w_s^T
            self.packed = [torch.ops.mkldnn._reorder_linear_weight(w_s.t().contiguous(), rows) for w_s in w.detach()]
            self.bias_s = [None] * len(w) if bias is None else list(bias.detach().flatten(1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return torch.bmm(x, self.w) if self.bias is None else torch.baddbmm(self.bias, x, self.w)
        if len(self.packed) == 1:  # the common case, without the per-stream loop's overhead
            return _LINEAR(x[0], self.packed[0], self.bias_s[0], "none", [], "").unsqueeze(0)
        return torch.stack([_LINEAR(x_s, w_s, b_s, "none", [], "") for x_s, w_s, b_s in zip(x, self.packed, self.bias_s)])


def _can_pack(w: torch.Tensor) -> bool:
    return (kernels.can_real(w) and w.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and _HAS_PACKED_LINEAR)


def _has_packed_linear() -> bool:
    try:
        return all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise"))
    except RuntimeError:  # pragma: no cover - builds without the mkldnn op namespace
        return False


_HAS_PACKED_LINEAR = _has_packed_linear()
_LINEAR = torch.ops.mkldnn._linear_pointwise.default if _HAS_PACKED_LINEAR else None


def _gate_buffer(u: torch.Tensor, overwrite_u: bool) -> torch.Tensor:
    """The buffer the loop turns into the activated gates: u itself when the caller hands it
    over (``overwrite_u``: a temporary nothing else reads), else a contiguous copy of u."""
    if overwrite_u and u.is_contiguous():
        return u.detach()
    return u.detach().clone(memory_format=torch.contiguous_format)


def _touched(shape, like: torch.Tensor) -> torch.Tensor:
    """A new tensor whose pages are already touched (zero-filled by a parallel fill). The loops
    write a fresh buffer a step at a time, and the page faults taken there, one thread at a
    time inside the step kernel, cost more than the fill: measured at B=16 T=1024 d=256, the
    LSTM's forward loop took 152 ms on fresh buffers against 24 + 94 ms filled first."""
    return like.new_zeros(shape)


def _rows(x: torch.Tensor):
    """x [time, streams, batch, n] (or [streams, batch, n]) as a numpy view [time, rows, n]
    ([1, rows, n]) sharing x's memory: the compiled kernels write through it."""
    if not x.is_contiguous():
        raise RuntimeError(f"cells: expected a contiguous tensor, got shape {tuple(x.shape)} strides {x.stride()}")
    lead = x.shape[0] if x.ndim == 4 else 1
    return x.view(lead, -1, x.shape[-1]).numpy()


def _weight_grad(h_prev: torch.Tensor, dv: torch.Tensor) -> torch.Tensor:
    """sum_t h_{t-1}^T dv_t per stream, as one batched matmul: [streams, d, gates * d]."""
    S = h_prev.shape[1]
    hp = h_prev.transpose(0, 1).reshape(S, -1, h_prev.shape[-1])
    return hp.transpose(1, 2) @ dv.transpose(0, 1).reshape(S, -1, dv.shape[-1])


def lstm_sequence(u, w, h0, c0, overwrite_u: bool = False):
    """The LSTM over a sequence with fused BPTT: (ys [time, streams, batch, d], h_T, c_T).

    ``overwrite_u=True`` lets the loop keep its gates in u's memory (u then holds them after the
    call): for callers whose u is a temporary nothing else reads, such as the layers' input
    projections. It saves a copy of u and the page faults of a buffer that size."""
    return _LSTM.apply(u, w, h0, c0, overwrite_u)


# ---------------------------------------------------------------------------------- GRU
class _GRU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, w, b, h0, overwrite_u):
        T, d = u.shape[0], h0.shape[-1]
        gates = _gate_buffer(u, overwrite_u)  # u, then the activated r, z, n (contiguous)
        vn = _touched((T, *h0.shape), u)  # h_{t-1} W_hn^T + b_hn, which r scales
        hs = _touched((T + 1, *h0.shape), u)
        hs[0] = h0
        recurrent = _Matmul(w, h0.shape[1], bias=b)
        fused = kernels.can_real(u)  # CPU: the gate arithmetic of a step in one compiled call
        if fused:
            g_np, vn_np, h_np = _rows(gates), _rows(vn), _rows(hs)
        for t in range(T):
            v = recurrent(hs[t])  # h_{t-1} W_hh^T + b_hh
            if fused:
                cells_kernels.gru_step(_rows(v)[0], g_np, vn_np, h_np, t)
            else:
                a = gates[t]
                a[..., : 2 * d].add_(v[..., : 2 * d]).sigmoid_()
                vn[t] = v[..., 2 * d :]
                r, z, n = a.unflatten(-1, (3, d)).unbind(-2)
                n.addcmul_(r, vn[t]).tanh_()
                torch.lerp(n, hs[t], z, out=hs[t + 1])
        ctx.save_for_backward(w, gates, vn, hs)
        return hs[1:], hs[T].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ys, grad_h):
        w, gates, vn, hs = ctx.saved_tensors
        T, d = gates.shape[0], hs.shape[-1]
        du = _touched(gates.shape, gates)
        dv = _touched(gates.shape, gates)
        dh = torch.zeros_like(hs[0]) if grad_h is None else grad_h.clone()
        recurrent = _Matmul(w.transpose(1, 2), hs.shape[2])
        fused = kernels.can_real(gates)
        if fused:  # dh is the matmul's (contiguous) output after the first step
            gy = torch.zeros_like(hs[:1]) if grad_ys is None else grad_ys.contiguous()
            dh, dhz = dh.contiguous(), torch.empty_like(hs[0])
            arrays = (_rows(gates), _rows(vn), _rows(hs), _rows(gy))
            du_np, dv_np, dhz_np = _rows(du), _rows(dv), _rows(dhz)[0]
        for t in range(T - 1, -1, -1):
            if fused:  # writes du[t], dv[t] and dhz = (dh + grad_ys[t]) z
                cells_kernels.gru_step_backward(*arrays, _rows(dh)[0], du_np, dv_np, dhz_np, t)
            else:
                if grad_ys is not None:
                    dh += grad_ys[t]
                r, z, n = gates[t].unflatten(-1, (3, d)).unbind(-2)
                dr, dz, dn = du[t].unflatten(-1, (3, d)).unbind(-2)
                torch.mul(dh * (1 - z), 1 - n * n, out=dn)
                torch.mul(dh * (hs[t] - n), z * (1 - z), out=dz)
                torch.mul(dn * vn[t], r * (1 - r), out=dr)
                dv[t, ..., : 2 * d] = du[t, ..., : 2 * d]
                torch.mul(dn, r, out=dv[t, ..., 2 * d :])
                dhz = dh * z
            dh = recurrent(dv[t]).add_(dhz)
        dw = _weight_grad(hs[:-1], dv) if ctx.needs_input_grad[1] else None
        db = dv.sum(dim=(0, 2)).unsqueeze(1) if ctx.needs_input_grad[2] else None
        return du, dw, db, dh, None


def gru_sequence(u, w, b, h0, overwrite_u: bool = False):
    """The GRU over a sequence with fused BPTT: (ys [time, streams, batch, d], h_T).
    ``overwrite_u`` as for ``lstm_sequence``."""
    return _GRU.apply(u, w, b, h0, overwrite_u)
