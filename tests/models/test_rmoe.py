"""rmoe: top-k mixture-of-experts channels routed by a GRU over the layer axis (RMoE)."""

from __future__ import annotations

import math

import pytest
import torch

from recur.models.rmoe import RecurrentRouterMoE, balance_loss, route
from recur.state import State
from recur.tasks.base import Batch

V, D = 11, 16


def _model(n_layers=3, **kw):
    torch.manual_seed(0)
    kw = {"pattern": "gla", "n_experts": 4, "top_k": 2, **kw}
    return RecurrentRouterMoE(V, D, n_layers, **kw).double()


def _x(t=9):
    return torch.randint(V, (2, t), generator=torch.Generator().manual_seed(1))


def _dense_reference(model, x):
    """Every expert evaluated on every token, weighted by a dense gate that is zero outside the
    top-k and the renormalised router probability inside it; the GRU stepped by hand over layers."""
    h = model.embed(x)
    g = torch.zeros(*x.shape, model.router_dim, dtype=h.dtype)
    for l, block in enumerate(model.backbone.layers):
        h, _, _ = block(h)
        u = model.norms[l](h)
        a = u @ model.router_in[l].weight.T
        if model.recurrent_router:
            gru = model.gru
            r = torch.sigmoid(a @ gru.weight_ih[:model.router_dim].T + gru.bias_ih[:model.router_dim]
                              + g @ gru.weight_hh[:model.router_dim].T + gru.bias_hh[:model.router_dim])
            z = torch.sigmoid(a @ gru.weight_ih[model.router_dim:2 * model.router_dim].T
                              + gru.bias_ih[model.router_dim:2 * model.router_dim]
                              + g @ gru.weight_hh[model.router_dim:2 * model.router_dim].T
                              + gru.bias_hh[model.router_dim:2 * model.router_dim])
            n = torch.tanh(a @ gru.weight_ih[2 * model.router_dim:].T + gru.bias_ih[2 * model.router_dim:]
                           + r * (g @ gru.weight_hh[2 * model.router_dim:].T + gru.bias_hh[2 * model.router_dim:]))
            g = (1 - z) * n + z * g
            logits = g @ model.router_out[l].weight.T
        else:
            logits = a @ model.router_out[l].weight.T
        p = logits.softmax(-1)
        kth = p.sort(-1, descending=True).values[..., model.top_k - 1:model.top_k]
        keep = p >= kth
        gate = torch.where(keep, p, torch.zeros_like(p))
        gate = gate / gate.sum(-1, keepdim=True)
        h = h + sum(gate[..., e:e + 1] * model.experts[l][e].mix(u) for e in range(model.n_experts))
    return model.head(model.norm(h))


@pytest.mark.parametrize("recurrent_router", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_top_k_routing_equals_the_dense_masked_computation(recurrent_router, top_k):
    model = _model(recurrent_router=recurrent_router, top_k=top_k)
    x = _x()
    torch.testing.assert_close(model(x).logits, _dense_reference(model, x), rtol=1e-12, atol=1e-12)


def test_the_gru_carries_the_previous_layers_input_into_the_router():
    """Layer 1's router logits, its own input u1 held fixed, depend on layer 0's input u0 through
    g_0 = GRU(W_in_0 u0, 0); the per-layer router's do not."""
    for recurrent in (True, False):
        model = _model(recurrent_router=recurrent)
        u0 = torch.randn(5, D, dtype=torch.float64, requires_grad=True)
        u1 = torch.randn(5, D, dtype=torch.float64)
        _, g0 = model.router_logits(0, u0, None)
        logits1, _ = model.router_logits(1, u1, g0)
        (grad,) = torch.autograd.grad(logits1.sum(), u0, allow_unused=True)
        if recurrent:
            assert grad is not None and grad.abs().max() > 1e-6
        else:
            assert g0 is None and grad is None


def test_the_plain_router_has_the_same_parameters_less_the_gru():
    rec, plain = _model(), _model(recurrent_router=False)
    names = {n for n, _ in rec.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert names and all(n.startswith("gru.") for n in names)
    assert (sum(p.numel() for p in rec.parameters()) - sum(p.numel() for p in plain.parameters())
            == sum(p.numel() for p in rec.gru.parameters()))


def test_route_renormalises_the_gate_over_the_chosen_experts():
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0), math.log(4.0)]], dtype=torch.float64)
    probs, chosen, gates = route(logits, 2)
    torch.testing.assert_close(probs, torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64) / 10)
    assert chosen.tolist() == [[3, 2]]
    torch.testing.assert_close(gates, torch.tensor([[4 / 7, 3 / 7]], dtype=torch.float64))


def test_the_balance_loss_equals_its_formula_on_a_hand_example():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    chosen = torch.tensor([[0, 1], [3, 0]])
    # f = (2, 1, 0, 1) / 4 assignments; P = (0.25, 0.25, 0.25, 0.25); 4 * sum f P = 4 * 0.25 = 1
    torch.testing.assert_close(balance_loss(probs, chosen, 4), torch.tensor(1.0, dtype=torch.float64))
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.5, 0.3, 0.1, 0.1]], dtype=torch.float64)
    chosen = torch.tensor([[0, 1], [0, 1]])
    # f = (1/2, 1/2, 0, 0), P = (0.6, 0.2, 0.1, 0.1): 4 * (0.3 + 0.1) = 1.6
    torch.testing.assert_close(balance_loss(probs, chosen, 4), torch.tensor(1.6, dtype=torch.float64))


def test_the_balance_loss_is_in_the_models_loss_and_trains_the_router():
    model = _model(balance_weight=0.05)
    x = _x()
    mask = torch.ones(2, 9, dtype=torch.bool)
    batch = Batch(x, torch.randint(V, (2, 9), generator=torch.Generator().manual_seed(2)), mask)
    out = model(x)
    assert set(out.aux) == {"balance_loss", "expert_usage_entropy", "router_entropy"}
    assert all(v.ndim == 0 for v in out.aux.values())
    assert 0 <= out.aux["expert_usage_entropy"] <= 1 and 0 <= out.aux["router_entropy"] <= math.log(4)
    ce = torch.nn.functional.cross_entropy(out.logits[mask], batch.targets[mask])
    torch.testing.assert_close(model.loss(out, batch), ce + out.aux["balance_loss"])
    out.aux["balance_loss"].backward()
    for name in ("router_out.1.weight", "router_in.2.weight", "gru.weight_hh", "gru.weight_ih"):
        assert dict(model.named_parameters())[name].grad.abs().max() > 0, name


def test_the_balance_loss_scales_with_its_weight_and_zero_turns_it_off():
    x = _x()
    a, b = _model(balance_weight=0.01)(x), _model(balance_weight=0.03)(x)
    torch.testing.assert_close(3 * a.aux["balance_loss"], b.aux["balance_loss"])
    assert _model(balance_weight=0)(x).aux["balance_loss"] == 0


def test_the_state_is_the_mixers_only():
    model = _model()
    x = _x(10)
    out = model(x)
    assert set(out.state) == {"layer0", "layer1", "layer2"}
    assert model.state_size(10) == model.backbone.state_size(10) == out.state.num_floats()
    with pytest.raises(ValueError, match="rmoe state must be a State with entries layer0, layer1, layer2"):
        model(x, State(layer0=out.state["layer0"]))


@pytest.mark.parametrize("option, match", [({"n_experts": 1}, "n_experts"), ({"n_experts": 2.5}, "n_experts"),
                                           ({"top_k": 0}, "top_k"), ({"top_k": 5}, r"top_k must be an int in \[1, n_experts=4\]"),
                                           ({"router_dim": 0}, "router_dim"), ({"recurrent_router": "yes"}, "recurrent_router"),
                                           ({"balance_weight": -1.0}, "balance_weight"),
                                           ({"balance_weight": float("nan")}, "balance_weight"),
                                           ({"mlp": None}, "mlp must name"), ({"mlp": "rwkv4"}, "stateless")])
def test_bad_options_are_clear_errors(option, match):
    with pytest.raises(ValueError, match=match):
        _model(**option)


def test_gelu_experts_and_a_small_router_width():
    model = _model(mlp="gelu", router_dim=4, n_experts=8, top_k=2)
    assert model.gru.hidden_size == 4 and len(model.experts[0]) == 8
    x = _x()
    torch.testing.assert_close(model(x).logits, _dense_reference(model, x), rtol=1e-12, atol=1e-12)
