"""The Independently Recurrent Neural Network (Li, Li, Cook, Zhu, Gao, "Independently Recurrent
Neural Network (IndRNN): Building A Longer and Deeper RNN", CVPR 2018).

    h_t = relu(W x_t + u * h_{t-1} + b)        u: [d_model], elementwise ("independent" neurons)
    y_t = h_t

Each neuron sees only its own past: neurons mix across layers (here: through the Block's MLP
and the next layer's W), not inside one. The paper's layer has no output projection, so y = h
(d_model wide); its networks put batch norm around the layer, which recur's Block norm replaces.

Memory and the recurrent-weight constraint (the paper's Section 3.1). For a ReLU neuron that
stays active, the gradient from step T back to step t scales like u^(T - t); keeping it below
gamma over a horizon of T steps needs |u| <= gamma^(1/T) (the official code's
U_bound = MAG^(1/seq_len), MAG = gamma = 2 in its adding-problem script). The official code
enforces this by clamping u after every optimiser step; a mixer cannot reach the optimiser, so
here the bound is a parameterisation:

    u = u_max * tanh(v),    u_max = gamma^(1/horizon)

which keeps |u| < u_max for any value of the trainable v, with smooth, never-zero gradients
(a clamp in the forward would zero the gradient of every weight past the bound and strand it
there). ``recurrent_weight`` returns u.

The horizon. A mixer in recur streams its state through sequences of any length, so by default
(``horizon=None``) the bound is the limit gamma^(1/T) -> 1 as T -> infinity: |u| < 1, the
setting the authors recommend for very long sequences, and the recurrence stays bounded for
any number of steps. Pass ``horizon=T`` for the paper's bound gamma^(1/T) (> 1: the state may
grow over T steps by at most a factor gamma but diverges on sequences much longer than T).

Initialisation (the authors' code): u uniform in [0, u_max] (the PyTorch code's
Uniform(0, U_bound), "so that different neurons keep different kinds of memory"); with
``long_memory=True``, uniform in [gamma^(-1/T), gamma^(1/T)], the code's init of the last layer
for tasks that need memory over the whole horizon T (needs ``horizon``). The input weight W
takes the official PyTorch code's kaiming_uniform(a=8, fan_in) and b = 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import positive_int
from recur.registry import register
from recur.state import State


@register("indrnn", family="classic",
          paper="Li, Li, Cook, Zhu, Gao, Independently Recurrent Neural Network (IndRNN): Building A Longer and Deeper RNN (2018)")
class IndRNN(Mixer):
    """Independently recurrent network: a ReLU RNN whose recurrent weight is a vector.

    h_t = relu(W x_t + u * h_{t-1} + b) (elementwise u, |u| < gamma^(1/horizon), 1 by default); y_t = h_t.
    Li et al., "Independently Recurrent Neural Network (IndRNN): Building A Longer and Deeper RNN" (2018).
    """

    modes = ("recurrent",)
    state_formula = "d_model"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        horizon: int | None = None,
        gamma: float = 2.0,
        long_memory: bool = False,
    ):
        super().__init__(d_model, mode)
        positive_int("horizon", horizon, owner="indrnn", optional=True)
        if not gamma >= 1.0:
            raise ValueError(f"indrnn: gamma (the largest gradient growth over the horizon) must be >= 1, got {gamma}")
        if long_memory and horizon is None:
            raise ValueError("indrnn: long_memory=True initialises u in [gamma^(-1/horizon), gamma^(1/horizon)]; pass horizon")
        self.horizon, self.gamma, self.long_memory = horizon, float(gamma), long_memory
        self.u_max = gamma ** (1.0 / horizon) if horizon is not None else 1.0

        self.weight = nn.Parameter(torch.empty(d_model, d_model))  # W: [out, in]
        nn.init.kaiming_uniform_(self.weight, a=8, mode="fan_in")
        self.bias = nn.Parameter(torch.zeros(d_model))
        low = gamma ** (-1.0 / horizon) if long_memory else 0.0
        u0 = torch.empty(d_model, dtype=torch.float64).uniform_(low, self.u_max)
        # u = u_max tanh(v); u0 < u_max with probability 1, the clamp only guards the atanh.
        self.v = nn.Parameter(torch.atanh((u0 / self.u_max).clamp(max=1 - 1e-12)).float())

    @property
    def recurrent_weight(self) -> torch.Tensor:
        """u = u_max * tanh(v): [d_model], |u| < u_max (<= once tanh rounds to 1 in float32)."""
        return self.u_max * torch.tanh(self.v)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(h=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        pre = x.to(work) @ self.weight.to(work).T + self.bias.to(work)  # [batch, time, d_model]
        u = self.u_max * torch.tanh(self.v.to(work))
        h, hs = state["h"].to(work), []
        for pre_t in pre.unbind(1):
            h = torch.relu(torch.addcmul(pre_t, u, h))
            hs.append(h)
        return torch.stack(hs, dim=1).to(dtype), State(h=h.to(dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, horizon={self.horizon}, gamma={self.gamma}, u_max={self.u_max:.6g}"
