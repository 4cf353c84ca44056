"""Miras test-time memories: an MLP memory trained at test time by one gradient step per token,
with a chosen attentional bias (the inner loss) and retention (the forget rule), per head:

    P_t = a_t P_{t-1} - eta_t grad_W l(M_{W_{t'}}; k_t, v_t)        (the retention's linear part)
    W_t = R(P_t)                                                     (the retention's closed form)
    o_t = M_{W_t}(q_t)                                               (read: no weight update)

(Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All Connected: A Journey Through Test-Time
Memorization, Attentional Bias, Retention, and Online Optimization", 2025, Section 5.)
Every weight matrix of the MLP follows the rule; t' = t - (t mod b) is the start of t's
mini-batch of ``chunk_size`` = b tokens, whose gradients are all taken at the memory W_{t'}
that the mini-batch started with (Titans' mini-batch semantics, as ``recur.ops.memory``).
Plain gradient descent: no momentum (the paper's three variants use GD).

Retentions R (``RETENTIONS``):
    "l2"  W = P                                  decay a_t (Yaad; Titans without momentum)
    "lq"  W = P / (||P||_q^(q-2) + eps)          l_q retention, Moneta's closed form (the
                                                 l_q norm of each weight matrix, elementwise;
                                                 eps = 0 is the paper's map, see lq_retention)
    "kl"  W = softmax_rows(P)                    KL (entropic) retention, Memora: W_t =
                                                 softmax(a_t log W_{t-1} - eta_t grad), which is
                                                 P_t = a_t P_{t-1} - eta_t grad on the logits P
                                                 (softmax ignores a row's additive constant)
Each weight W_l [d_in, d_out]; "kl" makes each of its d_in rows a distribution over d_out.

Attentional biases (``BIASES``), as dl/dM(k) (the output gradient the MLP backprop needs; the
rest is ``recur.ops.memory.mlp_gradients``):
    "l2"     l = ||e||_2^2                            -> 2 e              (e = M(k) - v)
    "lp"     l = ||e||_p^p                            -> p sign(e) |e|^(p-1)  (Moneta, p = 3)
    "huber"  l = 1/2 ||e||_2^2        if ||e||_2 <= delta_t               (Yaad: the paper's
             l = delta_t ||e||_1 - c  otherwise       -> e or delta_t sign(e)  switch on ||e||)
The Huber threshold delta_t is data-dependent: ``aux`` [batch, heads, time].

Because a_t and eta_t enter linearly and every gradient of a mini-batch is taken at the same
memory, the pre-memory after token i of a mini-batch entering with P is exact in closed form:

    P_i = D[i,0] P - sum_{m <= i} D[i,m] eta_m G_m,     D[i,m] = prod_{m < l <= i} a_l

Modes
    reference  the loop of the definition: the mini-batch's gradients at its start memory (all
               at once, since they share it), then token by token P <- a P - eta G, W = R(P),
               read. Per token: a multiply-add and the retention map per layer, and the read.
    chunk      each mini-batch at once: the per-token P_i from the closed form above
               (materialised: [n, d_in, d_out] per layer, n <= b), W_i = R(P_i), the reads as
               batched matmuls. R is non-linear, so the reads need each W_i itself (no
               outer-product shortcut), but nothing else crosses a mini-batch boundary.

State (``MirasState``): ``params`` P_t and ``anchor`` P_{t'} (tuples of [batch, heads, d_in,
d_out] per layer) and ``count`` int64 [batch] (tokens of the current mini-batch seen, 0..b-1).
Shapes: q, k [batch, heads, time, d_k]; v [batch, heads, time, d_v]; lr (eta), retain (a)
[batch, heads, time]. Half-precision inputs are computed in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from recur.ops.memory import ACTIVATIONS, by_phase, check_memory_call, mlp_forward, mlp_gradients

MODES = ("reference", "chunk")


# ----------------------------------------------------------------- attentional biases
def l2_bias(pred: torch.Tensor, target: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
    """dl/dpred of ||pred - target||_2^2: 2 (pred - target)."""
    return 2.0 * (pred - target)


def lp_bias(pred: torch.Tensor, target: torch.Tensor, aux: torch.Tensor | None = None, *, p: float = 3.0) -> torch.Tensor:
    """dl/dpred of ||pred - target||_p^p (Moneta): p sign(e) |e|^(p-1), e = pred - target."""
    e = pred - target
    return p * torch.sign(e) * e.abs().pow(p - 1)


def huber_bias(pred: torch.Tensor, target: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
    """dl/dpred of Yaad's Huber objective with threshold ``aux`` = delta [..., n] (per token):
    e if ||e||_2 <= delta (l = ||e||^2 / 2), else delta sign(e) (l = delta ||e||_1 - const)."""
    if aux is None:
        raise ValueError("the huber attentional bias needs its threshold delta (aux [batch, heads, time])")
    e = pred - target
    delta = aux[..., None]
    small = torch.linalg.vector_norm(e, dim=-1, keepdim=True) <= delta
    return torch.where(small, e, delta * torch.sign(e))


BIASES: dict[str, Callable] = {"l2": l2_bias, "lp": lp_bias, "huber": huber_bias}


# --------------------------------------------------------------------------- retentions
def identity_retention(P: torch.Tensor) -> torch.Tensor:
    """l2 retention: the memory is the pre-memory."""
    return P


def lq_retention(P: torch.Tensor, *, q: float = 4.0, eps: float = 0.0) -> torch.Tensor:
    """Moneta's l_q retention: W = P / (||P||_q^(q-2) + eps), the norm over each [d_in, d_out]
    matrix (eps = 0: the paper's closed form; for q = 4 it is then an involution). eps > 0
    bounds the memory, ||W||_q <= max_r r / (r^(q-2) + eps), where the paper's map blows up as
    P -> 0. The norm is computed on P / max|P| so that |P|^q cannot overflow."""
    scale = P.abs().amax((-2, -1), keepdim=True).clamp_min(torch.finfo(P.dtype).tiny)
    norm = scale * (P / scale).abs().pow(q).sum((-2, -1), keepdim=True).pow(1 / q)  # ||P||_q
    return P / (norm.pow(q - 2) + eps)


def kl_retention(P: torch.Tensor) -> torch.Tensor:
    """Memora's KL retention: each row of W on the simplex, W = softmax(P) over d_out."""
    return torch.softmax(P, dim=-1)


RETENTIONS: dict[str, Callable] = {"l2": identity_retention, "lq": lq_retention, "kl": kl_retention}


# ------------------------------------------------------------------------------ state
class MirasState(NamedTuple):
    """Pre-memory P_t, its value at the mini-batch start P_{t'} (tuples of [batch, heads,
    d_in, d_out] per layer) and ``count`` int64 [batch]."""

    params: tuple[torch.Tensor, ...]
    anchor: tuple[torch.Tensor, ...]
    count: torch.Tensor


def miras_state(params: Sequence[torch.Tensor], count: torch.Tensor | None = None) -> MirasState:
    """A fresh state at a mini-batch start: anchor = params, ``count`` 0."""
    params = tuple(params)
    if count is None:
        count = torch.zeros(params[0].shape[0], dtype=torch.int64, device=params[0].device)
    return MirasState(params, params, count)


# ------------------------------------------------------------------------ entry point
def miras_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    retain: torch.Tensor,
    state: MirasState,
    *,
    mode: str = "chunk",
    chunk_size: int = 16,
    bias: str | Callable = "l2",
    retention: str | Callable = "l2",
    aux: torch.Tensor | None = None,
    activation: str = "silu",
    residual: bool = True,
    norm: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, MirasState]:
    """Read and train the memory over a sequence: (o [batch, heads, time, d_v], state).

    ``bias``: a name in ``BIASES`` or a callable (pred, target, aux) -> dl/dpred; ``retention``:
    a name in ``RETENTIONS`` or a callable P -> W acting on [..., d_in, d_out]; ``aux``: an
    optional per-token tensor [batch, heads, time] handed to the bias (Yaad's delta).
    ``norm``: None or the gain [heads, d_v] of a LayerNorm on the MLP's output.
    """
    if mode not in MODES:
        raise ValueError(f"miras_memory mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(bias, str):
        if bias not in BIASES:
            raise ValueError(f"unknown attentional bias {bias!r}; known: {sorted(BIASES)}")
        bias = BIASES[bias]
    if isinstance(retention, str):
        if retention not in RETENTIONS:
            raise ValueError(f"unknown retention {retention!r}; known: {sorted(RETENTIONS)}")
        retention = RETENTIONS[retention]
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    _check(q, k, v, lr, retain, aux, state, residual)
    if bool(((state.count < 0) | (state.count >= chunk_size)).any()):
        raise ValueError(f"state.count must lie in [0, chunk_size={chunk_size}), got {state.count.tolist()}")
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v, lr, retain = (t.to(work) for t in (q, k, v, lr, retain))
    aux = None if aux is None else aux.to(work)
    cast = lambda ws, d: tuple(w.to(d) for w in ws)  # noqa: E731
    state = MirasState(cast(state.params, work), cast(state.anchor, work), state.count)
    mlp = dict(activation=activation, residual=residual, norm=None if norm is None else norm.to(work), eps=eps)
    piece = _reference_piece if mode == "reference" else _chunk_piece
    # rows at different mini-batch phases run separately
    o, state = by_phase(_run, (q, k, v, lr, retain, aux), state, piece=piece, chunk_size=chunk_size, bias=bias,
                        retention=retention, mlp=mlp)
    return o.to(dtype), MirasState(cast(state.params, dtype), cast(state.anchor, dtype), state.count)


def _check(q, k, v, lr, retain, aux, state, residual) -> None:
    if not isinstance(state, MirasState):
        raise TypeError(f"state must be a MirasState, got {type(state).__name__}")
    check_memory_call(q, k, v, dict(lr=lr, retain=retain, aux=aux), dict(params=state.params, anchor=state.anchor),
                      state.count, residual)


# ------------------------------------------------------------------------------ driver
def _run(q, k, v, lr, retain, aux, state, phase, *, piece, chunk_size, bias, retention, mlp):
    """Split the call at mini-batch boundaries; ``piece`` runs the tokens of one mini-batch."""
    T = q.shape[2]
    P, A = list(state.params), list(state.anchor)
    WA = [retention(a) for a in A]  # the memory the current mini-batch's gradients are taken at
    outs, t = [], 0
    while t < T:
        n = min(chunk_size - phase, T - t)
        span = slice(t, t + n)
        d = None if aux is None else aux[:, :, span]
        loss = lambda pred, target, d=d: bias(pred, target, d)  # noqa: E731
        inputs, deltas = mlp_gradients(WA, k[:, :, span], v[:, :, span], loss, **mlp)
        o, P = piece(q[:, :, span], lr[:, :, span], retain[:, :, span], inputs, deltas, P, retention, mlp)
        outs.append(o)
        t, phase = t + n, phase + n
        if phase == chunk_size:  # the mini-batch is complete: the next one starts from the memory now
            A, phase = list(P), 0
            WA = [retention(a) for a in A]
    o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return o, MirasState(tuple(P), tuple(A), (state.count + T) % chunk_size)


def _reference_piece(q, lr, retain, inputs, deltas, P, retention, mlp):
    """Token by token: P <- a P - eta h^T delta per layer, W = R(P), read."""
    steps = [(-lr[..., None, None] * h[..., :, None] * d[..., None, :]).unbind(2) for h, d in zip(inputs, deltas)]
    tokens = zip(q.unbind(2), retain[..., None, None].unbind(2), zip(*steps))
    outs = []
    for q_t, a_t, step_t in tokens:
        P = [torch.addcmul(step, a_t, p) for p, step in zip(P, step_t)]
        outs.append(mlp_forward([retention(p) for p in P], q_t[:, :, None], **mlp))
    return torch.cat(outs, dim=2), P


def _chunk_piece(q, lr, retain, inputs, deltas, P, retention, mlp):
    """The n tokens of one mini-batch at once: P_i = D[i,0] P - sum_m D[i,m] eta_m h_m^T delta_m."""
    n = q.shape[2]
    rows = torch.arange(n, device=q.device)[:, None]
    cols = torch.arange(-1, n, device=q.device)[None, :]  # -1: the state entering the mini-batch
    # D[..., i, m + 1] = prod_{m < l <= i} a_l: a masked cumulative product (exact for a = 0)
    factors = torch.where(rows > cols, retain[..., :, None], torch.ones((), dtype=q.dtype, device=q.device))
    D = torch.cumprod(factors, dim=-2).masked_fill(cols > rows, 0.0)  # [B, H, n, n + 1]
    D0, C = D[..., 0], D[..., 1:] * lr[..., None, :]  # C[i, m] = D[i, m] eta_m, zero for m > i
    Ps = [D0[..., None, None] * p[:, :, None] - torch.einsum("bhim,bhmk,bhmj->bhikj", C, h, d)
          for p, h, d in zip(P, inputs, deltas)]  # [B, H, n, d_in, d_out]
    o = mlp_forward([retention(p) for p in Ps], q[..., None, :], **mlp).squeeze(-2)
    return o, [p[:, :, -1] for p in Ps]
