"""The Hierarchically Gated Recurrent Network layer, HGRU (Qin, Yang, Zhong, "Hierarchically Gated
Recurrent Neural Network for Sequence Modeling", NeurIPS 2023), on ``recur.ops.scan.diagonal_scan``.

    Re(c_t)  = SiLU(x_t W_cr + b_cr),  Im(c_t) = SiLU(x_t W_ci + b_ci)       complex input, [d]
    mu_t     = sigmoid(x_t W_mu + b_mu)                                     forget gate before the bound
    lambda_t = gamma + (1 - gamma) * mu_t                                   in [gamma, 1)
    h_t      = lambda_t exp(i theta) * h_{t-1} + (1 - lambda_t) * c_t       complex, per channel
    g_t      = SiLU(x_t W_g + b_g)                                          output gate, [2 d]
    y_t      = LayerNorm(g_t * [Re h_t, Im h_t]) W_o + b_o

theta is a learned, data-independent phase per channel, initialised as the official code
(Hgru1d in Doraemonzzz/hgru-pytorch) does: theta_k = 10000^(-2k/d). The input gate is tied to
the forget gate (1 - lambda_t), as in the paper. The paper writes the output gate with an
unnamed activation tau and normalises the gated features; the official Hgru1d uses SiLU for
that gate (and normalises before gating): recur takes the paper's order and the official
activation. Linears and the LayerNorm at PyTorch's defaults, as the official code.

The lower bound. The paper learns the bounds of all layers together, per channel, as
gamma^k = [cumsum(softmax(P, dim=layers))]_k minus the first term, so gamma^1 = 0 and the bounds
grow with depth; the official code initialises P to a constant, i.e. gamma_l = l / L for layer
l of L. The softmax couples the layers, and a mixer owns only its own parameters, so recur fixes
each layer's bound at that initial schedule, gamma_l = layer_idx / n_layers (Backbone passes
both): monotone in depth by construction, but not learned. Standalone (no layer index)
gamma = 0; ``lower_bound`` overrides it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State


@register("hgrn", family="diagonal-ssm",
          paper="Qin, Yang, Zhong, Hierarchically Gated Recurrent Neural Network for Sequence Modeling (2023)")
class HGRN(Mixer):
    """HGRN: a complex diagonal recurrence whose forget gate has a depth-dependent lower bound.

    lambda_t = gamma + (1 - gamma) sigmoid(x W_mu); h_t = lambda_t e^{i theta} h_{t-1} + (1 - lambda_t) c_t,
    c_t = SiLU(x W_cr) + i SiLU(x W_ci); y = LayerNorm(SiLU(x W_g) * [Re h, Im h]) W_o.
    Qin, Yang, Zhong, "Hierarchically Gated Recurrent Neural Network for Sequence Modeling" (2023).
    """

    modes = ("chunk", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
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
        self.f_proj = nn.Linear(d, d)  # W_mu
        self.c_proj = nn.Linear(d, 2 * d)  # W_cr, W_ci
        self.g_proj = nn.Linear(d, 2 * d)  # W_g
        self.theta = nn.Parameter(10000 ** (-2 * torch.arange(d, dtype=torch.float32) / d))
        self.norm = nn.LayerNorm(2 * d)
        self.o_proj = nn.Linear(2 * d, d)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return State(h=torch.zeros(batch_size, self.d_model, device=device, dtype=complex_dtype))

    def forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """lambda_t = gamma + (1 - gamma) sigmoid(x W_mu): in [gamma, 1)."""
        f = F.linear(x, self.f_proj.weight.to(x.dtype), self.f_proj.bias.to(x.dtype))
        return self.lower_bound + (1 - self.lower_bound) * torch.sigmoid(f)

    def log_forget_gate(self, x: torch.Tensor) -> torch.Tensor:
        """log lambda_t; with gamma = 0 it is logsigmoid (finite, with finite gradients, where sigmoid underflows)."""
        if self.lower_bound > 0:
            return torch.log(self.forget_gate(x))
        return F.logsigmoid(F.linear(x, self.f_proj.weight.to(x.dtype), self.f_proj.bias.to(x.dtype)))

    def _forward(self, x, state, resets=None):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        u = x.to(work)
        log_lam = self.log_forget_gate(u)
        lam = log_lam.exp()
        c_re, c_im = F.silu(F.linear(u, self.c_proj.weight.to(work), self.c_proj.bias.to(work))).chunk(2, dim=-1)
        log_a = torch.complex(packing.hard_reset(log_lam, resets, time_dim=1), self.theta.to(work).expand_as(lam))
        b = torch.complex((1 - lam) * c_re, (1 - lam) * c_im)
        h, h_last = diagonal_scan(log_a, b, state["h"], mode=self.op_mode, chunk_size=self.chunk_size)
        g = F.silu(self.g_proj(x))
        o = self.norm(g * torch.cat([h.real, h.imag], dim=-1).to(dtype))
        return self.o_proj(o), State(h=h_last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lower_bound={self.lower_bound:.3g}, chunk_size={self.chunk_size}"
