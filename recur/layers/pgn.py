"""The Parallel Gated Network (Jia, Lin, Yu, Wang, Liu, Wan, "PGN: The RNN's New Successor is
Effective for Long-Range Time Series Forecasting", NeurIPS 2024), as a causal sequence mixer.

PGN replaces the RNN's hidden-to-hidden recurrence by a Historical Information Extraction (HIE)
layer, a linear layer that reads the previous time steps directly (an O(1) information path
from every past input), and one gate that selects and fuses that history with the current input
(the paper's Eq. 1, and the official code's ``PGN_2d``: a causal convolution over the
zero-padded past inputs, then ``gated_unit``):

    H_t  = HIE(Padding(X))_t = b_h + sum_{i=1..W} M_i x_{t-i}      (x_s = 0 for s < 0)
    G_t  = sigmoid(W_g [x_t, H_t] + b_g)
    H^_t = tanh(W_c [x_t, H_t] + b_c)
    y_t  = G_t * H_t + (1 - G_t) * H^_t

Interpretation for an unbounded stream. In the paper the HIE window W is the whole input
(L - 1 steps; the official code's kernel size seq_R - 1). A streaming mixer must bound it, so
W is the ``history`` option (64 by default): the state is the last W inputs, constant in the
sequence length, and with T <= W + 1 the layer is exactly the paper's PGN over the whole input.
The HIE is not a recurrence (no hidden state feeds back), which is the paper's point: a diagonal
linear recurrence in its place would put every past input behind a product of decays, the long
propagation path PGN removes, so this mixer does not use a scan. The official code runs HIE and
the gates per input variable (grouped convolutions: TPGN's channel independence for
multivariate series); a mixer's input is one token vector, so here HIE and the gates are dense
linear maps over the channels (``groups`` > 1 gives the grouped HIE).
"""

from __future__ import annotations

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import positive_int
from recur.registry import register
from recur.state import State


@register("pgn", family="parallel-gated",
          paper="Jia et al., PGN: The RNN's New Successor is Effective for Long-Range Time Series Forecasting (2024)")
class PGN(Mixer):
    """Parallel Gated Network: a linear layer over the last W inputs (HIE), fused with x_t by one gate.

        H_t = b_h + sum_{i=1..W} M_i x_{t-i}    (Historical Information Extraction; zero padding)
        G_t = sigmoid(W_g [x_t, H_t] + b_g),  H^_t = tanh(W_c [x_t, H_t] + b_c)
        y_t = G_t * H_t + (1 - G_t) * H^_t       (Gated Information Fusion)
    Jia et al., "PGN: The RNN's New Successor is Effective for Long-Range Time Series
    Forecasting" (NeurIPS 2024). W = ``history`` bounds the paper's whole-input window (module
    docstring); the state is the last W inputs, [batch, W, d_model].

    Modes: ``conv`` (HIE as one causal convolution over the whole call, parallel over time) and
    ``recurrent`` (the reference: HIE step by step from the carried window). The gates read x_t
    and H_t only, so they are computed for all steps at once in both modes.

    Initialisation: PyTorch's defaults, as the official code (Conv1d / Linear: weights and
    biases uniform in +-1/sqrt(fan_in)).
    """

    modes = ("conv", "recurrent")
    state_formula = "history * d_model"

    def __init__(self, d_model: int, mode: str | None = None, *, history: int = 64, groups: int = 1):
        super().__init__(d_model, mode)
        positive_int("history (the HIE window)", history, owner=self.name)
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or d_model % groups:
            raise ValueError(f"groups must be a positive int dividing d_model={d_model}, got {groups!r}")
        self.history, self.groups = history, groups
        d = d_model
        # HIE: kernel index j multiplies x_{t-W+j} (cross-correlation over the window), i.e. lag W - j.
        self.hie = nn.Conv1d(d, d, history, groups=groups)
        self.gates = nn.Linear(2 * d, 2 * d)  # [x_t, H_t] -> (gate, candidate)

    def hie_matrix(self) -> torch.Tensor:
        """The HIE as one matrix [d_model, W * d_model] acting on the flattened window (x_{t-W} first)."""
        d, g, W = self.d_model, self.groups, self.history
        w = self.hie.weight  # [d_out, d_in / groups, W]
        if g > 1:  # the grouped kernel as a dense, block-diagonal one: [d_out, d_in, W]
            eye = torch.eye(g, dtype=w.dtype, device=w.device)
            w = torch.einsum("aoiw,ab->aobiw", w.view(g, d // g, d // g, W), eye).reshape(d, d, W)
        return w.permute(0, 2, 1).reshape(d, W * d)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(window=torch.zeros(batch_size, self.history, self.d_model, device=device, dtype=dtype))

    def _forward(self, x, state):
        window = state["window"]  # [batch, W, d]: x_{t-W} .. x_{t-1} before step t
        if self.mode == "recurrent":
            M, b = self.hie_matrix(), self.hie.bias  # H_t = b + M vec(window)
            H = []
            for x_t in x.unbind(1):
                H.append(torch.addmm(b, window.flatten(1), M.T))
                window = torch.cat([window[:, 1:], x_t.unsqueeze(1)], dim=1)
            H = torch.stack(H, dim=1)
        else:
            xx = torch.cat([window, x], dim=1)  # x_{-W} .. x_{T-1}
            H = self.hie(xx[:, :-1].transpose(1, 2)).transpose(1, 2)  # [batch, T, d]
            window = xx[:, -self.history :]
        gate, cand = self.gates(torch.cat([x, H], dim=-1)).chunk(2, dim=-1)
        G = torch.sigmoid(gate)
        y = G * H + (1 - G) * torch.tanh(cand)
        return y, State(window=window)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, history={self.history}, groups={self.groups}"
