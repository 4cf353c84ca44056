"""Properties of the diagonal-family layers that the conformance suite cannot know."""

from __future__ import annotations

import torch

import recur
from recur.ops.scan import diagonal_scan


def test_rglru_decays_start_on_the_papers_ring():
    torch.manual_seed(0)
    a = recur.build("rglru", d_model=256).base_decay()
    assert a.min() >= 0.9 - 1e-6 and a.max() <= 0.999 + 1e-6
    # a^2 is uniform on [0.81, 0.998]: its mean is the midpoint
    assert abs((a**2).mean().item() - (0.81 + 0.998001) / 2) < 0.02


def test_rglru_normalisation_keeps_white_noise_at_unit_variance():
    """h_t = a h_{t-1} + sqrt(1 - a^2) x_t: for unit white noise x, Var h_t = sum_k c_k^2 over the
    impulse response c_k = sqrt(1 - a^2) a^k, which is 1 - a^(2(t+1)) -> 1 (exact, in float64)."""
    a = torch.tensor([0.5, 0.9, 0.99, 0.999], dtype=torch.float64)
    T = 20_000
    log_a = torch.log(a).expand(1, T, 4)
    impulse = torch.zeros(1, T, 4, dtype=torch.float64)
    impulse[:, 0] = 1.0
    c, _ = diagonal_scan(log_a, torch.sqrt(-torch.expm1(2 * log_a)) * impulse)
    torch.testing.assert_close((c[0] ** 2).sum(0), 1 - a ** (2 * T), rtol=1e-10, atol=1e-12)


def test_hgrn_lower_bounds_grow_with_depth_and_bound_the_forget_gate():
    torch.manual_seed(2)
    lm = recur.CausalLM(vocab_size=16, d_model=16, n_layers=3, pattern="hgrn")
    bounds = [m.lower_bound for m in lm.backbone.mixers]
    assert bounds == [0.0, 1 / 3, 2 / 3]
    x = torch.randn(2, 9, 16) * 10
    for m in lm.backbone.mixers:
        lam = m.forget_gate(x)
        assert (lam >= m.lower_bound - 1e-6).all() and (lam <= 1).all()  # float32 rounding
    assert recur.build("hgrn", d_model=16).lower_bound == 0.0
    assert recur.build("hgrn", d_model=16, lower_bound=0.5).lower_bound == 0.5
