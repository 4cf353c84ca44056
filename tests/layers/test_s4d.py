"""S4D (``recur/layers/s4d.py``): properties that the conformance suite cannot know: the S4D-Lin
initialisation, the zero-order hold against a closed form, and the convolution kernel as the
impulse response of the recurrence. Exactness checks in float64.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

import recur

from .helpers import close, randn


def make_s4d(seed=0, **kw):
    torch.manual_seed(seed)
    return recur.build("s4d", d_model=kw.pop("d_model", 8), **kw).double()


def test_s4d_initialisation_is_s4d_lin():
    layer = make_s4d(d_model=64, d_state=16)
    dtA, B_bar, C = layer.discretize(torch.float64)
    dt = layer.log_dt.exp()
    A = dtA / dt[:, None]
    n = torch.arange(8, dtype=torch.float64)
    # A_n = -1/2 + i pi n (float32 parameters)
    torch.testing.assert_close(A, (-0.5 + 1j * math.pi * n).expand(64, 8).to(A.dtype), rtol=1e-6, atol=1e-6)
    assert dt.min() >= 1e-3 and dt.max() <= 1e-1 and dt.max() / dt.min() > 10  # log-uniform over the range
    assert C.shape == (64, 8) and C.is_complex()
    assert layer.state_size(0) == 64 * 16  # N/2 complex modes per channel = N floats


def test_s4d_zoh_matches_the_closed_form_of_a_scalar_system():
    """x' = A x + B u with u held constant over a step of length dt: the exact solution is
    x(dt) = e^{A dt} x(0) + (e^{A dt} - 1)/A B u, read off the exponential of the augmented
    matrix [[A dt, B dt], [0, 0]] (a closed form independent of the layer's formula)."""
    layer = make_s4d(d_model=3, d_state=6)
    with torch.no_grad():
        layer.log_A_real.copy_(torch.log(torch.tensor([[0.5, 2.0, 1e-3]] * 3, dtype=torch.float64)))
        layer.A_imag.copy_(torch.tensor([[0.0, 3.0, 40.0]] * 3, dtype=torch.float64))
        layer.log_dt.copy_(torch.log(torch.tensor([1e-3, 0.1, 0.7], dtype=torch.float64)))
    dtA, B_bar, _ = layer.discretize(torch.float64)
    mpmath.mp.dps = 40  # the matrix exponential in 40-digit arithmetic
    for h in range(3):
        for n in range(3):
            A = complex(-math.exp(layer.log_A_real[h, n].item()), layer.A_imag[h, n].item())
            dt = math.exp(layer.log_dt[h].item())
            E = mpmath.expm(mpmath.matrix([[A * dt, dt], [0, 0]]))  # B = 1
            torch.testing.assert_close(dtA[h, n].exp().item(), complex(E[0, 0]), rtol=1e-13, atol=0)
            torch.testing.assert_close(B_bar[h, n].item(), complex(E[0, 1]), rtol=1e-13, atol=0)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_s4d_kernel_is_the_impulse_response_of_the_recurrence(mode):
    layer = make_s4d(d_model=8, d_state=64)
    layer.mode, layer.chunk_size = mode, 16
    T = 300
    impulse = torch.zeros(1, T, 8, dtype=torch.float64)
    impulse[:, 0] = 1.0
    with torch.no_grad():
        y, _ = layer.ssm(impulse, layer.init_state(1, dtype=torch.float64)["h"])
        K = layer.kernel(T, torch.float64)
    close(y[0] - layer.D.detach() * impulse[0], K, "impulse response vs K_l = 2 Re(C A_bar^l B_bar)")
    assert K[0].abs().min() > 0 and K[-1].abs().max() < K[0].abs().max()  # a decaying response


def test_s4d_conv_mode_with_an_initial_state_equals_the_recurrence():
    """conv mode adds the zero-input response of h0 and forms h_T by a Vandermonde sum: both equal
    the step-by-step recurrence (output, final state and gradients)."""
    layer = make_s4d(d_model=8, d_state=16)
    h0 = torch.complex(randn(3, 8, 8, seed=9), randn(3, 8, 8, seed=10))
    u0 = randn(3, 45, 8, seed=11)
    out = {}
    for mode in ("conv", "recurrent"):
        layer.mode = mode
        u = u0.clone().requires_grad_(True)
        y, h = layer.ssm(u, h0)
        loss = (y * randn(3, 45, 8, seed=12)).sum() + (torch.view_as_real(h) * randn(3, 8, 8, 2, seed=13)).sum()
        grads = torch.autograd.grad(loss, [u, layer.log_dt, layer.log_A_real, layer.A_imag, layer.C])
        out[mode] = (y.detach(), h.detach(), grads)
    close(out["conv"][0], out["recurrent"][0], "output")
    close(out["conv"][1], out["recurrent"][1], "final state")
    for a, b in zip(out["conv"][2], out["recurrent"][2]):
        close(a, b, "gradient")
    # the state matters: from zero the output differs
    layer.mode = "conv"
    y0, _ = layer.ssm(u0, torch.zeros_like(h0))
    assert not torch.allclose(y0, out["conv"][0])


def test_s4d_output_stage_is_gelu_then_glu():
    layer = make_s4d(d_model=8)
    x = randn(2, 7, 8, seed=14)
    y, _ = layer(x)
    pre, _ = layer.ssm(x, layer.init_state(2, dtype=torch.float64)["h"])
    z = F.gelu(pre) @ layer.out_proj.weight.T + layer.out_proj.bias
    close(y, z[..., :8] * torch.sigmoid(z[..., 8:]), "GLU(W GELU(y))")
