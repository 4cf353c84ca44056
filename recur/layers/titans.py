"""Titans: a neural long-term memory trained at test time, alone and in the paper's three
architectures (Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time", 2024).

The memory (``recur.ops.memory.mlp_memory``), per head, with mini-batches of b = ``chunk_size``
tokens (t' = t - t mod b; gradients inside a mini-batch are taken at the memory it started with):
    q_t, k_t, v_t = SiLU(conv(x_t W_Q)), SiLU(conv(x_t W_K)), SiLU(conv(x_t W_V));  q, k L2-normalised
    theta_t, eta_t, alpha_t = sigmoid(x_t W_theta + b_theta), sigmoid(..eta), sigmoid(..alpha)
    S_t = eta_t S_{t-1} - theta_t grad ||M_{t'}(k_t) - v_t||^2         (surprise with momentum)
    M_t = (1 - alpha_t) M_{t-1} + S_t                                  (forgetting)
    read:  M_t(q_t),  M(x) = x + LN(SiLU(x W_1) W_2)                    (L_M = 2; LN: gain g, no bias)

Mixers (each with the (y, state) contract):
    titans      the memory as the sequence mixer: y = W_O (RMSNorm(M_t(q_t)) * SiLU(x W_G))
    titans_mac  memory as context (eqs. 21-25): segments of ``segment_size`` tokens attend over
                [persistent tokens; memory reads h of the segment; the segment], the memory then
                learns from the attention output y, and y is gated by the memory's read of y
    titans_mag  memory as gate (eqs. 26-28): sliding-window attention with a persistent prefix,
                in parallel with the memory; y = W_O (RMSNorm(attn) * sigmoid(RMSNorm(memory)))
    titans_mal  memory as layer (eqs. 29-31): the memory layer, then sliding-window attention

Interpretations (the paper is silent or ambiguous; recur's choices):
  * memory MLP: L_M = 2, hidden width 4 * head_dim, no biases, and titans-pytorch's wrapping
    M(x) = x + LN(MLP(x)) (its default ``ResidualNorm``, from TTT; the paper: "in all blocks, we
    use residual connections", Section 4.4). The LayerNorm's gain is learned by the outer loop,
    not at test time (as TTT). It is needed, not cosmetic: without it the memory's gradients
    grow with its weights, and with momentum and mini-batches the untrained memory diverges
    within ~50 tokens at d_model = 16. The activation is SiLU (the paper's activation;
    titans-pytorch uses GELU, ``activation="gelu"``). The initial memory M_0 is learned (per
    head; Xavier-uniform as titans-pytorch), so ``init_state`` holds it.
  * the loss is the paper's eq. 12, ||M(k) - v||^2 (no 1/2, no mean over channels).
  * gates are per head and per token. Biases start at theta = 0.05, eta = 0.9, alpha = 0.01 (the
    paper gives no initialisation; small steps keep the untrained memory stable, and a slow
    forgetting makes it long-term from the start).
  * ``chunk_size`` (b, default 16) is part of the model, not only of the computation.
  * output (Section 4.4, "normalization and gating with a linear layer before the final output
    projection"): per-head RMSNorm, times SiLU(x W_G), then W_O, as in Gated DeltaNet.
  * the persistent tokens p_1..p_Np are learned d_model vectors entering the attention's key and
    value projections (no rotation: they are position-free). Their effect on the memory (eqs. 26
    and 29 also feed them to M) is a data-independent initial memory and conv context, which the
    learned M_0 already covers, so the memory reads x alone.
  * MAC: a token of a segment sees the persistent tokens, the memory reads h_j and tokens x_j of
    its own segment for j <= its position (the paper's figure shows h fully visible, which would
    let a token see reads of later tokens; recur is causal). The layout [p; h_1, x_1, h_2, x_2,
    ...] makes this plain causal attention (``recur.ops.attention``). The memory is updated token
    by token with y (mini-batch semantics), so the read M_t(y_t) of eq. 25 uses the memory after
    token t (reading it after the whole segment would not be causal). Attention positions are
    segment-local (rotary). The reads h are memory outputs, d_model wide (heads side by side),
    entering the attention's projections like tokens; y is the attention's per-head output
    (no W_O before the gate). ``segment_size`` defaults to 32 (small enough for the
    conformance suite's 37 tokens to cross a segment boundary). Its "recurrent" mode runs each
    segment's attention query by query over the key cache and the memory's reference loop.
  * MAG/MAL: the persistent prefix is visible to every query (SW-Attn*; MAL's eq. 31 has no star,
    but a prefix that slides out of the window after ``window`` tokens would make the layer depend
    on absolute position); the gate's sigma is a sigmoid.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import (ShortConv, logit, merge_heads, positions_from, positive_int, rotary, split_heads,
                                 window_property)
from recur.ops.attention import attention, attention_step, trim_cache
from recur.ops.memory import ACTIVATIONS, MemoryState, mlp_forward, mlp_memory
from recur.registry import register
from recur.state import State

PAPER = "Behrouz, Zhong, Mirrokni, Titans: Learning to Memorize at Test Time (2024)"


# ------------------------------------------------------------------------ the memory
class NeuralMemory(nn.Module):
    """The long-term memory module: q/k/v projections with short convs, per-head gates, and the
    MLP memory whose weights are the state (see the module docstring)."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, *, depth: int = 2, expansion: int = 4,
                 conv_size: int = 4, activation: str = "silu", memory_norm: bool = True, lr_init: float = 0.05,
                 momentum_init: float = 0.9, decay_init: float = 0.01):
        super().__init__()
        positive_int("depth", depth)
        positive_int("expansion", expansion)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        for name, p in (("lr_init", lr_init), ("momentum_init", momentum_init), ("decay_init", decay_init)):
            if not 0 < p < 1:
                raise ValueError(f"{name} must lie in (0, 1) (a sigmoid's value), got {p!r}")
        self.n_heads, self.head_dim, self.activation = n_heads, head_dim, activation
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.q_conv = ShortConv(inner, conv_size, bias=False)
        self.kv_conv = ShortConv(2 * inner, conv_size, bias=False)  # depthwise: k's and v's convs side by side
        self.gate_proj = nn.Linear(d_model, 3 * n_heads)  # theta, eta, alpha per head
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.tensor([logit(p) for p in (lr_init, momentum_init, decay_init)]).repeat_interleave(n_heads))
        dims = [head_dim] + [expansion * head_dim] * (depth - 1) + [head_dim]
        self.init_weights = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(n_heads, d_in, d_out)
            for h in range(n_heads):
                nn.init.xavier_uniform_(w[h])
            self.init_weights.append(nn.Parameter(w))
        # the gain of the LayerNorm on the MLP's output, M(x) = x + LN(MLP(x)) (learned, not test-time trained)
        self.norm_gain = nn.Parameter(torch.ones(n_heads, head_dim)) if memory_norm else None
        self.depth = depth
        self.memory_params = sum(a * b for a, b in zip(dims[:-1], dims[1:]))  # floats of one copy, per head

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else self.init_weights[0].dtype
        entries = {}
        for i, w in enumerate(self.init_weights):
            w = w.to(device=device, dtype=dtype)
            entries[f"W{i}"] = w.unsqueeze(0).expand(batch_size, *w.shape)
            entries[f"A{i}"] = entries[f"W{i}"]
            entries[f"S{i}"] = torch.zeros(batch_size, *w.shape, device=device, dtype=w.dtype)
        entries["count"] = torch.zeros(batch_size, device=device, dtype=torch.int64)
        entries["conv_q"] = self.q_conv.init_tail(batch_size, device=device, dtype=dtype)
        entries["conv_kv"] = self.kv_conv.init_tail(batch_size, device=device, dtype=dtype)
        return State(entries)

    def as_memory(self, st: State) -> MemoryState:
        L = self.depth
        return MemoryState(tuple(st[f"W{i}"] for i in range(L)), tuple(st[f"A{i}"] for i in range(L)),
                           tuple(st[f"S{i}"] for i in range(L)), st["count"])

    def queries(self, x: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q = l2norm(SiLU(conv(x W_Q))) per head [batch, heads, time, head_dim], and the new conv tail."""
        q, tail = self.q_conv(self.q_proj(x), tail)
        return F.normalize(split_heads(q, self.n_heads), dim=-1), tail

    def read(self, weights, q: torch.Tensor) -> torch.Tensor:
        """M*(q) with fixed weights (no update): q [batch, heads, n, head_dim]."""
        return mlp_forward(weights, q, self.activation, norm=self.norm_gain)

    def forward(self, x: torch.Tensor, st: State, mode: str, chunk_size: int) -> tuple[torch.Tensor, State]:
        """Read and train the memory on x [batch, time, d_model]: (reads [batch, heads, time, head_dim], state)."""
        q, conv_q = self.queries(x, st["conv_q"])
        kv, conv_kv = self.kv_conv(self.kv_proj(x), st["conv_kv"])
        k, v = (split_heads(t, self.n_heads) for t in kv.chunk(2, dim=-1))
        k = F.normalize(k, dim=-1)
        lr, momentum, decay = rearrange(torch.sigmoid(self.gate_proj(x)), "b t (g h) -> g b h t", g=3)
        o, mem = mlp_memory(q, k, v, lr, momentum, decay, self.as_memory(st), mode=mode, chunk_size=chunk_size,
                             activation=self.activation, norm=self.norm_gain)
        entries = {}
        for i in range(self.depth):
            entries[f"W{i}"], entries[f"A{i}"], entries[f"S{i}"] = mem.weights[i], mem.anchor[i], mem.momentum[i]
        return o, State(entries, count=mem.count, conv_q=conv_q, conv_kv=conv_kv)


class MemoryLayer(nn.Module):
    """The memory as a layer: y = W_O (RMSNorm_head(M_t(q_t)) * SiLU(x W_G))."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int, norm_eps: float = 1e-5, **memory_options):
        super().__init__()
        inner = n_heads * head_dim
        self.memory = NeuralMemory(d_model, n_heads, head_dim, **memory_options)
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def forward(self, x, st, mode, chunk_size):
        o, st = self.memory(x, st, mode, chunk_size)
        gate = split_heads(F.silu(self.g_proj(x)), self.memory.n_heads)
        return self.o_proj(merge_heads(self.o_norm(o) * gate)), st


# ---------------------------------------------------------------------- attention
class PersistentWindowAttention(nn.Module):
    """Sliding-window softmax attention (rotary) whose persistent tokens are visible to every query.

    Query t sees the N_p persistent keys/values (p W_K, p W_V, unrotated) and tokens
    t - window + 1 .. t. The state is the KV cache of the last window - 1 tokens and a position
    counter, as ``swa``'s.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, n_persistent: int, rotary_base: float = 10000.0,
                 project_out: bool = True):
        super().__init__()
        inner = n_heads * head_dim
        self.n_heads, self.head_dim, self.rotary_base = n_heads, head_dim, rotary_base
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        # without W_O the output stays [batch, time, heads * head_dim] (MAG and MAC gate it first)
        self.o_proj = nn.Linear(inner, d_model, bias=False) if project_out else nn.Identity()
        # unit-variance tokens after the pre-norm of a Block: the scale of the inputs they sit beside
        self.persistent = nn.Parameter(torch.randn(n_persistent, d_model))

    def persistent_kv(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.persistent[None]  # [1, Np, d_model]
        pk, pv = split_heads(self.k_proj(p), self.n_heads), split_heads(self.v_proj(p), self.n_heads)
        return pk.expand(batch_size, -1, -1, -1), pv.expand(batch_size, -1, -1, -1)

    def init_state(self, batch_size, device=None, dtype=None) -> dict:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        counter = torch.zeros(batch_size, device=device, dtype=torch.int64)
        return dict(pos=counter, start=counter.clone(), k=empty, v=empty.clone())

    def forward(self, x, pos, k_cache, v_cache, window: int, mode: str, start: torch.Tensor | None = None):
        """``start`` [batch] (default 0): where each row's current document began (packed
        sequences): cached keys before it are hidden (the persistent prefix stays visible)."""
        T, n = x.shape[1], k_cache.shape[2]
        start = torch.zeros_like(pos) if start is None else start
        masked = bool((start > pos - n).any())
        # rotary positions count from the document's start: the persistent keys are not rotated,
        # so a query's scores against them depend on its position in its document
        positions = positions_from(pos - start, T)
        q = rotary(split_heads(self.q_proj(x), self.n_heads), positions, self.rotary_base)
        k = rotary(split_heads(self.k_proj(x), self.n_heads), positions, self.rotary_base)
        v = split_heads(self.v_proj(x), self.n_heads)
        pk, pv = self.persistent_kv(x.shape[0])
        scale = self.head_dim**-0.5
        if mode == "recurrent":
            outs = []
            for q_t, k_t, v_t in zip(q.unbind(2), k.unbind(2), v.unbind(2)):
                k_all = torch.cat([k_cache, k_t[:, :, None]], dim=2)
                v_all = torch.cat([v_cache, v_t[:, :, None]], dim=2)
                # the cache holds at most window - 1 tokens: with the prefix, all of it is visible
                # (but for an earlier document's keys)
                if masked:  # the prefix after the cache (key order is free here): first hides cache keys only
                    first = (start - (pos + len(outs) + 1 - k_all.shape[2])).clamp(min=0)
                    outs.append(attention_step(q_t, torch.cat([k_all, pk], 2), torch.cat([v_all, pv], 2), scale=scale,
                                               first=first))
                else:
                    outs.append(attention_step(q_t, torch.cat([pk, k_all], 2), torch.cat([pv, v_all], 2), scale=scale))
                k_cache, v_cache = trim_cache(k_all, window), trim_cache(v_all, window)
            o = torch.stack(outs, dim=2)
        else:
            k_all, v_all = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
            o = prefix_window_attention(q, k_all, v_all, pk, pv, window, scale,
                                        first=(start - (pos - n)).clamp(min=0) if masked else None)
            k_cache, v_cache = trim_cache(k_all, window), trim_cache(v_all, window)
        return self.o_proj(merge_heads(o)), pos + T, k_cache, v_cache


def prefix_window_attention(q, k, v, pk, pv, window: int, scale: float, block: int = 256,
                            first: torch.Tensor | None = None) -> torch.Tensor:
    """Causal sliding-window attention plus a prefix visible to every query.

    q [batch, heads, T, d]; k, v [batch, heads, S, d] (S - T cached tokens, then the queries'
    own, as ``recur.ops.attention``); pk, pv [batch, heads, Np, d]. Query i (key index a =
    S - T + i) sees every prefix key and key j iff a - window < j <= a (and j >= first [batch],
    when given: the current document's first key). Blocks of ``block``
    queries, each one masked ``scaled_dot_product_attention`` call (``recur.ops.attention``
    has no always-visible prefix).
    """
    T, S, Np = q.shape[2], k.shape[2], pk.shape[2]
    outs = []
    for s in range(0, T, block):
        m = min(block, T - s)
        a0 = S - T + s
        lo, hi = max(0, a0 - window + 1), a0 + m
        a = torch.arange(a0, hi, device=q.device)[:, None]
        j = torch.arange(lo, hi, device=q.device)[None, :]
        visible = (j <= a) & (a - j < window)
        if first is not None:  # per row: [batch, 1, m, keys]
            visible = (visible & (j >= first[:, None, None]))[:, None]
        prefix = torch.ones(*visible.shape[:-1], Np, dtype=torch.bool, device=q.device)
        mask = torch.cat([prefix, visible], dim=-1)
        kb, vb = torch.cat([pk, k[:, :, lo:hi]], dim=2), torch.cat([pv, v[:, :, lo:hi]], dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, s : s + m], kb, vb, attn_mask=mask, scale=scale))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# -------------------------------------------------------------------------- mixers
class _TitansBase(Mixer):
    """Options shared by the four mixers (see the module docstring)."""

    modes = ("chunk", "recurrent")
    linear_recurrence = False  # a test-time-trained MLP (and attention over its reads)
    rotary_heads = False  # attention with rotary positions needs an even head_dim

    def __init__(self, d_model: int, mode: str | None = None, *, n_heads: int | None = None, head_dim: int | None = None,
                 depth: int = 2, expansion: int = 4, chunk_size: int = 16, conv_size: int = 4,
                 activation: str = "silu", memory_norm: bool = True, lr_init: float = 0.05,
                 momentum_init: float = 0.9, decay_init: float = 0.01, norm_eps: float = 1e-5):
        super().__init__(d_model, mode)
        self._init_heads(n_heads, head_dim, even=self.rotary_heads)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.conv_size = conv_size
        self.depth = depth
        self.memory_options = dict(depth=depth, expansion=expansion, conv_size=conv_size, activation=activation,
                                   memory_norm=memory_norm, lr_init=lr_init, momentum_init=momentum_init,
                                   decay_init=decay_init)
        self.norm_eps = norm_eps

    def _memory_state_size(self, memory: NeuralMemory) -> int:
        inner = self.n_heads * self.head_dim
        return 3 * self.n_heads * memory.memory_params + (self.conv_size - 1) * 3 * inner

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"depth={self.depth}, chunk_size={self.chunk_size}")


@register("titans", family="test-time-memory", paper=PAPER)
class Titans(_TitansBase):
    """Titans' neural long-term memory as a sequence mixer (the LMM): an MLP trained at test time.

    Per head, mini-batches of b = chunk_size tokens (t' = t - t mod b):
    S_t = eta_t S_{t-1} - theta_t grad ||M_{t'}(k_t) - v_t||^2 ;  M_t = (1 - alpha_t) M_{t-1} + S_t ;
    y_t = W_O (RMSNorm(M_t(q_t)) * SiLU(x_t W_G)), M(x) = x + SiLU(x W_1) W_2 (learned M_0).
    Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Sections 3.1-3.2.
    State: the memory (current, mini-batch start, momentum), a mini-batch counter, conv tails.
    """

    state_formula = "3 * n_heads * memory_params + 3 * (conv_size - 1) * n_heads * head_dim"

    def __init__(self, d_model: int, mode: str | None = None, **options):
        super().__init__(d_model, mode, **options)
        self.layer = MemoryLayer(d_model, self.n_heads, self.head_dim, self.norm_eps, **self.memory_options)
        self.memory_params = self.layer.memory.memory_params

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return self.layer.memory.init_state(batch_size, device=device, dtype=dtype)

    def _forward(self, x, state):
        return self.layer(x, state, self.op_mode, self.chunk_size)


class _WindowTitans(_TitansBase):
    """MAG and MAL: the memory and a persistent-prefix sliding-window attention (KV cache in the state)."""

    growing = (("k", 2), ("v", 2))
    rotary_heads = True
    project_attention = True  # W_O on the attention's output (MAG gates first, then projects)
    state_formula = ("3 * n_heads * memory_params + 3 * (conv_size - 1) * n_heads * head_dim"
                     " + 2 * n_heads * head_dim * min(T, window - 1)")
    window = window_property()

    def __init__(self, d_model: int, mode: str | None = None, *, window: int = 512, n_persistent: int = 4,
                 rotary_base: float = 10000.0, **options):
        super().__init__(d_model, mode, **options)
        self.window = window
        self.n_persistent = positive_int("n_persistent", n_persistent)
        self.attention = PersistentWindowAttention(d_model, self.n_heads, self.head_dim, n_persistent, rotary_base,
                                                   project_out=self.project_attention)

    @abstractmethod
    def _memory_module(self) -> NeuralMemory:
        """The NeuralMemory inside this architecture."""

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(self.attention.init_state(batch_size, device, dtype),
                     memory=self._memory_module().init_state(batch_size, device=device, dtype=dtype))

    def state_size(self, seq_len: int) -> int:
        cache = 2 * self.n_heads * self.head_dim * min(seq_len, self.window - 1)
        return self._memory_state_size(self._memory_module()) + cache

    def attend(self, x, state):
        return self.attention(x, state["pos"], state["k"], state["v"], self.window, self.mode, start=state["start"])

    def reset_rows(self, state, rows, initial):
        """The memory of the rows starting a document goes back to its initial state; their window
        hides the cached keys from the next token on (the cache grows, so it is not swapped)."""
        memory = packing.reset_rows(state["memory"], initial["memory"], rows)
        return state.replace(memory=memory, start=torch.where(rows, state["pos"], state["start"]))


@register("titans_mag", family="test-time-memory", paper=PAPER)
class TitansMAG(_WindowTitans):
    """Titans MAG (memory as a gate): sliding-window attention and the neural memory side by side.

    x~ = [p_1..p_Np] || x ;  y = SW-Attn*(x~) (the prefix visible to all) ;  o = y (x) M(x~)  (eqs. 26-28)
    with the gate o = W_O (RMSNorm_head(y) * sigmoid(RMSNorm_head(M_t(q_t)))) per head.
    Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Section 4.2.
    State: the window's KV cache and position, and the memory's state.
    """

    project_attention = False  # the gate's W_O projects both branches' product

    def __init__(self, d_model: int, mode: str | None = None, **options):
        super().__init__(d_model, mode, **options)
        self.memory = NeuralMemory(d_model, self.n_heads, self.head_dim, **self.memory_options)
        self.memory_params = self.memory.memory_params
        self.attn_norm = nn.RMSNorm(self.head_dim, eps=self.norm_eps)
        self.mem_norm = nn.RMSNorm(self.head_dim, eps=self.norm_eps)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)

    def _memory_module(self):
        return self.memory

    def gate(self, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """o = W_O (RMSNorm(y) * sigmoid(RMSNorm(m))): y [batch, time, inner], m [batch, heads, time, head_dim]."""
        y = split_heads(y, self.n_heads)
        return self.o_proj(merge_heads(self.attn_norm(y) * torch.sigmoid(self.mem_norm(m))))

    def _forward(self, x, state):
        y, pos, k, v = self.attend(x, state)
        m, mem = self.memory(x, state["memory"], self.op_mode, self.chunk_size)
        return self.gate(y, m), State(pos=pos, start=state["start"], k=k, v=v, memory=mem)


@register("titans_mal", family="test-time-memory", paper=PAPER)
class TitansMAL(_WindowTitans):
    """Titans MAL (memory as a layer): the neural memory layer, then sliding-window attention.

    x~ = [p_1..p_Np] || x ;  y = M(x~) ;  o = SW-Attn(y)   (eqs. 29-31), with the memory layer
    y_t = W_O (RMSNorm(M_t(q_t)) * SiLU(x_t W_G)) and the persistent prefix visible to every query.
    Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Section 4.3.
    State: the memory's state, the window's KV cache and position.
    """

    def __init__(self, d_model: int, mode: str | None = None, **options):
        super().__init__(d_model, mode, **options)
        self.layer = MemoryLayer(d_model, self.n_heads, self.head_dim, self.norm_eps, **self.memory_options)
        self.memory_params = self.layer.memory.memory_params

    def _memory_module(self):
        return self.layer.memory

    def _forward(self, x, state):
        y, mem = self.layer(x, state["memory"], self.op_mode, self.chunk_size)
        o, pos, k, v = self.attend(y, state)
        return o, State(pos=pos, start=state["start"], k=k, v=v, memory=mem)


@register("titans_mac", family="test-time-memory", paper=PAPER)
class TitansMAC(_TitansBase):
    """Titans MAC (memory as context): attention within segments over persistent tokens, memory reads and the segment.

    For each segment S of ``segment_size`` tokens (eqs. 21-25): h = M*_{start}(q(S)) (reads of the
    memory as the segment began); y = Attn([p_1..p_Np] || h || S) (causal: token j sees p, h_i and
    x_i for i <= j); the memory learns from y token by token (k, v, q from y; mini-batch
    semantics); o_t = W_O (RMSNorm(y_t) * sigmoid(RMSNorm(M_t(q(y_t))))).
    Behrouz, Zhong, Mirrokni, "Titans: Learning to Memorize at Test Time" (2024), Section 4.1.
    State: the memory's state, its weights at the segment start, the attention keys/values of the
    current partial segment (a buffer of 2 (segment_size - 1) slots, zero-padded) and counters.
    """

    rotary_heads = True
    state_formula = ("4 * n_heads * memory_params + 4 * (conv_size - 1) * n_heads * head_dim"
                     " + 4 * (segment_size - 1) * n_heads * head_dim")

    def __init__(self, d_model: int, mode: str | None = None, *, segment_size: int = 32, n_persistent: int = 4,
                 rotary_base: float = 10000.0, **options):
        super().__init__(d_model, mode, **options)
        self.segment_size = segment_size
        self.n_persistent = positive_int("n_persistent", n_persistent)
        self.memory = NeuralMemory(d_model, self.n_heads, self.head_dim, **self.memory_options)
        self.memory_params = self.memory.memory_params
        # no W_O: y stays [batch, time, heads * head_dim = d_model]; the memory and the gate read it
        self.attention = PersistentWindowAttention(d_model, self.n_heads, self.head_dim, n_persistent, rotary_base,
                                                   project_out=False)
        self.attn_norm = nn.RMSNorm(self.head_dim, eps=self.norm_eps)
        self.mem_norm = nn.RMSNorm(self.head_dim, eps=self.norm_eps)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)

    @property
    def segment_size(self) -> int:
        return self._segment_size

    @segment_size.setter
    def segment_size(self, value: int) -> None:
        self._segment_size = positive_int("segment_size", value)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        memory = self.memory.init_state(batch_size, device=device, dtype=dtype)
        dtype = memory["W0"].dtype
        buffer = torch.zeros(batch_size, self.n_heads, 2 * (self.segment_size - 1), self.head_dim, device=device, dtype=dtype)
        return State({f"seg_W{i}": memory[f"W{i}"] for i in range(self.depth)}, memory=memory,
                     conv_x=self.memory.q_conv.init_tail(batch_size, device=device, dtype=dtype),
                     k_buf=buffer, v_buf=buffer.clone(),
                     seg_count=torch.zeros(batch_size, device=device, dtype=torch.int64))

    def _forward(self, x, state):
        phase = state["seg_count"]
        if bool((phase == phase[0]).all()):
            return self._segments(x, state, int(phase[0]))
        # rows at different positions in their segments (states concatenated from different
        # calls) run as separate groups
        groups = [(phase == c).nonzero().squeeze(1) for c in torch.unique(phase)]
        parts = [self._segments(x[rows], state.select(rows), int(phase[rows[0]])) for rows in groups]
        inverse = torch.argsort(torch.cat(groups))
        return torch.cat([y for y, _ in parts])[inverse], State.cat([s for _, s in parts]).select(inverse)

    def _segments(self, x, state, s0: int):
        """All rows at position ``s0`` of their segment. Segment by segment: the reads h and the
        attention need only the memory at the segment start, so they run over the whole piece
        at once; the memory then learns from y (its own loop over mini-batches or tokens)."""
        B, T, _ = x.shape
        C, H = self.segment_size, self.n_heads
        attn, mem = self.attention, self.memory
        ref = self.mode == "recurrent"
        qx, conv_x = mem.queries(x, state["conv_x"])  # the memory's queries of the input stream
        positions = (s0 + torch.arange(T, device=x.device)) % C  # segment-local rotary positions
        positions = positions[None].expand(B, T)

        def qkv(tokens, pos):
            q = rotary(split_heads(attn.q_proj(tokens), H), pos, attn.rotary_base)
            k = rotary(split_heads(attn.k_proj(tokens), H), pos, attn.rotary_base)
            return q, k, split_heads(attn.v_proj(tokens), H)

        xq, xk, xv = qkv(x, positions)
        pk, pv = attn.persistent_kv(B)
        scale = self.head_dim**-0.5
        seg_W = [state[f"seg_W{i}"] for i in range(self.depth)]
        k_buf, v_buf = state["k_buf"][:, :, : 2 * s0], state["v_buf"][:, :, : 2 * s0]
        memory = state["memory"]
        outs, t, s = [], 0, s0
        while t < T:
            m = min(C - s, T - t)
            piece = slice(t, t + m)
            h = mem.read(seg_W, qx[:, :, piece])  # eq. 21: [B, H, m, d]
            hq, hk, hv = qkv(merge_heads(h), positions[:, piece])

            def interleave(a, b):  # [h_1, x_1, h_2, x_2, ...]: causal attention is the MAC mask
                return torch.stack([a, b], dim=3).reshape(B, H, 2 * m, -1)

            k_new, v_new = interleave(hk, xk[:, :, piece]), interleave(hv, xv[:, :, piece])
            keys, values = torch.cat([pk, k_buf, k_new], 2), torch.cat([pv, v_buf, v_new], 2)
            if ref:  # eqs. 22-23 token by token: x_j's query over the keys up to x_j
                before = keys.shape[2] - 2 * m
                y = torch.stack([attention_step(q_j, keys[:, :, : before + 2 * j + 2], values[:, :, : before + 2 * j + 2],
                                                scale=scale) for j, q_j in enumerate(xq[:, :, piece].unbind(2))], dim=2)
            else:  # eqs. 22-23 at once: causal attention of the interleaved sequence, the x positions kept
                y = attention(interleave(hq, xq[:, :, piece]), keys, values, scale=scale)[:, :, 1::2]
            # y: the segment tokens' attention outputs [B, H, m, d]
            r, memory = mem(merge_heads(y), memory, self.op_mode, self.chunk_size)  # eq. 24 (and the read of 25)
            outs.append(self.o_proj(merge_heads(self.attn_norm(y) * torch.sigmoid(self.mem_norm(r)))))  # eq. 25
            t, s = t + m, s + m
            if s == C:  # the segment is complete: the next one reads the memory as it is now
                seg_W = [memory[f"W{i}"] for i in range(self.depth)]
                k_buf, v_buf = k_buf[:, :, :0], v_buf[:, :, :0]
                s = 0
            else:
                k_buf, v_buf = torch.cat([k_buf, k_new], 2), torch.cat([v_buf, v_new], 2)
        fill = 2 * (C - 1) - k_buf.shape[2]
        k_buf, v_buf = F.pad(k_buf, (0, 0, 0, fill)), F.pad(v_buf, (0, 0, 0, fill))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return y, State({f"seg_W{i}": w for i, w in enumerate(seg_W)}, memory=memory, conv_x=conv_x,
                        k_buf=k_buf, v_buf=v_buf, seg_count=(state["seg_count"] + T) % C)
