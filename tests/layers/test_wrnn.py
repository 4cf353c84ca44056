"""wRNN (``recur/layers/wrnn.py``): properties from the paper that the conformance suite cannot
know. The untrained recurrence is a travelling wave (an impulse goes round the ring) and the fast
loop is the paper's circular Conv1d. All exactness checks run in float64.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import recur
from recur import State

from . import helpers
from .helpers import D, make, randn

RTOL, ATOL = 1e-9, 1e-11
close = partial(helpers.close, rtol=RTOL, atol=ATOL)


def test_wrnn_untrained_impulse_travels_round_the_ring():
    """At initialisation u is a one-position shift and V writes position 0: an impulse at t = 0
    appears at position (-t) mod n_spatial of every channel at step t, and nowhere else."""
    m = make("wrnn", n_channels=3, n_spatial=7)
    x = torch.zeros(1, 20, D, dtype=torch.float64)
    x[0, 0] = 1.0  # injects sum_i x_i / sqrt(D) = sqrt(D) > 0, which the ReLU passes
    h = m.init_state(1, dtype=torch.float64)
    injected = D / math.sqrt(D)
    for t in range(20):
        _, h = m(x[:, t : t + 1], h)
        expected = torch.zeros(3, 7, dtype=torch.float64)
        expected[:, (-t) % 7] = injected
        close(h["h"][0], expected, f"ring state at step {t}")


def test_wrnn_loop_is_the_circular_conv1d_rnn():
    """With random (trained-like) weights the fast gather-and-matmul loop equals the paper's
    h_t = relu(Conv1d_circular(h_{t-1}) + V x_t) with torch's own Conv1d."""
    m = make("wrnn", n_channels=4, n_spatial=9, kernel_size=5)
    with torch.no_grad():
        for p in (m.in_weight, m.in_bias, m.conv_weight, m.conv_bias):
            p.copy_(0.3 * randn(*p.shape, seed=p.numel()))
    x, h0 = randn(2, 11, D, seed=4), State(h=randn(2, 4, 9, seed=5).abs())
    y, state = m(x, h0)

    h, ys = h0["h"], []
    for t in range(x.shape[1]):
        padded = F.pad(h, (2, 2), mode="circular")
        rec = F.conv1d(padded, m.conv_weight, m.conv_bias)
        h = torch.relu(rec + (x[:, t] @ m.in_weight.T + m.in_bias).view(2, 4, 9))
        ys.append(h.flatten(1) @ m.out_weight.T + m.out_bias)
    close(y, torch.stack(ys, 1), "output vs Conv1d(padding_mode='circular') RNN")
    close(state["h"], h, "final ring state")


def test_wrnn_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        recur.build("wrnn", d_model=D, kernel_size=4)
