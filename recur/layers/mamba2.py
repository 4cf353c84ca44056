"""Mamba-2 (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", 2024): the SSD layer, a selective state-space model whose state
decays by one data-dependent scalar per head, inside the Mamba-2 block, on
``recur.ops.gated.gated_matrix``.

    z, xBC, dt~ = in_proj(u)                      order [z, x, B, C, dt] as the official code
    x, B, C     = SiLU(ShortConv(xBC))            causal depthwise conv (kernel 4) on [x, B, C]
    dt_t        = softplus(dt~_t + dt_bias)       one step size per head
    per head h (of headdim P) in group g(h) = h // (heads / n_groups):
        S_t = exp(dt_t A_h) S_{t-1} + dt_t B_t^g x_t^T     S: [d_state, headdim], A_h = -exp(A_log_h) < 0
        y_t = S_t^T C_t^g + D_h x_t
    out = out_proj(RMSNorm_groups(y * SiLU(z)))    gated RMSNorm, normalised per group (norm_before_gate=False)

SSD as gated linear attention: q = C, k = B (shared by the heads of a group), v = dt * x and
log alpha_t = dt_t A_h, one scalar decay per head and step; the chunkwise SSD algorithm of the
paper is ``gated_matrix``'s chunk mode (decayed masked matmuls inside chunks, the state passed
between chunks), and its quadratic "attention" form is the parallel mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import ShortConv, merge_heads, positive_ints, split_heads
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State


@register(
    "mamba2",
    family="selective-ssm",
    paper="Dao & Gu, Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State Space Duality (2024)",
)
class Mamba2(Mixer):
    """Mamba-2 block: the SSD recurrence (scalar decay per head) between a short conv and a gated RMSNorm.

    Per head: S_t = exp(dt_t A) S_{t-1} + dt_t B_t x_t^T;  y_t = S_t^T C_t + D x_t  (B, C shared
    within each of n_groups groups of heads); out = out_proj(RMSNorm(y * silu(z))).
    Dao & Gu, "Transformers are SSMs" (Mamba-2, 2024).

    Sizes: d_inner = expand * d_model (expand 2); headdim 64 through ``head_split`` (at most 64
    channels and at least two heads: d_model=16 gives 2 heads of 16, d_model >= 64 heads of 64);
    d_state = 64 (Mamba2Simple's default; the larger Mamba2 module defaults to 128) at every width,
    n_groups = 1. Initialisation (official code): A_h ~ U[1, 16] stored as A_log = log A_h;
    dt_bias = softplus^-1(dt) with dt log-uniform in [dt_min, dt_max] = [1e-3, 1e-1] (floored at
    1e-4); D = 1; norm weight 1; in_proj, out_proj (no bias) and the conv (with bias) at PyTorch's
    defaults. dt_limit is the official default (0, inf), i.e. no clamp. The gated RMSNorm has eps
    1e-5 and normalises each group's d_inner / n_groups channels, as ``Mamba2`` (not the simple
    module) does. State: the conv tail [d_conv - 1, d_inner + 2 n_groups d_state] and S
    [heads, d_state, headdim].
    """

    modes = ("chunk", "parallel", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "(d_conv - 1) * (d_inner + 2 * n_groups * d_state) + n_heads * d_state * head_dim"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        d_state: int = 64,
        expand: int = 2,
        head_dim: int | None = None,
        n_heads: int | None = None,
        n_groups: int = 1,
        d_conv: int = 4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, mode)
        positive_ints("mamba2", d_state=d_state, expand=expand, n_groups=n_groups, d_conv=d_conv)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"mamba2: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"mamba2: A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        self.d_state, self.expand, self.d_conv, self.n_groups = d_state, expand, d_conv, n_groups
        self.d_inner = d_inner = expand * d_model
        self._init_heads(n_heads, head_dim, width=d_inner)
        if self.n_heads % n_groups:
            raise ValueError(f"mamba2: n_groups={n_groups} must divide the number of heads {self.n_heads}")
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.conv_dim = d_inner + 2 * n_groups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * n_groups * d_state + self.n_heads, bias=bias)
        self.conv = ShortConv(self.conv_dim, d_conv, bias=conv_bias, activation="silu")
        dt = torch.exp(torch.rand(self.n_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.A_log = nn.Parameter(torch.empty(self.n_heads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            conv=self.conv.init_tail(batch_size, device=device, dtype=dtype),
            S=torch.zeros(batch_size, self.n_heads, self.d_state, self.head_dim, device=device, dtype=dtype),
        )

    def ssd_inputs(self, x: torch.Tensor, conv_tail: torch.Tensor, resets: torch.Tensor | None = None):
        """The SSD operands from the block input x [batch, time, d_model].

        Returns (z [b, t, d_inner], xs [b, t, d_inner], B [b, t, G, N], C [b, t, G, N],
        dt [b, t, heads], new conv tail), with dt, B, C, xs in the working dtype (>= float32).
        """
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        G, N = self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xBC, tail = self.conv(xBC, conv_tail, resets)
        xs, Bm, Cm = xBC.to(work).split([self.d_inner, G * N, G * N], dim=-1)
        dt = F.softplus(dt.to(work) + self.dt_bias.to(work))
        return z, xs, split_heads(Bm, G, "b t h d"), split_heads(Cm, G, "b t h d"), dt, tail

    def _forward(self, x, state, resets=None):
        H, G = self.n_heads, self.n_groups
        z, xs, Bm, Cm, dt, tail = self.ssd_inputs(x, state["conv"], resets)
        work = xs.dtype
        A = -self.A_log.to(work).exp()  # [heads], < 0
        log_alpha = packing.hard_reset(rearrange(dt * A, "b t h -> b h t"), resets, time_dim=2)  # <= 0
        # Heads of group g are g * H/G ... (g+1) * H/G - 1 (the official head -> group map).
        to_heads = lambda t: rearrange(t, "b t g n -> b g t n").repeat_interleave(H // G, dim=1)  # noqa: E731
        q, k = to_heads(Cm), to_heads(Bm)  # [b, heads, t, d_state]
        xh = split_heads(xs, H)
        v = xh * rearrange(dt, "b t h -> b h t 1")
        # The conv leaves its output time-major in memory; contiguous operands keep the
        # reference loop's per-step matmuls on the fast path (strided ones are ~100x slower).
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, S = gated_matrix(q, k, v, log_alpha, state["S"].to(work), mode=self.op_mode, chunk_size=self.chunk_size)
        y = o + self.D.to(work)[:, None, None] * xh
        y = merge_heads(y) * F.silu(z.to(work))
        y = split_heads(y, G, "b t h d")  # gated RMSNorm per group
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        y = merge_heads(y, "b t h d") * self.norm_weight.to(work)
        return self.out_proj(y.to(x.dtype)), State(conv=tail, S=S.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_inner={self.d_inner}, heads={self.n_heads}x{self.head_dim}, "
                f"d_state={self.d_state}, n_groups={self.n_groups}, chunk_size={self.chunk_size}")
