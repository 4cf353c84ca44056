"""The selective scan of Mamba (S6), with the output contraction fused in:

    h_t = exp(dt_t * A) * h_{t-1} + (dt_t * u_t) * B_t        h: [batch, D, N]
    y_t = sum_n C_t[n] * h_t[:, n]                            y: [batch, time, D]

    u, dt: [batch, time, D]     A: [D, N] (real, <= 0)     B, C: [batch, time, N]
    h0:    [batch, D, N] or None (zeros)

Modes (equal to ``reference`` up to summation order):

* ``reference``: the loop above, one step at a time; the oracle.
* ``chunk``: on CPU with numba, one compiled pass (``recur.ops.selective_kernels``): each thread runs a
  block of channels through time keeping only h [block, N], so no [batch, time, D, N] tensor
  exists; backward recomputes h from checkpoints every ``CHECKPOINT`` steps. Elsewhere
  (CUDA, or RECUR_COMPILED=0): blocks of chunk_size^2 steps, each a two-level
  ``diagonal_scan`` contracted with C inside the block, so at most one block of states
  [batch, block, D, N] exists at a time.

Half-precision inputs are computed in float32 and returned in their dtype.
"""

from __future__ import annotations

import torch

from recur.ops import selective_kernels, trace
from recur.ops.scan import diagonal_scan

MODES = ("reference", "chunk")


def selective_scan(u, dt, A, B, C, h0=None, *, mode: str = "chunk", chunk_size: int = 64):
    """Return (y [batch, time, D], h_last [batch, D, N]) of the selective scan."""
    if mode not in MODES:
        raise ValueError(f"selective_scan mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check(u, dt, A, B, C, h0)
    out = u.dtype
    work = torch.float32 if out in (torch.float16, torch.bfloat16) else out
    u, dt, A, B, C = (t.to(work) for t in (u, dt, A, B, C))
    batch, _, D = u.shape
    h = u.new_zeros(batch, D, A.shape[1]) if h0 is None else h0.to(work)
    if mode == "reference":
        y, h = _reference(u, dt, A, B, C, h)
    elif selective_kernels.can_selective_scan(u, h):
        y, h = selective_kernels.selective_scan(u, dt, A, B, C, h)
    else:
        y, h = _blocked(u, dt, A, B, C, h, chunk_size)
    trace.record(selective_scan, dict(u=u, dt=dt, A=A, B=B, C=C, h0=h0, mode=mode, chunk_size=chunk_size), "u", "h0", y,
                 layout="channels", batched=("u", "dt", "B", "C", "h0"))
    return y.to(out), h.to(out)


def _check(u, dt, A, B, C, h0) -> None:
    for name, t in (("u", u), ("dt", dt), ("A", A), ("B", B), ("C", C), ("h0", h0)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            raise TypeError(f"selective_scan: {name} must be a real floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if u.ndim != 3:
        raise ValueError(f"selective_scan: u must have shape [batch, time, D], got {tuple(u.shape)}")
    batch, T, D = u.shape
    if dt.shape != u.shape:
        raise ValueError(f"selective_scan: dt must have u's shape {tuple(u.shape)}, got {tuple(dt.shape)}")
    if A.ndim != 2 or A.shape[0] != D:
        raise ValueError(f"selective_scan: A must have shape [D={D}, N], got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, T, N):
            raise ValueError(f"selective_scan: {name} must have shape [batch, time, N]={(batch, T, N)}, got {tuple(t.shape)}")
    if h0 is not None and tuple(h0.shape) != (batch, D, N):
        raise ValueError(f"selective_scan: h0 must have shape [batch, D, N]={(batch, D, N)}, got {tuple(h0.shape)}")


def _reference(u, dt, A, B, C, h):
    ys = []
    for u_t, dt_t, B_t, C_t in zip(u.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1)):
        h = torch.exp(dt_t[:, :, None] * A) * h + (dt_t * u_t)[:, :, None] * B_t[:, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C_t))
    return torch.stack(ys, dim=1), h


def _blocked(u, dt, A, B, C, h, chunk_size: int):
    T, block, ys = u.shape[1], chunk_size**2, []
    for s in range(0, T, block):
        t = slice(s, s + block)
        log_a = dt[:, t, :, None] * A  # [batch, block, D, N]
        bx = (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        hs, h = diagonal_scan(log_a, bx, h, mode="chunk", chunk_size=chunk_size)
        ys.append(torch.einsum("btdn,btn->btd", hs, C[:, t]))
    return torch.cat(ys, dim=1), h
