"""The (gated) delta rule and its generalisation, the diagonal-plus-low-rank (DPLR) delta rule.

``delta_rule``, per head:

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ;   o_t = S_t^T q_t

DeltaNet has alpha_t = 1; Gated DeltaNet has a per-head scalar alpha_t = exp(log_alpha_t).
No normalisation or scaling happens here: the layer L2-normalises q, k and scales q.

``dplr_delta``, per head (RWKV-7's "generalised delta rule"):

    S_t = (Diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T ;   o_t = S_t^T q_t,   w_t = exp(log_w_t)

i.e. S_t = Diag(w_t) S_{t-1} + b_t (S_{t-1}^T a_t)^T + k_t v_t^T: the state is read at key a_t
(before this step's decay) and the read is written back at key b_t. w_t may differ per key
dimension. The delta rule is the special case log_w_t = log alpha_t (every dimension),
a_t = k_t, b_t = -alpha_t beta_t k_t and the written key beta_t k_t. RWKV-7 has
a_t = -kappa_t, b_t = kappa_t * a~_t (kappa the normalised removal key, a~ the in-context
learning rate) and the replacement key k~_t.

Modes (both functions; all equal to ``reference`` up to summation order)
    reference  the sequential loop (the oracle).
    chunk      the chunkwise WY / UT-transform form of Yang et al. 2024, "Parallelizing
               Linear Transformers with the Delta Rule over Sequence Length", with the
               decay of "Gated Delta Networks: Improving Mamba2 with Delta Rule"; for
               ``dplr_delta`` the same form with per-dimension decays, every exponent <= 0
               (see ``_dplr_chunk`` and ``decayed_scores``).

Resets: a log decay of -inf (alpha = 0, or w = 0 per dimension; also any decay so strong that
exp underflows to exactly 0) is exact in the chunk forms, forward and backward: the cumulative
decays come from ``recur.ops.scan.reset_cumsum`` (restarted after each reset, with a count of
resets beside them) and every decay across a reset is exactly 0 (``log_gap``), with no
-inf - (-inf). For ``delta_rule`` alpha_t = 0 clears the state: S_t = beta_t k_t v_t^T. For
``dplr_delta`` w_t = 0 clears only the diagonal part: the rank-one term reads S_{t-1} before the
decay, so S_t = b_t (S_{t-1}^T a_t)^T + k_t v_t^T; a full reset also needs a_t = 0 or b_t = 0.

Shapes: q, k: [batch, heads, time, d_k]; v: [batch, heads, time, d_v];
beta, log_alpha: [batch, heads, time]; S0 and the returned state: [batch, heads, d_k, d_v].
``dplr_delta`` also takes a, b: [batch, heads, time, d_k] and log_w: [batch, heads, time, d_k]
(per key dimension) or [batch, heads, time] (per head).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from einops import rearrange

from recur.ops import delta_kernels, kernels, trace
from recur.ops.gated import decayed_scores
from recur.ops.scan import log_gap, log_since_start, reset_cumsum

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

    ``log_alpha`` (<= 0; -inf: a reset, S_t = beta_t k_t v_t^T) is the per-head log decay,
    ``None`` for no decay (DeltaNet).
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
    # linear in v given the keys, strengths and decays (the transition does not read v)
    trace.record(delta_rule, dict(q=q, k=k, v=v, beta=beta, log_alpha=log_alpha, S0=S0, mode=mode, chunk_size=chunk_size),
                 "v", "S0", o)
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
    for j < i. With T = (I + A)^{-1} diag(beta) (the UT transform), W = T diag(e^g) K, U0 = T V
    (solved for directly, ``_unit_lower_solve_pair``; T itself is never formed):
        U        = U0 - W S
        O        = diag(e^g) Q S + (Q K^T * D) U,          D_ij = e^{g_i - g_j} for j <= i
        S_next   = e^{g_last} S + (diag(e^{g_last - g}) K)^T U
    Every decay is the exp of a difference g_i - g_j <= 0 (masked to -inf above the diagonal
    before the exp, and across resets), so decays that underflow give exact zeros, never inf or NaN.
    """
    B, H, T, Dk = k.shape
    C = min(chunk_size, T)
    n = -(-T // C)
    pad = n * C - T
    # Padded steps have k = v = beta = 0 and log alpha = 0: they leave the state unchanged.
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        beta = F.pad(beta, (0, pad))
        log_alpha = None if log_alpha is None else F.pad(log_alpha, (0, pad))
    q, k, v = (rearrange(t, "b h (n c) d -> b h n c d", c=C) for t in (q, k, v))
    beta = rearrange(beta, "b h (n c) -> b h n c", c=C)
    # g: the cumulative log decay [b, h, n, c]; n_r: its count of resets (None without any)
    g, n_r = (None, None) if log_alpha is None else reset_cumsum(rearrange(log_alpha, "b h (n c) -> b h n c", c=C), -1)
    A, P = _masks(_Gram.apply(k), q @ k.transpose(-1, -2), g, beta, n_r)
    if g is None:  # DeltaNet: every decay is 1, so the decay algebra drops out
        Rw, Rv = _scaled_inputs(q, k, v, beta, g)
        q_dec, k_dec, chunk_decay = q, k, beta.new_ones(beta.shape[:3])
    else:
        Rw, Rv, q_dec, k_dec, chunk_decay = _scaled_inputs(q, k, v, beta, g, n_r)
    # (I + A) W = diag(beta e^g) K and (I + A) U0 = diag(beta) V
    W, U0 = _unit_lower_solve_pair(A, Rw, Rv)

    # Only the state crosses chunks: a loop over n chunks of small matmuls (_StatePass).
    flat = lambda t: t.reshape(B * H, *t.shape[2:])  # noqa: E731
    Sc, U, S = _StatePass.apply(flat(U0), flat(W), flat(chunk_decay), flat(k_dec), S.reshape(B * H, Dk, -1))
    o = q_dec @ Sc.view(B, H, n, Dk, -1) + P @ U.view(B, H, n, C, -1)
    S = S.view(B, H, Dk, -1)
    o = rearrange(o, "b h n c d -> b h (n c) d")[:, :, :T]
    return o, S


class _StatePass(torch.autograd.Function):
    """The delta rule's sequential part, across chunks n = 0..N-1 from S_{-1} = S0:

        U_n = U0_n - W_n S_{n-1}            S_n = d_n S_{n-1} + K_n^T U_n

    U0, W, K: [M, N, C, d] (K the keys decayed to the chunk end), d: [M, N] (the chunk's total
    decay), S0: [M, d_k, d_v]. Returns (E, U, S_{N-1}) with E_n = S_{n-1}, the state entering
    chunk n. Under autograd each step would be a handful of graph nodes; the backward is
    written out instead, with G_n the gradient reaching S_n and gE, gU those reaching E, U:

        gU~_n = gU_n + K_n G_n              G_{n-1} = d_n G_n - W_n^T gU~_n + gE_n
        dU0_n = gU~_n    dW_n = -gU~_n E_n^T    dK_n = U_n G_n^T    dd_n = <E_n, G_n>    dS0 = G_{-1}

    Only the two recurrences run chunk by chunk; dW, dK and dd are batched matmuls after.
    """

    @staticmethod
    def forward(ctx, U0, W, d, K, S0):
        M, N, _, Dv = U0.shape
        E = U0.new_empty(M, N, S0.shape[1], Dv)
        U = torch.empty_like(U0)
        S = S0
        for i in range(N):
            E[:, i] = S
            U_i = torch.baddbmm(U0[:, i], W[:, i], S, alpha=-1)
            U[:, i] = U_i
            S = torch.baddbmm(S * d[:, i, None, None], K[:, i].transpose(1, 2), U_i)
        ctx.save_for_backward(W, d, K, E, U)
        return E, U, S

    @staticmethod
    @once_differentiable
    def backward(ctx, gE, gU, gS):
        W, d, K, E, U = ctx.saved_tensors
        N = U.shape[1]
        gE = torch.zeros_like(E) if gE is None else gE
        gU = torch.zeros_like(U) if gU is None else gU
        G = torch.zeros_like(E[:, 0]) if gS is None else gS.contiguous()
        Gs = torch.empty_like(E)  # G_n, the gradient reaching S_n
        gUt = torch.empty_like(U)
        for i in range(N - 1, -1, -1):
            Gs[:, i] = G
            gUt_i = torch.baddbmm(gU[:, i], K[:, i], G)
            gUt[:, i] = gUt_i
            G = torch.baddbmm(torch.addcmul(gE[:, i], G, d[:, i, None, None]), W[:, i].transpose(1, 2), gUt_i, alpha=-1)
        dW = (gUt @ E.transpose(-1, -2)).neg_() if ctx.needs_input_grad[1] else None
        dd = (E * Gs).sum((-1, -2)) if ctx.needs_input_grad[2] else None
        dK = U @ Gs.transpose(-1, -2) if ctx.needs_input_grad[3] else None
        return gUt, dW, dd, dK, G


def _scaled_inputs(q, k, v, beta, g, n=None):
    """Rw = diag(beta e^g) K and Rv = diag(beta) V, the solves' right-hand sides, and with a decay
    also Q and K decayed from the chunk start and to the chunk end, and the chunk's total decay:
    (Rw, Rv, diag(e^g) Q, diag(e^{g_last - g}) K, e^{g_last}); with resets (n their count, see
    ``reset_cumsum``) each decay across one is 0. CPU: one compiled pass each way
    (``delta_kernels.delta_inputs``); elsewhere PyTorch ops."""
    if kernels.can_real(k):
        return delta_kernels.delta_inputs(q, k, v, beta, g, n)
    if g is None:
        return beta[..., None] * k, beta[..., None] * v
    e_g = log_since_start(g, n).exp()[..., None]
    g_last, n_last = g[..., -1:], None if n is None else n[..., -1:]
    return ((beta[..., None] * e_g) * k, beta[..., None] * v, q * e_g, k * log_gap(g_last, g, n_last, n).exp()[..., None],
            log_since_start(g_last, n_last).exp()[..., 0])


class _Gram(torch.autograd.Function):
    """K K^T over the last two dims, with the backward of a symmetric product: dK = (G + G^T) K,
    one matmul where autograd's two-operand rule takes two (G K and G^T K) and an add."""

    @staticmethod
    def forward(ctx, k):
        ctx.save_for_backward(k)
        return k @ k.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad):
        (k,) = ctx.saved_tensors
        return (grad + grad.transpose(-1, -2)) @ k


def _masks(KK, QK, g, beta, n=None):
    """A = strict_lower(diag(beta) KK * D) and P = lower(QK * D), D_ij = e^{g_i - g_j} (all ones
    when g is None; 0 where a reset lies between j and i, n_i != n_j, n the count of resets or
    None), for the chunk blocks KK = K K^T, QK = Q K^T [..., C, C]. CPU: one compiled pass each
    way (``delta_kernels.delta_masks``); elsewhere PyTorch ops."""
    if kernels.can_real(KK):
        return delta_kernels.delta_masks(KK, QK, g, beta, n)
    C = KK.shape[-1]
    causal = torch.ones(C, C, dtype=torch.bool, device=KK.device).tril()
    if g is None:
        return (beta[..., None] * KK).tril(-1), QK.masked_fill(~causal, 0.0)
    col = lambda t: None if t is None else t[..., :, None]  # noqa: E731
    row = lambda t: None if t is None else t[..., None, :]  # noqa: E731
    decay = log_gap(col(g), row(g), col(n), row(n)).masked_fill(~causal, float("-inf")).exp()
    return (beta[..., None] * KK * decay).tril(-1), QK * decay


def _unit_lower_solve_pair(L, R1, R2):
    """((I + L)^{-1} R1, (I + L)^{-1} R2) for strictly lower triangular L [..., C, C].

    CPU: two compiled forward substitutions (recur.ops.delta_kernels.unit_lower_solve, 3x faster
    than LAPACK's batched solve here, which also copies to column-major); elsewhere one
    ``solve_triangular`` with both right-hand sides side by side."""
    if delta_kernels.can_tri_solve(L, R1):
        return delta_kernels.unit_lower_solve(L, R1), delta_kernels.unit_lower_solve(L, R2)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    X = torch.linalg.solve_triangular(eye + L, torch.cat([R1, R2], dim=-1), upper=False, unitriangular=True)
    return X.split([R1.shape[-1], R2.shape[-1]], dim=-1)


# ------------------------------------------------------------------------------------------
# The diagonal-plus-low-rank (generalised) delta rule
# ------------------------------------------------------------------------------------------
def dplr_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_w: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    S0: torch.Tensor | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = (Diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t; returns (o, S_last).

    q, k, a, b: [batch, heads, time, d_k]; v: [batch, heads, time, d_v]; ``log_w`` (<= 0, -inf
    allowed: see the module docstring on resets) the
    log decay per key dimension [batch, heads, time, d_k], per head [batch, heads, time], or
    None (w = 1); S0: [batch, heads, d_k, d_v] or None (zeros). o: [batch, heads, time, d_v].
    The rank-one term reads the state at key a_t before the step's decay and writes the read
    back at key b_t. Half-precision inputs are computed in float32 and returned in their dtype.
    """
    _check_dplr(q, k, v, log_w, a, b, S0)
    if mode not in MODES:
        raise ValueError(f"dplr_delta mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    B, H, T, Dk = q.shape
    q, k, v, a, b = (t.to(work) for t in (q, k, v, a, b))
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if S0 is None else S0.to(work)
    # decays as [batch, heads, time, G], G = d_k (per dimension) or 1 (per head)
    g = q.new_zeros(B, H, T, 1) if log_w is None else log_w.to(work)
    g = g if g.ndim == 4 else g.unsqueeze(-1)
    if mode == "reference":
        o, S = _dplr_reference(q, k, v, g, a, b, S)
    else:
        o, S = _dplr_chunk(q, k, v, g, a, b, S, chunk_size)
    trace.record(dplr_delta, dict(q=q, k=k, v=v, log_w=log_w, a=a, b=b, S0=S0, mode=mode, chunk_size=chunk_size),
                 "v", "S0", o)
    return o.to(dtype), S.to(dtype)


def _check_dplr(q, k, v, log_w, a, b, S0) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("log_w", log_w), ("a", a), ("b", b), ("S0", S0)):
        if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
            raise TypeError(f"dplr_delta: {name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if q.ndim != 4:
        raise ValueError(f"dplr_delta: q must be [batch, heads, time, d_k], got {tuple(q.shape)}")
    B, H, T, Dk = q.shape
    for name, t in (("k", k), ("a", a), ("b", b)):
        if t.shape != q.shape:
            raise ValueError(f"dplr_delta: {name} must have q's shape [batch, heads, time, d_k]={tuple(q.shape)}, "
                             f"got {tuple(t.shape)}")
    if v.ndim != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"dplr_delta: v must be [batch={B}, heads={H}, time={T}, d_v], got {tuple(v.shape)}")
    if log_w is not None and tuple(log_w.shape) not in ((B, H, T, Dk), (B, H, T)):
        raise ValueError(f"dplr_delta: log_w must be [batch, heads, time, d_k]={(B, H, T, Dk)} or "
                         f"[batch, heads, time]={(B, H, T)} or None, got {tuple(log_w.shape)}")
    if S0 is not None and tuple(S0.shape) != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"dplr_delta: S0 must be [batch={B}, heads={H}, d_k={Dk}, d_v={v.shape[-1]}] or None, "
                         f"got {tuple(S0.shape)}")


def _dplr_reference(q, k, v, g, a, b, S):
    """The loop: read r = S^T a, then S = w * S + b r^T + k v^T, then o = S^T q."""
    steps = zip(*(t.unbind(2) for t in (g.exp().unsqueeze(-1), q.unsqueeze(-2), k.unsqueeze(-1),
                                         v.unsqueeze(-2), a.unsqueeze(-2), b.unsqueeze(-1))))
    outs = []
    for w_t, q_t, k_t, v_t, a_t, b_t in steps:  # w_t [b, h, G, 1]; q_t, a_t [b, h, 1, d_k]; k_t, b_t [b, h, d_k, 1]
        read = a_t @ S  # [b, h, 1, d_v]
        S = torch.addcmul(torch.addcmul(w_t * S, b_t, read), k_t, v_t)
        outs.append(q_t @ S)
    return torch.cat(outs, dim=2), S


def _dplr_chunk(q, k, v, g, a, b, S, chunk_size):
    """Chunkwise form of S_i = Diag(w_i) S_{i-1} + b_i u_i^T + k_i v_i^T, u_i = S_{i-1}^T a_i.

    Inside a chunk (entering state S, positions i = 0..C-1) let c_i be the cumulative log decay
    through step i (per key dimension) and c'_i = c_{i-1} the one before it (c'_0 = 0). Unrolling,
    with the decayed scores X_Y[i, j] = sum_d x_id y_jd exp(cx_id - cy_jd) (``decayed_scores``):

        u_i = S^T (a_i e^{c'_i}) + sum_{j<i} A_ak[i, j] v_j + sum_{j<i} A_ab[i, j] u_j    (exponents c'_i - c_j)
        o_i = S^T (q_i e^{c_i})  + sum_{j<=i} A_qk[i, j] v_j + sum_{j<=i} A_qb[i, j] u_j  (exponents c_i - c_j)

    so (I - A_ab) U = diag(e^{c'}) A S + A_ak V, a unit lower triangular system (the UT transform):
    with W = (I - A_ab)^{-1} (A * e^{c'}) and U0 = (I - A_ab)^{-1} A_ak V (one solve for both),
        U      = U0 + W S
        O      = (Q * e^c) S + A_qk V + A_qb U
        S_next = e^{c_last} S + (K * e^{c_last - c})^T V + (B * e^{c_last - c})^T U.
    Only the state crosses chunks. The chunk length is ``chunk_size`` rounded up to a power of two
    (and no longer than T rounded up likewise), as ``decayed_scores`` halves chunks recursively.
    """
    B, H, T, Dk = k.shape
    C = 1 << (min(chunk_size, T) - 1).bit_length()
    n = math.ceil(T / C)
    pad = n * C - T
    if pad:  # padded steps have q = k = v = a = b = 0 and w = 1: they leave the state unchanged
        q, k, v, a, b, g = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v, a, b, g))
    q, k, v, a, b, g = (rearrange(t, "b h (n c) d -> b h n c d", c=C) for t in (q, k, v, a, b, g))
    c, n_r = reset_cumsum(g, -2)  # through step i: [b, h, n, C, G]; n_r counts resets (None: none)
    shift = lambda t: None if t is None else F.pad(t[..., :-1, :], (0, 0, 1, 0))  # noqa: E731
    c_before, n_before = shift(c), shift(n_r)  # through step i-1 (the read happens before the decay)
    c_last, n_last = c[..., -1:, :], None if n_r is None else n_r[..., -1:, :]

    # Scores sharing a query and its decays are computed together: the two key sets are stacked on
    # a leading dimension that the query and the decays broadcast over.
    A_ab, A_ak = decayed_scores(a, torch.stack([b, k]), c_before, c, True, n_before, n_r).unbind(0)
    A_qk, A_qb = decayed_scores(q, torch.stack([k, b]), c, c, False, n_r, n_r).unbind(0)
    W, U0 = _unit_lower_solve_pair(-A_ab, a * log_since_start(c_before, n_before).exp(), A_ak @ v)
    to_end = log_gap(c_last, c, n_last, n_r).exp()
    b_end = b * to_end
    kv_end = (k * to_end).transpose(-1, -2) @ v  # [b, h, n, d_k, d_v]
    decay = log_since_start(c_last, n_last).exp().transpose(-1, -2)  # [b, h, n, G, 1]

    states = []
    for U0_c, W_c, b_c, kv_c, decay_c in zip(*(t.unbind(2) for t in (U0, W, b_end, kv_end, decay))):
        states.append(S)
        U = U0_c + W_c @ S
        S = decay_c * S + kv_c + b_c.transpose(-1, -2) @ U
    Sc = torch.stack(states, dim=2)  # the state entering each chunk: [b, h, n, d_k, d_v]
    o = (q * log_since_start(c, n_r).exp()) @ Sc + A_qk @ v + A_qb @ (U0 + W @ Sc)
    o = rearrange(o, "b h n c d -> b h (n c) d")[:, :, :T]
    return o, S
