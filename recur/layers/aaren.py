"""Aaren (Feng, Tung, Hajimirsadeghi, Ahmed, Bengio, Mori, "Attention as an RNN", 2024), on
``recur.ops.prefix_attention.prefix_softmax_attention``.

One Aaren layer attends with a learned query token q (one per head, not a function of the
input) over the keys and values of every prefix of its inputs:

    k_t = W_k x_t,  v_t = W_v x_t                        per head h: k_t^h, v_t^h [head_dim]
    s_t^h = q^h . k_t^h / sqrt(head_dim)
    o_t^h = sum_{i<=t} exp(s_i^h) v_i^h / sum_{i<=t} exp(s_i^h)
    y_t = W_o concat_h(o_t^h)

which is carried in constant memory by the paper's RNN state (m, u, w) per head: the running
maximum score, sum exp(s_i - m) and sum exp(s_i - m) v_i (see the primitive). The paper stacks
Aaren layers where a Transformer stacks self-attention layers (each layer's outputs are the
next layer's inputs, with the Transformer's residuals, norms and MLPs): here one layer is the
mixer, and recur's Block/Backbone do the stacking.

Interpretations. The paper gives the equations above but no code for the layer; its Aaren
replaces a Transformer's multi-head attention, so this layer keeps multi-head attention's
structure: key, value and output projections without bias (as recur's ``attention``), heads
from ``head_split``, the 1/sqrt(head_dim) scale of scaled dot-product attention. The learned
query is parameterised directly in key space, q [n_heads, head_dim] (a learned token passed
through a query projection would be the same family of functions), initialised N(0, 1), which
is the scale a unit-variance token gets from a variance-preserving projection. No positions
are added: a fixed query sees keys only, and order enters through the causal prefixes.

Modes: ``chunk`` (default; running maximum by cummax, then the linear (u, w) recurrence as
``diagonal_scan``: O(T) work, fastest on CPU), ``parallel`` (the paper's parallel prefix scan,
Hillis-Steele, O(T log T)) and ``recurrent`` (the RNN one token at a time; the reference).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import merge_heads, split_heads
from recur.ops.prefix_attention import prefix_softmax_attention
from recur.registry import register
from recur.state import State


@register("aaren", family="attention",
          paper="Feng et al., Attention as an RNN (2024)")
class Aaren(Mixer):
    """Aaren: softmax attention of a learned query over every prefix, computed as an RNN.

    s_t = q . W_k x_t / sqrt(d) per head (q a learned token); m_t = max(m_{t-1}, s_t);
    u_t = u_{t-1} e^{m_{t-1} - m_t} + e^{s_t - m_t}; w_t = w_{t-1} e^{m_{t-1} - m_t} + e^{s_t - m_t} W_v x_t;
    y_t = W_o concat_heads(w_t / u_t). Feng et al., "Attention as an RNN" (2024).

    Options: ``n_heads`` / ``head_dim`` (default from ``head_split``), ``chunk_size`` (64,
    chunk mode's scan chunk). State: ``m``, ``u`` [batch, heads], ``w`` [batch, heads, head_dim];
    the zero state (u = 0) is the empty prefix (its m is ignored).
    """

    modes = ("chunk", "parallel", "recurrent")
    state_formula = "n_heads * (head_dim + 2)"

    def __init__(self, d_model: int, mode: str | None = None, *, n_heads: int | None = None,
                 head_dim: int | None = None, chunk_size: int = 64):
        super().__init__(d_model, mode)
        n_heads, head_dim = self._init_heads(n_heads, head_dim)
        self.chunk_size = chunk_size
        inner = n_heads * head_dim
        self.query = nn.Parameter(torch.randn(n_heads, head_dim))
        self.k_proj = nn.Linear(d_model, inner, bias=False)
        self.v_proj = nn.Linear(d_model, inner, bias=False)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        zeros = torch.zeros(batch_size, self.n_heads, device=device, dtype=dtype)
        return State(m=zeros, u=zeros.clone(),
                     w=torch.zeros(batch_size, self.n_heads, self.head_dim, device=device, dtype=dtype))

    def _forward(self, x, state):
        k = split_heads(self.k_proj(x), self.n_heads)
        v = split_heads(self.v_proj(x), self.n_heads)
        scores = torch.einsum("bhtd,hd->bht", k, self.query.to(k.dtype)) / math.sqrt(self.head_dim)
        o, (m, u, w) = prefix_softmax_attention(scores, v, (state["m"], state["u"], state["w"]),
                                                mode=self.op_mode, chunk_size=self.chunk_size)
        y = self.o_proj(merge_heads(o))
        return y, State(m=m, u=u, w=w)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}"
