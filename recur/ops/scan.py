"""The diagonal linear scan, elementwise over every channel:

    h_t = a_t * h_{t-1} + b_t          a_t = exp(log_a_t)

    b:     [batch, time, *dims]        real or complex
    log_a: broadcastable to b          [batch, time, *dims] per step (Mamba, minGRU),
                                       [*dims] time-invariant (LRU's lambda, S4D), ...
           real (<= 0) or complex (Re <= 0, so |a| <= 1); -inf (a = 0, a reset) included
    h0:    [batch, *dims] or None (zeros)

``diagonal_scan`` modes (equal to ``reference`` up to summation order):

* ``reference``: the loop above; the oracle.
* ``chunk``: on CPU with numba (a dependency), the compiled single-pass kernel of
  ``recur.ops.scan_kernels`` (set ``RECUR_COMPILED=0`` to turn it off); elsewhere (CUDA) a
  two-level scan: time is cut into n chunks of ``chunk_size``. One Python loop of chunk_size steps runs the recurrence inside every chunk at once from a zero
  state, keeping the running product P of the decays since the chunk start; a second
  loop of n steps passes the state between chunks; a fix-up adds each chunk's entering
  state times P. Python steps: chunk_size + n instead of time.

Numerics. Only products of decays are formed (|P| <= 1), never quotients: a decay that
underflows to 0 inside a chunk just zeroes the entering state's contribution, as it should,
and log a = -inf (a = 0, a reset) is exact in both modes, gradients included (exp's
derivative there is 0).
Time-padding steps have a = 1 and b = 0, which leave the state unchanged.

``log_space_scan`` is the parallel scan of Heinsen (2023), "Efficient Parallelization of
a Ubiquitous Sequential Computation", for positive recurrences (minGRU, minLSTM): all in
log space, one cumsum and one logcumsumexp.

``stabilized_scan`` runs h_t = exp(log_a_t) h_{t-1} + exp(log_w_t) v_t with unbounded input
exponents (RWKV-4's WKV), carrying h scaled by its running maximum exponent so that no
exponential overflows; its chunk mode is ``diagonal_scan`` on the rescaled recurrence.

Resets. A log decay of -inf (decay 0: the state is dropped, e.g. at a document boundary of a
packed sequence) is inside every primitive's domain log a <= 0. The diagonal scan only
exponentiates single log decays, so it needs nothing special. The forms that work with
cumulative log decays (here ``log_space_scan`` and ``stabilized_scan``'s running maximum; the
chunk forms of ``recur.ops.gated`` and ``recur.ops.delta``) would compute -inf - (-inf) = NaN,
and a very strong finite decay (-1e30) would swamp the cumulative sum so that the decays of
the later steps round away. They use ``reset_cumsum`` instead: a step whose log decay is below
``log_zero`` (where exp underflows to exactly 0 in the working precision, so the reference
loop multiplies by exactly 0 too; -inf included) is a *reset*. A count n of resets runs beside
the cumulative sum c, which restarts after each reset (the reset itself adding 0). The log
decay from step j to a later step i is then c_i - c_j when n_i = n_j and -inf otherwise
(``log_gap``; ``log_since_start`` for decays from the start): every difference is of finite
numbers, every exponent is still <= 0, and a pair separated by a reset gets exactly 0, as in
the loop. Running maxima and log-sums restart at resets the same way (``segment_cummax``,
``segment_logcumsumexp``). So nothing crosses a reset, not even rounding: the outputs after
it are bitwise independent of every input before it. When no step is a reset (n is None)
every function takes its plain path (the check costs a reduction over the sums' totals).

Low-precision inputs (float16/bfloat16) are computed in float32 and cast back.
"""

from __future__ import annotations

import itertools
import math

import torch
from einops import rearrange

from recur.ops import scan_kernels, trace

MODES = ("reference", "chunk")

_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


def diagonal_scan(
    log_a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run h_t = exp(log_a_t) * h_{t-1} + b_t over time (dim 1); return (h, h_last).

    h: [batch, time, *dims] (b's shape) and h_last: [batch, *dims]. The result is complex
    if log_a, b or h0 is; its precision is b's (float32 for half-precision b).
    """
    if mode not in MODES:
        raise ValueError(f"diagonal_scan mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check("diagonal_scan", log_a, b, h0)
    real = b.real.dtype if b.is_complex() else b.dtype
    work_real = torch.float32 if real in (torch.float16, torch.bfloat16) else real
    is_complex = log_a.is_complex() or b.is_complex() or (h0 is not None and h0.is_complex())
    work = _COMPLEX[work_real] if is_complex else work_real
    out = work if is_complex else b.dtype

    # log_a as [batch or 1, time or 1, *dims]: leading singleton dimensions made explicit.
    log_a = log_a.to(_COMPLEX[work_real] if log_a.is_complex() else work_real)
    log_a = log_a.reshape((1,) * (b.ndim - log_a.ndim) + tuple(log_a.shape))
    b = b.to(work)
    h = b.new_zeros(b.shape[:1] + b.shape[2:]) if h0 is None else h0.to(work)

    hs = _reference(log_a, b, h) if mode == "reference" else fast_scan(log_a, b, h, chunk_size)
    trace.record(diagonal_scan, dict(log_a=log_a, b=b, h0=h, mode=mode, chunk_size=chunk_size), "b", "h0", hs,
                 layout="channels", batched=("log_a", "b", "h0"))
    return hs.to(out), hs[:, -1].to(out)


def fast_scan(log_a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """All states of h_t = exp(log_a_t) h_{t-1} + b_t, for other primitives' inner recurrences.

    The fast path of ``diagonal_scan`` without its checks, promotion and trace record: log_a
    [batch or 1, time or 1, *dims broadcastable to b's], b [batch, time, *dims] and h0
    [batch, *dims] already in one working dtype. CPU: the compiled kernel; elsewhere the
    two-level chunked scan.
    """
    if scan_kernels.can_scan(log_a, b, h0):  # CPU: one fused pass over memory (numba)
        return scan_kernels.scan(log_a, b, h0)
    return _chunked(log_a, b, h0, chunk_size)


def _check(op: str, log_a, b, h0, names=("log_a", "b", "h0"), allow_complex: bool = True) -> None:
    """Types and shapes of a scan's inputs: b [batch, time, *dims], log_a broadcast to it, h0 [batch, *dims]."""
    kind = "floating-point or complex" if allow_complex else "real floating-point"
    for name, t in zip(names, (log_a, b, h0)):
        if t is not None and (not isinstance(t, torch.Tensor)
                              or not (t.is_floating_point() or (allow_complex and t.is_complex()))):
            raise TypeError(f"{op}: {name} must be a {kind} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    a_name, b_name, h_name = names
    if b.ndim < 2:
        raise ValueError(f"{op}: {b_name} must have shape [batch, time, *dims], got {tuple(b.shape)}")
    try:
        shape = torch.broadcast_shapes(log_a.shape, b.shape)
    except RuntimeError:
        shape = None
    if shape != b.shape:
        raise ValueError(f"{op}: {a_name} must broadcast to {b_name}'s shape [batch, time, *dims]={tuple(b.shape)}, got {tuple(log_a.shape)}")
    want = tuple(b.shape[:1] + b.shape[2:])
    if h0 is not None and tuple(h0.shape) != want:
        raise ValueError(f"{op}: {h_name} must have shape [batch, *dims]={want}, got {tuple(h0.shape)}")


def _reference(log_a, b, h):
    """The recurrence, one step at a time. log_a: [batch or 1, time or 1, *dims]."""
    a = log_a.exp()
    steps = a.unbind(1) if a.shape[1] > 1 else itertools.repeat(a[:, 0])
    hs = []
    for a_t, b_t in zip(steps, b.unbind(1)):
        h = torch.addcmul(b_t, a_t, h)
        hs.append(h)
    return torch.stack(hs, dim=1)


def _chunked(log_a, b, h0, chunk_size: int):
    """Two-level scan: inside all chunks at once, then the carry across chunks, then a fix-up."""
    T = b.shape[1]
    C = min(chunk_size, T)  # a short call (T=1 stepping) needs no longer inner loop
    n_chunks = math.ceil(T / C)
    pad = n_chunks * C - T
    log_a = log_a.expand(log_a.shape[0], T, *log_a.shape[2:])  # time-invariant decays: one per step
    if pad:  # a = 1 and b = 0: padding steps leave the state unchanged
        log_a = torch.cat([log_a, log_a.new_zeros(log_a.shape[0], pad, *log_a.shape[2:])], dim=1)
        b = torch.cat([b, b.new_zeros(b.shape[0], pad, *b.shape[2:])], dim=1)
    # Step-in-chunk first: a[j], b[j] are [batch, n_chunks, *dims], all chunks at step j.
    a = rearrange(log_a.exp(), "b (n c) ... -> c b n ...", c=C)
    b = rearrange(b, "b (n c) ... -> c b n ...", c=C)

    # Level 1: every chunk from a zero state, all chunks at once, with the cumulative decay
    # P_j = a_0 * ... * a_j since the chunk start (a running product: torch's CPU cumsum of
    # log a is several times slower than the whole loop).
    # unbind, not a[j]: indexing inside the loop makes autograd zero-fill a full-size
    # gradient per step (quadratic backward); unbind's backward is one stack.
    a_steps, b_steps = a.unbind(0), b.unbind(0)
    h, P = b_steps[0], a_steps[0]
    local, decay = [h], [P]
    for j in range(1, C):
        h = torch.addcmul(b_steps[j], a_steps[j], h)
        P = P * a_steps[j]
        local.append(h)
        decay.append(P)
    # Level 2: the state entering each chunk, sequential over chunks.
    carry, entering = h0, []
    for last_h, last_P in zip(h.unbind(1), P.unbind(1)):
        entering.append(carry)
        carry = torch.addcmul(last_h, last_P, carry)
    local, P = torch.stack(local), torch.stack(decay)  # [C, batch, n_chunks, *dims]
    entering = torch.stack(entering, dim=1)  # [batch, n_chunks, *dims]

    hs = torch.addcmul(local, P, entering)  # broadcast over the step-in-chunk dimension
    return rearrange(hs, "c b n ... -> b (n c) ...")[:, :T]


# ---------------------------------------------------------------------------------- resets
_LOG_ZERO: dict[torch.dtype, float] = {}


def log_zero(dtype: torch.dtype) -> float:
    """A log decay below which exp underflows to exactly 0 in ``dtype`` (a reset): the log of
    the smallest subnormal, less 1 (float32: -104.3, float64: -745.4)."""
    if dtype not in _LOG_ZERO:
        info = torch.finfo(dtype)
        _LOG_ZERO[dtype] = math.log(info.tiny * info.eps) - 1.0
    return _LOG_ZERO[dtype]


def reset_cumsum(log_a: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The cumulative log decay along ``dim``, reset-aware: (c, n).

    Steps with log_a < ``log_zero`` (-inf included) are resets, and n (int32) counts the resets
    through each step. c_t sums the log decays since the last reset (the reset's own counting
    0), or since the start before the first, so the log decay from step j to step i >= j is
    c_i - c_j if n_i == n_j, else -inf (``log_gap``). Summed within each segment only (one
    compiled pass on CPU, ``scan_kernels.segment_cumsum``; a doubling scan elsewhere,
    ``_segment_scan``), c after a reset does not depend on anything before it, not even in its
    rounding: nothing leaks across a reset, bit for bit. Without any reset:
    (cumsum, None), the plain cumulative sum; while ``torch.compile`` traces, the reset-aware
    form always (no data-dependent branch, so no graph break). The gradient reaching a reset's
    log decay is 0, as exp's is there.
    """
    limit = log_zero(log_a.dtype)
    if torch.compiler.is_compiling():  # no data-dependent branch (a graph break): always reset-aware
        resets = log_a < limit
        n = resets.cumsum(dim, dtype=torch.int32)
        return _segment_scan(log_a.masked_fill(resets, 0.0), n, dim, torch.add, 0.0), n
    c = log_a.cumsum(dim)
    # The total (the last sum) is <= every step's log decay (in floating point too: adding a
    # number <= 0 never rounds above it), so totals above the limit rule out any reset: one small
    # reduction is all the usual case costs. Below it, the steps themselves decide.
    if c.numel() == 0 or not bool(c.select(dim, -1).amin() < limit):
        return c, None
    resets = log_a < limit
    if not bool(resets.any()):  # strong decays that add up past the limit, but no reset
        return c, None
    n = resets.cumsum(dim, dtype=torch.int32)
    finite = log_a.masked_fill(resets, 0.0)
    if scan_kernels.can_segment_cumsum(finite):  # CPU: one compiled pass each way
        return scan_kernels.segment_cumsum(finite, n, dim), n
    return _segment_scan(finite, n, dim, torch.add, 0.0), n


def log_gap(c_to: torch.Tensor, c_from: torch.Tensor, n_to: torch.Tensor | None, n_from: torch.Tensor | None):
    """The log decay c_to - c_from from one point to a later one (``reset_cumsum``'s c at both),
    -inf (decay exactly 0) where a reset lies between them (n_to != n_from; n None: no reset)."""
    gap = c_to - c_from
    return gap if n_to is None else gap.masked_fill(n_to != n_from, -math.inf)


def log_since_start(c: torch.Tensor, n: torch.Tensor | None) -> torch.Tensor:
    """The log decay from the start of the sum to each point: c, or -inf after a reset."""
    return c if n is None else c.masked_fill(n != 0, -math.inf)


def _segment_scan(x: torch.Tensor, n: torch.Tensor, dim: int, op, fill: float) -> torch.Tensor:
    """The inclusive scan of the associative ``op`` along ``dim``, restarted at each reset: for
    each t, op over x_j, j <= t with n_j = n_t (n non-decreasing along dim, ``reset_cumsum``'s
    count). A doubling (Hillis-Steele) scan, log2(length) steps of whole-tensor ops: each step
    combines an element's window with the window just before it when both lie in one segment
    (a window that holds its segment's start is complete already). ``fill``: a value for the
    padding that the mask then discards."""
    x, n = x.movedim(dim, -1), n.expand(x.shape).movedim(dim, -1)
    step = 1
    while step < x.shape[-1]:
        prev_x = torch.nn.functional.pad(x[..., :-step], (step, 0), value=fill)
        prev_n = torch.nn.functional.pad(n[..., :-step], (step, 0), value=-1)
        x = torch.where(prev_n == n, op(prev_x, x), x)
        step *= 2
    return x.movedim(-1, dim)


def segment_cummax(x: torch.Tensor, n: torch.Tensor, dim: int) -> torch.Tensor:
    """max_{j <= t, n_j = n_t} x_j along ``dim``: the running maximum restarted at each reset."""
    return _segment_scan(x, n, dim, torch.maximum, -math.inf)


def segment_logcumsumexp(x: torch.Tensor, n: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum_{j <= t, n_j = n_t} exp(x_j) along ``dim``: ``torch.logcumsumexp`` restarted at
    each reset (x finite)."""
    return _segment_scan(x, n, dim, torch.logaddexp, 0.0)


def log_space_scan(
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    log_h0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive recurrence h_t = a_t h_{t-1} + b_t from log a, log b (and log h0); return (h, h_last).

    log h_t = a*_t + log(h0 + sum_{s<=t} exp(log_b_s - a*_s)),  a*_t = sum_{s<=t} log_a_s,
    i.e. a*_t + logaddexp(log_h0, logcumsumexp(log_b - a*)_t)  (Heinsen 2023).

    log_b: [batch, time, *dims], finite (b > 0); log_a: broadcastable to it, <= 0, -inf (a
    reset, h_t = b_t) included; log_h0: [batch, *dims] or None (h0 = 0). log_h0 = -inf (h0 = 0)
    is exact, with finite gradients (logaddexp's derivative in its -inf argument is 0). With
    resets (log a below ``log_zero``: see the module docstring) a*_t is ``reset_cumsum``'s c and
    the logcumsumexp restarts at each reset (``segment_logcumsumexp``), h0 counting only before
    the first: the same formula within each segment, NaN-free. Accuracy: the two
    terms a*_t and logcumsumexp grow like |a*_t| and cancel, so the relative error of h
    is about |a*_t| * eps; fine in float64, a consideration in float32 for very long
    sequences with strong decay.
    """
    _check("log_space_scan", log_a, log_b, log_h0, names=("log_a", "log_b", "log_h0"), allow_complex=False)

    out = log_b.dtype
    work = torch.float32 if out in (torch.float16, torch.bfloat16) else out
    log_b = log_b.to(work)
    a_star, n = reset_cumsum(log_a.to(work).expand(log_b.shape), dim=1)
    if n is None:
        L = torch.logcumsumexp(log_b - a_star, dim=1)
        if log_h0 is not None:
            L = torch.logaddexp(log_h0.to(work).unsqueeze(1), L)
    else:  # resets: the sums restart at each, and h0 reaches only the steps before the first
        L = segment_logcumsumexp(log_b - a_star, n, dim=1)
        if log_h0 is not None:
            L = torch.where(n == 0, torch.logaddexp(log_h0.to(work).unsqueeze(1), L), L)
    h = (a_star + L).exp()
    return h.to(out), h[:, -1].to(out)


def stabilized_scan(
    log_a: torch.Tensor,
    log_w: torch.Tensor,
    v: torch.Tensor,
    h0: torch.Tensor | None = None,
    m0: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t = exp(log_a_t) h_{t-1} + exp(log_w_t) v_t with unbounded log_w, kept in range by a running max.

    The true state h is never formed (exp(log_w) overflows float32 for log_w > 88). Instead

        m_t  = max(log_a_t + m_{t-1}, log_w_t)                  the running maximum exponent
        h~_t = exp(-m_t) h_t
             = exp(log_a_t + m_{t-1} - m_t) h~_{t-1} + exp(log_w_t - m_t) v_t

    and both exponents are <= 0 by the definition of m_t (a reset, log_a_t = -inf, makes
    m_t = log_w_t: see the module docstring). The initial state is (h0, m0) with
    h0 meaning h~_0: the zero state is h~_0 = 0, m_0 = -inf (the default), and then m_t is exactly
    the largest exponent log_w_j + sum_{j<s<=t} log_a_s among the terms of h_t, so every state's
    (h~, m) is a function of the inputs alone, the same in every mode (RWKV-4's (aa, bb, pp)).

    Shapes: log_w [batch, time, *mdims] sets the stabiliser's shape; log_a (real, <= 0, -inf allowed) broadcasts
    to log_w ([*mdims] time-invariant allowed); v [batch, time, *vdims] with log_w broadcastable to
    it: the dimensions log_w is broadcast along share one stabiliser (RWKV-4 stacks the numerator
    and denominator, [..., 2], under one m [..., 1]); h0 [batch, *vdims]; m0 [batch, *mdims].
    Returns (h~ [batch, time, *vdims], m [batch, time, *mdims]); the final state is their last step.

    m depends on the exponents only, so it is computed first: ``reference`` runs its recurrence
    step by step; ``chunk`` runs it chunk by chunk: with c the chunk-local cumulative log_a
    (inclusive), m_t = c_t + max(m_start, max_{j<=t} (log_w_j - c_j)), the last m passed to the
    next chunk (chunk-local sums keep float32 precise); with resets the maximum runs from the
    last reset and m_start counts only before the first (``reset_cumsum``,
    ``segment_cummax``). The scaled recurrence is then
    ``diagonal_scan`` in the same mode (reference loop, or chunked) with
    log a'_t = log_a_t + m_{t-1} - m_t and b_t = exp(log_w_t - m_t) v_t.
    Low-precision inputs are computed in float32 and cast back.
    """
    if mode not in MODES:
        raise ValueError(f"stabilized_scan mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check("stabilized_scan", log_a, log_w, m0, names=("log_a", "log_w", "m0"), allow_complex=False)
    _check("stabilized_scan", log_w, v, h0, names=("log_w", "v", "h0"), allow_complex=False)
    out = v.dtype
    work = torch.float32 if out in (torch.float16, torch.bfloat16) else out
    log_w, v = log_w.to(work), v.to(work)
    log_a = log_a.to(work).reshape((1,) * (log_w.ndim - log_a.ndim) + tuple(log_a.shape))
    h = v.new_zeros(v.shape[:1] + v.shape[2:]) if h0 is None else h0.to(work)
    m = log_w.new_full(log_w.shape[:1] + log_w.shape[2:], -math.inf) if m0 is None else m0.to(work)

    if mode == "reference":
        ms = _running_max(log_a, log_w, m)
    else:
        ms = _running_max_chunked(log_a, log_w, m, chunk_size)
    m_prev = torch.cat([m.unsqueeze(1), ms[:, :-1]], dim=1)
    # m = -inf while every input so far had weight 0 (log_w = -inf, a mask): the state is 0 and
    # stays 0; rebasing on 0 there keeps -inf - (-inf) out of the exponents.
    base = torch.where(ms == -math.inf, 0.0, ms)
    with trace.paused():  # the rescaled scan is an implementation detail, not a linear map of v
        hs, _ = diagonal_scan(log_a + m_prev - base, (log_w - base).exp() * v, h, mode=mode, chunk_size=chunk_size)
    return hs.to(out), ms.to(out)


def _running_max(log_a, log_w, m):
    """m_t = max(log_a_t + m_{t-1}, log_w_t), one step at a time. log_a: [batch or 1, time or 1, *mdims]."""
    steps = log_a.unbind(1) if log_a.shape[1] > 1 else itertools.repeat(log_a[:, 0])
    ms = []
    for la_t, lw_t in zip(steps, log_w.unbind(1)):
        m = torch.maximum(la_t + m, lw_t)
        ms.append(m)
    return torch.stack(ms, dim=1)


def _running_max_chunked(log_a, log_w, m0, chunk_size: int):
    """m_t = max(log_a_t + m_{t-1}, log_w_t) for all t, chunk by chunk (see ``stabilized_scan``)."""
    B, T = log_w.shape[:2]
    C = min(chunk_size, T)
    n_chunks = math.ceil(T / C)
    pad = n_chunks * C - T
    log_a = log_a.expand(log_w.shape)
    if pad:  # log_a = 0 and log_w = -inf: padding steps leave m unchanged
        log_a = torch.cat([log_a, log_a.new_zeros(B, pad, *log_a.shape[2:])], dim=1)
        log_w = torch.cat([log_w, log_w.new_full((B, pad, *log_w.shape[2:]), -math.inf)], dim=1)
    # resets (see the module docstring): the maximum restarts at each, the entering m counts
    # only before a chunk's first
    c, n = reset_cumsum(rearrange(log_a, "b (n c) ... -> b n c ...", c=C), dim=2)
    best = rearrange(log_w, "b (n c) ... -> b n c ...", c=C) - c
    best = best.cummax(dim=2).values if n is None else segment_cummax(best, n, dim=2)
    m, ms = m0, []
    for j, (c_n, best_n) in enumerate(zip(c.unbind(1), best.unbind(1))):  # [batch, C, *mdims]
        start = m.unsqueeze(1) if n is None else torch.where(n[:, j] == 0, m.unsqueeze(1), -math.inf)
        m_n = c_n + torch.maximum(start, best_n)
        ms.append(m_n)
        m = m_n[:, -1]
    return torch.cat(ms, dim=1)[:, :T]
