"""Softmax attention of one query over every prefix, as an RNN (Feng et al., "Attention as an RNN", 2024).

Per head, with scores s_i (the query's dot product with key i) and values v_i:

    o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i)

is carried by the constant-size state (m, u, w):

    m_t = max(m_{t-1}, s_t)                                   running maximum score
    u_t = u_{t-1} exp(m_{t-1} - m_t) + exp(s_t - m_t)         sum_{i<=t} exp(s_i - m_t)
    w_t = w_{t-1} exp(m_{t-1} - m_t) + exp(s_t - m_t) v_t     sum_{i<=t} exp(s_i - m_t) v_i
    o_t = w_t / u_t

Every exponent is <= 0, so no exponential overflows whatever the scores' magnitude. The step
is the associative operator of the paper (its Section 3.2) applied to (m_{t-1}, u_{t-1},
w_{t-1}) and the one-token element (s_t, 1, v_t):

    (m_A, u_A, w_A) (+) (m_B, u_B, w_B) = (m, u_A e^{m_A - m} + u_B e^{m_B - m}, w_A e^{m_A - m} + w_B e^{m_B - m}),
    m = max(m_A, m_B),

so the outputs for all t are a prefix scan of (+) (``combine``).

    scores: [batch, heads, time]          v: [batch, heads, time, d_v]
    state:  (m [batch, heads], u [batch, heads], w [batch, heads, d_v]) or None (the empty state)
    returns o [batch, heads, time, d_v] and the final state (m, u, w)

The empty state. The paper's identity element has m = -inf; a state here must be finite (it is
saved, compared and differentiated), so the empty state is any (m, 0, 0) with a finite m (the
zero state (0, 0, 0) by default): u = 0 marks it, and its m is ignored. A non-empty state always
has u >= 1 exactly (the term of the running maximum contributes exp(0) = 1), so the test u > 0
is exact. ``combine`` replaces the m of an empty operand by the other operand's before
combining, which makes (m, 0, 0) an exact identity with finite gradients (an m = 0 placeholder
against scores of -1000 would otherwise make u underflow to 0).

Modes (equal up to summation order; float64 agrees to ~1e-15, forward and backward):

* ``reference``: the recurrence above, one token at a time (the RNN form; the oracle).
* ``parallel``: the many-to-many outputs as an inclusive prefix scan of (+) over time
  (Hillis and Steele: ceil(log2 T) rounds, round r combining every element with the one 2^r
  steps earlier), the initial state folded into the first element. This is the paper's
  parallel form; O(T log T) work, every round a handful of whole-tensor ops.
* ``chunk`` (the default; about 3x faster than ``parallel`` on CPU at T = 256..4096, forward
  and backward): m_t is a running maximum, so it is known up front (``torch.cummax``); given m, the
  recurrence of (u, w) is linear, u_t = exp(m_{t-1} - m_t) u_{t-1} + exp(s_t - m_t), which is
  ``recur.ops.scan.diagonal_scan`` (its chunk mode: a compiled pass on CPU) with
  log a_t = m_{t-1} - m_t <= 0.

Low-precision inputs (float16/bfloat16) are computed in float32 and cast back.
"""

from __future__ import annotations

import torch

from recur.ops import trace
from recur.ops.scan import diagonal_scan

MODES = ("reference", "parallel", "chunk")

PrefixState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def prefix_softmax_attention(
    scores: torch.Tensor,
    v: torch.Tensor,
    state: PrefixState | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, PrefixState]:
    """o_t = softmax(s_{1..t}) . v_{1..t} for every t, continuing from ``state``; returns (o, (m, u, w)).

    scores [batch, heads, time]; v [batch, heads, time, d_v]; state (m [batch, heads],
    u [batch, heads], w [batch, heads, d_v]) or None for the empty state. ``chunk_size`` is the
    chunk of the diagonal scan in ``chunk`` mode. The output and state have v's dtype.
    """
    if mode not in MODES:
        raise ValueError(f"prefix_softmax_attention mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check(scores, v, state)
    out = v.dtype
    work = torch.float32 if out in (torch.float16, torch.bfloat16) else out
    B, H, T, dv = v.shape
    s = scores.to(work)
    # u and w move together: one tensor uw = [u, w] of width 1 + d_v, and each token's element
    # is (s_t, [1, v_t]).
    vv = torch.cat([v.new_ones(B, H, T, 1, dtype=work), v.to(work)], dim=-1)
    if state is None:
        m0, uw0 = s.new_zeros(B, H), s.new_zeros(B, H, 1 + dv)
    else:
        m0 = state[0].to(work)
        uw0 = torch.cat([state[1].to(work).unsqueeze(-1), state[2].to(work)], dim=-1)

    if mode == "reference":
        m, uw = _reference(s, vv, m0, uw0)
    elif mode == "parallel":
        m, uw = _parallel(s, vv, m0, uw0)
    else:
        m, uw = _chunked(s, vv, m0, uw0, chunk_size)
    o = uw[..., 1:] / uw[..., :1]
    trace.record(prefix_softmax_attention, dict(scores=scores, v=v, state=state, mode=mode, chunk_size=chunk_size),
                 "v", "state", o)
    last = uw[:, :, -1]
    return o.to(out), (m.to(out), last[..., 0].to(out), last[..., 1:].to(out))


def combine(a: PrefixState, b: PrefixState) -> PrefixState:
    """The associative operator (m_A, u_A, w_A) (+) (m_B, u_B, w_B): A's tokens followed by B's.

    m: [...], u: [...], w: [..., d_v]. An operand with u = 0 is empty: its m is ignored (replaced
    by the other's), so (m, 0, 0) is an exact identity for any finite m.
    """
    (m_a, u_a, w_a), (m_b, u_b, w_b) = a, b
    m, uw = _combine_packed((m_a, torch.cat([u_a.unsqueeze(-1), w_a], dim=-1)),
                            (m_b, torch.cat([u_b.unsqueeze(-1), w_b], dim=-1)))
    return m, uw[..., 0], uw[..., 1:]


def _first_max(m0, uw0, s):
    """The initial state's m, or the first score if the state is empty (then m0 is ignored)."""
    return torch.where(uw0[..., 0] > 0, m0, s[:, :, 0])


def _reference(s, vv, m, uw):
    """The recurrence one token at a time. s [B, H, T]; vv [B, H, T, 1 + d_v]; returns (m_T, uw [B, H, T, 1 + d_v])."""
    m = _first_max(m, uw, s)  # an empty state: m_1 = s_1 and uw0 = 0 contributes nothing
    outs = []
    for s_t, vv_t in zip(s.unbind(2), vv.unbind(2)):
        m_t = torch.maximum(m, s_t)
        uw = torch.addcmul(vv_t * (s_t - m_t).exp().unsqueeze(-1), uw, (m - m_t).exp().unsqueeze(-1))
        m = m_t
        outs.append(uw)
    return m, torch.stack(outs, dim=2)


def _parallel(s, vv, m0, uw0):
    """Inclusive Hillis-Steele scan of (+) over time, the initial state folded into the first element."""
    T = s.shape[2]
    m_1, uw_1 = _combine_packed((m0, uw0), (s[:, :, 0], vv[:, :, 0]))
    m = torch.cat([m_1.unsqueeze(2), s[:, :, 1:]], dim=2)
    uw = torch.cat([uw_1.unsqueeze(2), vv[:, :, 1:]], dim=2)
    step = 1
    while step < T:
        # element t (>= step) absorbs the prefix ending at t - step: after the round it covers
        # the 2 * step tokens ending at t (or all tokens from the start)
        m_c, uw_c = _combine_packed((m[:, :, :-step], uw[:, :, :-step]), (m[:, :, step:], uw[:, :, step:]))
        m = torch.cat([m[:, :, :step], m_c], dim=2)
        uw = torch.cat([uw[:, :, :step], uw_c], dim=2)
        step *= 2
    return m[:, :, -1], uw


def _combine_packed(a, b):
    """``combine`` on (m, uw) pairs with uw = [u, w] packed along the last dimension."""
    (m_a, uw_a), (m_b, uw_b) = a, b
    m_a = torch.where(uw_a[..., 0] > 0, m_a, m_b)
    m_b = torch.where(uw_b[..., 0] > 0, m_b, m_a)
    m = torch.maximum(m_a, m_b)
    return m, uw_a * (m_a - m).exp().unsqueeze(-1) + uw_b * (m_b - m).exp().unsqueeze(-1)


def _chunked(s, vv, m0, uw0, chunk_size):
    """Running maximum by cummax, then the linear (u, w) recurrence as a diagonal scan."""
    m_all = torch.cat([_first_max(m0, uw0, s).unsqueeze(2), s], dim=2).cummax(dim=2).values  # [B, H, 1 + T]
    m_prev, m = m_all[:, :, :-1], m_all[:, :, 1:]
    # diagonal_scan runs over dim 1: [B, T, H, 1 + d_v], one decay per (token, head)
    log_a = (m_prev - m).transpose(1, 2).unsqueeze(-1)
    b = ((s - m).exp().unsqueeze(-1) * vv).transpose(1, 2)
    with trace.paused():  # the rescaled scan is an implementation detail; this op records itself
        uw, _ = diagonal_scan(log_a, b, uw0, mode="chunk", chunk_size=chunk_size)
    return m[:, :, -1], uw.transpose(1, 2)


def _check(scores, v, state) -> None:
    for name, t in (("scores", scores), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"prefix_softmax_attention: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if v.ndim != 4 or scores.shape != v.shape[:3]:
        raise ValueError(f"prefix_softmax_attention: need scores [batch, heads, time] and v [batch, heads, time, d_v] "
                         f"with matching leading dimensions, got {tuple(scores.shape)} and {tuple(v.shape)}")
    if v.shape[2] == 0:
        raise ValueError("prefix_softmax_attention: need time >= 1")
    if state is None:
        return
    B, H, _, dv = v.shape
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise TypeError(f"prefix_softmax_attention: state must be a tuple (m, u, w) or None, got {type(state).__name__}")
    for name, t, want in zip("muw", state, ((B, H), (B, H), (B, H, dv))):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"prefix_softmax_attention: state entry {name} must be a floating-point tensor")
        if tuple(t.shape) != want:
            raise ValueError(f"prefix_softmax_attention: state entry {name} must have shape {want}, got {tuple(t.shape)}")
