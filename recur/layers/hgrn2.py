"""HGRN2 (Qin et al., "HGRN2: Gated Linear RNNs with State Expansion", 2024): HGRN's gated
linear recurrence with its state expanded by an outer product, on ``recur.ops.gated.gated_matrix``.

HGRN keeps a vector h_t = f_t * h_{t-1} + (1 - f_t) * i_t. HGRN2 expands it, per head, to a matrix
with no new parameters: the forget gate acts per key dimension and its complement (1 - f_t) is
the key (a tied input gate), the input i_t is the value and the output gate o_t is the query:

    f_t = gamma + (1 - gamma) * sigmoid(x_t W_f)         per key dimension, lower bound gamma
    S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_t^T            S: [expand_ratio, expand_ratio] per head
    y_t = S_t^T o_t,   o_t = silu(x_t W_o),  i_t = x_t W_i
    out = W_out RMSNorm(y)

("the output gate plays the role of Q, (1 - forget gate) the role of K and the input the role of
V", the official README), i.e. gated linear attention with log alpha_t = log f_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import head_split, merge_heads, split_heads
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State


@register("hgrn2", family="matrix-state", paper="Qin et al., HGRN2: Gated Linear RNNs with State Expansion (2024)")
class HGRN2(Mixer):
    """HGRN2: HGRN's forget-gated recurrence with an outer-product state expansion.

    Per head: S_t = Diag(f_t) S_{t-1} + (1 - f_t) i_t^T, y_t = S_t^T o_t, with
    f_t = gamma + (1 - gamma) sigmoid(x W_f) (gamma the layer's lower bound), o_t = silu(x W_o),
    i_t = x W_i; out = W_out RMSNorm(y). Qin et al., "HGRN2: Gated Linear RNNs with State
    Expansion" (2024).

    Sizes: each head's state is expand_ratio x expand_ratio (key dim = value dim = expand_ratio,
    n_heads = d_model / expand_ratio). The paper's language models use expand_ratio 128; here it
    is the largest divisor of d_model that is at most min(128, d_model / 2) (``head_split`` with
    max_head_dim=128): d_model=16 -> 2 heads of 8, 64 -> 2 of 32, 1024 -> 8 of 128. State:
    n_heads * expand_ratio^2 = d_model * expand_ratio floats.

    Lower bound (HGRN's hierarchy: upper layers forget less): gamma = layer_idx / n_layers when the
    layer knows its depth (Backbone passes layer_idx and n_layers), 0 standalone. The official
    model learns the bounds as cumsum(softmax(P, over layers)) minus the first layer's, with P
    initialised to ones, which is exactly layer_idx / n_layers at initialisation (per channel);
    here the bound is that value, fixed, because learning it couples all layers of the model
    through one shared parameter, which a per-layer mixer cannot hold. The gate is computed in log
    space, log f = log(gamma + (1 - gamma) sigmoid(a)) = logaddexp(log gamma, log(1 - gamma) +
    logsigmoid(a)), and the key as 1 - f = -expm1(log f) (exact for f near 1).

    Interpretations (official implementation, fla's HGRN2Attention, which the HGRN2 README points
    to): projections without bias, silu on the query (the output gate), no activation on the
    input, no short convolution, no separate output gate (the query is that gate), RMSNorm with a
    weight over all heads' channels (eps 1e-5), then the output projection; no extra q scaling
    (the paper's y_t = o_t . h_t; a constant scale before the RMSNorm cancels anyway). Linear
    layers keep PyTorch's default init (the official model re-initialises every linear with
    N(0, 0.02^2) at the model level).
    """

    modes = ("chunk", "parallel", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "n_heads * expand_ratio * expand_ratio"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        expand_ratio: int | None = None,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
        n_layers: int | None = None,
    ):
        super().__init__(d_model, mode)
        if expand_ratio is None:
            self.n_heads, self.expand_ratio = head_split(d_model, max_head_dim=128)
        else:
            self.n_heads, self.expand_ratio = head_split(d_model, head_dim=expand_ratio)
        if (layer_idx is None) != (n_layers is None):
            raise ValueError(f"hgrn2: pass both layer_idx and n_layers or neither, got layer_idx={layer_idx}, n_layers={n_layers}")
        if n_layers is not None and not 0 <= layer_idx < n_layers:
            raise ValueError(f"hgrn2: need 0 <= layer_idx < n_layers, got layer_idx={layer_idx}, n_layers={n_layers}")
        self.lower_bound = 0.0 if n_layers is None else layer_idx / n_layers
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.q_proj = nn.Linear(d_model, d_model, bias=False)  # output gate o_t (the query)
        self.f_proj = nn.Linear(d_model, d_model, bias=False)  # forget gate f_t
        self.i_proj = nn.Linear(d_model, d_model, bias=False)  # input i_t (the value)
        self.norm_weight = nn.Parameter(torch.ones(d_model))
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        e = self.expand_ratio
        return State(S=torch.zeros(batch_size, self.n_heads, e, e, device=device, dtype=dtype))

    def log_forget(self, x: torch.Tensor) -> torch.Tensor:
        """log f_t = log(gamma + (1 - gamma) sigmoid(x W_f)) [batch, time, d_model], in >= float32."""
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        log_f = F.logsigmoid(self.f_proj(x).to(work))
        gamma = self.lower_bound
        if gamma > 0:
            log_f = torch.logaddexp(torch.full_like(log_f, math.log(gamma)), math.log1p(-gamma) + log_f)
        return log_f

    def _forward(self, x, state, resets=None):
        H = self.n_heads
        log_f = self.log_forget(x)
        k = -torch.expm1(log_f)  # 1 - f_t, the tied input gate
        q, k, v = split_heads(F.silu(self.q_proj(x)), H), split_heads(k.to(x.dtype), H), split_heads(self.i_proj(x), H)
        log_alpha = packing.hard_reset(split_heads(log_f, H), resets, time_dim=2)
        o, S = gated_matrix(q, k, v, log_alpha, state["S"], mode=self.op_mode, chunk_size=self.chunk_size)
        o = merge_heads(o)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight
        return self.o_proj(o), State(S=S)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, heads={self.n_heads}x{self.expand_ratio}, "
                f"lower_bound={self.lower_bound:.3g}, chunk_size={self.chunk_size}")
