"""The Structurally Constrained Recurrent Network (Mikolov, Joulin, Chopra, Mathieu, Ranzato,
"Learning Longer Memory in Recurrent Neural Networks", 2014): a sigmoid RNN beside a slowly
changing, linear context state.

    s_t = (1 - alpha) B x_t + alpha s_{t-1}            context ("slow") units, alpha fixed
    h_t = sigmoid(P s_t + A x_t + R h_{t-1})           hidden ("fast") units
    y_t = U h_t + V s_t                                back to d_model

The paper constrains the context recurrence to alpha * I with alpha fixed (0.95): it is
linear and time-invariant, so s for the whole call is one ``diagonal_scan`` with the constant
decay log alpha, run in the primitive's ``reference`` mode (the mixer's only mode is
``recurrent``: the hidden recurrence is nonlinear). The h loop then does one matmul and one
sigmoid per step. The paper's y_t = softmax(U h_t + V s_t) is a language model's output; here
y_t is the projection back to d_model and the LM head lives in ``CausalLM``. The state is
(h, s): d_hidden + d_context floats.

Sizes: d_hidden = d_model and d_context = max(1, round(0.4 * d_hidden)) by default, the
paper's 100 hidden / 40 context units ratio (its Penn Treebank models use 40/10, 100/40 and
300/40).

Initialisation (the authors' Torch code, facebookarchive/SCRNNs, ``initSCRNN``): every
encoder weight (A, B, P, R) ~ N(0, 0.05^2) ("frand"); the context recurrence is 0.95 I with
its gradient zeroed (here the constant alpha) and the context input is scaled by
1 - alpha = 0.05 (the paper's (1 - alpha) B). No biases, as in the paper's equations and the
code's bias-free layers. The code zero-initialises its output (softmax) layer; here U and V
keep PyTorch's Linear init instead, because inside a residual block a zero output projection
would give the mixer a zero output and zero gradients to every other weight at the start.
The code's x_t is one-hot (A and B are lookup tables); here it is a dense d_model vector.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import positive_ints
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State


@register("scrn", family="classic",
          paper="Mikolov, Joulin, Chopra, Mathieu, Ranzato, Learning Longer Memory in Recurrent Neural Networks (2014)")
class SCRN(Mixer):
    """Structurally Constrained Recurrent Network: a sigmoid RNN fed by a slow linear context.

    s_t = (1 - alpha) B x_t + alpha s_{t-1} (alpha fixed, 0.95); h_t = sigmoid(P s_t + A x_t + R h_{t-1});
    y_t = U h_t + V s_t. Mikolov et al., "Learning Longer Memory in Recurrent Neural Networks" (2014).
    """

    modes = ("recurrent",)
    linear_recurrence = False  # the context scan feeds a sigmoid RNN
    state_formula = "d_hidden + d_context"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        d_hidden: int | None = None,
        d_context: int | None = None,
        alpha: float = 0.95,
        init_std: float = 0.05,
    ):
        super().__init__(d_model, mode)
        d_hidden = d_model if d_hidden is None else d_hidden
        d_context = max(1, round(0.4 * d_hidden)) if d_context is None else d_context
        positive_ints("scrn", d_hidden=d_hidden, d_context=d_context)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"scrn: alpha must be in [0, 1) (the context's fixed decay), got {alpha}")
        self.d_hidden, self.d_context, self.alpha = d_hidden, d_context, float(alpha)

        self.B = nn.Linear(d_model, d_context, bias=False)   # context input
        self.A = nn.Linear(d_model, d_hidden, bias=False)    # hidden input
        self.P = nn.Linear(d_context, d_hidden, bias=False)  # context -> hidden
        self.R = nn.Parameter(torch.empty(d_hidden, d_hidden))  # hidden -> hidden, [out, in]
        for w in (self.B.weight, self.A.weight, self.P.weight, self.R):
            nn.init.normal_(w, std=init_std)
        self.U = nn.Linear(d_hidden, d_model, bias=False)
        self.V = nn.Linear(d_context, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            h=torch.zeros(batch_size, self.d_hidden, device=device, dtype=dtype),
            s=torch.zeros(batch_size, self.d_context, device=device, dtype=dtype),
        )

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        u = x.to(work)
        A, B, P, U, V = (layer.weight.to(work) for layer in (self.A, self.B, self.P, self.U, self.V))
        # The context: a time-invariant diagonal scan, decay alpha for every unit.
        log_alpha = torch.full((self.d_context,), math.log(self.alpha) if self.alpha > 0 else -math.inf,
                               device=x.device, dtype=work)
        s, s_last = diagonal_scan(log_alpha, (1.0 - self.alpha) * (u @ B.T),
                                  state["s"].to(work), mode=self.op_mode)
        pre = u @ A.T + s @ P.T  # [batch, time, d_hidden]
        h, hs, r = state["h"].to(work), [], self.R.to(work).T
        for pre_t in pre.unbind(1):
            h = torch.sigmoid(torch.addmm(pre_t, h, r))
            hs.append(h)
        hs = torch.stack(hs, dim=1)
        y = hs @ U.T + s @ V.T
        return y.to(dtype), State(h=h.to(dtype), s=s_last.to(dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, d_hidden={self.d_hidden}, d_context={self.d_context}, alpha={self.alpha}"
