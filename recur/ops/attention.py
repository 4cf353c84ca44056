"""Causal softmax attention over a KV cache, full or sliding-window.

Queries are the last ``T`` tokens of a sequence whose keys/values ``k, v`` [batch, heads, S, d]
hold ``S - T`` cached tokens first, then the queries' own tokens: key index j is the token
at absolute position P - (S - T) + j when the queries sit at P .. P+T-1. Query i (key index
a = S - T + i) sees key j iff  j <= a  and (window is None or a - j < window), i.e. itself and
at most ``window - 1`` earlier tokens:

    o_i = sum_j softmax_j(scale * q_i . k_j) v_j      over the visible j;  scale = 1/sqrt(d_k).

Only relative positions matter here; rotary positions are applied by the layer before.

Packed documents: ``first`` [batch, T] (int64) hides, for each query, the keys before its
document's first key index (key j visible iff first_i <= j as well): a block-diagonal causal
mask. A query always sees its own token (first_i <= a).

    attention(q, k, v, window=None, mode="parallel")   # [batch, heads, T, d_v]
    attention_step(q, k, v, window=None)               # one new query against the cache
    trim_cache(k, window)                              # keep the last window - 1 tokens
    append_to_cache(cache, new, window)                # concatenate, then trim

Modes: ``reference`` (one query at a time, the oracle) and ``parallel`` (blocks of queries,
each one call of ``scaled_dot_product_attention`` with an explicit additive mask; it agrees
with the reference to ~1e-15 in float64, forward and backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recur.ops import trace

MODES = ("reference", "parallel")

# Largest score block (queries x keys x batch x heads) one parallel step may materialise:
# 2^28 elements = 1 GB in float32, whatever the context length. SDPA's fused kernels (the CPU
# flash kernel, CUDA flash/efficient) never materialise it; its math backend does. Larger
# blocks mean fewer kernel calls (at 100k cached keys, 512-query blocks run ~1.6x faster
# than 128-query blocks on CPU).
_BLOCK_ELEMENTS = 1 << 28
_PACKED_BLOCK = 128  # queries per block with packed documents (see _parallel)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    scale: float | None = None,
    mode: str = "parallel",
    query_block: int | None = None,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal (optionally sliding-window) softmax attention of the last T tokens over all S keys.

    q: [batch, heads, T, d_k]; k: [batch, heads, S, d_k]; v: [batch, heads, S, d_v], S >= T.
    ``window``: a query sees itself and ``window - 1`` earlier tokens (None: all earlier ones).
    ``query_block``: queries per block in parallel mode (default: the largest power of two
    keeping the block's scores under 2^28 elements). ``first`` (optional) int64 [batch, T]: the
    first key index each query may see (its document's start; see the module docstring).
    Returns [batch, heads, T, d_v].
    """
    _check(q, k, v, window, mode)
    _check_first(first, q.shape[0], q.shape[2], k.shape[2])
    if query_block is not None and (isinstance(query_block, bool) or not isinstance(query_block, int) or query_block < 1):
        raise ValueError(f"query_block must be None or an int >= 1, got {query_block!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    if mode == "reference":
        o = _reference(q, k, v, window, scale, first)
    else:
        o = _parallel(q, k, v, window, scale, query_block, first)
    trace.record(attention, dict(q=q, k=k, v=v, window=window, scale=scale, mode=mode, first=first), "v", None, o)
    return o


def attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int | None = None,
                   scale: float | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding step: the newest token's query against the cache that already holds its key.

    q: [batch, heads, d_k]; k, v: [batch, heads, S, d] (the last entry is the query's own token);
    ``first`` (optional) int64 [batch]: the first key index the query may see.
    Returns [batch, heads, d_v]; equals the last row of ``attention`` over the same keys.
    """
    if q.ndim != 3 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention_step: q must be [batch, heads, d_k] matching k [batch, heads, S, d_k], got {tuple(q.shape)} and {tuple(k.shape)}")
    _check(q[:, :, None], k, v, window, "reference")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    _check_first(None if first is None else first[:, None], q.shape[0], 1, k.shape[2])
    lo = 0 if window is None else max(0, k.shape[2] - window)
    hidden = None if first is None else _hidden(first[:, None], lo, k.shape[2])[:, 0]
    return _attend(q, k[:, :, lo:], v[:, :, lo:], scale, hidden)


def trim_cache(kv: torch.Tensor, window: int | None) -> torch.Tensor:
    """The cache to carry after these tokens: everything (full attention) or the last window - 1.

    kv: [batch, heads, S, d]. The next query sees itself plus window - 1 earlier tokens, so
    older entries can never be seen again.
    """
    if window is None:
        return kv
    keep = window - 1
    # contiguous(): a trimmed cache is a copy, so the dropped entries' memory is freed.
    return kv[:, :, max(0, kv.shape[2] - keep) :].contiguous()


def append_to_cache(cache: torch.Tensor, new: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """``cache`` [batch, heads, L, d] followed by ``new`` [batch, heads, T, d], trimmed for ``window``."""
    return trim_cache(torch.cat([cache, new], dim=2), window)


# ------------------------------------------------------------------------------ modes
def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
            hidden: torch.Tensor | None = None) -> torch.Tensor:
    # q: [batch, heads, d_k]; k, v: [batch, heads, n, d] -> [batch, heads, d_v]; all visible but
    # the keys where hidden [batch, n] is True
    scores = scale * torch.einsum("bhd,bhnd->bhn", q, k)
    if hidden is not None:
        scores = scores.masked_fill(hidden[:, None], float("-inf"))
    return torch.einsum("bhn,bhnd->bhd", torch.softmax(scores, dim=-1), v)


def _hidden(first: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """[batch, queries, hi - lo] True where key index lo..hi-1 is before the query's first key."""
    return torch.arange(lo, hi, device=first.device) < first[..., None]


def _reference(q, k, v, window, scale, first=None):
    T, S = q.shape[2], k.shape[2]
    out = []
    for i in range(T):
        a = S - T + i  # key index of query i's own token
        lo = 0 if window is None else max(0, a - window + 1)
        hidden = None if first is None else _hidden(first[:, i], lo, a + 1)
        out.append(_attend(q[:, :, i], k[:, :, lo : a + 1], v[:, :, lo : a + 1], scale, hidden))
    return torch.stack(out, dim=2)


def _parallel(q, k, v, window, scale, query_block, first=None):
    B, H, T, _ = q.shape
    S = k.shape[2]
    n = query_block if query_block is not None else _default_block(T, S, window, B * H)
    if first is not None and query_block is None:
        # packed documents: blocks of at most 128 queries read keys from their earliest
        # document start on, so the cost follows the documents' lengths, not the row's
        n = min(n, _PACKED_BLOCK)
    out = []
    for s in range(0, T, n):
        m = min(n, T - s)
        a0 = S - T + s  # key index of the block's first query
        lo = 0 if window is None else max(0, a0 - window + 1)
        if first is not None:
            lo = max(lo, int(first[:, s : s + m].min()))
        hi = a0 + m
        qb, kb, vb = q[:, :, s : s + m], k[:, :, lo:hi], v[:, :, lo:hi]
        if first is not None:
            # packed documents: the causal (window) mask and the document mask, per row
            a = torch.arange(a0, hi, device=q.device)[:, None]
            j = torch.arange(lo, hi, device=q.device)[None, :]
            visible = (j <= a) if window is None else (j <= a) & (a - j < window)
            visible = visible & ~_hidden(first[:, s : s + m], lo, hi)  # [batch, m, keys]
            out.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=visible[:, None], scale=scale))
        elif lo == a0 and (window is None or window >= m):
            # A square block the window does not cut: SDPA's own causal mask.
            out.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale))
        else:
            mask = _reversed_rows_mask(m, hi - lo, window, q.dtype, q.device)
            out.append(F.scaled_dot_product_attention(qb.flip(2), kb, vb, attn_mask=mask, scale=scale).flip(2))
    return out[0] if len(out) == 1 else torch.cat(out, dim=2)


def _default_block(T: int, S: int, window: int | None, bh: int) -> int:
    def span(n):  # keys one block of n queries can see
        return S if window is None else min(S, window - 1 + n)

    n = 1
    while n < T and 2 * n * span(2 * n) * bh <= _BLOCK_ELEMENTS:
        n *= 2
    return n


def _reversed_rows_mask(m: int, kv: int, window: int | None, dtype, device) -> torch.Tensor:
    """Additive mask [m, kv] (0 visible, -inf hidden) for a block whose last query is the last key, rows reversed.

    Query r (rows in natural order) is key kv - m + r and sees key c iff 0 <= kv - m + r - c < window:
    the mask depends on c - r only. With rows reversed (r' = m - 1 - r) it depends on r' + c,
    so a 1-D buffer viewed with strides (1, 1) holds it in O(m + kv) memory instead of O(m * kv),
    and SDPA reads it without the cost of building (or converting) a dense mask.
    """
    last = kv - 1  # query r' sees key c iff last - window < r' + c <= last
    i = torch.arange(m + kv - 1, device=device)
    visible = i <= last
    if window is not None:
        visible &= i > last - window
    buf = torch.zeros(m + kv - 1, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    return buf.as_strided((m, kv), (1, 1))


def _check_first(first, B: int, T: int, S: int) -> None:
    if first is None:
        return
    if not isinstance(first, torch.Tensor) or first.dtype != torch.int64 or tuple(first.shape) != (B, T):
        raise ValueError(f"first must be an int64 tensor [batch, queries]={(B, T)} of key indices, "
                         f"got {getattr(first, 'dtype', type(first).__name__)} {tuple(getattr(first, 'shape', ()))}")


def _check(q, k, v, window, mode) -> None:
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, heads, time, d], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q [batch, heads, T, d_k], k [batch, heads, S, d_k], v [batch, heads, S, d_v] must agree, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"keys must include the queries' own tokens (S >= T), got S={k.shape[2]} < T={q.shape[2]}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or an int >= 1 (a query sees itself and window - 1 earlier tokens), got {window!r}")
