"""Gated Linear Attention (Yang et al. 2023): linear attention whose matrix state
decays per key dimension with a data-dependent, low-rank gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import merge_heads, split_heads
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State

@register(
    "gla",
    family="matrix-state",
    paper="Yang et al., Gated Linear Attention Transformers with Hardware-Efficient Training (2023)",
)
class GLA(Mixer):
    """Gated linear attention: a matrix state with a data-dependent diagonal decay.

    Per head, with q scaled by d_k^-0.5 (head key dim, as the paper):
        alpha_t = sigmoid(x_t W_1 W_2 + b)^(1/tau)     (rank 16, tau = 16; in log space
                  log alpha_t = logsigmoid(x_t W_1 W_2 + b) / tau)
        S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T;   o_t = S_t^T q_t
        y_t = (swish(x_t W_r + b_r) * LayerNorm_head(o_t)) W_O
    Key width d_model * expand_k (0.5), value width d_model * expand_v (1.0), 4 heads
    as in the paper; the per-head LayerNorm (the paper's choice) shares its affine
    parameters across heads.
    """

    modes = ("chunk", "parallel", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "n_heads * key_dim * value_dim"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        n_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_rank: int = 16,
        gate_temperature: float = 16.0,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ):
        super().__init__(d_model, mode)
        key_width, value_width = d_model * expand_k, d_model * expand_v
        if not (key_width.is_integer() and value_width.is_integer()):
            raise ValueError(f"gla: d_model * expand_k and d_model * expand_v must be integers, got {key_width} and {value_width}")
        key_width, value_width = int(key_width), int(value_width)
        if n_heads < 1 or key_width < n_heads or key_width % n_heads or value_width < n_heads or value_width % n_heads:
            raise ValueError(
                f"gla: n_heads={n_heads} must divide the key width d_model*expand_k={key_width} "
                f"and the value width d_model*expand_v={value_width}"
            )
        self.n_heads = n_heads
        self.key_dim, self.value_dim = key_width // n_heads, value_width // n_heads
        self.gate_temperature = gate_temperature
        self.chunk_size = chunk_size
        self.q_proj = nn.Linear(d_model, key_width, bias=False)
        self.k_proj = nn.Linear(d_model, key_width, bias=False)
        self.v_proj = nn.Linear(d_model, value_width, bias=False)
        self.gate_down = nn.Linear(d_model, gate_rank, bias=False)  # W_1
        self.gate_up = nn.Linear(gate_rank, key_width, bias=True)  # W_2, b
        self.r_proj = nn.Linear(d_model, value_width, bias=True)  # output gate W_r, b_r
        self.o_proj = nn.Linear(value_width, d_model, bias=False)
        self.norm = nn.LayerNorm(self.value_dim, eps=norm_eps)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(S=torch.zeros(batch_size, self.n_heads, self.key_dim, self.value_dim, device=device, dtype=dtype))

    def _forward(self, x, state, resets=None):
        H = self.n_heads
        q = split_heads(self.q_proj(x), H) * self.key_dim**-0.5
        k = split_heads(self.k_proj(x), H)
        v = split_heads(self.v_proj(x), H)
        log_alpha = split_heads(F.logsigmoid(self.gate_up(self.gate_down(x))) / self.gate_temperature, H)
        log_alpha = packing.hard_reset(log_alpha, resets, time_dim=2)
        o, S = gated_matrix(q, k, v, log_alpha, state["S"], mode=self.op_mode, chunk_size=self.chunk_size)
        o = merge_heads(self.norm(o))
        y = self.o_proj(F.silu(self.r_proj(x)) * o)
        return y, State(S=S)
