"""RG-LRU (``recur/layers/rglru.py``): properties that the conformance suite cannot know: the
decay's initial range from the paper, the input normalisation, and the paper's equations written
out as a plain loop. Exactness checks in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import recur
from recur.layers.rglru import RGLRU

from .helpers import close, randn


def test_rglru_decay_at_full_gate_starts_uniform_on_the_papers_range():
    """The paper: Lambda is initialised so that a^c (c = 8, a = sigmoid(Lambda)) is uniform on
    [0.9, 0.999]. recurrentgemma's code instead puts a itself on that ring (a^2 uniform)."""
    torch.manual_seed(0)
    layer = recur.build("rglru", d_model=4096)
    a = torch.sigmoid(layer.Lambda.double())
    close(a.log(), layer.log_base_decay(torch.float64), "log a = -softplus(-Lambda)")
    a_c = a**8
    assert a_c.min() >= 0.9 - 1e-6 and a_c.max() <= 0.999 + 1e-6
    # uniform: mean 0.9495, sd (0.099)/sqrt(12) = 0.0286, quartiles at 0.92475 and 0.97425
    assert abs(a_c.mean().item() - 0.9495) < 0.003
    assert abs(a_c.std().item() - 0.099 / math.sqrt(12)) < 0.002
    q = torch.quantile(a_c, torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert torch.allclose(q, torch.tensor([0.92475, 0.97425], dtype=torch.float64), atol=0.004)

    code = recur.build("rglru", d_model=4096, a_init="recurrentgemma")
    a = torch.sigmoid(code.Lambda.double())
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
    assert abs((a**2).mean().item() - (0.81 + 0.998001) / 2) < 0.005


def _rglru_probe(log_a_t, r_bias=0.0, i_bias=0.0):
    """An RG-LRU block wired so that the recurrence is visible: u = x (W_b = I, conv = current tap),
    constant gates r = sigmoid(r_bias), i = sigmoid(i_bias), and y = h (GeLU(1000) = 1000, W_o = I/1000).
    Lambda is set so that the decay a_t = a^(8 r) has the given log per channel."""
    d = len(log_a_t)
    layer = RGLRU(d, n_heads=1).double()
    eye = torch.eye(d, dtype=torch.float64)
    r = torch.sigmoid(torch.tensor(r_bias, dtype=torch.float64))
    log_a = torch.tensor(log_a_t, dtype=torch.float64) / (8 * r)  # log a = log a_t / (c r)
    with torch.no_grad():
        layer.in_proj.weight.copy_(eye)
        layer.in_proj.bias.zero_()
        layer.conv.weight.zero_()
        layer.conv.weight[:, 0, -1] = 1.0  # y_t = x_t
        layer.conv.bias.zero_()
        layer.gate_r.weight.zero_()
        layer.gate_r.bias.fill_(r_bias)
        layer.gate_i.weight.zero_()
        layer.gate_i.bias.fill_(i_bias)
        layer.branch_proj.weight.zero_()
        layer.branch_proj.bias.fill_(1e3)  # GeLU(1000) = 1000 exactly, undone by W_o = I / 1000
        layer.out_proj.weight.copy_(eye * 1e-3)
        layer.out_proj.bias.zero_()
        layer.Lambda.copy_(-torch.log(torch.expm1(-log_a)))
    return layer


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rglru_normalisation_keeps_white_noise_variance_bounded(mode):
    """h_t = a h_{t-1} + sqrt(1 - a^2) i x_t: for white noise x of unit variance, Var h_T is the
    squared norm of the impulse response c_k = sqrt(1 - a^2) i a^k, which is
    i^2 (1 - a^(2T)) <= i^2 for every a (closed form): without the sqrt(1 - a^2) factor it would be
    i^2 (1 - a^(2T)) / (1 - a^2), which grows without bound as a -> 1."""
    a = torch.tensor([0.5, 0.9, 0.99, 0.999, 0.99999], dtype=torch.float64)
    layer = _rglru_probe(a.log().tolist(), r_bias=0.3, i_bias=-0.2)
    layer.mode = mode
    T = 3000
    impulse = torch.zeros(1, T, len(a), dtype=torch.float64)
    impulse[:, 0] = 1.0
    c, _ = layer(impulse)  # the impulse response per channel
    i = torch.sigmoid(torch.tensor(-0.2, dtype=torch.float64))
    k = torch.arange(T, dtype=torch.float64)[:, None]
    close(c[0], torch.sqrt(1 - a**2) * i * a**k, "impulse response sqrt(1 - a^2) i a^k")
    variance = (c[0] ** 2).sum(0)
    close(variance, i**2 * (1 - a ** (2 * T)), "Var h_T = i^2 (1 - a^(2T))")
    assert (variance <= i**2 * (1 + 1e-12)).all()  # bounded by the input's variance times i^2, for every a


def test_rglru_normalisation_is_accurate_near_one():
    """sqrt(1 - a_t^2) for log a_t = -1e-12 in float64: 1 - a_t^2 = 1 - e^(-2e-12) = 2e-12 - 2e-24 + ...
    (series); forming a_t = exp(log a_t) first and then 1 - a_t^2 keeps only ~4 digits of it."""
    eps = 1e-12
    layer = _rglru_probe([-eps])
    _, state = layer(torch.ones(1, 1, 1, dtype=torch.float64))
    i = torch.sigmoid(torch.tensor(0.0, dtype=torch.float64)).item()
    want = math.sqrt(2 * eps - 2 * eps**2) * i
    assert abs(state["h"].item() / want - 1) < 1e-10
    naive = math.sqrt(1 - math.exp(-eps) ** 2) * i
    assert abs(naive / want - 1) > 1e-6  # the cancellation this guards against


def test_rglru_follows_the_papers_equations():
    """The block written out step by step from its parameters: y = (GeLU(x W_a) * h) W_o with
    u = Conv1D(x W_b), r, i = sigmoid(block-diagonal linears of u), a_t = sigmoid(Lambda)^(8 r),
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i * u_t); and the state is (conv tail, h)."""
    torch.manual_seed(3)
    layer = recur.build("rglru", d_model=16).double()
    assert layer.n_heads == 2
    with torch.no_grad():  # non-trivial biases
        for p in (layer.gate_r.bias, layer.gate_i.bias, layer.conv.bias):
            p.normal_()
    x = randn(2, 13, 16, seed=4)
    y, state = layer(x)
    xb = x @ layer.in_proj.weight.T + layer.in_proj.bias
    xp = torch.cat([torch.zeros(2, 3, 16, dtype=torch.float64), xb], dim=1)
    w = layer.conv.weight[:, 0]  # [channels, 4], tap 3 is the current input
    u = sum(xp[:, k : k + 13] * w[:, k] for k in range(4)) + layer.conv.bias

    def block_diag(lin, v):
        W = torch.block_diag(*lin.weight)  # [16, 16]
        return v @ W + lin.bias.reshape(-1)

    r, i = torch.sigmoid(block_diag(layer.gate_r, u)), torch.sigmoid(block_diag(layer.gate_i, u))
    a = torch.sigmoid(layer.Lambda) ** (8 * r)
    h, hs = torch.zeros(2, 16, dtype=torch.float64), []
    for t in range(13):
        h = a[:, t] * h + torch.sqrt(1 - a[:, t] ** 2) * (i[:, t] * u[:, t])
        hs.append(h)
    want = (F.gelu(x @ layer.branch_proj.weight.T + layer.branch_proj.bias) * torch.stack(hs, 1)) @ layer.out_proj.weight.T
    close(y, want + layer.out_proj.bias, "output")
    close(state["h"], h, "state h")
    close(state["conv"], xb[:, -3:], "state: the last 3 inputs of the conv")
