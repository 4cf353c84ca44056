"""Griffin's recurrent block with the Real-Gated Linear Recurrent Unit (De et al., "Griffin: Mixing
Gated Linear Recurrences with Local Attention for Efficient Language Models", 2024), on
``recur.ops.scan.diagonal_scan``.

    branch_1 = GeLU(x W_a)                                   [batch, time, lru_width]
    u        = Conv1D_4(x W_b)                               causal temporal conv, kernel 4, no activation
    r_t      = sigmoid(u_t W_r + b_r)                        recurrence gate   (block-diagonal over heads)
    i_t      = sigmoid(u_t W_i + b_i)                        input gate        (block-diagonal over heads)
    a_t      = a^(c r_t),  a = sigmoid(Lambda),  c = 8
    log a_t  = -c * r_t * softplus(-Lambda)                  (log sigmoid(Lambda) = -softplus(-Lambda))
    h_t      = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * u_t)
    y        = (branch_1 * h) W_o

The recurrence width ``lru_width`` defaults to d_model (the paper's RG-LRU width; Griffin's
expansion factor 4/3 is the MLP's, which is recur's Block's business). The gates W_r, W_i are
block-diagonal with one block per head, as in the official code (recurrentgemma's
BlockDiagonalLinear); heads from ``head_split`` (16 -> 2 x 8; the released 2B model uses
10 heads of 256).

sqrt(1 - a_t^2) is computed as sqrt(-expm1(2 log a_t)), accurate when a_t is close to 1, and,
as in the official code, its derivative 1 / (2 sqrt(x)) is clipped at 1000 (i.e. evaluated at
x >= 1/(4 * 1000^2)): the forward is exact, only the gradient near a_t = 1 is bounded.

Initialisation. Lambda (``a_init="paper"``, the default): a^c uniform on [0.9, 0.999] (the
paper, Section 2.4), so the decay at a fully open recurrence gate (r_t = 1) starts in that
range. The official recurrentgemma code does something else: it draws a^2 uniform on
[0.9^2, 0.999^2] (``a_init="recurrentgemma"``), i.e. the *base* a on the ring [0.9, 0.999], so
a^c starts in [0.43, 0.992]. Everything else as the official code: gate weights LeCun normal
N(0, 1/head_width) with zero biases (the paper: "LeCun init"); W_a, W_b N(0, 1/d_model) and
W_o N(0, 1/lru_width), zero biases; conv weights N(0, 0.01/4), zero bias. (The official model
scales W_o's variance by 2/n_layers; a mixer here does not know the depth of its stack.)
Hawk stacks these blocks (pattern ``hawk``); Griffin alternates two of them with local
attention (pattern ``griffin``). The official code's reset of h at document boundaries is not
needed here (one sequence per row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import ShortConv, head_split, positive_int
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State

C = 8.0  # the paper's fixed scalar c
MAX_SQRT_GRADIENT = 1000.0  # the official code's bound on d sqrt(x) / dx


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


class _SqrtBoundedGradient(torch.autograd.Function):
    """sqrt(x), with the derivative 1 / (2 sqrt(x)) capped at MAX_SQRT_GRADIENT."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clamp(4 * x, min=1 / MAX_SQRT_GRADIENT**2))


@register("rglru", family="diagonal-ssm",
          paper="De et al., Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language Models (2024)")
class RGLRU(Mixer):
    """Griffin's recurrent block: GeLU branch times (Conv1D -> RG-LRU) branch, then a projection.

    r_t, i_t = sigmoid(block-diagonal linears of u_t); log a_t = -8 r_t softplus(-Lambda) (a = sigmoid(Lambda));
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t u_t); y = (GeLU(x W_a) * h) W_o.
    De et al., "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
    Language Models" (2024).
    """

    modes = ("chunk", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "lru_width + (conv_size - 1) * lru_width"

    def __init__(self, d_model: int, mode: str | None = None, *, lru_width: int | None = None,
                 n_heads: int | None = None, conv_size: int = 4, a_init: str = "paper",
                 a_min: float = 0.9, a_max: float = 0.999, chunk_size: int = 64):
        super().__init__(d_model, mode)
        width = positive_int("lru_width", d_model if lru_width is None else lru_width, owner=self.name)
        if not 0 < a_min < a_max < 1:
            raise ValueError(f"need 0 < a_min < a_max < 1, got a_min={a_min}, a_max={a_max}")
        if a_init not in ("paper", "recurrentgemma"):
            raise ValueError(f"a_init must be 'paper' or 'recurrentgemma', got {a_init!r}")
        self.lru_width, self.conv_size, self.chunk_size = width, conv_size, chunk_size
        self.a_init, self.a_min, self.a_max = a_init, a_min, a_max
        self.n_heads, head_width = head_split(width, n_heads)
        self.branch_proj = nn.Linear(d_model, width)  # W_a (GeLU branch)
        self.in_proj = nn.Linear(d_model, width)  # W_b (recurrent branch)
        self.conv = ShortConv(width, conv_size, bias=True, activation=None)
        self.gate_r = _BlockDiagonalLinear(self.n_heads, head_width)
        self.gate_i = _BlockDiagonalLinear(self.n_heads, head_width)
        self.out_proj = nn.Linear(width, d_model)  # W_o
        with torch.no_grad():
            for linear, fan_in in ((self.branch_proj, d_model), (self.in_proj, d_model), (self.out_proj, width)):
                linear.weight.normal_(0.0, 1 / math.sqrt(fan_in))
                linear.bias.zero_()
            self.conv.weight.normal_(0.0, math.sqrt(0.01 / conv_size))
            self.conv.bias.zero_()
        if a_init == "paper":  # a^c ~ U[a_min, a_max]: log a = log(a^c) / c
            log_a = torch.empty(width).uniform_(a_min, a_max).log() / C
        else:  # a^2 ~ U[a_min^2, a_max^2]
            log_a = 0.5 * torch.empty(width).uniform_(a_min**2, a_max**2).log()
        # a = sigmoid(Lambda)  <=>  Lambda = log(a / (1 - a)) = -log(expm1(-log a))
        self.Lambda = nn.Parameter(-torch.log(torch.expm1(-log_a)))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(conv=self.conv.init_tail(batch_size, device=device, dtype=dtype),
                     h=torch.zeros(batch_size, self.lru_width, device=device, dtype=dtype))

    def log_base_decay(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """log a = log sigmoid(Lambda) = -softplus(-Lambda) per channel: log a_t = c r_t log a."""
        return -F.softplus(-self.Lambda.to(dtype))

    def _forward(self, x, state, resets=None):
        dtype = x.dtype
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        branch = F.gelu(self.branch_proj(x))
        u, tail = self.conv(self.in_proj(x), state["conv"], resets)
        u = u.to(work)
        r, i = torch.sigmoid(self.gate_r(u)), torch.sigmoid(self.gate_i(u))
        log_a = C * r * self.log_base_decay(work)
        b = _SqrtBoundedGradient.apply(-torch.expm1(2 * log_a)) * (i * u)
        log_a = packing.hard_reset(log_a, resets, time_dim=1)  # after b: its sqrt(1 - a^2) is the gate's
        h, h_last = diagonal_scan(log_a, b, state["h"].to(work), mode=self.op_mode, chunk_size=self.chunk_size)
        y = self.out_proj(branch * h.to(dtype))
        return y, State(conv=tail, h=h_last.to(dtype))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, lru_width={self.lru_width}, n_heads={self.n_heads}, "
                f"a_init={self.a_init!r}, chunk_size={self.chunk_size}")
