"""Properties of the diagonal-family layers (rglru, hgrn, s4d) that the conformance suite cannot
know: initialisation ranges from the papers, closed forms, the papers' equations written out as
plain loops, and depth-dependent configuration. Exactness checks in float64."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

import recur
from recur.layers.rglru import RGLRU

RTOL, ATOL = 1e-8, 1e-10


def randn(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------- RG-LRU
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


# ------------------------------------------------------------------------------------------ HGRN
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


# ------------------------------------------------------------------------------------------ S4D
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
