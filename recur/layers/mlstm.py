"""xLSTM's matrix LSTM (Beck et al. 2024): a matrix memory written with an exponential input
gate and read with a normaliser, stabilised by a running maximum, inside the paper's mLSTM
block (up-projection, causal conv, learnable skip, output gate, down-projection).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import ShortConv, merge_heads, split_heads
from recur.ops.gated import gated_matrix_stabilized
from recur.registry import register
from recur.state import State


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: the channels are cut into blocks of ``block`` and each block
    has its own [block x block] matrix (xLSTM's LinearHeadwiseExpand with expansion 1, no bias)."""

    def __init__(self, channels: int, block: int, std: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels // block, block, block) * std)  # [blocks, out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "... (n d) -> ... n d", d=self.weight.shape[-1])
        return rearrange(torch.einsum("...nd,nod->...no", x, self.weight), "... n o -> ... (n o)")


@register("mlstm", family="matrix-state", paper="Beck et al., xLSTM: Extended Long Short-Term Memory (2024)")
class MLSTM(Mixer):
    """The mLSTM block of xLSTM (the paper's Fig. 10, its up/down projections included).

    Block: [x_m, z] = x W_up (inner width proj_factor * d_model); c = silu(conv4(x_m)) (causal,
    depthwise); q = c W_q, k = c W_k, v = x_m W_v (block-diagonal maps, blocks of 4);
    i~_t, f~_t = [q, k, v] W_{i,f} + b_{i,f} (one scalar per head); per head, the mLSTM cell
        C_t = f_t C_{t-1} + i_t v_t k_t^T,   n_t = f_t n_{t-1} + i_t k_t      (k scaled by d_k^-1/2)
        h~_t = C_t q_t / max(|n_t^T q_t|, 1),   i_t = exp(i~_t),  f_t = sigmoid(f~_t)
    then y = (GroupNorm_heads(h~) + s * c) * silu(z) W_down, with a learnable skip s.

    Stabiliser: m_t = max(log f_t + m_{t-1}, i~_t); the state is carried as (C~, n~) =
    exp(-m_t) (C, n), so no exponential overflows, and the read is
        h~_t = C~_t q_t / (max(|n~_t^T q_t|, exp(-m_t)) + eps),
    which equals the unscaled form (eps = 1e-6 aside, as in the official code). The running
    maximum lives in the primitive ``gated_matrix_stabilized`` (its chunked form is what lets
    the chunked and step-by-step modes agree, final m included); the normaliser n is the same
    recurrence with v = 1, a ones column appended to v. State: the conv tail, C, n and m
    (zeros, as the official step function's initial state).

    Initialisation (official xlstm code): W_up, W_q, W_k, W_v ~ N(0, 2 / (5 d_model))
    ("small init"); W_down ~ N(0, (2 / (n_layers sqrt(d_model)))^2) ("Wang init", n_layers from
    the Backbone, 1 standalone); gate weights zero, forget bias linspace(3, 6) over heads,
    input bias N(0, 0.1^2); skip ones; GroupNorm scale ones without bias (the official
    parameterises it as 1 + w with w = 0); the conv keeps PyTorch's default init. Interpretations:
    the official code rounds the inner width up to a multiple of 64; here it is exactly
    proj_factor * d_model, so the default works at small widths. The forget gate is the
    official sigmoid (the paper allows exp). xLSTM's pre-norm and residual are recur's Block.
    """

    modes = ("chunk", "parallel", "recurrent")
    state_formula = "(conv_size - 1) * inner_dim + n_heads * head_dim * (head_dim + 1) + n_heads"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_heads: int = 4,
        proj_factor: float = 2.0,
        conv_size: int = 4,
        qkv_block: int = 4,
        chunk_size: int = 64,
        eps: float = 1e-6,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
        n_layers: int | None = None,
    ):
        super().__init__(d_model, mode)
        inner = d_model * proj_factor
        if not float(inner).is_integer():
            raise ValueError(f"mlstm: d_model * proj_factor must be an integer, got {inner}")
        inner = int(inner)
        if n_heads < 1 or inner % n_heads or inner % qkv_block:
            raise ValueError(
                f"mlstm: n_heads={n_heads} and qkv_block={qkv_block} must divide the inner width "
                f"d_model * proj_factor = {inner}"
            )
        self.inner_dim, self.n_heads, self.head_dim = inner, n_heads, inner // n_heads
        self.conv_size, self.chunk_size, self.eps, self.norm_eps = conv_size, chunk_size, eps, norm_eps
        small = math.sqrt(2 / (5 * d_model))
        self.up_proj = nn.Linear(d_model, 2 * inner, bias=False)
        nn.init.normal_(self.up_proj.weight, std=small)
        self.conv = ShortConv(inner, conv_size, bias=True, activation="silu")
        self.q_proj = HeadwiseLinear(inner, qkv_block, small)
        self.k_proj = HeadwiseLinear(inner, qkv_block, small)
        self.v_proj = HeadwiseLinear(inner, qkv_block, small)
        self.igate = nn.Linear(3 * inner, n_heads)
        self.fgate = nn.Linear(3 * inner, n_heads)
        with torch.no_grad():
            nn.init.zeros_(self.igate.weight)
            nn.init.normal_(self.igate.bias, std=0.1)
            nn.init.zeros_(self.fgate.weight)
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, n_heads))
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.skip = nn.Parameter(torch.ones(inner))
        self.down_proj = nn.Linear(inner, d_model, bias=False)
        n_blocks = 1 if n_layers is None else n_layers  # the official num_blocks of the Wang init
        nn.init.normal_(self.down_proj.weight, std=2 / n_blocks / math.sqrt(d_model))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        H, d = self.n_heads, self.head_dim
        return State(
            conv=self.conv.init_tail(batch_size, device, dtype),
            C=torch.zeros(batch_size, H, d, d, device=device, dtype=dtype),
            n=torch.zeros(batch_size, H, d, device=device, dtype=dtype),
            m=torch.zeros(batch_size, H, device=device, dtype=dtype),
        )

    def gates(self, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """(log f, log i) [batch, heads, time] from the block's q, k, v [batch, time, inner]."""
        qkv = torch.cat([q, k, v], dim=-1)
        work = torch.float32 if qkv.dtype in (torch.float16, torch.bfloat16) else qkv.dtype
        log_f = F.logsigmoid(self.fgate(qkv).to(work))
        log_i = self.igate(qkv).to(work)
        return rearrange(log_f, "b t h -> b h t"), rearrange(log_i, "b t h -> b h t")

    def cell(self, q, k, v, log_f, log_i, C, n, m):
        """The stabilised mLSTM cell on heads: q, k, v [batch, heads, time, d]; returns
        (h~ [batch, heads, time, d], C, n, m) with the final scaled state."""
        k = k * self.head_dim**-0.5
        v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the ones column accumulates n
        S0 = torch.cat([C, n.unsqueeze(-1)], dim=-1)
        o, S, m = gated_matrix_stabilized(q, k, v1, log_f, log_i, S0, m, mode=self.op_mode, chunk_size=self.chunk_size)
        denominator = torch.maximum(o[..., -1:].abs(), torch.exp(-m).unsqueeze(-1)) + self.eps
        return o[..., :-1] / denominator, S[..., :-1], S[..., -1], m[..., -1]

    def _forward(self, x, state):
        H = self.n_heads
        x_m, z = self.up_proj(x).chunk(2, dim=-1)
        c, tail = self.conv(x_m, state["conv"])
        q, k, v = self.q_proj(c), self.k_proj(c), self.v_proj(x_m)
        log_f, log_i = self.gates(q, k, v)
        h, C, n, m = self.cell(split_heads(q, H), split_heads(k, H), split_heads(v, H), log_f, log_i,
                               state["C"], state["n"], state["m"])
        h = merge_heads(h)
        h = F.group_norm(h.flatten(0, 1), self.n_heads, self.norm_weight.to(h.dtype), None, self.norm_eps).view_as(h)
        y = self.down_proj((h + self.skip * c) * F.silu(z))
        return y, State(conv=tail, C=C, n=n, m=m)
