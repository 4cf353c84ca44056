"""Softmax attention as a recurrent layer: the KV cache is the state.

``attention`` attends to every earlier token (its state grows by one key and one value per
token); ``swa`` attends to the last ``window`` tokens only (its cache stops growing at
``window - 1`` tokens). Both rotate queries and keys by their absolute positions (RoPE),
so the cache holds rotated keys and a position counter continues the rotation across calls.

Packed documents (``resets``): a query sees only the keys of its own document, a block-diagonal
causal mask; the state's ``start`` (the absolute position where the current document began)
keeps the cache's earlier documents hidden in later calls. Rotary scores depend on relative
positions only, so a document gives the same outputs wherever it sits in the row.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import merge_heads, positions_from, rotary, split_heads, window_property
from recur.ops.attention import attention, attention_step, trim_cache
from recur.registry import register
from recur.state import State


@register("attention", family="attention", paper="Vaswani et al., Attention Is All You Need (2017); Su et al., RoFormer (2021)")
class Attention(Mixer):
    """Multi-head causal softmax attention with rotary positions; the KV cache is the state.

    q_t, k_t, v_t = W_q x_t, W_k x_t, W_v x_t (per head; q, k rotated by position t);
    K_t = [K_{t-1}; k_t], V_t = [V_{t-1}; v_t];  y_t = W_o concat_heads(softmax(q_t K_t^T / sqrt(d)) V_t).
    Vaswani et al., "Attention Is All You Need" (2017), rotary positions from Su et al., "RoFormer" (2021).

    Options: ``n_heads`` / ``head_dim`` (default from ``head_split``: at least two heads
    of at most 64 channels), ``rotary_base`` (10000).
    State: ``pos`` int64 [batch] (tokens seen), ``start`` int64 [batch] (where the current document
    began: keys before it are hidden), ``k``, ``v`` [batch, heads, cached_time, head_dim].
    Modes: ``parallel`` (all new tokens in one masked attention) and ``recurrent`` (token by
    token through the cache: the reference).
    """

    modes = ("parallel", "recurrent")
    state_formula = "2 * n_heads * head_dim * T"
    growing = (("k", 2), ("v", 2))
    native_packing = True

    def __init__(self, d_model: int, mode: str | None = None, n_heads: int | None = None, head_dim: int | None = None,
                 rotary_base: float = 10000.0):
        super().__init__(d_model, mode)
        n_heads, head_dim = self._init_heads(n_heads, head_dim, even=True)
        self.rotary_base = rotary_base
        inner = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def attention_window(self) -> int | None:
        """Tokens a query sees (itself included); None: the whole past."""
        return None

    def cache_length(self, seq_len: int) -> int:
        window = self.attention_window()
        return seq_len if window is None else min(seq_len, window - 1)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        counter = torch.zeros(batch_size, device=device, dtype=torch.int64)
        return State(pos=counter, start=counter.clone(), k=empty, v=empty.clone())

    def state_size(self, seq_len: int) -> int:
        return 2 * self.n_heads * self.head_dim * self.cache_length(seq_len)

    def extra_repr(self) -> str:
        window = self.attention_window()
        shown = "" if window is None else f", window={window}"
        return f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}{shown}"

    def _forward(self, x, state, resets=None):
        T, window, H = x.shape[1], self.attention_window(), self.n_heads
        pos, start = state["pos"], state["start"]
        positions = positions_from(pos, T)  # [batch, time], absolute
        # each query's document start (absolute); a mask is needed only where it hides a cached key
        doc = start[:, None].expand_as(positions) if resets is None else packing.document_start(resets, positions, start)
        # rotary positions count from the document's start (only their differences reach the
        # scores; counting from the start makes a packed document's keys those it has alone)
        q = rotary(split_heads(self.q_proj(x), H), positions - doc, self.rotary_base)
        k = rotary(split_heads(self.k_proj(x), H), positions - doc, self.rotary_base)
        v = split_heads(self.v_proj(x), H)  # q, k, v: [batch, heads, time, head_dim]
        scale = 1.0 / math.sqrt(self.head_dim)
        n = state["k"].shape[2]
        masked = resets is not None or bool((start > pos - n).any())
        if self.mode == "parallel":
            k_all = torch.cat([state["k"], k], dim=2)
            v_all = torch.cat([state["v"], v], dim=2)
            first = (doc - (pos - n)[:, None]).clamp(min=0) if masked else None  # key index j is position pos - n + j
            o = attention(q, k_all, v_all, window=window, scale=scale, mode="parallel", first=first)
            k_cache, v_cache = trim_cache(k_all, window), trim_cache(v_all, window)
        else:
            k_cache, v_cache, outs = state["k"], state["v"], []
            for t in range(T):
                # The cache plus this token: at most `window` entries, all visible to q_t (but
                # for the keys of earlier documents).
                k_all = torch.cat([k_cache, k[:, :, t : t + 1]], dim=2)
                v_all = torch.cat([v_cache, v[:, :, t : t + 1]], dim=2)
                first = (doc[:, t] - (pos + t + 1 - k_all.shape[2])).clamp(min=0) if masked else None
                outs.append(attention_step(q[:, :, t], k_all, v_all, window=window, scale=scale, first=first))
                k_cache, v_cache = trim_cache(k_all, window), trim_cache(v_all, window)
            o = torch.stack(outs, dim=2)
        y = self.o_proj(merge_heads(o))
        return y, State(pos=pos + T, start=doc[:, -1], k=k_cache, v=v_cache)

    def reset_rows(self, state, rows, initial=None):
        """The rows where ``rows`` is True start a document at their next token."""
        return state.replace(start=torch.where(rows, state["pos"], state["start"]))


@register("swa", family="attention", paper="Beltagy et al., Longformer (2020); Jiang et al., Mistral 7B (2023); Ren et al., Samba (2024)")
class SlidingWindowAttention(Attention):
    """Sliding-window causal softmax attention with rotary positions; the state is the last window-1 tokens.

    As ``attention``, but query t sees only tokens t-window+1 .. t:
    y_t = W_o concat_heads(softmax(q_t K_{t-w+1..t}^T / sqrt(d)) V_{t-w+1..t}); the cache keeps
    the last window-1 rotated keys and values, so memory is constant after window-1 tokens.
    Local attention of Longformer (Beltagy et al. 2020), Mistral 7B (Jiang et al. 2023) and the
    attention layers of Samba (Ren et al. 2024).

    ``window`` (default 512) is settable after construction. Samba uses 2048 at a 4k training
    length; 512 keeps the window well inside the few-hundred to few-thousand token sequences
    of recur's probes, so the layer differs from full attention where it matters.
    """

    state_formula = "2 * n_heads * head_dim * min(T, window - 1)"
    window = window_property()

    def __init__(self, d_model: int, mode: str | None = None, window: int = 512, **options):
        super().__init__(d_model, mode, **options)
        self.window = window

    def attention_window(self) -> int:
        return self.window
