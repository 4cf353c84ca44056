"""The (gated) delta rule, per head:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ;   o_t = S_t^T q_t

DeltaNet has alpha_t = 1; Gated DeltaNet has a per-head scalar alpha_t = exp(log_alpha_t).
No normalisation or scaling happens here: the layer L2-normalises q, k and scales q.

Modes
    reference  the sequential loop (the oracle).
    chunk      the chunkwise WY / UT-transform form of Yang et al. 2024, "Parallelizing
               Linear Transformers with the Delta Rule over Sequence Length", with the
               decay of "Gated Delta Networks: Improving Mamba2 with Delta Rule".

Shapes: q, k: [batch, heads, time, d_k]; v: [batch, heads, time, d_v];
beta, log_alpha: [batch, heads, time]; S0 and the returned state: [batch, heads, d_k, d_v].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

MODES = ("reference", "chunk")


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_alpha: torch.Tensor | None = None,
    S0: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Gated) delta rule over a sequence; returns (o [batch, heads, time, d_v], S_last).

    ``log_alpha`` (<= 0) is the per-head log decay, ``None`` for no decay (DeltaNet).
    ``beta`` is the writing strength, in (0, 1) (up to 2 allows negative eigenvalues).
    Half-precision inputs are computed in float32 and returned in their own dtype.
    """
    _check(q, k, v, beta, log_alpha, S0)
    if mode not in MODES:
        raise ValueError(f"delta_rule mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    B, H, _, Dk = k.shape
    Dv = v.shape[-1]
    if S0 is None:
        S0 = torch.zeros(B, H, Dk, Dv, device=q.device, dtype=work)
    q, k, v, beta, S0 = (t.to(work) for t in (q, k, v, beta, S0))
    if log_alpha is not None:
        log_alpha = log_alpha.to(work)
    if mode == "reference":
        o, S = _reference(q, k, v, beta, log_alpha, S0)
    else:
        o, S = _chunk(q, k, v, beta, log_alpha, S0, chunk_size)
    return o.to(dtype), S.to(dtype)


def _check(q, k, v, beta, log_alpha, S0) -> None:
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [batch, heads, time, d_k], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T, Dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be [batch={B}, heads={H}, time={T}, d_v], got {tuple(v.shape)}")
    if beta.shape != (B, H, T):
        raise ValueError(f"beta must be [batch={B}, heads={H}, time={T}], got {tuple(beta.shape)}")
    if log_alpha is not None and log_alpha.shape != (B, H, T):
        raise ValueError(f"log_alpha must be [batch={B}, heads={H}, time={T}] or None, got {tuple(log_alpha.shape)}")
    if S0 is not None and S0.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"S0 must be [batch={B}, heads={H}, d_k={Dk}, d_v={v.shape[-1]}] or None, got {tuple(S0.shape)}")


def _reference(q, k, v, beta, log_alpha, S):
    """The loop. alpha (I - beta k k^T) S + beta k v^T is written as
    S' = alpha S ;  S = S' + beta k (v - S'^T k)^T   (write the error of the current read)."""
    bk = beta[..., None] * k
    alpha = None if log_alpha is None else log_alpha.exp()
    outs = []
    # unbind over time: indexing inside the loop would make backward quadratic in T
    alphas = [None] * q.shape[2] if alpha is None else alpha.unbind(2)
    for q_t, k_t, v_t, bk_t, a_t in zip(q.unbind(2), k.unbind(2), v.unbind(2), bk.unbind(2), alphas):
        if a_t is not None:
            S = a_t[:, :, None, None] * S
        read = (k_t[:, :, None, :] @ S).squeeze(-2)  # S^T k_t: [batch, heads, d_v]
        S = S + bk_t[:, :, :, None] * (v_t[:, :, None, :] - read[:, :, None, :])
        outs.append((q_t[:, :, None, :] @ S).squeeze(-2))
    return torch.stack(outs, dim=2), S


def _chunk(q, k, v, beta, log_alpha, S, chunk_size):
    """Chunkwise form. Within a chunk (positions i = 0..C-1, entering state S) let
    g_i = sum_{j<=i} log alpha_j and write the update as S_i = alpha_i S_{i-1} + k_i u_i^T with
    u_i = beta_i (v_i - alpha_i S_{i-1}^T k_i). Unrolling alpha_i S_{i-1} gives the unit lower
    triangular system (I + A) U = diag(beta) (V - diag(e^g) K S), A_ij = beta_i e^{g_i - g_j} k_i.k_j
    for j < i. With T = (I + A)^{-1} diag(beta) (the UT transform), W = T diag(e^g) K, U0 = T V:
        U        = U0 - W S
        O        = diag(e^g) Q S + (Q K^T * D) U,          D_ij = e^{g_i - g_j} for j <= i
        S_next   = e^{g_last} S + (diag(e^{g_last - g}) K)^T U
    Every decay is the exp of a difference g_i - g_j <= 0 (masked to -inf above the diagonal
    before the exp), so decays that underflow give exact zeros, never inf or NaN.
    """
    B, H, T, Dk = k.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    # Padded steps have k = v = beta = 0 and log alpha = 0: they leave the state unchanged.
    if log_alpha is None:
        log_alpha = torch.zeros_like(beta)
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta, log_alpha = (F.pad(t, (0, pad)) for t in (beta, log_alpha))
    q, k, v = (rearrange(t, "b h (n c) d -> b h n c d", c=C) for t in (q, k, v))
    beta, log_alpha = (rearrange(t, "b h (n c) -> b h n c", c=C) for t in (beta, log_alpha))

    g = log_alpha.cumsum(-1)  # [b, h, n, c]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = causal.tril(-1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [b, h, n, c, c]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)

    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0.0)
    Tm = torch.linalg.solve_triangular(eye + A, torch.diag_embed(beta), upper=False, unitriangular=True)
    W = Tm @ (k * g.exp()[..., None])
    U0 = Tm @ v
    P = (q @ k.transpose(-1, -2)) * decay
    q_dec = q * g.exp()[..., None]
    g_last = g[..., -1:]  # [b, h, n, 1]
    k_dec = k * (g_last - g).exp()[..., None]

    # Only the state crosses chunks: a loop over n chunks of small matmuls.
    states = []
    chunks = zip(U0.unbind(2), W.unbind(2), g_last.exp().unbind(2), k_dec.unbind(2))
    for U0_c, W_c, decay_c, k_dec_c in chunks:
        states.append(S)
        U = U0_c - W_c @ S
        S = decay_c[:, :, :, None] * S + k_dec_c.transpose(-1, -2) @ U
    Sc = torch.stack(states, dim=2)  # state entering each chunk: [b, h, n, d_k, d_v]
    o = q_dec @ Sc + P @ (U0 - W @ Sc)
    o = rearrange(o, "b h n c d -> b h (n c) d")[:, :, :T]
    return o, S
