"""Delta-rule mixers: DeltaNet and Gated DeltaNet, both on ``recur.ops.delta.delta_rule``.

Layer (the authors' layer, as in flash-linear-attention's defaults):
    q, k, v = ShortConv_silu(x W_q), ShortConv_silu(x W_k), ShortConv_silu(x W_v)   (kernel 4)
    q, k    = L2-normalised per head; q additionally scaled by d_k^-0.5
    beta_t  = sigmoid(x_t W_beta)                                                     (per head)
    S_t     = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ;  o_t = S_t^T q_t
    y       = W_o RMSNorm_head(o)                  (DeltaNet, alpha_t = 1)
    y       = W_o (RMSNorm_head(o) * silu(x W_g))  (Gated DeltaNet, alpha_t = exp(g_t))

``negative_eigenvalues=True`` takes beta_t = 2 sigmoid(x_t W_beta) in (0, 2), so the transition
I - beta_t k_t k_t^T has the eigenvalue 1 - beta_t in (-1, 1) along k_t (Grazzi et al., "Unlocking
State-Tracking in Linear RNNs Through Negative Eigenvalues", 2024): a reflection, which parity and
other state-tracking problems need; with beta in (0, 1) every eigenvalue lies in [0, 1].

Heads (``common.head_split``): ``head_dim`` defaults to the largest divisor of d_model that is at most
min(64, d_model / 2): at least two heads, at most 64 channels each (d_model=16 -> 2 heads of 8;
96 -> 2 of 48; 1024 -> 16 of 64). Pass ``n_heads`` and/or ``head_dim`` to choose; ``expand_v``
widens the value (and state) per head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import ShortConv, head_split, merge_heads, positive_int, split_heads
from recur.ops.delta import delta_rule
from recur.registry import register
from recur.state import State


class _DeltaRuleMixer(Mixer):
    """Shared body of DeltaNet and Gated DeltaNet (see the module docstring)."""

    modes = ("chunk", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "n_heads * head_k_dim * head_v_dim + 3 * n_heads * (2 * head_k_dim + head_v_dim)"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        expand_v: int = 1,
        conv_size: int = 4,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        negative_eigenvalues: bool = False,
    ):
        super().__init__(d_model, mode)
        positive_int("expand_v", expand_v, owner=self.name)
        if not isinstance(negative_eigenvalues, bool):
            raise ValueError(f"{self.name}: negative_eigenvalues must be True or False, got {negative_eigenvalues!r}")
        self.negative_eigenvalues = negative_eigenvalues
        self.n_heads, self.head_k_dim = head_split(d_model, n_heads, head_dim)
        self.head_v_dim = self.head_k_dim * expand_v
        self.chunk_size = chunk_size
        H, key_dim, value_dim = self.n_heads, self.n_heads * self.head_k_dim, self.n_heads * self.head_v_dim

        self.q_proj = nn.Linear(d_model, key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, value_dim, bias=False)
        self.b_proj = nn.Linear(d_model, H, bias=False)
        self.q_conv = ShortConv(key_dim, conv_size, bias=False)
        self.k_conv = ShortConv(key_dim, conv_size, bias=False)
        self.v_conv = ShortConv(value_dim, conv_size, bias=False)
        self.o_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            S=torch.zeros(batch_size, self.n_heads, self.head_k_dim, self.head_v_dim, device=device, dtype=dtype),
            conv_q=self.q_conv.init_tail(batch_size, device=device, dtype=dtype),
            conv_k=self.k_conv.init_tail(batch_size, device=device, dtype=dtype),
            conv_v=self.v_conv.init_tail(batch_size, device=device, dtype=dtype),
        )

    def log_alpha(self, x: torch.Tensor) -> torch.Tensor | None:
        """Per-head log decay [batch, heads, time], or None for no decay."""
        return None

    def output_gate(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return o

    def _forward(self, x, state, resets=None):
        q, conv_q = self.q_conv(self.q_proj(x), state["conv_q"], resets)
        k, conv_k = self.k_conv(self.k_proj(x), state["conv_k"], resets)
        v, conv_v = self.v_conv(self.v_proj(x), state["conv_v"], resets)
        q, k, v = (split_heads(t, self.n_heads) for t in (q, k, v))
        q = F.normalize(q, dim=-1) * self.head_k_dim**-0.5
        k = F.normalize(k, dim=-1)
        beta = rearrange(torch.sigmoid(self.b_proj(x)), "b t h -> b h t")
        if self.negative_eigenvalues:
            beta = 2 * beta  # in (0, 2): the transition's eigenvalue 1 - beta along k_t reaches (-1, 0)
        o, S = delta_rule(
            q, k, v, beta, packing.hard_reset(self.log_alpha(x), resets, time_dim=2, like=q), state["S"],
            mode=self.op_mode,
            chunk_size=self.chunk_size,
        )
        o = self.output_gate(self.o_norm(rearrange(o, "b h t d -> b t h d")), x)
        y = self.o_proj(merge_heads(o, "b t h d"))
        return y, State(S=S, conv_q=conv_q, conv_k=conv_k, conv_v=conv_v)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_heads={self.n_heads}, head_k_dim={self.head_k_dim}, "
                f"head_v_dim={self.head_v_dim}, chunk_size={self.chunk_size}"
                + (", negative_eigenvalues=True" if self.negative_eigenvalues else ""))


@register("deltanet", family="delta-rule",
          paper="Yang et al., Parallelizing Linear Transformers with the Delta Rule over Sequence Length (2024)")
class DeltaNet(_DeltaRuleMixer):
    """DeltaNet: linear attention whose memory is edited by the delta rule (error-correcting writes).

    S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ;  o_t = S_t^T q_t, with short-conv,
    L2-normalised q, k (q scaled by d_k^-0.5), beta_t = sigmoid(x_t W_beta), per-head RMSNorm output.
    Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
    Sequence Length" (NeurIPS 2024); the rule itself is Schlag et al. 2021 (fast weight programmers).
    """


@register("gated_deltanet", family="delta-rule",
          paper="Yang, Kautz, Hatamizadeh, Gated Delta Networks: Improving Mamba2 with Delta Rule (2024)")
class GatedDeltaNet(_DeltaRuleMixer):
    """Gated DeltaNet: the delta rule with a Mamba-2 style per-head scalar decay and an output gate.

    S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T ;  o_t = S_t^T q_t,
    alpha_t = exp(-exp(A_log) * softplus(x_t W_a + dt_bias)), y = W_o (RMSNorm(o) * silu(x W_g)).
    A ~ U[1, 16] (A_log = log A), dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1].
    Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule" (ICLR 2025).
    """

    def __init__(self, d_model: int, mode: str | None = None, *, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 A_init_range: tuple[float, float] = (1.0, 16.0), **options):
        super().__init__(d_model, mode, **options)
        H = self.n_heads
        self.a_proj = nn.Linear(d_model, H, bias=False)
        self.g_proj = nn.Linear(d_model, H * self.head_v_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(H).uniform_(*A_init_range).log())
        dt = torch.exp(torch.empty(H).uniform_(math.log(dt_min), math.log(dt_max)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def log_alpha(self, x):
        # In float32 at least: a bfloat16 log decay would lose most of its digits.
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        g = -self.A_log.to(work).exp() * F.softplus(self.a_proj(x).to(work) + self.dt_bias.to(work))
        return rearrange(g, "b t h -> b h t")

    def output_gate(self, o, x):
        return o * F.silu(split_heads(self.g_proj(x), self.n_heads, "b t h d"))
