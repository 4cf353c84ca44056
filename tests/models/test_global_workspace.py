"""global_workspace: the hand-designed Increment adds exactly one to a one-hot digit; the modules
chained as the paper's solution (Input, then Increment b times, then Output) compute a + b; the
gates sum to one (the straight-through gate is one-hot forward with the softmax's gradient); the
controller's step loop equals a hand-unrolled LSTM reference in float64; the workspace stays a
distribution; the loss reaches the controller; bad options fail clearly."""

from __future__ import annotations

import pytest
import torch

from recur import ARCHITECTURES
from recur.models.global_workspace import GlobalWorkspace, gate_weights, increment_matrix

V, D = 13, 8


def model(seed: int = 0, **kw) -> GlobalWorkspace:
    torch.manual_seed(seed)
    kw = {"vocab_size": V, "d_model": D, "n_layers": 1, "pattern": "gla", "max_steps": 4, **kw}
    return GlobalWorkspace(**kw).double()


def test_registered_as_depth_recurrent():
    entry = ARCHITECTURES.describe("global_workspace")
    assert entry["family"] == "depth-recurrent" and "Global Workspace" in entry["paper"]


@pytest.mark.parametrize("v", range(V - 1))
def test_the_fixed_increment_adds_one_to_every_one_hot_digit(v):
    m = model()
    e = torch.nn.functional.one_hot(torch.tensor(v), V).double()
    assert torch.equal(m.increment_module(e), torch.nn.functional.one_hot(torch.tensor(v + 1), V).double())


def test_the_fixed_increment_wraps_at_the_top_slot_and_moves_a_distributions_mass():
    S = increment_matrix(V, dtype=torch.float64)
    top = torch.nn.functional.one_hot(torch.tensor(V - 1), V).double()
    assert torch.equal(top @ S, torch.nn.functional.one_hot(torch.tensor(0), V).double())
    w = torch.rand(3, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = w / w.sum(-1, keepdim=True)
    shifted = model().increment_module(w)
    assert torch.equal(shifted[:, 1:], w[:, :-1]) and torch.equal(shifted[:, 0], w[:, -1])


@pytest.mark.parametrize("a, b", [(0, 0), (3, 4), (6, 6), (0, 7), (5, 0), (0, V - 1)])
def test_input_then_b_increments_then_output_computes_the_sum(a, b):
    """The paper's solution routed by hand: with the Input module reading a (its read-out set to
    pick a), Input once, Increment b times and Output from then on leave one-hot(a + b)."""
    m = model()
    with torch.no_grad():
        m.input_read.weight.zero_()
        m.input_read.bias.fill_(-1e3)
        m.input_read.bias[a] = 0.0
    u = torch.zeros(1, D, dtype=torch.float64)
    w = torch.full((1, V), 1.0 / V, dtype=torch.float64)
    schedule = [0] + [1] * b + [2, 2]  # input, increment x b, output (holds)
    for choice in schedule:
        g = torch.nn.functional.one_hot(torch.tensor([choice]), 3).double()
        w = g[:, :1] * m.input_module(u) + g[:, 1:2] * m.increment_module(w) + g[:, 2:] * w
    torch.testing.assert_close(w[0], torch.nn.functional.one_hot(torch.tensor(a + b), V).double(),
                               rtol=0, atol=1e-12)


def test_softmax_gates_sum_to_one_and_the_straight_through_gate_is_one_hot_with_the_softmax_gradient():
    scores = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    soft = gate_weights(scores, "softmax")
    torch.testing.assert_close(soft.sum(-1), torch.ones(5, dtype=torch.float64))
    hard = gate_weights(scores, "straight_through")
    assert torch.equal(hard.detach(), torch.nn.functional.one_hot(scores.argmax(-1), 3).double())
    g = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (grad_hard,) = torch.autograd.grad((hard * g).sum(), scores)
    (grad_soft,) = torch.autograd.grad((scores.softmax(-1) * g).sum(), scores)
    torch.testing.assert_close(grad_hard, grad_soft)


def reference_route(m: GlobalWorkspace, u: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The controller's steps unrolled by hand: the LSTM cell's equations written out (gates i, f,
    g, o in PyTorch's order), the gate, the modules as formulas, the workspace update."""
    cell = m.controller
    n = u.shape[0]
    w = torch.full((n, V), 1.0 / V, dtype=u.dtype)
    h = c = torch.zeros(n, m.controller_size, dtype=u.dtype)
    x_in = torch.softmax(u @ m.input_read.weight.T + m.input_read.bias, -1)
    if m.increment == "fixed":
        inc = lambda w: torch.cat([w[:, -1:], w[:, :-1]], dim=1)  # noqa: E731 - mass of v moves to v + 1
    else:
        inc = lambda w: w @ torch.softmax(m.increment_logits, -1)  # noqa: E731
    gates = []
    for _ in range(m.max_steps):
        z = torch.cat([w, u], -1) @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
        i, f, gg, o = z.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
        h = torch.sigmoid(o) * torch.tanh(c)
        s = h @ m.gate_head.weight.T + m.gate_head.bias
        g = torch.softmax(s, -1)
        if m.gate == "straight_through":
            g = torch.nn.functional.one_hot(s.argmax(-1), 3).double()
        w = g[:, 0:1] * x_in + g[:, 1:2] * inc(w) + g[:, 2:3] * w
        gates.append(g)
    return w, gates


@pytest.mark.parametrize("gate", ["softmax", "straight_through"])
@pytest.mark.parametrize("increment", ["fixed", "learned"])
@pytest.mark.parametrize("steps", [1, 5])
def test_the_step_loop_equals_a_hand_unrolled_reference_in_float64(gate, increment, steps):
    m = model(gate=gate, increment=increment, max_steps=steps, controller_size=6)
    u = torch.randn(7, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w, gates = m.route(u)
    w_ref, gates_ref = reference_route(m, u)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gates, torch.stack(gates_ref), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gates.sum(-1), torch.ones(steps, 7, dtype=torch.float64))


@pytest.mark.parametrize("gate", ["softmax", "straight_through"])
def test_the_logits_are_the_log_of_a_distribution_and_aux_gates_sum_to_one(gate):
    m = model(gate=gate, increment="learned")
    x = torch.randint(V, (2, 6), generator=torch.Generator().manual_seed(0))
    out = m(x)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(2, 6, dtype=torch.float64))
    total = sum(out.aux[f"gate_{k}"] for k in ("input", "increment", "output"))
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("increment", ["fixed", "learned"])
def test_the_loss_reaches_the_controller_and_the_modules(increment):
    from recur.tasks import get_task

    task = get_task("chain_addition")
    torch.manual_seed(0)
    m = GlobalWorkspace(vocab_size=task.vocab_size, d_model=D, pattern="gla", max_steps=4, increment=increment)
    batch = task.batch(8, 8, torch.Generator().manual_seed(0))
    m.loss(m(batch.inputs), batch).backward()
    for p in (m.controller.weight_ih, m.controller.weight_hh, m.gate_head.weight, m.input_read.weight,
              m.embed.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if increment == "learned":
        assert m.increment_logits.grad.abs().sum() > 0
    else:
        assert not any(n.startswith("shift") for n, _ in m.named_parameters())  # hand-designed: no weights


def test_built_from_a_run_config_with_its_own_options():
    m = GlobalWorkspace.from_config({"d_model": 16, "n_layers": 1, "mixer": "lstm",
                                     "args": {"max_steps": 7, "gate": "straight_through"}}, vocab_size=V)
    assert m.max_steps == 7 and m.gate == "straight_through" and m.controller_size == 16


@pytest.mark.parametrize("kw, match", [
    ({"gate": "gumbel"}, "gate must be one of softmax, straight_through"),
    ({"increment": "mlp"}, "increment must be one of fixed, learned"),
    ({"max_steps": 0}, "max_steps"),
    ({"max_steps": True}, "max_steps"),
    ({"controller_size": 0}, "controller_size"),
    ({"vocab_size": 1}, "vocab_size"),
])
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        model(**kw)
