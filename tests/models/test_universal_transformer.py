"""universal_transformer: a weight-tied Backbone stepped max_steps times with a step embedding and
per-position ACT halting; the weights, the ponder loss and its gradient, fixed depth, halting by
bias, a short Trainer run and the errors."""

from __future__ import annotations

import pytest
import torch

from recur.models.universal_transformer import UniversalTransformer, act_halting, sinusoid_signal

V, D = 11, 16


def _model(seed: int = 0, **options) -> UniversalTransformer:
    torch.manual_seed(seed)
    return UniversalTransformer(V, D, 1, **{"pattern": "attention", "max_steps": 3, **options}).double()


def _tokens(b: int = 2, t: int = 9) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(1))


def test_act_halting_matches_a_hand_computation():
    # three positions, three steps, eps 0.01 (threshold 0.99):
    #  a: 0.5, 0.3 keep running; step 3 is the last, forced halt: w = 0.2 = R, N = 3
    #  b: 0.995 > 0.99 at step 1: halts there with R = 1, N = 1, then weight 0
    #  c: 0.6 then 0.6 + 0.395 = 0.995 > 0.99: halts at step 2 with R = 0.4, N = 2
    p = torch.tensor([[0.5, 0.995, 0.6],
                      [0.3, 0.2, 0.395],
                      [0.4, 0.7, 0.1]], dtype=torch.float64)
    w, n, r = act_halting(p, 0.01)
    expected = torch.tensor([[0.5, 1.0, 0.6],
                             [0.3, 0.0, 0.4],
                             [0.2, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(w, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(w.sum(0), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(n, torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(r, torch.tensor([0.2, 1.0, 0.4], dtype=torch.float64), rtol=0, atol=1e-15)
    # the threshold is 1 - eps, not the 0.9 of a popular port: 0.5 + 0.45 = 0.95 keeps running
    w, n, _ = act_halting(torch.tensor([[0.5], [0.45], [0.3]], dtype=torch.float64), 0.01)
    assert n.item() == 3 and torch.allclose(w[:, 0], torch.tensor([0.5, 0.45, 0.05], dtype=torch.float64))


def test_the_output_is_the_halting_weighted_mix_of_the_steps():
    model = _model()
    x = _tokens()
    z = model.embed(x)
    zs, ps = [], []
    for n in range(3):
        inp = z + model.step_embed.weight[n]
        ps.append(torch.sigmoid(inp @ model.halting.weight[0] + model.halting.bias[0]))
        z, _ = model.backbone(inp)
        zs.append(z)
    w, n_steps, r = act_halting(torch.stack(ps), 0.01)
    h = sum(w[k, ..., None] * zs[k] for k in range(3))
    out = model(x)
    torch.testing.assert_close(out.logits, model.head(model.norm(h)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.aux["ponder_loss"], 0.01 * (n_steps + r).mean(), rtol=1e-12, atol=0)
    assert out.aux["ponder_steps"] == n_steps.mean() and 1 < out.aux["ponder_steps"] < 3  # bias 1.0: ~2 steps


def test_the_ponder_loss_has_a_gradient_into_the_halting_unit():
    model = _model()
    out = model(_tokens())
    assert out.aux["ponder_loss"].requires_grad and not out.aux["ponder_steps"].requires_grad
    out.aux["ponder_loss"].backward()
    assert model.halting.weight.grad.abs().sum() > 0 and model.halting.bias.grad.abs() > 0


def test_fixed_depth_equals_the_tied_backbone_stepped_max_steps_times():
    model = _model(act=False)
    assert not hasattr(model, "halting")
    x = _tokens()
    z = model.embed(x)
    for n in range(3):
        z, _ = model.backbone(z + model.step_embed.weight[n])
    out = model(x)
    torch.testing.assert_close(out.logits, model.head(model.norm(z)), rtol=1e-12, atol=1e-12)
    assert out.aux == {} and set(out.state) == {"step0", "step1", "step2"}
    assert model.state_size(9) == 3 * model.backbone.state_size(9)


def test_sinusoid_step_signal_has_no_parameters_and_is_added():
    model = _model(act=False, step_embedding="sinusoid")
    assert not hasattr(model, "step_embed")
    x = _tokens()
    z = model.embed(x)
    for n in range(3):
        z, _ = model.backbone(z + sinusoid_signal(n, D, dtype=torch.float64))
    torch.testing.assert_close(model(x).logits, model.head(model.norm(z)), rtol=1e-12, atol=1e-12)
    assert torch.equal(sinusoid_signal(0, 4), torch.tensor([0.0, 0.0, 1.0, 1.0]))


@pytest.mark.parametrize("bias, steps", [(10.0, 1.0), (-10.0, 4.0)])
def test_the_halting_bias_sets_the_ponder_steps(bias, steps):
    model = _model(max_steps=4, halting_bias_init=bias)
    aux = model(_tokens()).aux
    assert aux["ponder_steps"].item() == steps
    # N + R: halting at once leaves R = 1; running to the cap leaves R = 1 - sum p ~ 1 as well
    torch.testing.assert_close(aux["ponder_loss"] / 0.01, torch.tensor(steps + 1.0, dtype=torch.float64),
                               rtol=0, atol=1e-3)


def test_the_state_carries_per_step_with_halting_in_play():
    model = _model(max_steps=4, pattern="gla")
    x = _tokens(t=13)
    whole = model(x)
    first = model(x[:, :5])
    second = model(x[:, 5:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="step0, step1, step2 .max_steps=3"):
        _model(max_steps=3, pattern="gla")(x, whole.state)


@pytest.mark.parametrize("options, phrase", [
    ({"max_steps": 0}, "max_steps must be a positive int"),
    ({"max_steps": 2.0}, "max_steps must be a positive int"),
    ({"act": "yes"}, "act must be True"),
    ({"act_epsilon": 0.0}, "act_epsilon must be in"),
    ({"act_epsilon": 1.0}, "act_epsilon must be a finite number in"),
    ({"ponder_weight": -0.1}, "ponder_weight must be a finite number >= 0"),
    ({"ponder_weight": float("nan")}, "ponder_weight"),
    ({"halting_bias_init": "1"}, "halting_bias_init must be a finite number"),
    ({"step_embedding": "rotary"}, "step_embedding must be one of learned, sinusoid"),
])
def test_bad_options_are_clear_errors(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        UniversalTransformer(V, D, 1, **options)


def test_the_trainer_learns_associative_retrieval_with_act():
    """A key-value pair then its query (key_size 1): exact match from chance (1/16) to >= 0.9 in
    300 steps, the ponder loss in the objective (measured: 1.0 at 400 steps)."""
    from recur.config import RunConfig
    from recur.training.trainer import train

    cfg = {"task": {"name": "associative_retrieval", "args": {"key_size": 1}, "seq_len": 8},
           "model": {"arch": "universal_transformer", "mixer": "attention", "d_model": 32, "n_layers": 1,
                     "args": {"max_steps": 3}},
           "optim": {"steps": 300, "batch_size": 32, "lr": 3e-3, "early_stop": None},
           "eval": {"lengths": [8], "batches": 4}, "device": "cpu", "seed": 0}
    result = train(RunConfig.model_validate(cfg), progress=False)
    assert result.metrics["8"]["exact_match"] >= 0.9, result.metrics
    assert result.train_loss < 0.5 * result.curve[0][1]
