"""Test-time memory: an MLP whose weights are trained at test time by gradient descent with
momentum and weight decay on an associative loss (Titans' neural long-term memory), per head:

    S_t = eta_t S_{t-1} - theta_t grad l(M_{t'}; k_t, v_t)        (momentum: the "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                               (decay: forgetting)
    o_t = M_t(q_t)                                                  (read: no weight update)

M is the whole weight set of the MLP (the rules apply to every weight matrix), l the attentional
bias (``loss``), and t' = t - (t mod b) the start of t's mini-batch of ``chunk_size`` = b tokens:
within a mini-batch every gradient is taken at the memory M_{t'} the mini-batch started with
(Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", 2024, Section 3.2).
The model is *defined* with this mini-batch semantics; b = 1 is plain online gradient descent.

The memory MLP, per head, with weights W_1 .. W_L (W_l: [d_{l-1}, d_l], d_0 = d_k, d_L = d_v):

    h_0 = x ;  z_l = h_{l-1} W_l ;  h_l = act(z_l) for l < L ;  M(x) = N(z_L) (+ x if residual)

N is the identity or, given ``norm`` (a gain g [heads, d_v]), a LayerNorm without bias,
N(z) = g * (z - mean z) / sqrt(var z + eps): TTT's and titans-pytorch's x + LN(MLP(x)). The
gain is a parameter of the outer loop, not trained at test time. The norm bounds the memory's
output, so its gradients shrink as its weights grow: without it a momentum memory with
mini-batches diverges at moderate learning rates.

Its gradient is written out (backprop by hand, with matmuls), never with torch.autograd.grad,
so the outer loop can differentiate through it (double backward) at the cost of a few matmuls:

    delta_L = dl/dz_L = N'(z_L)^T dl/dM(k)   (dl/dM(k): the attentional bias' output gradient,
                                              2 (M(k) - v) for l2; N' the LayerNorm's Jacobian)
    delta_l = (delta_{l+1} W_{l+1}^T) * act'(z_l)
    grad_{W_l} l = h_{l-1}^T delta_l                                (an outer product per token)

Modes
    reference  the token-by-token loop of the definition above (the oracle): at each token the
               gradient at the stored mini-batch-start memory, then momentum, decay, read; when
               a mini-batch completes, its start memory becomes the current memory. (All the
               gradients of a mini-batch are taken at the same memory, so the loop computes them
               together when the mini-batch begins: per token it does only the momentum and
               memory updates and the read, a handful of small matmuls.)
    chunk      the parallel form (Section 3.2). Inside a mini-batch of n tokens entering with
               memory W, momentum S and start memory A, with E[j,m] = prod_{m<l<=j} eta_l,
               D[i,j] = prod_{j<l<=i} (1 - alpha_l) and the per-token gradients G_m (all at A):
                   S_j = E[j,0] S - sum_m E[j,m] theta_m G_m
                   M_i = D[i,0] W + F_i S - sum_m C[i,m] G_m,     F = D[:,1:] E[:,0],
                                                                  C = (D[:,1:] E[:,1:]) diag(theta)
               Each G_m = h_m^T delta_m is an outer product, so the read of layer l is an
               attention-like masked matmul that never builds a per-token weight:
                   z_i = D[i,0] u_i W + F_i u_i S - sum_m C[i,m] (u_i . h_m) delta_m
               (u: layer l's input for the query). Layer 1's outputs come this way, then the
               activation, then layer 2 the same way. Only the memory crosses mini-batches.

State (``MemoryState``, batch-first): ``weights`` M_t and ``anchor`` M_{t'} and ``momentum`` S_t,
each a tuple of L tensors [batch, heads, d_{l-1}, d_l]; ``count`` int64 [batch], the tokens of
the current mini-batch already seen (0 .. b-1). Carrying the state across calls that end
mid-mini-batch is exact.

Extension points (the Miras framework: Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All
Connected", 2025, chooses memory, attentional bias, retention and learning algorithm):
  * attentional bias: ``loss`` names an entry of ``LOSSES`` (or is a callable) mapping
    (prediction M(k), target v) [..., d_v] to dl/dM(k). That is all the rest needs: the
    backprop above, the reference loop and the chunk form are unchanged, because every
    gradient is still an outer product h^T delta at the mini-batch-start memory. Add l_p
    (Moneta), Huber (Yaad) and friends as new entries.
  * retention: the linear (1 - alpha) decay with momentum is the l2 retention; it appears in
    exactly two places, the update lines of ``_reference`` and the transfer coefficients of
    ``_chunk`` (``_transfer``). A non-linear retention (Moneta's l_q, Memora's KL) replaces
    those; the per-token gradients come from the same ``mlp_gradients``.
  * memory architecture: the MLP depth is len(state.weights); ``activation``, ``norm`` and
    ``residual`` choose the rest.

Shapes: q, k [batch, heads, time, d_k]; v [batch, heads, time, d_v]; lr (theta), momentum
(eta), decay (alpha) [batch, heads, time], each in [0, 1]. Half-precision inputs are computed
in float32 and returned in their own dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

MODES = ("reference", "chunk")


# ----------------------------------------------------------------- attentional biases
def l2_bias(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """dl/dpred of l = ||pred - target||^2 (Titans eq. 12): 2 (pred - target)."""
    return 2.0 * (pred - target)


# name -> (prediction, target) -> dl/dprediction, elementwise over [..., d_v]
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"l2": l2_bias}


# --------------------------------------------------------------------- activations
def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _gelu(z: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(z)


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2))))
    pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
    return cdf + z * pdf


# name -> (act, act'); exact derivatives (GELU is the erf form, as torch's default)
ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "silu": (torch.nn.functional.silu, _silu_grad),
    "gelu": (_gelu, _gelu_grad),
}


# ------------------------------------------------------------------------- state
class MemoryState(NamedTuple):
    """The memory's state: current weights M_t, mini-batch-start weights M_{t'}, momentum S_t
    (tuples of [batch, heads, d_in, d_out] per layer) and ``count`` int64 [batch]."""

    weights: tuple[torch.Tensor, ...]
    anchor: tuple[torch.Tensor, ...]
    momentum: tuple[torch.Tensor, ...]
    count: torch.Tensor


def memory_state(weights: Sequence[torch.Tensor], count: torch.Tensor | None = None) -> MemoryState:
    """A fresh state at a mini-batch start: anchor = weights, zero momentum, ``count`` 0."""
    weights = tuple(weights)
    if count is None:
        count = torch.zeros(weights[0].shape[0], dtype=torch.int64, device=weights[0].device)
    return MemoryState(weights, weights, tuple(torch.zeros_like(w) for w in weights), count)


# ------------------------------------------------------------------- the MLP by hand
def _normalize(z: torch.Tensor, gain: torch.Tensor | None, eps: float) -> torch.Tensor:
    """N(z), the bias-free LayerNorm with a per-head gain; the identity when ``gain`` is None.
    z [batch, heads, ..., d]; gain [heads, d]."""
    if gain is None:
        return z
    gain = gain.reshape(gain.shape[0], *[1] * (z.ndim - 3), gain.shape[-1])
    return torch.nn.functional.layer_norm(z, z.shape[-1:], eps=eps) * gain


def mlp_forward(weights: Sequence[torch.Tensor], x: torch.Tensor, activation: str = "silu",
                residual: bool = True, norm: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """M(x) for weights [batch, heads, ..., d_in, d_out] per layer and x [batch, heads, ..., n, d_0]
    -> [..., n, d_L] (extra dims in the middle: e.g. one memory per token)."""
    act, _ = ACTIVATIONS[activation]
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = act(h)
    h = _normalize(h, norm, eps)
    return h + x if residual else h


def mlp_gradients(weights: Sequence[torch.Tensor], k: torch.Tensor, v: torch.Tensor, loss: Callable,
                  activation: str = "silu", residual: bool = True, norm: torch.Tensor | None = None,
                  eps: float = 1e-5) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The per-token gradient of l(M(k_m), v_m) w.r.t. every W_l, as factors of outer products.

    weights [batch, heads, d_{l-1}, d_l]; k [batch, heads, n, d_0]; v [batch, heads, n, d_L].
    Returns (inputs, deltas): inputs[l] = h_{l-1} [..., n, d_{l-1}] and deltas[l] = dl/dz_l
    [..., n, d_l], so that token m's gradient w.r.t. W_l is inputs[l][m]^T deltas[l][m].
    """
    act, act_grad = ACTIVATIONS[activation]
    inputs, pre = [], []
    h = k
    for i, w in enumerate(weights):
        inputs.append(h)
        z = h @ w
        if i < len(weights) - 1:
            pre.append(z)
            h = act(z)
        else:
            h = z
    out = h
    if norm is not None:
        rstd = torch.rsqrt(h.var(-1, unbiased=False, keepdim=True) + eps)
        zhat = (h - h.mean(-1, keepdim=True)) * rstd
        out = zhat * norm[:, None, :]
    if residual:
        out = out + k
    delta = loss(out, v)
    if norm is not None:  # back through the LayerNorm: rstd (g - mean g - zhat mean(g zhat)), g = gain * dl/dN
        g = delta * norm[:, None, :]
        delta = rstd * (g - g.mean(-1, keepdim=True) - zhat * (g * zhat).mean(-1, keepdim=True))
    deltas = [delta]
    for i in range(len(weights) - 1, 0, -1):
        delta = (delta @ weights[i].transpose(-1, -2)) * act_grad(pre[i - 1])
        deltas.append(delta)
    return inputs, deltas[::-1]


# --------------------------------------------------------------------- entry point
def mlp_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor,
    decay: torch.Tensor,
    state: MemoryState,
    *,
    mode: str = "chunk",
    chunk_size: int = 16,
    loss: str | Callable = "l2",
    activation: str = "silu",
    residual: bool = True,
    norm: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, MemoryState]:
    """Read and train the MLP memory over a sequence; returns (o [batch, heads, time, d_v], state).

    ``chunk_size`` is the mini-batch b of the definition (it changes the model, not only the
    computation). ``loss``: a name in ``LOSSES`` or a callable (prediction, target) -> dl/dpred.
    ``norm``: None, or the gain [heads, d_v] of the LayerNorm on the MLP's output.
    """
    if mode not in MODES:
        raise ValueError(f"mlp_memory mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"unknown attentional bias {loss!r}; known: {sorted(LOSSES)}")
        loss = LOSSES[loss]
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)}")
    _check(q, k, v, lr, momentum, decay, state, residual)
    if bool(((state.count < 0) | (state.count >= chunk_size)).any()):
        raise ValueError(f"state.count must lie in [0, chunk_size={chunk_size}) (tokens of the current mini-batch), "
                         f"got {state.count.tolist()}: was the state made with another chunk_size?")
    if norm is not None and norm.shape != (q.shape[1], v.shape[-1]):
        raise ValueError(f"norm must be None or a gain [heads={q.shape[1]}, d_v={v.shape[-1]}], got {tuple(norm.shape)}")
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v, lr, momentum, decay = (t.to(work) for t in (q, k, v, lr, momentum, decay))
    state = MemoryState(*(tuple(w.to(work) for w in ws) for ws in state[:3]), state.count)
    mlp = dict(activation=activation, residual=residual, norm=None if norm is None else norm.to(work), eps=eps)
    args = dict(chunk_size=chunk_size, loss=loss, mlp=mlp)
    run = _reference if mode == "reference" else _chunk
    o, state = run(q, k, v, lr, momentum, decay, state, **args)
    out_state = MemoryState(*(tuple(w.to(dtype) for w in ws) for ws in state[:3]), state.count)
    return o.to(dtype), out_state


def _check(q, k, v, lr, momentum, decay, state, residual) -> None:
    if not isinstance(state, MemoryState):
        raise TypeError(f"state must be a MemoryState, got {type(state).__name__}")
    check_memory_call(q, k, v, dict(lr=lr, momentum=momentum, decay=decay),
                      dict(weights=state.weights, anchor=state.anchor, momentum=state.momentum), state.count, residual)


def check_memory_call(q, k, v, gates: dict, layers: dict, count, residual: bool) -> None:
    """Shapes of a test-time memory's call (``mlp_memory``, ``recur.ops.miras``): q, k [batch,
    heads, time, d_k], v [..., d_v]; each gate [batch, heads, time] (or None); ``layers`` names
    tuples of per-layer weights [batch, heads, d_in, d_out] that must agree, chaining d_k to
    d_v; ``count`` int64 [batch]."""
    if q.ndim != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [batch, heads, time, d_k], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, H, T, Dk = q.shape
    if v.ndim != 4 or v.shape[:3] != (B, H, T):
        raise ValueError(f"v must be [batch={B}, heads={H}, time={T}, d_v], got {tuple(v.shape)}")
    for name, g in gates.items():
        if g is not None and g.shape != (B, H, T):
            raise ValueError(f"{name} must be [batch={B}, heads={H}, time={T}], got {tuple(g.shape)}")
    names = ", ".join(f"state.{n}" for n in layers)
    first, *others = layers.values()
    if not first or any(len(ws) != len(first) for ws in others):
        raise ValueError(f"{names} must hold the same number (>= 1) of layers")
    dims = [Dk]
    for i, w in enumerate(first):
        if w.ndim != 4 or w.shape[:2] != (B, H) or w.shape[2] != dims[-1]:
            raise ValueError(f"memory layer {i} must be [batch={B}, heads={H}, d_in={dims[-1]}, d_out], got {tuple(w.shape)}")
        if any(ws[i].shape != w.shape for ws in others):
            raise ValueError(f"memory layer {i}: {names} must all have the shape {tuple(w.shape)}")
        dims.append(w.shape[3])
    if dims[-1] != v.shape[-1]:
        raise ValueError(f"the memory's last layer outputs {dims[-1]} channels, v has d_v={v.shape[-1]}")
    if residual and Dk != v.shape[-1]:
        raise ValueError(f"a residual memory needs d_k == d_v, got {Dk} and {v.shape[-1]}")
    if count.shape != (B,) or count.dtype != torch.int64:
        raise ValueError(f"state.count must be int64 [batch={B}], got {count.dtype} {tuple(count.shape)}")


# ------------------------------------------------------------------------ reference
def by_phase(run, rows: Sequence[torch.Tensor | None], state, **args):
    """``run(*rows, state, phase, **args)`` on the batch rows grouped by their mini-batch phase
    (``state.count``): every row of one call is at the same position of its mini-batch. Rows
    differ only when states from different positions were concatenated. ``rows`` are tensors
    with a leading batch dimension (or None); ``state`` is a NamedTuple of per-layer weight
    tuples ending with ``count`` (``MemoryState``, ``recur.ops.miras.MirasState``)."""
    count = state.count
    if bool((count == count[0]).all()):
        return run(*rows, state, int(count[0]), **args)
    groups = [(count == c).nonzero().squeeze(1) for c in torch.unique(count)]
    outs, states = [], []
    for g in groups:
        sub = type(state)(*(tuple(w[g] for w in ws) for ws in state[:-1]), count[g])
        o, s = run(*(None if t is None else t[g] for t in rows), sub, int(count[g[0]]), **args)
        outs.append(o)
        states.append(s)
    inverse = torch.argsort(torch.cat(groups))
    merged = [tuple(torch.cat(ws)[inverse] for ws in zip(*(s[i] for s in states))) for i in range(len(state) - 1)]
    return torch.cat(outs)[inverse], type(state)(*merged, torch.cat([s.count for s in states])[inverse])


def _by_phase(run):
    """``run`` (q, k, v, lr, momentum, decay, state, phase) applied through ``by_phase``."""

    def wrapped(q, k, v, lr, momentum, decay, state, **args):
        return by_phase(run, (q, k, v, lr, momentum, decay), state, **args)

    return wrapped


@_by_phase
def _reference(q, k, v, lr, momentum, decay, state, phase, *, chunk_size, loss, mlp):
    """The definition, token by token. A mini-batch's gradients are all taken at the memory it
    started with (``A``), so they are computed together when it begins; each token then updates
    the momentum and the memory and reads the memory."""
    B, H, T, _ = q.shape
    W, A, S = list(state.weights), list(state.anchor), list(state.momentum)
    # the loop runs on [batch * heads, ...] tensors: 3-d bmm has far less overhead per call
    flat = lambda t: t.reshape(B * H, *t.shape[2:])  # noqa: E731
    W, S = [flat(w) for w in W], [flat(w) for w in S]
    act, _ = ACTIVATIONS[mlp["activation"]]
    gain = None if mlp["norm"] is None else mlp["norm"].repeat(B, 1)[:, None, :]  # [B*H, 1, d_v]
    eta, keep = flat(momentum)[..., None, None], flat(1 - decay)[..., None, None]  # [B*H, T, 1, 1]
    outs, t = [], 0
    while t < T:
        n = min(chunk_size - phase, T - t)  # the tokens of this call in the current mini-batch
        span = slice(t, t + n)
        inputs, deltas = mlp_gradients(A, k[:, :, span], v[:, :, span], loss, **mlp)
        th = lr[:, :, span, None, None]
        # -theta_m grad_{W_l} l(A; x_m) = -theta_m h_m^T delta_m for every token m: [B*H, n, d_in, d_out]
        steps = [flat(-th * h[..., :, None] * d[..., None, :]).unbind(1) for h, d in zip(inputs, deltas)]
        # unbind over time: indexing inside the loop would make backward quadratic in T
        tokens = zip(flat(q[:, :, span]).unbind(1), eta[:, span].unbind(1), keep[:, span].unbind(1), zip(*steps))
        for q_t, eta_t, keep_t, step_t in tokens:
            for i, step in enumerate(step_t):
                S[i] = torch.addcmul(step, eta_t, S[i])  # eta S - theta grad
                W[i] = torch.addcmul(S[i], keep_t, W[i])  # (1 - alpha) W + S
            outs.append(_read(W, q_t[:, None], act, gain, mlp["eps"], mlp["residual"]))
        t, phase = t + n, phase + n
        if phase == chunk_size:  # the mini-batch is complete: the next one starts from the memory now
            A, phase = [w.reshape(B, H, *w.shape[1:]) for w in W], 0
    count = (state.count + T) % chunk_size
    unflat = lambda t: t.reshape(B, H, *t.shape[1:])  # noqa: E731
    W, S = tuple(unflat(w) for w in W), tuple(unflat(w) for w in S)
    o = unflat(torch.cat(outs, dim=1))
    return o, MemoryState(W, tuple(A), S, count)


def _read(W, q, act, gain, eps, residual):
    """M(q) on [batch * heads, 1, d] (the reference loop's read; ``mlp_forward`` for one token)."""
    h = q
    for i, w in enumerate(W):
        h = torch.bmm(h, w)
        if i < len(W) - 1:
            h = act(h)
    if gain is not None:
        h = torch.nn.functional.layer_norm(h, h.shape[-1:], eps=eps) * gain
    return h + q if residual else h


# ---------------------------------------------------------------------------- chunk
def _transfer(g: torch.Tensor) -> torch.Tensor:
    """P[..., i, m] = prod_{m < l <= i} g_l over one mini-batch, i = 1..n, m = 0..n (0: the
    state entering it); 0 for m > i. g: [..., n] -> [..., n, n + 1].

    A masked cumulative product (no division, no log): exact for gates that are exactly 0.
    """
    n = g.shape[-1]
    rows = torch.arange(1, n + 1, device=g.device)[:, None]
    cols = torch.arange(0, n + 1, device=g.device)[None, :]
    factors = torch.where(rows > cols, g[..., :, None], torch.ones((), dtype=g.dtype, device=g.device))
    return torch.cumprod(factors, dim=-2).masked_fill(cols > rows, 0.0)


@_by_phase
def _chunk(q, k, v, lr, momentum, decay, state, phase, *, chunk_size, loss, mlp):
    """The mini-batch-parallel form (see the module docstring), all rows at mini-batch phase ``phase``.

    The call's tokens are laid on the mini-batch grid: ``phase`` padding tokens in front and
    padding tokens at the end fill partial mini-batches, so every mini-batch is a full block of
    b. Padding is the identity: lr 0, momentum 1 and decay 0 keep S, and a write mask ``w``
    (0 on padding) drops their S_j from the memory, M_i = D[i,0] W + sum_j D[i,j] w_j S_j.
    """
    act, _ = ACTIVATIONS[mlp["activation"]]
    b = chunk_size
    B, H, T, _ = q.shape
    n = -(-(phase + T) // b)
    front, back = phase, n * b - phase - T

    def pad(t, value=0.0):
        if not (front or back):
            return t
        shape = list(t.shape)
        parts = []
        if front:
            parts.append(t.new_full(shape[:2] + [front] + shape[3:], value))
        parts.append(t)
        if back:
            parts.append(t.new_full(shape[:2] + [back] + shape[3:], value))
        return torch.cat(parts, dim=2)

    def blocks(t):  # [B, H, n*b, ...] -> [B, H, n, b, ...]
        return t.reshape(B, H, n, b, *t.shape[3:])

    write = blocks(pad(torch.ones_like(lr)))  # [B, H, n, b]: 1 on real tokens
    q, k, v, lr, decay = (blocks(pad(t)) for t in (q, k, v, lr, decay))
    momentum = blocks(pad(momentum, 1.0))
    PE, PD = _transfer(momentum), _transfer(1 - decay)  # [B, H, n, b, b+1]
    E0, E = PE[..., 0], PE[..., 1:]
    D0, D = PD[..., 0], PD[..., 1:]
    F = (D @ (write * E0)[..., None]).squeeze(-1)  # [B, H, n, b]: weight of the entering momentum in M_i
    C = (D @ (write[..., None] * E)) * lr[..., None, :]  # [B, H, n, b, b], lower triangular: weight of G_m in M_i
    Cl = C[..., -1, :]  # weight of G_m in the mini-batch's last memory
    El = E[..., -1, :] * lr  # weight of G_m in the mini-batch's last momentum

    W, A, S = list(state.weights), list(state.anchor), list(state.momentum)
    L = len(W)
    outs = []
    chunks = zip(q.unbind(2), k.unbind(2), v.unbind(2), D0.unbind(2), F.unbind(2), C.unbind(2),
                 Cl.unbind(2), El.unbind(2), E0[..., -1].unbind(2))
    for j, (q_c, k_c, v_c, d0, f, c, c_last, e_last, e0_last) in enumerate(chunks):
        if j > 0:
            A = W  # a new mini-batch starts: its gradients are taken at the memory it starts with
        inputs, deltas = mlp_gradients(A, k_c, v_c, loss, **mlp)
        # read: per layer, the per-token weights applied as an attention-like masked matmul
        u = q_c
        for i in range(L):
            scores = (u @ inputs[i].transpose(-1, -2)) * c  # [B, H, b(query), b(token m)]
            z = d0[..., None] * (u @ W[i]) + f[..., None] * (u @ S[i]) - scores @ deltas[i]
            u = act(z) if i < L - 1 else z
        u = _normalize(u, mlp["norm"], mlp["eps"])
        outs.append(u + q_c if mlp["residual"] else u)
        # the memory and momentum after the mini-batch's last token
        newW, newS = [], []
        for i in range(L):
            hT = inputs[i].transpose(-1, -2)
            newW.append(d0[..., -1, None, None] * W[i] + f[..., -1, None, None] * S[i] - hT @ (c_last[..., None] * deltas[i]))
            newS.append(e0_last[..., None, None] * S[i] - hT @ (e_last[..., None] * deltas[i]))
        W, S = newW, newS
    if back == 0:
        A = W  # the call ends exactly at a mini-batch boundary
    o = torch.stack(outs, dim=2).reshape(B, H, n * b, -1)[:, :, front : front + T]
    count = (state.count + T) % b
    return o, MemoryState(tuple(W), tuple(A), tuple(S), count)
