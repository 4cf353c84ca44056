"""The bidirectional wrapper (Schuster & Paliwal 1997): y = W [F(x) ; flip(B(flip(x)))] + b, with
two independent causal mixers; a GRU inside is torch's bidirectional GRU followed by a Linear."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import recur
from recur import State
from recur.catalog import evaluate_formula

D = 16
TOL = dict(rtol=1e-10, atol=1e-12)  # float64, only summation order differs


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make(mixer="gla", seed=0, **config):
    torch.manual_seed(seed)
    return recur.build("bidirectional", D, mixer=mixer, **config).double()


@pytest.mark.parametrize("mixer", ["gla", "gru", "swa"])
def test_output_merges_a_forward_pass_and_a_reversed_backward_pass(mixer):
    m = make(mixer)
    x = randn(2, 11, D, seed=1)
    _, given = m(randn(2, 5, D, seed=2))  # a non-trivial state
    for state in (None, given):
        y, s = m(x, state)
        y_f, s_f = m.forward_mixer(x, None if state is None else state["forward"])
        y_b, s_b = m.backward_mixer(x.flip(1), None if state is None else state["backward"])
        expected = torch.cat([y_f, y_b.flip(1)], -1) @ m.out_proj.weight.T + m.out_proj.bias
        torch.testing.assert_close(y, expected, **TOL)
        for key, want in (("forward", s_f), ("backward", s_b)):
            for (name, a), (_, b) in zip(s[key].tensors(), want.tensors()):
                torch.testing.assert_close(a, b, **TOL, msg=lambda msg: f"{key}.{name}: {msg}")


def test_gru_inside_is_torchs_bidirectional_gru_then_a_linear():
    """Schuster & Paliwal's BRNN with GRU cells: torch.nn.GRU(d, d, bidirectional=True) holding the
    two inner GRUs' weights, then the wrapper's Linear: same outputs, final states and input gradients."""
    m = make("gru")
    module = nn.GRU(D, D, bidirectional=True, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        for inner, suffix in ((m.forward_mixer, "_l0"), (m.backward_mixer, "_l0_reverse")):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(module, kind + suffix).copy_(getattr(inner, kind)[0].reshape(getattr(module, kind + suffix).shape))
    x = randn(3, 13, D, seed=3)
    h0 = 0.5 * randn(2, 3, D, seed=4)  # torch's h_0: [directions, batch, hidden]
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    state = State(forward=State(h=h0[0][:, None]), backward=State(h=h0[1][:, None]))
    y, s = m(x1, state)
    y_t, h_n = module(x2, h0)
    y_t = m.out_proj(y_t)
    torch.testing.assert_close(y, y_t, **TOL)
    torch.testing.assert_close(s["forward"]["h"][:, 0], h_n[0], **TOL)
    torch.testing.assert_close(s["backward"]["h"][:, 0], h_n[1], **TOL)
    w = randn(*y.shape, seed=5)
    g1, = torch.autograd.grad((y * w).sum(), x1)
    g2, = torch.autograd.grad((y_t * w).sum(), x2)
    torch.testing.assert_close(g1, g2, **TOL)


@pytest.mark.parametrize("mixer", ["gla", "gru"])
def test_reversing_the_input_and_swapping_the_directions_reverses_the_output(mixer):
    m = make(mixer)
    swapped = copy.deepcopy(m)
    swapped.forward_mixer.load_state_dict(m.backward_mixer.state_dict())
    swapped.backward_mixer.load_state_dict(m.forward_mixer.state_dict())
    with torch.no_grad():
        swapped.out_proj.weight.copy_(torch.cat(m.out_proj.weight.chunk(2, dim=1)[::-1], dim=1))
    x = randn(2, 19, D, seed=6)
    torch.testing.assert_close(swapped(x.flip(1))[0].flip(1), m(x)[0], **TOL)


def test_directions_have_their_own_parameters_and_share_the_config():
    m = make("gla", n_heads=2, chunk_size=16)
    f, b = m.forward_mixer, m.backward_mixer
    assert f is not b and f.n_heads == b.n_heads == 2 and f.chunk_size == b.chunk_size == 16
    assert not torch.equal(f.q_proj.weight, b.q_proj.weight), "two independent mixers, two inits"
    assert m.out_proj.in_features == 2 * D and m.out_proj.out_features == D
    n_params = sum(p.numel() for p in m.parameters())
    assert n_params == 2 * sum(p.numel() for p in f.parameters()) + 2 * D * D + D


@pytest.mark.parametrize("mixer", ["gla", "gru", "swa", "mamba"])
def test_modes_are_the_inner_mixers_and_mode_sets_both(mixer):
    m = make(mixer)
    inner_modes = recur.model_info(mixer).cls.modes
    assert m.modes == inner_modes and m.mode == inner_modes[0]
    for mode in reversed(inner_modes):
        m.mode = mode
        assert m.forward_mixer.mode == m.backward_mixer.mode == mode
    with pytest.raises(ValueError, match="modes"):
        m.mode = "conv" if "conv" not in inner_modes else "nope"
    assert make(mixer, mode="recurrent").forward_mixer.mode == "recurrent"
    assert recur.model_info("bidirectional").cls.modes == recur.model_info("gla").cls.modes  # the default inner's


def test_chunk_size_and_window_pass_through_only_if_the_inner_has_them():
    gla, gru, swa = make("gla"), make("gru"), make("swa")
    assert hasattr(gla, "chunk_size") and not hasattr(gla, "window")
    gla.chunk_size = 8
    assert gla.forward_mixer.chunk_size == gla.backward_mixer.chunk_size == gla.chunk_size == 8
    assert not hasattr(gru, "chunk_size") and not hasattr(gru, "window")
    with pytest.raises(AttributeError, match="chunk_size"):
        gru.chunk_size = 8
    assert hasattr(swa, "window")
    swa.window = 6
    assert swa.forward_mixer.window == swa.backward_mixer.window == 6


def test_refuses_a_non_causal_inner_mixer_and_unknown_names():
    with pytest.raises(ValueError, match="must be causal"):
        recur.build("bidirectional", D, mixer="lstm", bidirectional=True)
    with pytest.raises(ValueError, match="cannot wrap itself"):
        recur.build("bidirectional", D, mixer="bidirectional")
    with pytest.raises(ValueError, match="'gla'"):
        recur.build("bidirectional", D, mixer="glaa")
    with pytest.raises(TypeError, match="registered model name"):
        recur.build("bidirectional", D, mixer=nn.GRU)
    assert recur.build("bidirectional", D).causal is False
    assert recur.model_info("bidirectional").family == "wrapper"


def test_growing_inner_states_are_checked_by_the_inner_mixer():
    """Attention's KV cache grows: a carried cache of any length is accepted, a wrong one is refused
    naming the direction; state_size grows with the tokens seen and stays honest."""
    m = make("swa")
    m.window = 6
    _, s = m(randn(2, 4, D, seed=7))
    _, s = m(randn(2, 3, D, seed=8), s)
    assert s.num_floats() == m.state_size(7) == 2 * m.forward_mixer.state_size(7)
    assert m.state_size(3) < m.state_size(7), "the windowed cache grows up to window - 1 tokens"
    bad = s.replace(backward=s["backward"].replace(k=s["backward"]["k"][:, :1]))
    with pytest.raises(ValueError, match="backward direction.*shape"):
        m(randn(2, 3, D), bad)
    with pytest.raises(TypeError, match="dtype"):
        m(randn(2, 3, D), s.to(torch.float32))
    with pytest.raises(ValueError, match=r"expected \['backward', 'forward'\]"):
        m(randn(2, 3, D), State(forward=s["forward"]))
    with pytest.raises(TypeError, match="must be a State"):
        m(randn(2, 3, D), State(forward=s["forward"], backward=torch.zeros(2)))


@pytest.mark.parametrize("mixer", ["gla", "gru", "lstm", "swa", "attention"])
def test_state_formula_is_twice_the_inner_formula(mixer):
    m = make(mixer)
    assert m.state_formula == f"2 * ({m.forward_mixer.state_formula})"
    for t in (0, 1, 37, 1000):
        assert evaluate_formula(m, t) == m.state_size(t) == 2 * m.forward_mixer.state_size(t)
