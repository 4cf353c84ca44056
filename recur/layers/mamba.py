"""Mamba, the selective state-space block (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", 2023), on ``recur.ops.selective.selective_scan``.

    x, z      = in_proj(u)                                  each [batch, time, d_inner]
    x         = SiLU(ShortConv(x))                          causal depthwise conv, kernel 4
    dt~, B, C = x_proj(x)                                   [dt_rank], [N], [N] per step
    dt        = softplus(dt_proj(dt~))                      [d_inner] per step
    h_t       = exp(dt_t A) * h_{t-1} + dt_t B_t x_t        h: [d_inner, N], A = -exp(A_log)
    y_t       = C_t . h_t + D * x_t
    out       = out_proj(y * SiLU(z))

(zero-order hold for A, the simplified Euler step dt * B for the input, as in the paper's
reference code). Sizes: d_inner = expand * d_model (expand 2), N = d_state = 16,
dt_rank = ceil(d_model / 16).

Initialisation (the paper's Section 3.6 and its code): A_log = log(1..N) for every channel
(S4D-real, A = -(1..N)); D = 1; dt_proj's bias = softplus^-1(dt) with dt log-uniform in
[dt_min, dt_max] = [1e-3, 1e-1] (floored at 1e-4), so softplus(bias) starts in that range;
dt_proj's weight uniform in +-dt_rank^-0.5 (dt_scale = 1); other linears and the conv at
PyTorch's defaults.

Modes: ``recurrent`` runs the selective scan's reference loop, one step at a time;
``chunk`` its fast form: on CPU a compiled single pass that never holds the states of more
than one step ([batch, d_inner, N]) plus checkpoints every 64 steps for backward; elsewhere
blocks of chunk_size^2 steps of the two-level diagonal scan (see recur/ops/selective.py).
The scan runs in at least float32 (bfloat16 inputs are computed in float32 and cast back).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import ShortConv, positive_ints
from recur.ops.selective import selective_scan
from recur.registry import register
from recur.state import State


@register("mamba", family="selective-ssm",
          paper="Gu & Dao, Mamba: Linear-Time Sequence Modeling with Selective State Spaces (2023)")
class Mamba(Mixer):
    """Mamba block: a selective (input-dependent) diagonal SSM between a short conv and a SiLU gate.

    h_t = exp(dt_t A) * h_{t-1} + dt_t B_t x_t (per channel, h: [d_inner, N]); y_t = C_t . h_t + D x_t;
    out = out_proj(y * silu(z)), with dt, B, C projected from the short-conv'd input x.
    Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces" (2023).
    """

    modes = ("chunk", "recurrent")
    state_formula = "d_inner * d_state + 3 * d_inner"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, mode)
        positive_ints(self.name, optional=True, d_state=d_state, expand=expand, dt_rank=dt_rank)
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_state, self.expand, self.chunk_size = d_state, expand, chunk_size
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv = ShortConv(d_inner, d_conv, bias=conv_bias, activation="silu")
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

        std = self.dt_rank**-0.5 * dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.empty(d_inner).uniform_(math.log(dt_min), math.log(dt_max))).clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus(bias) = dt
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            conv=self.conv.init_tail(batch_size, device=device, dtype=dtype),
            h=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype),
        )

    def scan_inputs(self, x: torch.Tensor, state: State | None = None):
        """(u, dt, A, B, C) that the layer feeds the selective scan for input x [batch, time, d_model]
        (from a zero state unless ``state`` is given): what ``recur speed`` times the scan on."""
        state = self.init_state(x.shape[0], device=x.device, dtype=x.dtype) if state is None else state
        return self._scan_inputs(self._branches(x, state)[0], x.dtype)

    def _branches(self, x, state):
        """(conv branch after its short conv and SiLU, gate branch z, conv tail)."""
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        xs, conv_tail = self.conv(xs, state["conv"])
        return xs, z, conv_tail

    def _scan_inputs(self, xs, dtype):
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        dt_low, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt_low).to(work))  # [batch, time, d_inner]
        A = -self.A_log.to(work).exp()  # [d_inner, N]
        return xs.to(work), dt, A, Bm.to(work), Cm.to(work)

    def _forward(self, x, state):
        xs, z, conv_tail = self._branches(x, state)
        u, dt, A, Bm, Cm = self._scan_inputs(xs, x.dtype)
        work = u.dtype
        y, h = selective_scan(u, dt, A, Bm, Cm, state["h"].to(work), mode=self.op_mode, chunk_size=self.chunk_size)
        y = y + self.D.to(work) * u
        y = y * F.silu(z.to(work))
        return self.out_proj(y.to(x.dtype)), State(conv=conv_tail, h=h.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_inner={self.d_inner}, d_state={self.d_state}, "
                f"dt_rank={self.dt_rank}, chunk_size={self.chunk_size}")
