"""Classic nonlinear recurrent cells: Elman (tanh) RNN, LSTM and GRU.

Nonlinear recurrences have no parallel form: each supports ``recurrent`` mode only.
The input projections for all time steps are one matmul; the loop only does the
recurrent matmul and the gate nonlinearities.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.registry import register
from recur.state import State


@register("elman", family="classic", paper="Elman, Finding Structure in Time (1990)")
class Elman(Mixer):
    """Elman (simple tanh) RNN.

    h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh);  y_t = h_t.
    Parameters are laid out as ``torch.nn.RNN`` (uniform(-1/sqrt(d), 1/sqrt(d)) init).
    """

    modes = ("recurrent",)

    def __init__(self, d_model: int, mode: str | None = None):
        super().__init__(d_model, mode)
        d = d_model
        self.weight_ih = nn.Parameter(torch.empty(d, d))
        self.weight_hh = nn.Parameter(torch.empty(d, d))
        self.bias_ih = nn.Parameter(torch.empty(d))
        self.bias_hh = nn.Parameter(torch.empty(d))
        bound = 1.0 / math.sqrt(d)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(h=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype))

    def _forward(self, x, state):
        u = x @ self.weight_ih.T + (self.bias_ih + self.bias_hh)  # [batch, time, d]
        h, ys = state["h"], []
        w_hh = self.weight_hh.T
        for t in range(x.shape[1]):
            h = torch.tanh(u[:, t] + h @ w_hh)
            ys.append(h)
        return torch.stack(ys, dim=1), State(h=h)
