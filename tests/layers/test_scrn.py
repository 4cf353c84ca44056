"""SCRN (``recur/layers/scrn.py``): properties from the paper that the conformance suite cannot
know. The context is a closed-form geometric sum, and alpha = 0 leaves a plain sigmoid RNN.
Exactness checks run in float64, where the only differences are rounding (~1e-15 relative), so
the tolerances leave wide headroom.
"""

from __future__ import annotations

import pytest
import torch

import recur

from .helpers import D, close, make, randn


def test_scrn_with_alpha_zero_is_a_sigmoid_rnn_on_projected_input():
    """alpha = 0: s_t = B x_t, h_t = sigmoid(P B x_t + A x_t + R h_{t-1}), y_t = U h_t + V B x_t;
    the carried context is forgotten at once, the carried h is not."""
    m = make("scrn", alpha=0.0)
    _, start = m(randn(2, 5, D, seed=2))  # a non-zero (h, s) to start from
    x = randn(2, 13, D, seed=3)
    y, state = m(x, start)

    A, B, P, R = m.A.weight, m.B.weight, m.P.weight, m.R
    h, ys = start["h"], []
    for t in range(x.shape[1]):
        s = x[:, t] @ B.T
        h = torch.sigmoid(s @ P.T + x[:, t] @ A.T + h @ R.T)
        ys.append(h @ m.U.weight.T + s @ m.V.weight.T)
    close(y, torch.stack(ys, dim=1), "alpha=0 output vs a sigmoid RNN on [A; PB] x")
    close(state["h"], h, "final hidden state")
    close(state["s"], x[:, -1] @ B.T, "final context = B x_T")


@pytest.mark.parametrize("alpha", [0.95, 0.5])
def test_scrn_context_is_the_geometric_sum_of_projected_inputs(alpha):
    """s_t = alpha^t s_0 + sum_{j<=t} (1 - alpha) alpha^(t-j) B x_j."""
    m = make("scrn", alpha=alpha)
    s0 = randn(2, m.d_context, seed=4)
    start = m.init_state(2, dtype=torch.float64).replace(s=s0)
    x = randn(2, 25, D, seed=5)
    bx = x @ m.B.weight.T  # [batch, time, d_context]
    for t in (1, 7, 25):
        _, state = m(x[:, :t], start)
        powers = alpha ** torch.arange(t - 1, -1, -1, dtype=torch.float64)  # alpha^(t-j), j = 1..t
        expected = alpha**t * s0 + (1 - alpha) * torch.einsum("j,bjc->bc", powers, bx[:, :t])
        close(state["s"], expected, f"context after {t} steps")


def test_scrn_default_sizes_follow_the_paper_ratio():
    """d_hidden = d_model, d_context = round(0.4 d_hidden) (the paper's 100 hidden / 40 context)."""
    m = recur.build("scrn", d_model=100)
    assert (m.d_hidden, m.d_context, m.alpha) == (100, 40, 0.95)
    assert m.state_size(1) == 140
