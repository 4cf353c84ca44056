"""Minimal RNNs: minGRU and minLSTM (Feng, Tung, Ahmed, Bengio, Hajimirsadeghi, "Were RNNs
All We Needed?", 2024), on ``recur.ops.scan``.

Both drop the hidden-state dependence of the gates, so the recurrence is a positive
diagonal linear scan h_t = a_t * h_{t-1} + b_t with

    minGRU:   z_t = sigmoid(k_t),  a_t = 1 - z_t,  b_t = z_t * g(h~_t)
    minLSTM:  f_t, i_t = sigmoid(.), normalised f' = f / (f + i), i' = i / (f + i),
              a_t = f'_t,  b_t = i'_t * g(h~_t)

with g(x) = x + 0.5 for x >= 0 and sigmoid(x) otherwise (continuous, positive, so the
scan can run in log space). Gates are computed in log space:
log z = -softplus(-k), log(1 - z) = -softplus(k), and for minLSTM with
d = softplus(-k_f) - softplus(-k_i) = log(i / f): log f' = -softplus(d), log i' = -softplus(-d).

Modes: ``chunk`` (the diagonal scan's fast mode: the compiled kernel on CPU, the two-level
chunked scan elsewhere; the default, as it measured 5x faster than the log-space scan on CPU,
see benchmarks/RESULTS.md), ``parallel`` (Heinsen's log-space scan), ``recurrent`` (the
sequential reference). The state is h itself ([batch, d_hidden]):
the carried state never goes through g, so carrying it is exact. In log space h0 enters
linearly, h_t = prod(a) * h0 + scan(a, b)_t, so h0 = 0 (the initial state) and h0 of any
sign are exact, with exact gradients.

Width: d_hidden = expansion * d_model; an output projection Linear(d_hidden, d_model)
(no bias) maps back when expansion != 1, as in the paper's expanded models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import positive_int
from recur.ops.scan import diagonal_scan, log_space_scan
from recur.registry import register
from recur.state import State

PAPER = "Feng et al., Were RNNs All We Needed? (2024)"


def g(x: torch.Tensor) -> torch.Tensor:
    """x + 0.5 for x >= 0, sigmoid(x) below: continuous at 0 and always positive."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    # Both branches are finite everywhere (relu keeps the log's argument >= 0.5), so the
    # unselected branch never injects inf/NaN into the gradient.
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


class _MinRNN(Mixer):
    """Shared body of minGRU and minLSTM (see the module docstring)."""

    modes = ("chunk", "parallel", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "d_hidden"
    n_gates = 1  # gate projections besides the candidate h~
    # Subclasses define log_coefficients(gates, cand) -> (log a, log b) of h_t = a_t h_{t-1} + b_t
    # from the gate pre-activations [..., n_gates * d_hidden] and the candidate's [..., d_hidden].

    def __init__(self, d_model: int, mode: str | None = None, *, expansion: int = 1, chunk_size: int = 64):
        super().__init__(d_model, mode)
        self.expansion = positive_int("expansion", expansion, owner=self.name)
        self.d_hidden = expansion * d_model
        self.chunk_size = chunk_size
        # One matmul for the gate pre-activations and the candidate h~ (nn.Linear default init).
        self.in_proj = nn.Linear(d_model, (self.n_gates + 1) * self.d_hidden)
        self.out_proj = nn.Linear(self.d_hidden, d_model, bias=False) if expansion != 1 else nn.Identity()

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(h=torch.zeros(batch_size, self.d_hidden, device=device, dtype=dtype))

    def _forward(self, x, state, resets=None):
        dtype = x.dtype
        # In float32 at least: a bfloat16 decay near 1 would round to 1 (no forgetting).
        work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        u = self.in_proj(x).to(work)
        gates, cand = u[..., : -self.d_hidden], u[..., -self.d_hidden :]
        log_a, log_b = self.log_coefficients(gates, cand)
        log_a = packing.hard_reset(log_a, resets, time_dim=1)
        h0 = state["h"].to(work)
        if self.mode == "parallel":
            h, _ = log_space_scan(log_a, log_b)
            h = h + log_a.cumsum(dim=1).exp() * h0.unsqueeze(1)  # the initial state, linearly
            h_last = h[:, -1]
        else:
            h, h_last = diagonal_scan(
                log_a, log_b.exp(), h0,
                mode=self.op_mode, chunk_size=self.chunk_size,
            )
        y = self.out_proj(h.to(dtype))
        return y, State(h=h_last.to(dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_hidden={self.d_hidden}, chunk_size={self.chunk_size}"


@register("mingru", family="minimal-rnn", paper=PAPER)
class MinGRU(_MinRNN):
    """minGRU: a GRU whose update gate and candidate depend on the input only.

    z_t = sigmoid(W_z x_t + b_z), h~_t = g(W_h x_t + b_h), h_t = (1 - z_t) * h_{t-1} + z_t * h~_t,
    g(x) = x + 0.5 (x >= 0) else sigmoid(x); y_t = W_o h_t (identity when expansion = 1).
    Feng, Tung, Ahmed, Bengio, Hajimirsadeghi, "Were RNNs All We Needed?" (2024).
    """

    n_gates = 1

    def log_coefficients(self, gates, cand):
        log_z = -F.softplus(-gates)
        return -F.softplus(gates), log_z + log_g(cand)  # log(1 - z), log(z * g(h~))


@register("minlstm", family="minimal-rnn", paper=PAPER)
class MinLSTM(_MinRNN):
    """minLSTM: an LSTM with input-only gates, normalised so that f' + i' = 1.

    f_t, i_t = sigmoid(W_f x_t + b_f), sigmoid(W_i x_t + b_i); f' = f / (f + i), i' = i / (f + i);
    h~_t = g(W_h x_t + b_h); h_t = f'_t * h_{t-1} + i'_t * h~_t; y_t = W_o h_t (identity when expansion = 1).
    Feng, Tung, Ahmed, Bengio, Hajimirsadeghi, "Were RNNs All We Needed?" (2024).
    """

    n_gates = 2

    def log_coefficients(self, gates, cand):
        k_f, k_i = gates.chunk(2, dim=-1)
        d = F.softplus(-k_f) - F.softplus(-k_i)  # log(i / f)
        return -F.softplus(d), -F.softplus(-d) + log_g(cand)  # log f', log(i' * g(h~))
