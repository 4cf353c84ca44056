"""The Hierarchically Gated Recurrent Network layer (Qin, Yang, Zhong, "Hierarchically Gated
Recurrent Neural Network for Sequence Modeling", NeurIPS 2023), on ``recur.ops.scan.diagonal_scan``.

    f_t      = sigmoid(x_t W_f + b_f)                       forget gate, real, per channel
    lambda_t = gamma + (1 - gamma) * f_t                    lower bound gamma grows with depth
    c_t      = SiLU(x_t W_cr) + i SiLU(x_t W_ci)            complex input
    h_t      = lambda_t exp(i theta) * h_{t-1} + (1 - lambda_t) * c_t      (complex, per channel)
    g_t      = sigmoid(x_t W_g + b_g)                       output gate, [2 d]
    y_t      = LayerNorm(g_t * [Re h_t, Im h_t]) W_o

theta is a learned, data-independent phase per channel; the input gate is tied to the forget
gate (1 - lambda_t), as in the paper.

The lower bound. The paper learns one bound per layer, monotone in depth, as
Gamma = cumsum(softmax(P)) over the layers with the first layer's bound 0; at initialisation
(P = 0) that is gamma_l = l / L for layer l of L. A mixer owns only its own parameters, so the
cross-layer softmax cannot be learned here; recur fixes the bounds at the paper's initial
schedule gamma_l = layer_idx / n_layers (Backbone passes both), monotone by construction.
Standalone (no layer index) gamma = 0; ``lower_bound`` overrides it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State


@register("hgrn", family="diagonal-ssm",
          paper="Qin, Yang, Zhong, Hierarchically Gated Recurrent Neural Network for Sequence Modeling (2023)")
class HGRN(Mixer):
    """HGRN: a complex diagonal recurrence whose forget gate has a depth-dependent lower bound.

    lambda_t = gamma + (1 - gamma) sigmoid(x W_f); h_t = lambda_t e^{i theta} h_{t-1} + (1 - lambda_t) c_t,
    c_t = SiLU(x W_cr) + i SiLU(x W_ci); y = LayerNorm(sigmoid(x W_g) * [Re h, Im h]) W_o.
    Qin, Yang, Zhong, "Hierarchically Gated Recurrent Neural Network for Sequence Modeling" (2023).
    """

    modes = ("chunk", "recurrent")
    state_formula = "2 * d_model"

    def __init__(self, d_model: int, mode: str | None = None, *, layer_idx: int | None = None,
                 n_layers: int | None = None, lower_bound: float | None = None, chunk_size: int = 64):
        super().__init__(d_model, mode)
        if lower_bound is None:
            if layer_idx is None or n_layers is None:
                lower_bound = 0.0
            else:
                if not 0 <= layer_idx < n_layers:
                    raise ValueError(f"need 0 <= layer_idx < n_layers, got layer_idx={layer_idx}, n_layers={n_layers}")
                lower_bound = layer_idx / n_layers
        if not 0.0 <= lower_bound < 1.0:
            raise ValueError(f"lower_bound must be in [0, 1), got {lower_bound}")
        self.lower_bound, self.chunk_size = float(lower_bound), chunk_size
        d = d_model
        self.f_proj = nn.Linear(d, d)
        self.c_proj = nn.Linear(d, 2 * d)  # real and imaginary parts of the input
        self.g_proj = nn.Linear(d, 2 * d)
        self.theta = nn.Parameter(10000 ** (-torch.arange(d, dtype=torch.float32) / d))  # rotary-like phases
        self.norm = nn.LayerNorm(2 * d)
        self.o_proj = nn.Linear(2 * d, d)
        nn.init.normal_(self.o_proj.weight, std=1 / math.sqrt(2 * d))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return State(h=torch.zeros(batch_size, self.d_model, device=device, dtype=complex_dtype))

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """lambda_t = gamma + (1 - gamma) sigmoid(x W_f): in [gamma, 1)."""
        f = F.linear(x, self.f_proj.weight.to(x.dtype), self.f_proj.bias.to(x.dtype))
        return self.lower_bound + (1 - self.lower_bound) * torch.sigmoid(f)

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        u = x.to(work)
        lam = self.forget_gate(u)
        c_re, c_im = F.silu(F.linear(u, self.c_proj.weight.to(work), self.c_proj.bias.to(work))).chunk(2, dim=-1)
        log_a = torch.complex(torch.log(lam), self.theta.to(work).expand_as(lam))
        b = torch.complex((1 - lam) * c_re, (1 - lam) * c_im)
        h, h_last = diagonal_scan(log_a, b, state["h"], mode=self.op_mode, chunk_size=self.chunk_size)
        g = torch.sigmoid(self.g_proj(x))
        o = self.norm(g * torch.cat([h.real, h.imag], dim=-1).to(dtype))
        return self.o_proj(o), State(h=h_last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lower_bound={self.lower_bound:.3g}, chunk_size={self.chunk_size}"
