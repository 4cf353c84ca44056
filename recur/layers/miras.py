"""Miras: Moneta, Yaad and Memora, test-time MLP memories with a non-l2 attentional bias or a
non-l2 retention (Behrouz, Razaviyayn, Zhong, Mirrokni, "It's All Connected: A Journey Through
Test-Time Memorization, Attentional Bias, Retention, and Online Optimization", 2025, Section 5).

The memory (``recur.ops.miras.miras_memory``), per head, with mini-batches of b = ``chunk_size``
tokens (t' = t - t mod b; the gradients of a mini-batch are taken at the memory it started with):
    q_t, k_t, v_t = SiLU(conv(x_t W_Q)), SiLU(conv(x_t W_K)), SiLU(conv(x_t W_V));  q, k L2-normalised
    eta_t, a_t = sigmoid(x_t W_eta + b_eta), sigmoid(x_t W_a + b_a)       (per head, per token)
    M(x) = x + LN(SiLU(x W_1) W_2)                          (2-layer MLP, LN gain g; Moneta: no LN)
    moneta  A_t = a_t A_{t-1} - eta_t grad ||M_{W_{t'}}(k_t) - v_t||_p^p ;  W_t = A_t / (||A_t||_q^(q-2) + eps)
    yaad    W_t = a_t W_{t-1} - eta_t grad Huber_{delta_t}(M_{W_{t'}}(k_t) - v_t),  delta_t = softplus(x_t W_d + b_d)
    memora  W_t = softmax(a_t log W_{t-1} - eta_t grad ||M_{W_{t'}}(k_t) - v_t||^2)   (row-wise)
    y_t = W_O (RMSNorm(M_{W_t}(q_t)) * SiLU(x_t W_G))

Interpretations (the paper is terse; recur's choices):
  * the memory, projections, convs, gating and output follow recur's Titans layer (the paper
    builds its three models on Titans' LMM block: "we follow the Titans architecture"),
    but with plain gradient descent (no momentum), the learning algorithm the paper lists
    for the three variants. The MLP is applied weight-matrix by weight-matrix: every W_l
    follows the variant's retention.
  * Moneta: p = 3, q = 4 (the paper's choice). Its memory has no LayerNorm by default,
    M(x) = x + SiLU(x W_1) W_2 (``memory_norm=False``): an output LayerNorm makes the loss
    blind to trading scale between W_1 and W_2, and through W = A / ||A||_4^2 (which shrinks W
    as A grows) that flat direction runs away (A_1 grew geometrically to overflow within 10k
    untrained steps at d_model = 16); without the norm the loss pins the scale. The l_p gradient is exact, p sign(e) |e|^(p-1)
    (the paper smooths sign and |.| for p < 2; for p = 3 the exact gradient is already
    continuous). The l_q norm is elementwise over each weight matrix. The state holds the
    unnormalised accumulator A, and the learned initial memory is parameterised by A_0 (Xavier).
    Stabiliser (not in the paper): W = A / (||A||_q^(q-2) + eps), eps = ``lq_eps`` = 0.01
    (0 gives the paper's map). The paper's map sends A -> 0 to W -> infinity; then the l_3
    gradient (cubic in W) throws A far out and float32 overflows: the untrained layer went
    non-finite within 40k steps at d_model = 16. With eps, ||W||_4 <= 1 / (2 sqrt(eps)) = 5.
  * Yaad: the paper's Huber variant switches on the error's l2 norm: gradient e (of
    ||e||^2 / 2) when ||e||_2 <= delta_t, else delta_t sign(e) (of delta_t ||e||_1);
    delta_t > 0 is data-dependent (softplus of a projection, per head; starts at 1).
  * Memora: the retention is the KL divergence to the previous memory plus entropy, whose
    closed form is the softmax above (the paper's scale c = 1). Each weight matrix's rows (over
    its input index) are distributions over its outputs. The state holds the logits P_t (W_t =
    softmax(P_t); softmax ignores a row's additive constant, so P_t = a_t P_{t-1} - eta_t grad is
    exact and log W never has to be taken). The initial logits are learned, N(0, 1).
  * gate biases start at eta = 0.05 and a = 0.99 (slow forgetting); ``chunk_size`` (b,
    default 16) is part of the model (the paper trains with mini-batches).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import ShortConv, logit, merge_heads, positive_int, split_heads
from recur.ops.miras import MirasState, lp_bias, lq_retention, miras_memory
from recur.registry import register
from recur.state import State

PAPER = ("Behrouz, Razaviyayn, Zhong, Mirrokni, It's All Connected: A Journey Through Test-Time Memorization, "
         "Attentional Bias, Retention, and Online Optimization (2025)")


class _Miras(Mixer):
    """The shared layer: projections, gates, the memory and the gated output (module docstring)."""

    modes = ("chunk", "recurrent")
    state_formula = "2 * n_heads * memory_params + 3 * (conv_size - 1) * n_heads * head_dim"
    bias = "l2"
    retention = "l2"
    n_gates = 2  # eta, a (+ delta for Yaad)

    def __init__(self, d_model: int, mode: str | None = None, *, n_heads: int | None = None, head_dim: int | None = None,
                 depth: int = 2, expansion: int = 4, chunk_size: int = 16, conv_size: int = 4, memory_norm: bool = True,
                 lr_init: float = 0.05, retain_init: float = 0.99, norm_eps: float = 1e-5):
        super().__init__(d_model, mode)
        self._init_heads(n_heads, head_dim)
        self.chunk_size = positive_int("chunk_size", chunk_size)
        self.depth = positive_int("depth", depth)
        positive_int("expansion", expansion)
        self.conv_size = conv_size
        for name, p in (("lr_init", lr_init), ("retain_init", retain_init)):
            if not 0 < p < 1:
                raise ValueError(f"{name} must lie in (0, 1) (a sigmoid's value), got {p!r}")
        H, d = self.n_heads, self.head_dim
        inner = H * d
        self.q_proj = nn.Linear(d_model, inner, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * inner, bias=False)
        self.q_conv = ShortConv(inner, conv_size, bias=False)
        self.kv_conv = ShortConv(2 * inner, conv_size, bias=False)
        self.gate_proj = nn.Linear(d_model, self.n_gates * H)
        with torch.no_grad():
            self.gate_proj.bias.copy_(torch.tensor(self._gate_biases(lr_init, retain_init)).repeat_interleave(H))
        dims = [d] + [expansion * d] * (depth - 1) + [d]
        self.init_weights = nn.ParameterList(nn.Parameter(self._initial_weights(H, a, b)) for a, b in zip(dims[:-1], dims[1:]))
        self.norm_gain = nn.Parameter(torch.ones(H, d)) if memory_norm else None
        self.memory_params = sum(a * b for a, b in zip(dims[:-1], dims[1:]))  # floats of one copy, per head
        self.g_proj = nn.Linear(d_model, inner, bias=False)
        self.o_norm = nn.RMSNorm(d, eps=norm_eps)
        self.o_proj = nn.Linear(inner, d_model, bias=False)

    # the variant's hooks
    def _gate_biases(self, lr_init: float, retain_init: float) -> list[float]:
        return [logit(lr_init), logit(retain_init)]

    def _initial_weights(self, n_heads: int, d_in: int, d_out: int) -> torch.Tensor:
        w = torch.empty(n_heads, d_in, d_out)
        for h in range(n_heads):
            nn.init.xavier_uniform_(w[h])
        return w

    def _initial_params(self, w: torch.Tensor) -> torch.Tensor:
        """The state's pre-memory P_0 for the learned initial parameter."""
        return w

    def _bias_options(self) -> dict:
        return {}

    # the mixer
    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else self.init_weights[0].dtype
        entries = {}
        for i, w in enumerate(self.init_weights):
            p = self._initial_params(w.to(device=device, dtype=dtype))
            entries[f"P{i}"] = p.unsqueeze(0).expand(batch_size, *p.shape)
            entries[f"A{i}"] = entries[f"P{i}"]
        entries["count"] = torch.zeros(batch_size, device=device, dtype=torch.int64)
        entries["conv_q"] = self.q_conv.init_tail(batch_size, device=device, dtype=dtype)
        entries["conv_kv"] = self.kv_conv.init_tail(batch_size, device=device, dtype=dtype)
        return State(entries)

    def _forward(self, x, state):
        H, L = self.n_heads, self.depth
        q, conv_q = self.q_conv(self.q_proj(x), state["conv_q"])
        kv, conv_kv = self.kv_conv(self.kv_proj(x), state["conv_kv"])
        q = F.normalize(split_heads(q, H), dim=-1)
        k, v = (split_heads(t, H) for t in kv.chunk(2, dim=-1))
        k = F.normalize(k, dim=-1)
        gates = rearrange(self.gate_proj(x), "b t (g h) -> g b h t", g=self.n_gates)
        lr, retain = torch.sigmoid(gates[0]), torch.sigmoid(gates[1])
        aux = F.softplus(gates[2]) if self.n_gates > 2 else None
        mem = MirasState(tuple(state[f"P{i}"] for i in range(L)), tuple(state[f"A{i}"] for i in range(L)), state["count"])
        o, mem = miras_memory(q, k, v, lr, retain, mem, mode=self.op_mode, chunk_size=self.chunk_size, bias=self._bias(),
                              retention=self._retention(), aux=aux, norm=self.norm_gain)
        y = self.o_proj(merge_heads(self.o_norm(o) * split_heads(F.silu(self.g_proj(x)), H)))
        entries = {}
        for i in range(L):
            entries[f"P{i}"], entries[f"A{i}"] = mem.params[i], mem.anchor[i]
        return y, State(entries, count=mem.count, conv_q=conv_q, conv_kv=conv_kv)

    def _bias(self):
        return self.bias

    def _retention(self):
        return self.retention

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"depth={self.depth}, chunk_size={self.chunk_size}")


@register("moneta", family="test-time-memory", paper=PAPER)
class Moneta(_Miras):
    """Moneta: an MLP memory with the l_p attentional bias and l_q retention (p = 3, q = 4).

    Per head, mini-batches of b tokens (t' = t - t mod b):
    A_t = a_t A_{t-1} - eta_t grad ||M_{W_{t'}}(k_t) - v_t||_p^p ;  W_t = A_t / (||A_t||_q^(q-2) + eps) ;
    y_t = W_O (RMSNorm(M_{W_t}(q_t)) * SiLU(x_t W_G)),  M(x) = x + SiLU(x W_1) W_2.
    Behrouz et al., "It's All Connected" (2025), Section 5 (Moneta).
    State: A_t and A_{t'} per layer, a mini-batch counter, conv tails.
    """

    def __init__(self, d_model: int, mode: str | None = None, *, p: float = 3.0, q: float = 4.0, lq_eps: float = 0.01,
                 memory_norm: bool = False, **options):
        if not p >= 1:
            raise ValueError(f"moneta: p must be >= 1 (an l_p norm), got {p!r}")
        if not q >= 2:
            raise ValueError(f"moneta: q must be >= 2 (an l_q retention), got {q!r}")
        if not lq_eps >= 0:
            raise ValueError(f"moneta: lq_eps must be >= 0, got {lq_eps!r}")
        self.p, self.q, self.lq_eps = float(p), float(q), float(lq_eps)
        super().__init__(d_model, mode, memory_norm=memory_norm, **options)

    def _bias(self):
        return lambda pred, target, aux: lp_bias(pred, target, aux, p=self.p)

    def _retention(self):
        return lambda P: lq_retention(P, q=self.q, eps=self.lq_eps)



@register("yaad", family="test-time-memory", paper=PAPER)
class Yaad(_Miras):
    """Yaad: an MLP memory with the Huber attentional bias (data-dependent threshold) and l2 retention.

    Per head, mini-batches of b tokens, e_t = M_{W_{t'}}(k_t) - v_t, delta_t = softplus(x_t W_d + b_d):
    W_t = a_t W_{t-1} - eta_t grad l_t,  grad l_t = grad ||e_t||^2 / 2 if ||e_t|| <= delta_t else delta_t grad ||e_t||_1 ;
    y_t = W_O (RMSNorm(M_{W_t}(q_t)) * SiLU(x_t W_G)),  M(x) = x + LN(SiLU(x W_1) W_2).
    Behrouz et al., "It's All Connected" (2025), Section 5 (Yaad).
    State: W_t and W_{t'} per layer, a mini-batch counter, conv tails.
    """

    bias = "huber"
    n_gates = 3

    def __init__(self, d_model: int, mode: str | None = None, *, delta_init: float = 1.0, **options):
        if not delta_init > 0:
            raise ValueError(f"yaad: delta_init must be > 0 (a softplus value), got {delta_init!r}")
        self.delta_init = float(delta_init)
        super().__init__(d_model, mode, **options)

    def _gate_biases(self, lr_init, retain_init):
        return [logit(lr_init), logit(retain_init), math.log(math.expm1(self.delta_init))]


@register("memora", family="test-time-memory", paper=PAPER)
class Memora(_Miras):
    """Memora: an MLP memory with the l2 attentional bias and KL (entropic) retention.

    Per head, mini-batches of b tokens, each weight matrix's rows on the simplex:
    W_t = softmax(a_t log W_{t-1} - eta_t grad ||M_{W_{t'}}(k_t) - v_t||^2)  (row-wise; held as logits) ;
    y_t = W_O (RMSNorm(M_{W_t}(q_t)) * SiLU(x_t W_G)),  M(x) = x + LN(SiLU(x W_1) W_2).
    Behrouz et al., "It's All Connected" (2025), Section 5 (Memora).
    State: the logits P_t and P_{t'} per layer, a mini-batch counter, conv tails.
    """

    retention = "kl"

    def _initial_weights(self, n_heads, d_in, d_out):
        return torch.randn(n_heads, d_in, d_out)  # logits: random rows break the hidden units' symmetry
