"""recur's LSTM and GRU are torch.nn.LSTM / torch.nn.GRU: same weights give the same outputs,
final states and gradients (float64 exactly up to summation order, float32 to float32 precision),
for one or several layers, one or two directions. Head-wise layers (n_heads > 1) are the torch
module whose W_hh is the block-diagonal matrix of their blocks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recur.layers.rnn import GRU, LSTM
from recur.state import State

D, B, T = 12, 3, 25
PAIRS = [(LSTM, nn.LSTM), (GRU, nn.GRU)]
# (num_layers, bidirectional)
STACKS = [(1, False), (2, False), (1, True), (2, True)]
# float64: only summation order differs (~1e-15). float32: torch.testing's float32 defaults.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1.3e-6, atol=1e-5)}


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def hx_tuple(hx):
    return hx if isinstance(hx, tuple) else (hx,)


def torch_module(theirs, num_layers, bidirectional, dtype=torch.float64, **kw):
    """The torch module with input and output width D (hidden D // 2 per direction if bidirectional)."""
    return theirs(D, D // 2 if bidirectional else D, num_layers=num_layers, bidirectional=bidirectional, dtype=dtype, **kw)


def torch_params(module):
    """torch's parameters in recur's entry order k = layer * num_directions + direction, per kind."""
    dirs = 2 if module.bidirectional else 1
    suffixes = [f"_l{i}" + ("_reverse" if r else "") for i in range(module.num_layers) for r in range(dirs)]
    return {kind: [getattr(module, kind + s) for s in suffixes] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}


def block_diagonal(blocks: torch.Tensor, gates: int) -> torch.Tensor:
    """The dense torch W_hh [gates*hidden, hidden] of head-wise blocks [heads, gates*head_dim, head_dim]."""
    heads, _, hd = blocks.shape
    dense = blocks.new_zeros(gates, heads, hd, heads, hd)
    for j in range(heads):
        dense[:, j, :, j, :] = blocks[j].reshape(gates, hd, hd)
    return dense.reshape(gates * heads * hd, heads * hd)


def diagonal_blocks(dense: torch.Tensor, gates: int, heads: int) -> torch.Tensor:
    """The inverse view: the diagonal blocks [heads, gates*head_dim, head_dim] of a dense W_hh."""
    hd = dense.shape[1] // heads
    dense = dense.reshape(gates, heads, hd, heads, hd)
    return torch.stack([dense[:, j, :, j, :].reshape(gates * hd, hd) for j in range(heads)])


def run_both(layer, module, x, hx0, batch_first=True):
    """Outputs, final states (torch layout) and gradients (x, hx, every parameter) of both under one
    loss; torch's W_hh gradients are given as their diagonal blocks (all of it when n_heads = 1)."""
    dtype, n_states = x.dtype, len(layer.state_keys)
    # torch
    x_t = x.clone().requires_grad_(True)
    hx_t = tuple(h.clone().requires_grad_(True) for h in hx0) if hx0 is not None else None
    y_t, hn_t = module(x_t if batch_first else x_t.transpose(0, 1), (hx_t if n_states == 2 else hx_t[0]) if hx0 is not None else None)
    y_t = y_t if batch_first else y_t.transpose(0, 1)
    hn_t = hx_tuple(hn_t)
    # recur
    x_o = x.clone().requires_grad_(True)
    hx_o = tuple(h.clone().requires_grad_(True) for h in hx0) if hx0 is not None else None
    state = layer.state_from_torch(hx_o if n_states == 2 else hx_o[0]) if hx0 is not None else None
    y_o, s_o = layer(x_o, state)
    hn_o = hx_tuple(layer.state_to_torch(s_o))

    w_y = rand(*y_t.shape, dtype=dtype, seed=10)
    w_h = [rand(*h.shape, dtype=dtype, seed=11 + i) for i, h in enumerate(hn_t)]

    def loss(y, hn):
        return (y * w_y).sum() + sum((h * w).sum() for h, w in zip(hn, w_h))

    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    theirs = torch_params(module)
    params_t = [p for kind in kinds for p in theirs[kind]]
    inputs_t = [x_t, *(hx_t or ())]
    inputs_o = [x_o, *(hx_o or ())]
    g_t = torch.autograd.grad(loss(y_t, hn_t), inputs_t + params_t)
    g_o = torch.autograd.grad(loss(y_o, hn_o), inputs_o + [getattr(layer, kind) for kind in kinds])
    n_in, n = len(inputs_t), len(theirs["weight_ih"])
    grads_t = dict(zip(["x", *[f"hx[{i}]" for i in range(n_in - 1)]], g_t[:n_in]))
    grads_o = dict(zip(grads_t, g_o[:n_in]))
    for j, kind in enumerate(kinds):
        for k in range(n):
            theirs_k = g_t[n_in + j * n + k]
            if kind == "weight_hh":
                theirs_k = diagonal_blocks(theirs_k, layer.gates, layer.n_heads)
            grads_t[f"{kind}[{k}]"], grads_o[f"{kind}[{k}]"] = theirs_k, g_o[n_in + j][k]
    return (y_o, hn_o, grads_o), (y_t, hn_t, grads_t)


def assert_same(ours, theirs, tol):
    (y_o, hn_o, g_o), (y_t, hn_t, g_t) = ours, theirs
    torch.testing.assert_close(y_o, y_t, **tol, msg=lambda m: f"output: {m}")
    for name, a, b in zip(("h_n", "c_n"), hn_o, hn_t):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    assert g_o.keys() == g_t.keys()
    for name in g_t:
        torch.testing.assert_close(g_o[name], g_t[name], **tol, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("num_layers,bidirectional", STACKS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_outputs_states_and_gradients_match_torch(ours, theirs, num_layers, bidirectional, dtype, with_state, batch_first):
    torch.manual_seed(0)
    module = torch_module(theirs, num_layers, bidirectional, dtype=dtype, batch_first=batch_first)
    layer = ours.from_torch(module)
    assert layer.weight_ih.dtype == dtype
    assert (layer.num_layers, layer.bidirectional, layer.d_model) == (num_layers, bidirectional, D)
    assert layer.causal is not bidirectional

    x = rand(B, T, D, dtype=dtype, seed=1)
    n = num_layers * (2 if bidirectional else 1)
    hidden = D // 2 if bidirectional else D
    hx0 = tuple(0.5 * rand(n, B, hidden, dtype=dtype, seed=2 + i) for i in range(len(layer.state_keys))) if with_state else None
    ours_out, theirs_out = run_both(layer, module, x, hx0, batch_first)
    assert ours_out[1][0].shape == (n, B, hidden)
    assert_same(ours_out, theirs_out, TOL[dtype])


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("num_layers,bidirectional", STACKS)
@pytest.mark.parametrize("n_heads", [2, 3])
def test_headwise_is_torch_with_a_block_diagonal_recurrent_matrix(ours, theirs, num_layers, bidirectional, n_heads):
    """A head-wise layer equals the torch module whose W_hh is the block-diagonal expansion of its
    blocks: outputs, final states and gradients (the blocks' gradients are the diagonal blocks of
    torch's dense W_hh gradient)."""
    torch.manual_seed(0)
    layer = ours(D, num_layers=num_layers, bidirectional=bidirectional, n_heads=n_heads).double()
    n, hd = num_layers * layer.num_directions, layer.head_dim
    assert layer.weight_hh.shape == (n, n_heads, ours.gates * hd, hd)  # only the blocks are stored
    module = torch_module(theirs, num_layers, bidirectional, batch_first=True)
    theirs_p = torch_params(module)
    with torch.no_grad():
        for k in range(n):
            theirs_p["weight_ih"][k].copy_(layer.weight_ih[k])
            theirs_p["weight_hh"][k].copy_(block_diagonal(layer.weight_hh[k], ours.gates))
            theirs_p["bias_ih"][k].copy_(layer.bias_ih[k])
            theirs_p["bias_hh"][k].copy_(layer.bias_hh[k])
    hx0 = tuple(0.5 * rand(n, B, layer.hidden_size, dtype=torch.float64, seed=2 + i) for i in range(len(layer.state_keys)))
    assert_same(*run_both(layer, module, rand(B, T, D, dtype=torch.float64, seed=1), hx0), TOL[torch.float64])


@pytest.mark.parametrize("ours", [LSTM, GRU])
@pytest.mark.parametrize("num_layers,bidirectional", STACKS)
def test_one_head_is_the_dense_layer(ours, num_layers, bidirectional):
    torch.manual_seed(0)
    dense = ours(D, num_layers=num_layers, bidirectional=bidirectional).double()
    torch.manual_seed(0)
    one = ours(D, num_layers=num_layers, bidirectional=bidirectional, n_heads=1).double()
    assert one.n_heads == dense.n_heads == 1
    for (name, a), (_, b) in zip(dense.named_parameters(), one.named_parameters()):
        assert torch.equal(a, b), name
    x = rand(B, T, D, dtype=torch.float64, seed=1)
    (y1, s1), (y2, s2) = dense(x), one(x)
    assert torch.equal(y1, y2) and all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("ours", [LSTM, GRU])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_headwise_gates_read_only_their_own_head(ours, bidirectional):
    """Perturbing head j's hidden state at step t changes head j's units at t + 1 and leaves every
    other head's unchanged, exactly (one layer; each direction). A dense layer mixes all heads."""
    heads, t = 3, 7
    x = rand(2, 12, D, dtype=torch.float64, seed=5)

    def next_step_after_perturbing(layer, j, key="h"):
        _, s = layer(x[:, :t])
        per_head = s[key].unflatten(-1, (heads, -1)).clone()
        per_head[..., j, :] += 0.3
        y_pert, s_pert = layer(x[:, t : t + 1], s.replace(**{key: per_head.flatten(-2)}))
        y, _ = layer(x[:, t : t + 1], s)
        return y.unflatten(-1, (layer.num_directions, heads, -1)), y_pert.unflatten(-1, (layer.num_directions, heads, -1))

    torch.manual_seed(0)
    layer = ours(D, n_heads=heads, bidirectional=bidirectional).double()
    for j in range(heads):
        y, y_pert = next_step_after_perturbing(layer, j)
        for i in range(heads):
            same = torch.equal(y[..., i, :], y_pert[..., i, :])
            assert same is (i != j), f"head {i} after perturbing head {j}: {'unchanged' if same else 'changed'}"
    torch.manual_seed(0)
    dense = ours(D, bidirectional=bidirectional).double()
    y, y_pert = next_step_after_perturbing(dense, 0)
    assert not torch.equal(y[..., 1:, :], y_pert[..., 1:, :]), "a dense W_hh must mix the units"


@pytest.mark.parametrize("ours", [LSTM, GRU])
@pytest.mark.parametrize("options", [dict(num_layers=3), dict(num_layers=2, n_heads=4), dict(n_heads=2)])
def test_stacked_and_headwise_state_carry_is_exact(ours, options):
    """The causal options (stacked layers, heads) keep the state contract: a split or token-by-token
    run equals one call, outputs and final states."""
    torch.manual_seed(0)
    layer = ours(D, **options).double()
    x = rand(2, 17, D, dtype=torch.float64, seed=6)
    y, s = layer(x)
    assert s["h"].shape == (2, layer.num_layers, D)
    for t in (1, 9):
        y1, s1 = layer(x[:, :t])
        y2, s2 = layer(x[:, t:], s1)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y, **TOL[torch.float64])
        for k in s:
            torch.testing.assert_close(s2[k], s[k], **TOL[torch.float64])
    state, ys = None, []
    for t in range(x.shape[1]):
        yt, state = layer(x[:, t : t + 1], state)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, **TOL[torch.float64])
    assert layer.state_size(5) == len(layer.state_keys) * layer.num_layers * D


@pytest.mark.parametrize("ours", [LSTM, GRU])
def test_bidirectional_layer_reads_the_future_and_is_not_causal(ours):
    assert ours.causal is True and ours(D).causal is True
    layer = ours(D, bidirectional=True).double()
    assert layer.causal is False
    x = rand(2, 9, D, dtype=torch.float64, seed=7)
    y, s = layer(x)
    x2 = x.clone()
    x2[:, -1] += 1.0
    y2, _ = layer(x2)
    assert not torch.allclose(y2[:, 0], y[:, 0]), "the backward direction must carry the last token to the first"
    assert torch.equal(y2[:, 0, : D // 2], y[:, 0, : D // 2]), "the forward half is causal"
    assert s["h"].shape == (2, 2, D // 2) and layer.state_size(9) == len(layer.state_keys) * D


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_module_without_bias_loads_zero_biases(ours, theirs):
    torch.manual_seed(0)
    module = theirs(D, D // 2, bias=False, batch_first=True, bidirectional=True, num_layers=2, dtype=torch.float64)
    layer = ours.from_torch(module)
    assert torch.count_nonzero(layer.bias_ih) == 0 and torch.count_nonzero(layer.bias_hh) == 0
    x = rand(2, 9, D, dtype=torch.float64, seed=3)
    torch.testing.assert_close(layer(x)[0], module(x)[0], **TOL[torch.float64])


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_from_torch_rejects_what_the_layer_cannot_represent(ours, theirs):
    with pytest.raises(ValueError, match="input_size == hidden_size \\* num_directions"):
        ours.from_torch(theirs(D + 1, D))
    with pytest.raises(ValueError, match="input_size == hidden_size \\* num_directions"):
        ours.from_torch(theirs(D, D, bidirectional=True))  # concatenated output 2D wide, input D
    with pytest.raises(ValueError, match="head-wise"):
        ours.from_torch(theirs(D, D), n_heads=2)
    with pytest.raises(TypeError, match="from the module"):
        ours.from_torch(theirs(D, D), num_layers=2)
    other = nn.GRU if theirs is nn.LSTM else nn.LSTM
    with pytest.raises(TypeError, match=f"torch.nn.{theirs.__name__}"):
        ours.from_torch(other(D, D))
    with pytest.raises(TypeError, match=f"torch.nn.{theirs.__name__}"):
        ours.from_torch(nn.Linear(D, D))
    assert ours.from_torch(theirs(D, D), n_heads=None, mode="recurrent").n_heads == 1


def test_lstm_from_torch_rejects_projections():
    with pytest.raises(ValueError, match="proj_size"):
        LSTM.from_torch(nn.LSTM(D, D, proj_size=4))


@pytest.mark.parametrize("ours", [LSTM, GRU])
def test_bad_options_raise_clear_errors(ours):
    with pytest.raises(ValueError, match="d_model must be even"):
        ours(D + 1, bidirectional=True)
    with pytest.raises(ValueError, match="n_heads"):
        ours(D, n_heads=5)  # does not divide 12
    with pytest.raises(ValueError, match="n_heads"):
        ours(D, bidirectional=True, n_heads=4)  # does not divide the 6 units of a direction
    with pytest.raises(ValueError, match="n_heads"):
        ours(D, n_heads=0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_layers"):
            ours(D, num_layers=bad)
    with pytest.raises(ValueError, match="bidirectional"):
        ours(D, bidirectional="yes")
    layer = ours(D, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match=r"must have shape \(3, 4, 6\)"):
        layer(torch.randn(3, 5, D), State({k: torch.zeros(3, 2, 6) for k in layer.state_keys}))


@pytest.mark.parametrize("ours", [LSTM, GRU])
@pytest.mark.parametrize("num_layers,bidirectional", STACKS)
def test_state_conversion_round_trips_and_checks_shapes(ours, num_layers, bidirectional):
    layer = ours(D, num_layers=num_layers, bidirectional=bidirectional)
    n, hidden = num_layers * layer.num_directions, layer.hidden_size
    _, state = layer(rand(4, 5, D, dtype=torch.float32, seed=4))
    for k in state:
        assert state[k].shape == (4, n, hidden)
    hx = layer.state_to_torch(state)
    for h in hx_tuple(hx):
        assert h.shape == (n, 4, hidden)
    back = layer.state_from_torch(hx)
    assert isinstance(back, State) and list(back) == list(state)
    for key in state:
        assert torch.equal(back[key], state[key])
    wrong = tuple(torch.zeros(n + 1, 4, hidden) for _ in hx_tuple(hx))
    with pytest.raises(ValueError, match=rf"\[num_layers \* num_directions={n}, batch, hidden={hidden}\]"):
        layer.state_from_torch(wrong if ours is LSTM else wrong[0])
    with pytest.raises(ValueError, match="entries"):
        layer.state_from_torch((torch.zeros(n, 4, hidden),) * 3)


@pytest.mark.parametrize("options", [{}, dict(num_layers=2, bidirectional=True, n_heads=3)])
def test_lstm_forget_gate_bias_starts_at_forget_bias(options):
    torch.manual_seed(0)
    layer = LSTM(D, **options)
    H = layer.hidden_size
    forget = slice(H, 2 * H)
    assert torch.all(layer.bias_ih[:, forget] + layer.bias_hh[:, forget] == 1.0)  # every layer and direction
    layer = LSTM(D, forget_bias=2.5, **options)
    assert torch.all(layer.bias_ih[:, forget] + layer.bias_hh[:, forget] == 2.5)
    others = torch.cat([layer.bias_ih[:, :H], layer.bias_ih[:, 2 * H :]], dim=1)
    assert others.abs().max() <= 1 / math.sqrt(H) and others.abs().max() > 0


@pytest.mark.parametrize("ours,options", [(LSTM, {"forget_bias": None}), (GRU, {})])
@pytest.mark.parametrize("stack", [{}, dict(num_layers=2, bidirectional=True), dict(n_heads=4)])
def test_default_init_is_torchs_uniform(ours, options, stack):
    """torch's uniform(+-1/sqrt(hidden)); recurrent blocks uniform(+-1/sqrt(head_dim)) (torch's rule
    for an RNN of head_dim units, equal to torch's init when dense)."""
    torch.manual_seed(0)
    layer = ours(64, **options, **stack)
    for name, p in layer.named_parameters():
        bound = 1 / math.sqrt(layer.head_dim if name == "weight_hh" else layer.hidden_size)
        assert p.abs().max() <= bound, name
        assert p.abs().max() > 0.9 * bound, f"{name} does not span the init range"
