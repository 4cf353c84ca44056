"""block_recurrent: the gates' equations, tokens reading the old state, information carried across
windows only by the state, other configurations' modes and carry, options and errors, and MQAR
from the command line. The registry-driven suites (tests/conformance) test the example itself."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recur.cli import main
from recur.models.block_recurrent import BlockRecurrentLayer, BlockRecurrentTransformer
from recur.state import State

V, D = 11, 16
TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64: modes and hand computations differ by summation order only


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tokens(t, b=2, seed=1):
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def _layer(**options):
    torch.manual_seed(0)
    return BlockRecurrentLayer(D, **{"window": 4, "n_states": 3, **options}).double()


def _rms(x, weight):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps) * weight


def _gate(gate, s, y, h):
    if gate.kind == "fixed":
        g = torch.sigmoid(gate.bias)
        return s * g + y * (1 - g)
    f = torch.sigmoid(h @ gate.forget.weight.T + gate.forget.bias + 1)
    i = torch.sigmoid(h @ gate.input.weight.T + gate.input.bias - 1)
    return s * f + y * i


def _state_after_one_window(m, S, h):
    """The update written out head by head: S [B, N, d] and one window's layer input h [B, W, d]."""
    H, dh, inner = m.n_heads, m.head_dim, m.n_heads * m.head_dim
    wq, wk, wv, wq2 = m.state_proj.weight.split(inner, dim=0)
    z = _rms(S, m.state_norm.weight) + m.state_positions
    keys, values = h @ m.k_proj.weight.T, h @ m.v_proj.weight.T  # the tokens' own keys, unrotated
    heads_self, heads_cross = [], []
    for j in range(H):
        c = slice(j * dh, (j + 1) * dh)
        rq, rk, rv, rq2 = z @ wq[c].T, z @ wk[c].T, z @ wv[c].T, z @ wq2[c].T
        heads_self.append(torch.softmax(rq @ rk.transpose(1, 2) / math.sqrt(dh), -1) @ rv)
        heads_cross.append(torch.softmax(rq2 @ keys[..., c].transpose(1, 2) / math.sqrt(dh), -1) @ values[..., c])
    a = torch.cat(heads_self + heads_cross, dim=-1)  # [B, N, 2 * inner]: self heads, then cross heads
    S = _gate(m.gate, S, a @ m.state_out.weight.T, a)
    if m.state_ffn:
        u = torch.relu(_rms(S, m.ffn_norm.weight) @ m.ffn_in.weight.T)
        S = _gate(m.ffn_gate, S, u @ m.ffn_out.weight.T, u)
    return S


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
@pytest.mark.parametrize("gate,state_ffn", [("fixed", False), ("lstm", False), ("lstm", True)])
def test_gate_equations_match_a_hand_computation_for_one_window(gate, state_ffn, mode):
    m = _layer(gate=gate, state_ffn=state_ffn, mode=mode)
    h = _randn(2, 4, D, seed=2)
    S0 = m.init_state(2)["S"]
    assert torch.equal(S0, m.initial_state.expand(2, -1, -1))
    _, part = m(h[:, :3])
    torch.testing.assert_close(part["S"], S0, rtol=0, atol=0)  # no update before the window ends
    _, after = m(h)
    torch.testing.assert_close(after["S"], _state_after_one_window(m, S0, h), **TIGHT)
    _, two = m(torch.cat([h, h.flip(1)], dim=1))  # the second window starts from the first's state
    torch.testing.assert_close(two["S"], _state_after_one_window(m, after["S"], h.flip(1)), **TIGHT)


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_tokens_read_the_state_from_before_their_window(mode):
    """With the self-attention half of the output projection zeroed, token t's output is its read of
    the state: changing every other token of its window changes nothing, changing the previous
    window changes it, and the state after the window does see the change."""
    m = _layer(mode=mode)
    W, inner = m.window, m.n_heads * m.head_dim
    with torch.no_grad():
        m.o_proj.weight[:, :inner] = 0
    x = _randn(2, 3 * W, D, seed=3)
    y, s = m(x)
    for t in range(W, 2 * W):  # window 1
        other = x.clone()
        others = [j for j in range(W, 2 * W) if j != t]
        other[:, others] = _randn(2, W - 1, D, seed=4 + t)
        y2, s2 = m(other[:, :2 * W])
        torch.testing.assert_close(y2[:, t], y[:, t], rtol=0, atol=0)
        assert (s2["S"] - s["S"]).abs().max() > 1e-6  # the update read the whole window
        earlier = x.clone()
        earlier[:, W - 1] += 1.0
        assert (m(earlier)[0][:, t] - y[:, t]).abs().min() > 1e-8  # window 0 reaches window 1 through S


def _late_gradient(model, late, early):
    e = model.embed(_tokens(4 * model.window)).detach().requires_grad_(True)
    h, _ = model.backbone(e)
    (g,) = torch.autograd.grad(model.head(model.norm(h))[:, late].sum(), e)
    return g[:, early].abs().max().item(), g[:, late - model.window].abs().max().item()


@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_information_crosses_windows_only_through_the_state(mode):
    """Two layers of attention over itself and W earlier tokens reach 2W back; a token three windows
    later still depends on an early token, through the state, and not at all when the layer's read
    of the state is zeroed."""
    torch.manual_seed(0)
    model = BlockRecurrentTransformer.example(V, D).double()
    model.set_mode(mode)
    W = model.window  # 5: token 1 is in window 0, token 17 in window 3
    far, near = _late_gradient(model, late=17, early=1)
    assert far > 1e-8 and near > 1e-8
    (layer,) = model.recurrent
    with torch.no_grad():
        layer.o_proj.weight[:, layer.n_heads * layer.head_dim:] = 0
    far, near = _late_gradient(model, late=17, early=1)
    assert far == 0.0 and near > 1e-8 and 17 - 1 > 2 * W


CONFIGS = {
    "fixed gate, dual (state FFN)": dict(gate="fixed", state_ffn=True),
    "recurrent layers 0 and -1 of 3": dict(n_layers=3, recurrent_layers=[0, -1]),
    "gla plain layers, layernorm, no mlp": dict(pattern="gla", norm="layernorm", mlp=None, recurrent_layers=0),
    "4 heads, one window longer than the call": dict(window=7, n_states=3, n_heads=4, head_dim=4),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_other_configurations_hold_modes_carry_and_stepping(config):
    torch.manual_seed(0)
    options = {"n_layers": 2, "window": 3, "n_states": 2, **CONFIGS[config]}
    fast = BlockRecurrentTransformer(V, D, **options).double()
    for m in fast.mixers:
        if hasattr(m, "chunk_size"):
            m.chunk_size = 8
    ref = BlockRecurrentTransformer(V, D, **options).double()
    ref.load_state_dict(fast.state_dict())
    for m in ref.mixers:
        if hasattr(m, "chunk_size"):
            m.chunk_size = 8
    ref.set_mode("recurrent")
    x = _tokens(17)
    a, b = fast(x), ref(x)
    torch.testing.assert_close(a.logits, b.logits, **TIGHT)
    g = _randn(*a.logits.shape, seed=5)
    (a.logits * g).sum().backward()
    (b.logits * g).sum().backward()
    for (n, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, q.grad, **TIGHT, msg=lambda s: f"{n}: {s}")
    with torch.no_grad():
        for model in (fast, ref):
            first = model(x[:, :8])
            torch.testing.assert_close(torch.cat([first.logits, model(x[:, 8:], first.state).logits], 1), a.logits,
                                       **TIGHT)
            state, steps = None, []
            for t in range(10):
                out = model(x[:, t:t + 1], state)
                steps.append(out.logits)
                state = out.state
            torch.testing.assert_close(torch.cat(steps, 1), a.logits[:, :10], **TIGHT)


def test_the_state_is_the_vectors_and_the_last_window_and_stays_flat():
    torch.manual_seed(0)
    model = BlockRecurrentTransformer(V, D, n_layers=2, window=5, n_states=2)
    (layer,) = model.recurrent
    state = model(_tokens(23)).state["layer1"]
    assert set(state) == {"pos", "start", "k", "v", "S"}
    assert state["S"].shape == (2, 2, D) and state["k"].shape == (2, layer.n_heads, 5, layer.head_dim)
    assert model.backbone.mixers[0].window == 6  # the swa layers: themselves and the W before
    assert model.state_size(20) == model.state_size(20 * 64) == model(_tokens(40)).state.num_floats()
    given = BlockRecurrentTransformer(V, D, n_layers=2, window=5, mixer_config={"swa": {"window": 3}})
    assert given.backbone.mixers[0].window == 3


@pytest.mark.parametrize("options,phrase", [
    (dict(gate="gru"), "gate must be one of fixed, lstm"),
    (dict(recurrent_layers=2), "recurrent_layers must be"),
    (dict(recurrent_layers=[0, -2]), "distinct"),
    (dict(window=0), "window must be a positive int"),
    (dict(n_states=1.5), "n_states must be a positive int"),
    (dict(state_ffn="yes"), "state_ffn must be true or false"),
])
def test_bad_options_are_named(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        BlockRecurrentTransformer(V, D, n_layers=2, **options)


def test_a_wrong_state_names_the_recurrent_layer():
    model = BlockRecurrentTransformer(V, D, n_layers=2, window=5, n_states=2)
    state = model.init_state(2)
    bad = State({**state, "layer1": state["layer1"].replace(S=torch.zeros(2, 3, D))})
    with pytest.raises(ValueError, match=r"block_recurrent: state entry 'S' must have shape \(2, 2, 16\)"):
        model(_tokens(4), bad)


def test_mqar_trains_from_the_cli(db, capsys):
    argv = ["run", "--task", "mqar", "--arch", "block_recurrent", "--model", "swa", "--task-arg", "vocab_size=32",
            "--task-arg", "num_kv_pairs=4", "--d-model", "16", "--n-layers", "2", "--seq-len", "32", "--steps", "4",
            "--batch-size", "8", "--eval-lengths", "32,64", "--eval-batches", "1", "--device", "cpu",
            "--set", "model.args.window=8", "--set", "model.args.n_states=4", "--set", "model.args.gate=lstm",
            "--db", str(db), "--json", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["model"].startswith("block_recurrent:") and obj["steps"] == 4 and set(obj["metrics"]) == {"32", "64"}
    assert all(0 <= m["accuracy"] <= 1 for m in obj["metrics"].values())


def test_evaluation_runs_in_pieces_of_windows_and_equals_one_call():
    """Without autograd a long call runs in pieces of ``eval_windows`` windows (flat memory); the
    logits, the picked positions' rows and the final state equal one call with autograd, packed
    documents included, and a piece may end mid-window of a state that began mid-window."""
    torch.manual_seed(0)
    lm = BlockRecurrentTransformer(V, D, n_layers=2, window=4, n_states=2, gate="lstm").double()
    lm.eval_windows = 2  # pieces of 8 tokens
    x = _tokens(37, b=3)
    resets = torch.zeros(3, 37, dtype=torch.bool)
    resets[1, 13] = resets[2, 30] = True
    picked = torch.rand(3, 37, generator=torch.Generator().manual_seed(2)) < 0.3
    start = lm(_tokens(3, b=3, seed=4)).state  # begin mid-window
    for kwargs in ({}, {"resets": resets}, {"positions": picked}, {"resets": resets, "positions": picked}):
        whole = lm(x, start, **kwargs)  # autograd on: one call
        with torch.no_grad():
            pieces = lm(x, start, **kwargs)
        torch.testing.assert_close(pieces.logits, whole.logits.detach(), **TIGHT)
        _same_state(pieces.state, whole.state)
        torch.testing.assert_close(lm(x[:, :1], pieces.state).logits, lm(x[:, :1], whole.state).logits, **TIGHT)
        if "positions" in kwargs:
            assert pieces.positions is picked and pieces.logits.shape[0] == int(picked.sum())


def _same_state(a, b):
    assert set(a) == set(b)
    for key in b:
        if isinstance(b[key], State):
            _same_state(a[key], b[key])
        else:
            torch.testing.assert_close(a[key], b[key].detach(), **TIGHT)
