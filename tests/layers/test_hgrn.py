"""HGRN (``recur/layers/hgrn.py``): properties that the conformance suite cannot know: the
depth-dependent lower bound of the forget gate and the paper's equations written out as a plain
loop. Exactness checks in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recur

from .helpers import close, randn


def test_hgrn_lower_bound_is_monotone_in_depth_and_bounds_the_forget_gate():
    L = 6
    layers = [recur.build("hgrn", d_model=16, layer_idx=l, n_layers=L).double() for l in range(L)]
    bounds = [m.lower_bound for m in layers]
    assert bounds[0] == 0.0 and all(b1 < b2 for b1, b2 in zip(bounds, bounds[1:])) and bounds[-1] < 1
    assert bounds == [l / L for l in range(L)]
    x = randn(2, 9, 16, seed=5) * 50  # saturating gate pre-activations, both signs
    for m in layers:
        lam = m.forget_gate(x)
        assert (lam >= m.lower_bound).all() and (lam <= 1).all()
        assert lam.min() < m.lower_bound + 1e-6, "a saturated gate reaches its lower bound"
        close(m.log_forget_gate(x).exp(), lam, "log_forget_gate")
    assert recur.build("hgrn", d_model=16).lower_bound == 0.0
    assert recur.build("hgrn", d_model=16, lower_bound=0.5, layer_idx=1, n_layers=4).lower_bound == 0.5
    with pytest.raises(ValueError, match="lower_bound"):
        recur.build("hgrn", d_model=16, lower_bound=1.0)
    with pytest.raises(ValueError, match="layer_idx"):
        recur.build("hgrn", d_model=16, layer_idx=3, n_layers=3)


def test_causal_lm_gives_hgrn_layers_increasing_lower_bounds():
    torch.manual_seed(2)
    lm = recur.CausalLM(vocab_size=16, d_model=16, n_layers=3, pattern="hgrn")
    assert [m.lower_bound for m in lm.backbone.mixers] == [0.0, 1 / 3, 2 / 3]


@pytest.mark.parametrize("lower_bound", [0.0, 0.6])
def test_hgrn_follows_the_papers_equations(lower_bound):
    """HGRU written out: lambda_t = gamma + (1 - gamma) sigmoid(x W_mu), c_t = SiLU(x W_cr) + i SiLU(x W_ci),
    h_t = lambda_t e^{i theta} h_{t-1} + (1 - lambda_t) c_t, y = LayerNorm(SiLU(x W_g) [Re h, Im h]) W_o."""
    torch.manual_seed(6)
    m = recur.build("hgrn", d_model=16, lower_bound=lower_bound).double()
    _, s0 = m(randn(2, 4, 16, seed=7))
    x = randn(2, 11, 16, seed=8)
    y, state = m(x, s0)
    lam = lower_bound + (1 - lower_bound) * torch.sigmoid(x @ m.f_proj.weight.T + m.f_proj.bias)
    c = F.silu(x @ m.c_proj.weight.T + m.c_proj.bias)
    c = torch.complex(c[..., :16], c[..., 16:])
    rot = torch.exp(1j * m.theta.double())
    h, hs = s0["h"], []
    for t in range(11):
        h = lam[:, t] * rot * h + (1 - lam[:, t]) * c[:, t]
        hs.append(h)
    hs = torch.stack(hs, 1)
    g = F.silu(x @ m.g_proj.weight.T + m.g_proj.bias)
    o = F.layer_norm(g * torch.cat([hs.real, hs.imag], -1), (32,), m.norm.weight, m.norm.bias, m.norm.eps)
    close(y, o @ m.o_proj.weight.T + m.o_proj.bias, "output")
    close(state["h"], h, "state")
    # the init (float32 parameters): theta_k = 10000^(-2k/d)
    torch.testing.assert_close(m.theta.detach(), 10000 ** (-2 * torch.arange(16, dtype=torch.float64) / 16), rtol=1e-6, atol=0)
