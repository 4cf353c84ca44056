"""The gated matrix-state recurrence (gated linear attention), per head:

    S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T        S: [d_k, d_v]
    o_t = S_t^T q_t                                 (default)
    o_t = S_{t-1}^T q_t + (q_t * u . k_t) v_t       (output_before_update=True, bonus=u: RWKV-6)

    q, k:      [batch, heads, time, d_k]
    v:         [batch, heads, time, d_v]
    log_alpha: [batch, heads, time, d_k]  per key dimension (GLA, GateLoop, HGRN-2, RWKV-6), <= 0
                                          (-inf: alpha = 0, a reset of the state)
               [batch, heads, time]       one decay per head and step (RetNet, Mamba-2, mLSTM)
               None                       alpha = 1 (linear attention, fast weights)
    S0:        [batch, heads, d_k, d_v] or None (zeros)

Two options change only how the output reads the state:

* ``output_before_update``: o_t reads S_{t-1}, the state before step t's decay and write.
* ``bonus`` u: [heads, d_k] adds the current token's term (q_t * u . k_t) v_t to o_t, a
  per-key-dimension weight on the current key instead of the state's (RWKV-6's "time_first").
  With output_before_update it is the only way the current token is seen (without decay
  (alpha = 1), u = 1 gives back the default output S_t^T q_t); without it, the bonus is
  simply added to S_t^T q_t. Note that S_{t-1} is read before alpha_t decays it.

``gated_matrix_stabilized`` runs the same recurrence with an exponential input gate, carrying
the state scaled by a running maximum (xLSTM's mLSTM); see its docstring.

Modes (all equal to ``reference`` up to summation order):

* ``reference``: the loop above; the oracle.
* ``chunk``: the sequence is cut into chunks of ``chunk_size``. Inside a chunk the
  outputs are masked matmuls (the attention-like form; the mask is strictly lower
  triangular when the output reads the state before the update, and the bonus sits on the
  diagonal); between chunks only the state is passed, so the cost is linear in time.
* ``parallel``: one chunk spanning the whole sequence (quadratic in time, like
  attention), including the initial state's contribution and the final state.

Numerics. With c_t the cumulative log decay inside a chunk, the decay from step j to
step i >= j is exp(c_i - c_j) (per key dimension); a query that reads the state before
the update sees exp(c_{i-1} - c_j) instead (the exclusive cumulative sum, for j < i).
Forming exp(c_i) and exp(-c_j) separately overflows as soon as the decays underflow
within a chunk, so every exponent here is <= 0: pairwise differences are masked (to
-inf) before exp, and for per-dimension decays, pairs in different halves of a block go
through the reference point r = c at the end of the first half: exp(c_i - r) * exp(r - c_j),
both factors <= 1, one matmul per halving level (``decayed_scores``; chunk lengths that are
not a power of two use fixed sub-chunks instead: Yang et al. 2023, secondary-level chunking).

Resets. log alpha = -inf (alpha = 0: S_t = k_t v_t^T, e.g. at a document boundary of a packed
sequence), or any log decay so strong that exp underflows to exactly 0 (-1e4, -1e30), would
make the cumulative sums -inf and their differences NaN, or round away the later decays. The
chunk forms take c from ``recur.ops.scan.reset_cumsum`` instead: c restarts after each reset
and a count n of resets runs beside it, and every difference above is taken only between
points with equal n, -inf (a decay of exactly 0) across a reset (``log_gap``): the masked pairs,
both factors through r, the decays from the chunk start and to its end, and the chunk's total
decay passed to the next chunk (0 when the chunk holds a reset). Every exponent stays <= 0
and finite minus finite, forward and backward, and nothing before a reset reaches any output
after it, not even in the rounding. Per key dimension, a reset may hold for some dimensions
only. With resets the factored path (``FACTOR_LIMIT``) is never taken: a reset's decay is far
below the limit. Without resets nothing changes (one check of g).

Low-precision inputs (float16/bfloat16) are computed in float32 and cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

from recur.ops import gated_kernels, kernels, trace
from recur.ops.scan import fast_scan, log_gap, log_since_start, reset_cumsum, segment_cummax

MODES = ("reference", "chunk", "parallel")
SUB_CHUNK = 16  # sub-chunk length for per-dimension decays (pairwise tensor [sub, sub, d_k])
# Largest total log decay within a chunk for which per-dimension decays factor through the chunk
# start (``_chunked``): q_i e^{c_i} . k_j e^{-c_j}, one matmul, with e^{-c_j} <= e^limit (no
# overflow) and a relative rounding error of about |c| ulp per factor (the chunkwise GLA of
# Yang et al. 2023). e^16 ~ 9e6 costs float32 at most ~1e-6; larger decays take
# ``_intra_scores``, whose exponents are all <= 0.
FACTOR_LIMIT = {torch.float32: 16.0, torch.float64: 64.0}


def gated_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    S0: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
    output_before_update: bool = False,
    bonus: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; return (o, S_last).

    With ``output_before_update`` the output reads S_{t-1} instead of S_t; ``bonus`` u
    [heads, d_k] adds (q_t * u . k_t) v_t to o_t. o: [batch, heads, time, d_v] and S_last:
    [batch, heads, d_k, d_v], in q's dtype. No scaling is applied to q or k. ``log_alpha``
    (<= 0; -inf is a reset, alpha = 0, exact in every mode: see the module docstring) and
    ``bonus`` may have another floating dtype.
    """
    _check_mode(mode, chunk_size)
    _check(q, k, v, log_alpha, S0, "gated_matrix")
    if not isinstance(output_before_update, bool):
        raise TypeError(f"gated_matrix: output_before_update must be a bool, got {output_before_update!r}")
    B, H, T, K = q.shape
    if bonus is not None:
        if not isinstance(bonus, torch.Tensor) or not bonus.is_floating_point():
            raise TypeError(f"gated_matrix: bonus must be a floating-point tensor, got {getattr(bonus, 'dtype', type(bonus).__name__)}")
        if tuple(bonus.shape) != (H, K):
            raise ValueError(f"gated_matrix: bonus must have shape [heads, d_k]={(H, K)}, got {tuple(bonus.shape)}")
    dtype = q.dtype
    work = _work_dtype(dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    # Decays as [batch, heads, time, G] with G = d_k (per dimension) or 1 (per head).
    if log_alpha is None:
        g = q.new_zeros(B, H, T, 1)
    else:
        g = log_alpha.to(work)
        g = g if g.ndim == 4 else g.unsqueeze(-1)
    S = q.new_zeros(B, H, K, v.shape[-1]) if S0 is None else S0.to(work)
    u = None if bonus is None else bonus.to(work)[:, None, :]  # [heads, 1, d_k]

    if mode == "reference":
        o, S = _reference(q, k, v, g, S, output_before_update, u)
    else:  # parallel: a single chunk over the (padded) sequence
        size = chunk_size if mode == "chunk" else SUB_CHUNK * math.ceil(T / SUB_CHUNK)
        o, S = _chunked(q, k, v, g, S, size, output_before_update, u)
    trace.record(gated_matrix, dict(q=q, k=k, v=v, log_alpha=log_alpha, S0=S0, mode=mode, chunk_size=chunk_size,
                                    output_before_update=output_before_update, bonus=bonus), "v", "S0", o)
    return o.to(dtype), S.to(dtype)


def gated_matrix_stabilized(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_f: torch.Tensor,
    log_i: torch.Tensor,
    S0: torch.Tensor | None = None,
    m0: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gated recurrence with an exponential input gate, kept in range by a running maximum.

    Per head, with a scalar log forget gate log f_t <= 0 (-inf: a reset) and an unbounded log
    input gate i_t:

        S_t = f_t S_{t-1} + exp(i_t) k_t v_t^T                     (the true state)
        m_t = max(log f_t + m_{t-1}, i_t)                          (the stabiliser)
        S~_t = exp(-m_t) S_t,   o~_t = S~_t^T q_t = exp(-m_t) S_t^T q_t

    Returns (o~ [batch, heads, time, d_v], S~_last [batch, heads, d_k, d_v], m [batch, heads,
    time]); the final stabiliser is m[..., -1]. The initial state is (S0, m0), S0 meaning
    S~_0 (zeros if None) and m0 [batch, heads] (zeros if None, as xLSTM's zero state).

    Design: exp(i_t) overflows float32 for i_t > 88, so the true state is never formed. In the
    scaled state the recurrence reads

        S~_t = exp(log f_t + m_{t-1} - m_t) S~_{t-1} + exp(i_t - m_t) k_t v_t^T,

    and both exponents are <= 0 by the definition of m_t. m depends on the gates only, not on
    the state, so it is computed first (``reference``: the loop above; ``chunk``/``parallel``:
    within a chunk, m_t = c_t + max(m_start, max_{j<=t} (i_j - c_j)) with c the chunk-local
    cumulative log f, and the last m carried to the next chunk; with resets, log f_t = -inf,
    m_t = i_t: the maximum runs from the last reset and m_start counts only before the chunk's
    first, see ``recur.ops.scan.reset_cumsum``), and the scaled recurrence is
    then ``gated_matrix`` with log alpha'_t = log f_t + m_{t-1} - m_t and k'_t = exp(i_t - m_t) k_t,
    in the same mode, with all of its numerics (every exponent <= 0). The stabiliser is
    therefore a primitive, not a layer detail: its chunked form is what makes the chunked
    mode match the step-by-step mode exactly, final (S~, m) included. Only a per-head
    forget gate is supported: one running maximum must scale the whole state of a head.

    A caller reads ratios in which exp(-m_t) cancels: mLSTM appends a ones column to v, so
    the last column of o~ is the normaliser n~_t^T q_t, and divides by
    max(|n~_t^T q_t|, exp(-m_t)) = exp(-m_t) max(|n_t^T q_t|, 1).
    """
    _check_mode(mode, chunk_size)
    _check(q, k, v, None, S0, "gated_matrix_stabilized")
    B, H, T, K = q.shape
    for name, t, shape in (("log_f", log_f, (B, H, T)), ("log_i", log_i, (B, H, T)), ("m0", m0, (B, H))):
        if t is None and name == "m0":
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"gated_matrix_stabilized: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != shape:
            raise ValueError(f"gated_matrix_stabilized: {name} must have shape {shape}, got {tuple(t.shape)}")
    dtype = q.dtype
    work = _work_dtype(dtype)
    q, k, v = q.to(work), k.to(work), v.to(work)
    log_f, log_i = log_f.to(work), log_i.to(work)
    m0 = q.new_zeros(B, H) if m0 is None else m0.to(work)

    if mode == "reference":
        m = _running_max(log_f, log_i, m0)
    else:
        m = _running_max_chunked(log_f, log_i, m0, chunk_size if mode == "chunk" else T)
    m_prev = torch.cat([m0.unsqueeze(-1), m[..., :-1]], dim=-1)
    log_alpha = log_f + m_prev - m  # <= 0: m_t >= log f_t + m_{t-1}
    k = k * (log_i - m).exp().unsqueeze(-1)  # exponent <= 0: m_t >= i_t
    o, S = gated_matrix(q, k, v, log_alpha, S0 if S0 is None else S0.to(work), mode=mode, chunk_size=chunk_size)
    return o.to(dtype), S.to(dtype), m.to(dtype)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _check_mode(mode, chunk_size) -> None:
    if mode not in MODES:
        raise ValueError(f"gated_matrix mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check(q, k, v, log_alpha, S0, fn) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("log_alpha", log_alpha), ("S0", S0)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if q.ndim != 4:
        raise ValueError(f"{fn}: q must have shape [batch, heads, time, d_k], got {tuple(q.shape)}")
    B, H, T, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"{fn}: k must have q's shape [batch, heads, time, d_k]={tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"{fn}: v must have shape [batch={B}, heads={H}, time={T}, d_v], got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or (S0 is not None and S0.dtype != q.dtype):
        raise TypeError(f"{fn}: q, k, v and S0 must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {getattr(S0, 'dtype', None)}")
    if log_alpha is not None and tuple(log_alpha.shape) not in ((B, H, T), (B, H, T, K)):
        raise ValueError(
            f"{fn}: log_alpha must have shape [batch, heads, time]={(B, H, T)} or "
            f"[batch, heads, time, d_k]={(B, H, T, K)}, got {tuple(log_alpha.shape)}"
        )
    if S0 is not None and tuple(S0.shape) != (B, H, K, v.shape[-1]):
        raise ValueError(f"{fn}: S0 must have shape [batch, heads, d_k, d_v]={(B, H, K, v.shape[-1])}, got {tuple(S0.shape)}")


def _reference(q, k, v, g, S, before: bool, u):
    """The recurrence, one step at a time. g: [batch, heads, time, G]; S: [batch, heads, d_k, d_v]."""
    # Per-step views prepared outside the loop: a_t [b, h, G, 1], q_t [b, h, 1, d_k],
    # k_t [b, h, d_k, 1], v_t [b, h, 1, d_v].
    steps = zip(*(t.unbind(2) for t in (g.exp().unsqueeze(-1), q.unsqueeze(-2), k.unsqueeze(-1), v.unsqueeze(-2))))
    outs = []
    for a_t, q_t, k_t, v_t in steps:
        S_next = torch.addcmul(a_t * S, k_t, v_t)
        outs.append(q_t @ (S if before else S_next))  # [batch, heads, 1, d_v]
        S = S_next
    o = torch.cat(outs, dim=2)
    if u is not None:  # the current token's bonus (q_t * u . k_t) v_t reads no state
        o = o + (q * u * k).sum(-1, keepdim=True) * v
    return o, S


def _running_max(log_f, log_i, m):
    """m_t = max(log f_t + m_{t-1}, i_t), one step at a time. log_f, log_i: [batch, heads, time]."""
    ms = []
    for lf_t, li_t in zip(log_f.unbind(-1), log_i.unbind(-1)):
        m = torch.maximum(lf_t + m, li_t)
        ms.append(m)
    return torch.stack(ms, dim=-1)


def _running_max_chunked(log_f, log_i, m, chunk_size: int):
    """The same m in closed form inside chunks: m_t = c_t + max(m_start, max_{j<=t} (i_j - c_j))."""
    T = log_f.shape[-1]
    n_chunks = math.ceil(T / chunk_size)
    pad = n_chunks * chunk_size - T
    if pad:  # padding steps have f = 1 and i = -inf: they leave m unchanged
        log_f, log_i = F.pad(log_f, (0, pad)), F.pad(log_i, (0, pad), value=-math.inf)
    # chunk-local cumulative log f; with resets (log f = -inf) the maximum restarts at each,
    # and the entering m counts only before the chunk's first (``reset_cumsum``)
    c, n = reset_cumsum(rearrange(log_f, "b h (n c) -> b h n c", c=chunk_size), dim=-1)
    best = rearrange(log_i, "b h (n c) -> b h n c", c=chunk_size) - c
    best = best.cummax(-1).values if n is None else segment_cummax(best, n, dim=-1)  # max_{j<=t} (i_j - c_j)
    starts = []
    open_last = [None] * n_chunks if n is None else (n[..., -1] == 0).unbind(2)  # no reset in the chunk
    for c_last, best_last, open_c in zip(c[..., -1].unbind(2), best[..., -1].unbind(2), open_last):  # carry m
        starts.append(m)
        m = c_last + torch.maximum(m if open_c is None else torch.where(open_c, m, -math.inf), best_last)
    start = torch.stack(starts, dim=2).unsqueeze(-1)
    m = c + torch.maximum(start if n is None else torch.where(n == 0, start, -math.inf), best)
    return rearrange(m, "b h n c -> b h (n c)")[..., :T]


def _chunked(q, k, v, g, S, chunk_size: int, before: bool, u):
    """Chunkwise form: masked matmuls inside chunks, the state passed between chunks."""
    T = q.shape[2]
    n_chunks = math.ceil(T / chunk_size)
    pad = n_chunks * chunk_size - T
    if pad:  # padding steps have k = v = 0 and alpha = 1: they leave the state unchanged
        q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    q, k, v, g = (rearrange(t, "b h (n c) d -> b h n c d", c=chunk_size) for t in (q, k, v, g))
    C = chunk_size
    limit = FACTOR_LIMIT.get(q.dtype)
    with torch.no_grad():
        factor = g.shape[-1] > 1 and limit is not None and bool((g.sum(-2) >= -limit).all())
    if factor:
        # Per-dimension decays small enough to factor through the chunk start (see
        # _intra_scores): e^{cq} and e^{-c} serve the intra-chunk scores, the state update
        # (e^{c_last - c} = e^{c_last} e^{-c}) and the read of the entering state alike.
        q_dec, k_inv, k_end, c_last = _factored_decays(q, k, g, before)
        # in place: the matmul's backward does not read its output; tril_'s backward is one
        # pass (grad.tril), a masked_fill_'s a copy and a fill
        scores = (q_dec @ k_inv.transpose(-1, -2)).tril_(-1 if before else 0)
    else:
        # log decay from the chunk start through step i (inclusive), with n the count of resets
        # (None without any: see ``reset_cumsum``)
        c, n = reset_cumsum(g, dim=-2)
        c_last, n_last = c[..., -1:, :], None if n is None else n[..., -1:, :]  # [b, h, n, 1, G]
        # The query's log decay: through step i, or through step i-1 when it reads the state
        # before the update (the exclusive cumulative sum, shifted so c_{i-1} - c_{i-1} is exactly 0).
        shift = lambda t: None if t is None else F.pad(t[..., :-1, :], (0, 0, 1, 0))  # noqa: E731
        cq, nq = (shift(c), shift(n)) if before else (c, n)
        scores = _intra_scores(q, k, cq, c, strict=before, nq=nq, nk=n)  # steps inside the same chunk
        q_dec, k_end = q * log_since_start(cq, nq).exp(), k * log_gap(c_last, c, n_last, n).exp()
        c_last = log_since_start(c_last, n_last)  # the chunk's total decay: 0 if it holds a reset
    if u is not None:  # the bonus is the diagonal of the intra-chunk scores
        scores = scores + torch.diag_embed((q * u.unsqueeze(-3) * k).sum(-1))
    o = scores @ v

    # State passing: each chunk adds its k_j decayed to the chunk end, times v_j, to the state
    # decayed over the chunk: S_n = e^{c_last,n} S_{n-1} + update_n, a diagonal scan over chunks
    # (one compiled pass on CPU) whose channels are the d_k x d_v state entries.
    update = k_end.transpose(-1, -2) @ v  # [b, h, n, d_k, d_v]
    bh, n, dk, dv = q.shape[0] * q.shape[1], update.shape[2], update.shape[3], update.shape[4]
    log_decay = c_last.transpose(-1, -2).reshape(bh, n, -1, 1)  # [bh, n, G, 1]
    states = fast_scan(log_decay, update.reshape(bh, n, dk, dv), S.reshape(bh, dk, dv)).view(update.shape)
    # the state entering chunk n is S_{n-1}: chunk 0 reads S, the others the scan's states; one
    # batched matmul-add over all chunks (its backward too) instead of two slices' matmuls and
    # in-place adds, whose strided slice and backward cost more (A/B fwd+bwd: 143 -> 134 ms)
    entering = torch.cat([S.unsqueeze(2), states[:, :, :-1]], dim=2)
    o = torch.baddbmm(o.flatten(0, 2), q_dec.flatten(0, 2), entering.flatten(0, 2)).view(o.shape)
    o = rearrange(o, "b h n c d -> b h (n c) d")[:, :, :T]
    return o, states[:, :, -1]


def _factored_decays(q, k, g, before: bool):
    """(q e^{cq}, k e^{-c}, k e^{c_last - c}, c_last) for c = the chunk's cumulative sum of g
    (per key dimension, every c_last >= -FACTOR_LIMIT) and cq = c, or c shifted by one step
    when the output reads the state before the update. CPU: one compiled pass each way
    (``gated_kernels.gla_decays``); elsewhere PyTorch ops."""
    if kernels.can_real(k):
        return gated_kernels.gla_decays(q, k, g, before)
    c = g.cumsum(dim=-2)
    c_last = c[..., -1:, :]
    e_c = c.exp()  # in [e^-limit, 1]: dividing by it is safe and saves an exp
    q_dec = q * (F.pad(c[..., :-1, :], (0, 0, 1, 0)).exp() if before else e_c)
    k_inv = k / e_c
    return q_dec, k_inv, k_inv * c_last.exp(), c_last


def _intra_scores(q, k, cq, ck, strict: bool, nq=None, nk=None):
    """Decayed causal scores A[i, j] = sum_d q_id k_jd exp(cq_id - ck_jd) for j <= i (j < i if
    ``strict``), else 0; and 0 where a reset lies between the two (nq_i != nk_j).

    q, k: [..., C, d_k]; cq, ck: [..., C, G] cumulative log decays of queries and keys (G = 1 or
    d_k), with cq_i - ck_j <= 0 on the unmasked pairs; nq, nk: their counts of resets, or None
    (``reset_cumsum``). Returns [..., C, C].
    """
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1 if strict else 0)
    tr = lambda t: None if t is None else t.transpose(-1, -2)  # noqa: E731
    if ck.shape[-1] == 1:  # one decay per head: the decay factors out of the dot product
        diff = log_gap(cq, ck.transpose(-1, -2), nq, tr(nk)).masked_fill(~causal, -math.inf)
        return (q @ k.transpose(-1, -2)) * diff.exp()

    if C & (C - 1) == 0:  # a power of two: recursive halving, no [C, C, d_k] tensor
        return decayed_scores(q, k, cq, ck, strict, nq, nk)

    # Other chunk lengths: per-dimension decays in sub-chunks of length s (a divisor of C).
    s = max(d for d in range(1, min(C, SUB_CHUNK) + 1) if C % d == 0)
    A = C // s
    subs = lambda t: None if t is None else rearrange(t, "... (a s) d -> ... a s d", s=s)  # noqa: E731
    qs, ks, cqs, cks, nqs, nks = (subs(t) for t in (q, k, cq, ck, nq, nk))
    unsq = lambda t, d: None if t is None else t.unsqueeze(d)  # noqa: E731

    # Pairs within one sub-chunk: pairwise decays, masked before exp.
    tri = causal[:s, :s]
    diff = log_gap(cqs.unsqueeze(-2), cks.unsqueeze(-3), unsq(nqs, -2), unsq(nks, -3))
    diff = diff.masked_fill(~tri[:, :, None], -math.inf)  # [..., a, i, j, d_k]
    diag = torch.einsum("...id,...jd,...ijd->...ij", qs, ks, diff.exp())  # [..., a, s, s]

    # Pairs in earlier sub-chunks: through the reference point r_a (ck just before sub-chunk a;
    # a query of sub-chunk a has decayed at least that far, also when it reads the state before
    # its own update, since its exclusive sum starts at r_a).
    before_sub = lambda t: torch.cat([torch.zeros_like(t[..., :1, -1:, :]), t[..., :-1, -1:, :]], dim=-3)  # noqa: E731
    r, nr = before_sub(cks), None if nks is None else before_sub(nks)  # [..., a, 1, d_k]
    q_r = qs * log_gap(cqs, r, nqs, nr).exp()  # exponent <= 0
    earlier = torch.arange(C, device=q.device)[None, :] < (s * torch.arange(A, device=q.device))[:, None]  # [a, C]
    to_ref = log_gap(r, ck.unsqueeze(-3), nr, unsq(nk, -3))
    to_ref = to_ref.masked_fill(~earlier[:, :, None], -math.inf)  # [..., a, C, d_k], exponent <= 0
    k_r = k.unsqueeze(-3) * to_ref.exp()
    scores = rearrange(q_r @ k_r.transpose(-1, -2), "... a i (b j) -> ... a i b j", j=s)
    on_diag = torch.eye(A, dtype=torch.bool, device=q.device)[:, None, :, None]
    scores = torch.where(on_diag, diag.unsqueeze(-2), scores)
    return rearrange(scores, "... a i b j -> ... (a i) (b j)")


def decayed_scores(x, y, cx, cy, strict: bool, nx=None, ny=None):
    """A[i, j] = sum_d x_id y_jd exp(cx_id - cy_jd) for j <= i (j < i if ``strict``), else 0.

    x, y: [..., C, d] (leading dimensions broadcast); cx, cy: [..., C, G] cumulative log decays,
    G = d (per dimension) or 1 (per head), non-increasing along C with cx_i <= cy_j whenever
    j <= i (j < i if strict) and cx_i <= cy_i. C must be a power of two. Returns [..., C, C].
    With resets (``reset_cumsum``), nx, ny [..., C, G] count them: a term is 0 where a reset lies
    between the two (nx_id != ny_jd), and a cross term through r is 0 if one lies on either side.

    Every exponent is <= 0, so decays that underflow give exact zeros, never inf or NaN. With one
    decay per head the masked pairwise differences are exponentiated directly. Per dimension, the
    chunk is halved recursively: for each block, the pairs (i in its second half, j in its first)
    go through the reference point r = cy at the end of the first half,
        x_i e^{cx_i - r} . y_j e^{r - cy_j}     (both exponents <= 0),
    one matmul per level: log2(C) levels of O(C d) scaling instead of a [C, C, d] tensor.
    """
    C = x.shape[-2]
    if cy.shape[-1] == 1:
        causal = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
        diff = log_gap(cx, cy.transpose(-1, -2), nx, None if ny is None else ny.transpose(-1, -2))
        return (x @ y.transpose(-1, -2)) * diff.masked_fill(~causal, -math.inf).exp()
    lead = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2], cx.shape[:-2], cy.shape[:-2])
    if strict:
        A = x.new_zeros(*lead, C, 1, 1)
    else:
        A = (x * y * log_gap(cx, cy, nx, ny).exp()).sum(-1).expand(*lead, C)[..., None, None]
    h = 1
    while h < C:  # blocks of size h (A: [..., C / h, h, h]) are paired into blocks of size 2h
        halves = lambda t: t.unflatten(-2, (C // (2 * h), 2, h))  # noqa: E731  [..., blocks, 2, h, d]
        late = lambda t: None if t is None else halves(t)[..., 1, :, :]  # noqa: E731  queries: second halves
        early = lambda t: None if t is None else halves(t)[..., 0, :, :]  # noqa: E731  keys: first halves
        xs, cxs, nxs = late(x), late(cx), late(nx)
        ys, cys, nys = early(y), early(cy), early(ny)
        r, nr = cys[..., -1:, :], None if nys is None else nys[..., -1:, :]
        cross = (xs * log_gap(cxs, r, nxs, nr).exp()) @ (ys * log_gap(r, cys, nr, nys).exp()).transpose(-1, -2)
        A = A.unflatten(-3, (C // (2 * h), 2))  # [..., blocks, 2, h, h]
        first, second = A[..., 0, :, :], A[..., 1, :, :]
        A = torch.cat([torch.cat([first, torch.zeros_like(first)], -1), torch.cat([cross, second], -1)], -2)
        h *= 2
    return A.squeeze(-3)
