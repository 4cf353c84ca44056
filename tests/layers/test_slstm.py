"""sLSTM (``recur/layers/slstm.py``): properties from the paper that the conformance suite cannot
know. The output does not depend on the stabiliser, the heads are independent RNNs, and it
equals the unstabilised exponential-gate LSTM where nothing overflows. Exactness checks run in
float64, where the only differences are rounding (~1e-15 relative).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recur
from recur import State
from recur.models import Backbone

from .helpers import D, close, make, randn


def make_slstm(seed=0, **options):
    """An sLSTM with non-zero recurrent blocks (the official init is R = 0, which would hide R)."""
    m = make("slstm", seed=seed, **options)
    with torch.no_grad():
        m.R.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 100))
        m.bias.add_(0.3 * randn(*m.bias.shape, seed=seed + 200))
    return m


def slstm_unstabilised(m, x):
    """The sLSTM layer from its equations with the plain exponential gates (no m): c and n
    accumulate exp(i~) directly. Zero initial state; returns (y, h, c, n)."""
    B, T, _ = x.shape
    H, d, k = m.n_heads, m.head_dim, m.conv_size
    padded = F.pad(x.transpose(1, 2), (k - 1, 0))
    x_conv = F.silu(F.conv1d(padded, m.conv.weight, m.conv.bias, groups=D)).transpose(1, 2)
    h = torch.zeros(B, D, dtype=x.dtype)
    c, n, hs = h.clone(), h.clone(), []
    for t in range(T):
        h_new, c_new, n_new = [], [], []
        for head in range(H):
            ch = slice(head * d, (head + 1) * d)
            pre = (torch.cat([x_conv[:, t, ch] @ m.W_if[head], x[:, t, ch] @ m.W_zo[head]], dim=-1)
                   + m.bias[head] + h[:, ch] @ m.R[head])
            i, f, z, o = pre.split(d, dim=-1)
            forget = torch.exp(f) if m.forget_gate == "exp" else torch.sigmoid(f)
            c_h = forget * c[:, ch] + torch.exp(i) * torch.tanh(z)
            n_h = forget * n[:, ch] + torch.exp(i)
            h_new.append(torch.sigmoid(o) * c_h / n_h)
            c_new.append(c_h)
            n_new.append(n_h)
        h, c, n = torch.cat(h_new, -1), torch.cat(c_new, -1), torch.cat(n_new, -1)
        hs.append(h)
    hs = torch.stack(hs, dim=1)
    y = F.group_norm(hs.reshape(B * T, D), H, m.norm_weight, None, eps=m.norm_eps).reshape(B, T, D)
    return y, h, c, n


@pytest.mark.parametrize("forget_gate", ["sigmoid", "exp"])
def test_slstm_equals_the_unstabilised_exponential_gating(forget_gate):
    """Where exp(i~) cannot overflow (float64, 12 steps), the stabilised cell equals plain exponential
    gating: c_t = f c_{t-1} + exp(i~) z, n_t = f n_{t-1} + exp(i~), h = o c / n; the carried
    (c, n) are exp(-m) times the plain ones."""
    m = make_slstm(forget_gate=forget_gate)
    x = randn(2, 12, D, seed=10)
    y, state = m(x)
    y_ref, h_ref, c_ref, n_ref = slstm_unstabilised(m, x)
    close(y, y_ref, "output vs the unstabilised sLSTM")
    close(state["h"], h_ref, "final h")
    scale = state["m"].exp()
    close(state["c"] * scale, c_ref, "final c * exp(m) vs the plain c")
    close(state["n"] * scale, n_ref, "final n * exp(m) vs the plain n")


def test_slstm_output_does_not_depend_on_the_stabiliser():
    """(c, n, m) and (c e^-delta, n e^-delta, m + delta) are the same memory: same outputs, same
    final memory up to its own scale."""
    m = make_slstm()
    _, start = m(randn(2, 9, D, seed=11))
    delta = 6 * torch.rand(2, D, generator=torch.Generator().manual_seed(12), dtype=torch.float64) - 3
    shifted = start.replace(c=start["c"] * torch.exp(-delta), n=start["n"] * torch.exp(-delta), m=start["m"] + delta)
    x = randn(2, 21, D, seed=13)
    y, s = m(x, start)
    y2, s2 = m(x, shifted)
    close(y2, y, "output after shifting the stabiliser")
    close(s2["h"], s["h"], "final h after shifting the stabiliser")
    for key in ("c", "n"):
        close(s2[key] * s2["m"].exp(), s[key] * s["m"].exp(), f"final {key} * exp(m)")


def test_slstm_first_step_from_the_empty_memory_is_well_defined():
    """From the zero state (n = 0) the first step sets m = i~, so n_1 = 1: the output does not depend
    on m_0, and stays finite even when exp(i~) underflows (float32, i~ = -200)."""
    m = make_slstm()
    x = randn(2, 7, D, seed=14)
    zero = m.init_state(2, dtype=torch.float64)
    y, s = m(x, zero)
    y2, _ = m(x, zero.replace(m=randn(2, D, seed=15)))
    close(y2, y, "output from n = 0 with another m_0")
    assert (s["n"] >= 1 - 1e-12).all(), "n fell below 1 after a fresh start"

    m32 = make_slstm().float()
    with torch.no_grad():
        m32.bias.view(m32.n_heads, 4, m32.head_dim)[:, 0] = -200.0  # input gate exp(-200) = 0 in float32
    y32, s32 = m32(x.float())
    assert torch.isfinite(y32).all() and torch.isfinite(s32["n"]).all() and (s32["n"] > 0).all()


def test_slstm_fresh_rows_in_a_carried_batch_start_fresh():
    """The empty-memory rule is per element: a batch mixing a zero-state row and a carried row
    gives each row what it gives alone."""
    m = make_slstm()
    _, used = m(randn(1, 6, D, seed=16))
    state = State.cat([m.init_state(1, dtype=torch.float64), used])
    x = randn(2, 10, D, seed=17)
    y, _ = m(x, state)
    y0, _ = m(x[:1])
    y1, _ = m(x[1:], used)
    close(y[:1], y0, "fresh row in a mixed batch")
    close(y[1:], y1, "carried row in a mixed batch")


@pytest.mark.parametrize("n_heads", [2, 4])
def test_slstm_heads_are_independent_rnns(n_heads):
    """Block-diagonal W and R, a depthwise conv and a per-head norm: changing one head's input
    channels leaves the other heads' outputs unchanged; R stores only its diagonal blocks."""
    m = make_slstm(n_heads=n_heads)
    d = D // n_heads
    assert tuple(m.R.shape) == (n_heads, d, 4 * d)
    x = randn(2, 15, D, seed=18)
    y, _ = m(x)
    changed = slice(d, 2 * d)  # head 1
    x2 = x.clone()
    x2[:, 3:, changed] += randn(2, 12, d, seed=19)
    y2, _ = m(x2)
    others = [c for c in range(D) if not changed.start <= c < changed.stop]
    close(y2[..., others], y[..., others], "other heads after changing head 1's input")
    assert not torch.allclose(y2[..., changed], y[..., changed]), "head 1 ignores its own input"


def test_slstm_forget_bias_is_the_official_powerlaw_over_depth():
    """b_f = 5 - 12 (k / (head_dim - 1))^(0.3 + 1.3 layer_idx / (n_layers - 1)) in every head,
    from +5 down to -7; the other biases start at 0 and R at 0 (official init)."""
    backbone = Backbone(D, n_layers=3, pattern="slstm")
    for layer, mixer in enumerate(backbone.mixers):
        bias = mixer.bias.detach().view(mixer.n_heads, 4, mixer.head_dim)
        k = torch.arange(mixer.head_dim, dtype=torch.float32) / (mixer.head_dim - 1)
        expected = 5 - 12 * k ** (0.3 + 1.3 * layer / 2)
        torch.testing.assert_close(bias[:, 1], expected.expand(mixer.n_heads, -1))
        assert bias[:, 1, 0].eq(5).all() and torch.allclose(bias[:, 1, -1], torch.tensor(-7.0))
        assert bias[:, [0, 2, 3]].eq(0).all() and mixer.R.eq(0).all()
    alone = recur.build("slstm", d_model=D)
    torch.testing.assert_close(alone.bias.detach().view(alone.n_heads, 4, -1)[0, 1], backbone.mixers[0].bias.detach().view(2, 4, -1)[0, 1])


def test_slstm_options_out_proj_and_no_conv():
    """out_proj=True maps the default output through one bias-free Linear (same other weights for
    the same seed); conv_size=0 carries no conv tail and its state still carries exactly."""
    x = randn(2, 9, D, seed=20)
    y, _ = make_slstm()(x)
    projected = make_slstm(out_proj=True)
    y_proj, _ = projected(x)
    close(y_proj, y @ projected.out_proj.weight.T, "out_proj output vs Linear of the default output")

    m = make_slstm(conv_size=0)
    y0, s0 = m(x)
    assert "conv" not in s0 and m.state_size(9) == 4 * D
    y1, s1 = m(x[:, :4])
    y2, _ = m(x[:, 4:], s1)
    close(torch.cat([y1, y2], dim=1), y0, "conv_size=0: state carry")
