"""recur's LSTM and GRU are torch.nn.LSTM / torch.nn.GRU: same weights give the same outputs,
final states and gradients (float64 exactly up to summation order, float32 to float32 precision)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recur.layers.rnn import GRU, LSTM
from recur.state import State

D, B, T = 12, 3, 25
PAIRS = [(LSTM, nn.LSTM), (GRU, nn.GRU)]
# float64: only summation order differs (~1e-15). float32: torch.testing's float32 defaults.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1.3e-6, atol=1e-5)}


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def hx_tuple(hx):
    return hx if isinstance(hx, tuple) else (hx,)


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_states_and_gradients_match_torch(ours, theirs, dtype, with_state, batch_first):
    torch.manual_seed(0)
    module = theirs(D, D, batch_first=batch_first, dtype=dtype)
    layer = ours.from_torch(module)
    assert layer.weight_ih.dtype == dtype

    x = rand(B, T, D, dtype=dtype, seed=1)
    n_states = 2 if ours is LSTM else 1
    hx0 = tuple(0.5 * rand(1, B, D, dtype=dtype, seed=2 + i) for i in range(n_states)) if with_state else None

    # torch
    x_t = x.clone().requires_grad_(True)
    hx_t = tuple(h.clone().requires_grad_(True) for h in hx0) if with_state else None
    y_t, hn_t = module(x_t if batch_first else x_t.transpose(0, 1), (hx_t if n_states == 2 else hx_t[0]) if with_state else None)
    y_t = y_t if batch_first else y_t.transpose(0, 1)
    hn_t = hx_tuple(hn_t)

    # recur
    x_o = x.clone().requires_grad_(True)
    hx_o = tuple(h.clone().requires_grad_(True) for h in hx0) if with_state else None
    state = layer.state_from_torch(hx_o if n_states == 2 else hx_o[0]) if with_state else None
    y_o, s_o = layer(x_o, state)
    hn_o = hx_tuple(layer.state_to_torch(s_o))

    tol = TOL[dtype]
    torch.testing.assert_close(y_o, y_t, **tol, msg=lambda m: f"output: {m}")
    for name, a, b in zip(("h_n", "c_n"), hn_o, hn_t):
        assert a.shape == b.shape == (1, B, D)
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")

    w_y = rand(B, T, D, dtype=dtype, seed=10)
    w_h = [rand(1, B, D, dtype=dtype, seed=11 + i) for i in range(n_states)]

    def loss(y, hn):
        return (y * w_y).sum() + sum((h * w).sum() for h, w in zip(hn, w_h))

    params_t = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
    params_o = [layer.weight_ih, layer.weight_hh, layer.bias_ih, layer.bias_hh]
    inputs_t = [x_t, *(hx_t or ())]
    inputs_o = [x_o, *(hx_o or ())]
    g_t = torch.autograd.grad(loss(y_t, hn_t), inputs_t + params_t)
    g_o = torch.autograd.grad(loss(y_o, hn_o), inputs_o + params_o)
    names = ["x", *[f"hx[{i}]" for i in range(len(inputs_t) - 1)], "weight_ih", "weight_hh", "bias_ih", "bias_hh"]
    for name, a, b in zip(names, g_o, g_t):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_module_without_bias_loads_zero_biases(ours, theirs):
    torch.manual_seed(0)
    module = theirs(D, D, bias=False, batch_first=True, dtype=torch.float64)
    layer = ours.from_torch(module)
    assert torch.count_nonzero(layer.bias_ih) == 0 and torch.count_nonzero(layer.bias_hh) == 0
    x = rand(2, 9, D, dtype=torch.float64, seed=3)
    torch.testing.assert_close(layer(x)[0], module(x)[0], **TOL[torch.float64])


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_from_torch_rejects_what_one_layer_cannot_represent(ours, theirs):
    with pytest.raises(ValueError, match="num_layers=2"):
        ours.from_torch(theirs(D, D, num_layers=2))
    with pytest.raises(ValueError, match="bidirectional"):
        ours.from_torch(theirs(D, D, bidirectional=True))
    with pytest.raises(ValueError, match="input_size == hidden_size"):
        ours.from_torch(theirs(D + 1, D))
    other = nn.GRU if theirs is nn.LSTM else nn.LSTM
    with pytest.raises(TypeError, match=f"torch.nn.{theirs.__name__}"):
        ours.from_torch(other(D, D))
    with pytest.raises(TypeError, match=f"torch.nn.{theirs.__name__}"):
        ours.from_torch(nn.Linear(D, D))


def test_lstm_from_torch_rejects_projections():
    with pytest.raises(ValueError, match="proj_size"):
        LSTM.from_torch(nn.LSTM(D, D, proj_size=4))


@pytest.mark.parametrize("ours", [LSTM, GRU])
def test_state_conversion_round_trips_and_checks_shapes(ours):
    layer = ours(D)
    _, state = layer(rand(4, 5, D, dtype=torch.float32, seed=4))
    hx = layer.state_to_torch(state)
    for h in hx_tuple(hx):
        assert h.shape == (1, 4, D)
    back = layer.state_from_torch(hx)
    assert isinstance(back, State) and list(back) == list(state)
    for key in state:
        assert torch.equal(back[key], state[key])
    with pytest.raises(ValueError, match=rf"\[1, batch, {D}\]"):
        layer.state_from_torch(tuple(torch.zeros(2, 4, D) for _ in hx_tuple(hx)) if ours is LSTM else torch.zeros(2, 4, D))
    with pytest.raises(ValueError, match="entries"):
        layer.state_from_torch((torch.zeros(1, 4, D),) * 3)


def test_lstm_forget_gate_bias_starts_at_forget_bias():
    torch.manual_seed(0)
    forget = slice(D, 2 * D)
    layer = LSTM(D)
    assert torch.all(layer.bias_ih[forget] + layer.bias_hh[forget] == 1.0)
    layer = LSTM(D, forget_bias=2.5)
    assert torch.all(layer.bias_ih[forget] + layer.bias_hh[forget] == 2.5)
    others = torch.cat([layer.bias_ih[:D], layer.bias_ih[2 * D :]])
    assert others.abs().max() <= 1 / math.sqrt(D) and others.abs().max() > 0


@pytest.mark.parametrize("ours,options", [(LSTM, {"forget_bias": None}), (GRU, {})])
def test_default_init_is_torchs_uniform(ours, options):
    torch.manual_seed(0)
    layer = ours(64, **options)
    bound = 1 / math.sqrt(64)
    for name, p in layer.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.9 * bound, f"{name} does not span the init range"
