"""Griffin's recurrent block with the Real-Gated Linear Recurrent Unit (De et al., "Griffin: Mixing
Gated Linear Recurrences with Local Attention for Efficient Language Models", 2024), on
``recur.ops.scan.diagonal_scan``.

    branch_1 = GeLU(x W_1)                                   [batch, time, width]
    u        = Conv1D_4(x W_2)                               causal temporal conv, kernel 4, no activation
    r_t      = sigmoid(u_t W_r + b_r)                        recurrence gate   (block-diagonal over heads)
    i_t      = sigmoid(u_t W_i + b_i)                        input gate        (block-diagonal over heads)
    log a_t  = -c * r_t * softplus(Lambda)                   a_t = a^(c r_t), a = exp(-softplus(Lambda)), c = 8
    h_t      = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)
    y        = (branch_1 * h) W_o

Initialisation as the official recurrentgemma code: a^2 uniform on [0.9^2, 0.999^2] (the ring
of radii [0.9, 0.999]), gate weights N(0, 1/head_width) with zero biases, the other linears
and the conv at PyTorch's defaults. sqrt(1 - a_t^2) is computed as sqrt(-expm1(2 log a_t)),
accurate when a_t is close to 1. Hawk stacks these blocks (pattern ``hawk``); Griffin
alternates two of them with local attention (pattern ``griffin``). Document-boundary resets
of the official code are not needed here (one sequence per row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import ShortConv, head_split
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State

C = 8.0  # the paper's fixed scalar c


class _BlockDiagonalLinear(nn.Module):
    """x -> per head x_h W_h + b_h: [batch, time, heads * w] -> same, W: [heads, w, w]."""

    def __init__(self, n_heads: int, head_width: int):
        super().__init__()
        self.n_heads = n_heads
        self.weight = nn.Parameter(torch.randn(n_heads, head_width, head_width) / math.sqrt(head_width))
        self.bias = nn.Parameter(torch.zeros(n_heads, head_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = rearrange(x, "b t (h w) -> b t h w", h=self.n_heads)
        y = torch.einsum("bthi,hij->bthj", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        return rearrange(y, "b t h w -> b t (h w)")


@register("rglru", family="diagonal-ssm",
          paper="De et al., Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language Models (2024)")
class RGLRU(Mixer):
    """Griffin's recurrent block: GeLU branch times (Conv1D -> RG-LRU) branch, then a projection.

    r_t, i_t = sigmoid(block-diagonal linears of u_t); log a_t = -8 r_t softplus(Lambda);
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t); y = (GeLU(x W_1) * h) W_o.
    De et al., "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
    Language Models" (2024).
    """

    modes = ("chunk", "recurrent")
    state_formula = "lru_width + (conv_size - 1) * lru_width"

    def __init__(self, d_model: int, mode: str | None = None, *, lru_width: int | None = None,
                 n_heads: int | None = None, conv_size: int = 4, min_radius: float = 0.9,
                 max_radius: float = 0.999, chunk_size: int = 64):
        super().__init__(d_model, mode)
        width = d_model if lru_width is None else lru_width
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"lru_width must be a positive int, got {lru_width!r}")
        if not 0 < min_radius < max_radius < 1:
            raise ValueError(f"need 0 < min_radius < max_radius < 1, got {min_radius}, {max_radius}")
        self.lru_width, self.conv_size, self.chunk_size = width, conv_size, chunk_size
        self.n_heads, head_width = head_split(width, n_heads)
        self.branch_proj = nn.Linear(d_model, width)  # W_1 (GeLU branch)
        self.in_proj = nn.Linear(d_model, width)  # W_2 (recurrent branch)
        self.conv = ShortConv(width, conv_size, bias=True, activation=None)
        self.gate_r = _BlockDiagonalLinear(self.n_heads, head_width)
        self.gate_i = _BlockDiagonalLinear(self.n_heads, head_width)
        radius_sq = torch.empty(width).uniform_(min_radius**2, max_radius**2)
        # softplus(Lambda) = -log a with a = sqrt(radius^2): Lambda = softplus^-1(-0.5 log radius^2)
        self.Lambda = nn.Parameter(torch.log(torch.expm1(-0.5 * radius_sq.log())))
        self.out_proj = nn.Linear(width, d_model)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(conv=self.conv.init_tail(batch_size, device=device, dtype=dtype),
                     h=torch.zeros(batch_size, self.lru_width, device=device, dtype=dtype))

    def base_decay(self) -> torch.Tensor:
        """a = exp(-softplus(Lambda)) per channel: the decay at full recurrence gate (a_t = a^(8 r_t))."""
        return torch.exp(-F.softplus(self.Lambda))

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        branch = F.gelu(self.branch_proj(x))
        u, tail = self.conv(self.in_proj(x), state["conv"])
        u = u.to(work)
        r, i = torch.sigmoid(self.gate_r(u)), torch.sigmoid(self.gate_i(u))
        log_a = -C * r * F.softplus(self.Lambda.to(work))
        b = torch.sqrt(-torch.expm1(2 * log_a)) * (i * u)
        h, h_last = diagonal_scan(log_a, b, state["h"].to(work), mode=self.op_mode, chunk_size=self.chunk_size)
        y = self.out_proj(branch * h.to(dtype))
        return y, State(conv=tail, h=h_last.to(dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lru_width={self.lru_width}, n_heads={self.n_heads}, chunk_size={self.chunk_size}"
