"""The gated matrix-state recurrence (gated linear attention), per head:

    S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T        S: [d_k, d_v]
    o_t = S_t^T q_t

    q, k:      [batch, heads, time, d_k]
    v:         [batch, heads, time, d_v]
    log_alpha: [batch, heads, time, d_k]  per key dimension (GLA, GateLoop, HGRN-2)
               [batch, heads, time]       one decay per head and step (RetNet, Mamba-2)
               None                       alpha = 1 (linear attention, fast weights)
    S0:        [batch, heads, d_k, d_v] or None (zeros)

Modes (all equal to ``reference`` up to summation order):

* ``reference``: the loop above; the oracle.
* ``chunk``: the sequence is cut into chunks of ``chunk_size``. Inside a chunk the
  outputs are masked matmuls (the attention-like form); between chunks only the
  state is passed, so the cost is linear in time.
* ``parallel``: one chunk spanning the whole sequence (quadratic in time, like
  attention), including the initial state's contribution and the final state.

Numerics. With c_t the cumulative log decay inside a chunk, the decay from step j to
step i >= j is exp(c_i - c_j) (per key dimension). Forming exp(c_i) and exp(-c_j)
separately overflows as soon as the decays underflow within a chunk, so every
exponent here is <= 0: pairwise differences are masked (to -inf) before exp, and for
per-dimension decays, pairs in different sub-chunks go through the reference point
r = c at the end of the previous sub-chunk: exp(c_i - r) * exp(r - c_j), both factors
<= 1 (Yang et al. 2023, secondary-level chunking).

Low-precision inputs (float16/bfloat16) are computed in float32 and cast back.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange

MODES = ("reference", "chunk", "parallel")
SUB_CHUNK = 16  # sub-chunk length for per-dimension decays (pairwise tensor [sub, sub, d_k])


def gated_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    S0: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; return (o, S_last).

    o: [batch, heads, time, d_v] and S_last: [batch, heads, d_k, d_v], in q's dtype.
    No scaling is applied to q or k. ``log_alpha`` (<= 0) may have another floating dtype.
    """
    if mode not in MODES:
        raise ValueError(f"gated_matrix mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check(q, k, v, log_alpha, S0)
    B, H, T, K = q.shape
    V = v.shape[-1]
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = q.to(work), k.to(work), v.to(work)
    # Decays as [batch, heads, time, G] with G = d_k (per dimension) or 1 (per head).
    if log_alpha is None:
        g = q.new_zeros(B, H, T, 1)
    else:
        g = log_alpha.to(work)
        g = g if g.ndim == 4 else g.unsqueeze(-1)
    S = q.new_zeros(B, H, K, V) if S0 is None else S0.to(work)

    if mode == "reference":
        o, S = _reference(q, k, v, g, S)
    elif mode == "chunk":
        o, S = _chunked(q, k, v, g, S, chunk_size)
    else:  # parallel: a single chunk over the (padded) sequence
        o, S = _chunked(q, k, v, g, S, SUB_CHUNK * math.ceil(T / SUB_CHUNK))
    return o.to(dtype), S.to(dtype)


def _check(q, k, v, log_alpha, S0) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("log_alpha", log_alpha), ("S0", S0)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            raise TypeError(f"gated_matrix: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if q.ndim != 4:
        raise ValueError(f"gated_matrix: q must have shape [batch, heads, time, d_k], got {tuple(q.shape)}")
    B, H, T, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"gated_matrix: k must have q's shape [batch, heads, time, d_k]={tuple(q.shape)}, got {tuple(k.shape)}")
    if v.ndim != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"gated_matrix: v must have shape [batch={B}, heads={H}, time={T}, d_v], got {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype or (S0 is not None and S0.dtype != q.dtype):
        raise TypeError(f"gated_matrix: q, k, v and S0 must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}, {getattr(S0, 'dtype', None)}")
    if log_alpha is not None and tuple(log_alpha.shape) not in ((B, H, T), (B, H, T, K)):
        raise ValueError(
            f"gated_matrix: log_alpha must have shape [batch, heads, time]={(B, H, T)} or "
            f"[batch, heads, time, d_k]={(B, H, T, K)}, got {tuple(log_alpha.shape)}"
        )
    if S0 is not None and tuple(S0.shape) != (B, H, K, v.shape[-1]):
        raise ValueError(f"gated_matrix: S0 must have shape [batch, heads, d_k, d_v]={(B, H, K, v.shape[-1])}, got {tuple(S0.shape)}")


def _reference(q, k, v, g, S):
    """The recurrence, one step at a time. g: [batch, heads, time, G]; S: [batch, heads, d_k, d_v]."""
    # Per-step views prepared outside the loop: a_t [b, h, G, 1], q_t [b, h, 1, d_k],
    # k_t [b, h, d_k, 1], v_t [b, h, 1, d_v].
    steps = zip(*(t.unbind(2) for t in (g.exp().unsqueeze(-1), q.unsqueeze(-2), k.unsqueeze(-1), v.unsqueeze(-2))))
    outs = []
    for a_t, q_t, k_t, v_t in steps:
        S = torch.addcmul(a_t * S, k_t, v_t)
        outs.append(q_t @ S)  # [batch, heads, 1, d_v]
    return torch.cat(outs, dim=2), S


def _chunked(q, k, v, g, S, chunk_size: int):
    """Chunkwise form: masked matmuls inside chunks, the state passed between chunks."""
    T = q.shape[2]
    n_chunks = math.ceil(T / chunk_size)
    pad = n_chunks * chunk_size - T
    if pad:  # padding steps have k = v = 0 and alpha = 1: they leave the state unchanged
        q, k, v, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, g))
    q, k, v, g = (rearrange(t, "b h (n c) d -> b h n c d", c=chunk_size) for t in (q, k, v, g))
    c = g.cumsum(dim=-2)  # log decay from the chunk start through step i (inclusive)
    c_last = c[..., -1:, :]  # [b, h, n, 1, G]

    o = _intra_scores(q, k, c) @ v  # contributions of steps inside the same chunk

    # State passing: each chunk adds its k_j decayed to the chunk end, times v_j.
    update = (k * (c_last - c).exp()).transpose(-1, -2) @ v  # [b, h, n, d_k, d_v]
    decay = c_last.exp().transpose(-1, -2)  # [b, h, n, G, 1]: total decay over the chunk
    entering = []
    for decay_n, update_n in zip(decay.unbind(2), update.unbind(2)):  # unbind: linear-cost backward
        entering.append(S)
        S = decay_n * S + update_n
    entering = torch.stack(entering, dim=2)  # state before each chunk: [b, h, n, d_k, d_v]
    o = o + (q * c.exp()) @ entering
    o = rearrange(o, "b h n c d -> b h (n c) d")[:, :, :T]
    return o, S


def _intra_scores(q, k, c):
    """Decayed causal scores A[i, j] = sum_d q_id k_jd exp(c_id - c_jd) for j <= i, else 0.

    q, k: [..., C, d_k]; c: [..., C, G] cumulative log decays (G = 1 or d_k). Returns [..., C, C].
    """
    C = q.shape[-2]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    if c.shape[-1] == 1:  # one decay per head: the decay factors out of the dot product
        diff = (c - c.transpose(-1, -2)).masked_fill(~causal, -math.inf)
        return (q @ k.transpose(-1, -2)) * diff.exp()

    # Per-dimension decays, in sub-chunks of length s (a divisor of C).
    s = max(d for d in range(1, min(C, SUB_CHUNK) + 1) if C % d == 0)
    A = C // s
    qs, ks, cs = (rearrange(t, "... (a s) d -> ... a s d", s=s) for t in (q, k, c))

    # Pairs within one sub-chunk: pairwise decays, masked before exp.
    tri = causal[:s, :s]
    diff = (cs.unsqueeze(-2) - cs.unsqueeze(-3)).masked_fill(~tri[:, :, None], -math.inf)  # [..., a, i, j, d_k]
    diag = torch.einsum("...id,...jd,...ijd->...ij", qs, ks, diff.exp())  # [..., a, s, s]

    # Pairs in earlier sub-chunks: through the reference point r_a (c just before sub-chunk a).
    r = torch.cat([torch.zeros_like(cs[..., :1, -1:, :]), cs[..., :-1, -1:, :]], dim=-3)  # [..., a, 1, d_k]
    q_r = qs * (cs - r).exp()  # exponent <= 0
    earlier = torch.arange(C, device=q.device)[None, :] < (s * torch.arange(A, device=q.device))[:, None]  # [a, C]
    to_ref = (r - c.unsqueeze(-3)).masked_fill(~earlier[:, :, None], -math.inf)  # [..., a, C, d_k], exponent <= 0
    k_r = k.unsqueeze(-3) * to_ref.exp()
    scores = rearrange(q_r @ k_r.transpose(-1, -2), "... a i (b j) -> ... a i b j", j=s)
    on_diag = torch.eye(A, dtype=torch.bool, device=q.device)[:, None, :, None]
    scores = torch.where(on_diag, diag.unsqueeze(-2), scores)
    return rearrange(scores, "... a i b j -> ... (a i) (b j)")
