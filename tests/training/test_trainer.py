"""The Trainer: the schedule, seeding, early stop, evaluation at every length, the training-method hooks."""

from __future__ import annotations

import math

import pytest
import torch
from harness_tasks import tiny

from recur.config import RunConfig
from recur.models import CausalLM
from recur.training import ConfigError, build, train
from recur.training.methods.state_noise import noise_state
from recur.training.trainer import lr_factor, make_optimizer


def test_lr_schedule_warms_up_linearly_then_decays_as_a_cosine():
    steps, warmup = 100, 10
    f = [lr_factor(s, steps, warmup, 0.1) for s in range(steps)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert f[warmup] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[warmup:], f[warmup + 1:]))  # monotone decay
    mid = warmup + (steps - 1 - warmup) / 2
    assert lr_factor(int(mid), steps, warmup, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * int(mid - warmup) / 89)))
    assert lr_factor(0, 10, 0) == 1.0  # no warm-up: start at the peak


def test_optimizer_follows_the_schedule():
    cfg = tiny(steps=20, warmup=0.25, lr=0.1)
    _, model = build(cfg)
    opt, sched = make_optimizer(model, cfg)
    lrs = []
    for _ in range(cfg.optim.steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[4] == pytest.approx(0.1) and lrs[0] == pytest.approx(0.02) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert all(p.ndim >= 2 for p in model.parameters() if id(p) in decayed)


def test_train_learns_a_tiny_task_and_reports_every_length():
    cfg = tiny(steps=300, d_model=32, early_stop=0.99)
    result = train(cfg, progress=False)
    assert set(result.metrics) == {"8", "32"}
    assert all(set(m) == {"accuracy", "exact_match"} for m in result.metrics.values())
    assert result.metrics["8"]["accuracy"] > 0.9  # chance is 1/8
    assert result.early_stopped and result.steps < 300
    _, model = build(cfg)
    assert result.params == sum(p.numel() for p in model.parameters()) and result.state_size == 32
    assert result.seconds > 0 and result.train_seq_len == 8


def test_the_early_stop_waits_its_patience_after_the_rule_first_holds(monkeypatch):
    """The run stops ``early_stop_patience`` steps after the accuracy rule first held (a fraction of
    the budget below 1, a number of steps from 1 on); patience 0 stops at once, as before."""
    from recur.training.trainer import Trainer

    first = {}
    saturated = Trainer._saturated

    def spy(self):
        hit = saturated(self)
        if hit:
            first.setdefault(self.cfg.optim.early_stop_patience, self.step)
        return hit

    monkeypatch.setattr(Trainer, "_saturated", spy)
    results = {p: train(tiny(steps=300, d_model=32, early_stop=0.99, early_stop_patience=p), progress=False)
               for p in (0, 0.1, 25)}
    assert all(r.early_stopped for r in results.values())
    assert results[0].steps == first[0]
    assert results[0.1].steps == first[0.1] + 30 and results[25].steps == first[25] + 25
    assert first[0] == first[0.1] == first[25]  # the same run up to the rule
    assert RunConfig(task="parity", model="lstm").optim.early_stop_patience == 0.2  # the default


def test_train_is_deterministic_given_the_seed():
    a, b = train(tiny(steps=8), progress=False), train(tiny(steps=8), progress=False)
    c = train(tiny(steps=8, seed=1), progress=False)
    assert a.metrics == b.metrics and a.train_loss == b.train_loss
    assert c.train_loss != a.train_loss


def test_noise_state_fills_floats_and_keeps_counters_and_kv_caches():
    torch.manual_seed(0)
    model = CausalLM(8, 16, 2, pattern=["elman", "attention"])
    state = noise_state(model, 3, 0.5, torch.Generator().manual_seed(0), "cpu")
    h = state["layer0"]["h"]
    assert h.shape == (3, 16) and 0.3 < h.std() < 0.7
    assert state["layer1"]["k"].shape[2] == 0 and (state["layer1"]["pos"] == 0).all()
    model(torch.zeros(3, 5, dtype=torch.long), state)  # a valid initial state


@pytest.mark.parametrize("change", [{"state_init": "noise", "state_noise_std": 0.5}, {"state_passing": True}])
def test_interventions_train_and_change_the_run(change):
    base = train(tiny(steps=6), progress=False)
    other = train(tiny(steps=6, **change), progress=False)
    assert other.steps == 6 and other.train_loss != base.train_loss


def test_bad_configs_raise_config_errors_before_training():
    with pytest.raises(ConfigError, match="Did you mean 'elman'"):
        train(tiny(model="elmann"), progress=False)
    with pytest.raises(ConfigError, match="unexpected keyword argument"):
        train(tiny(model_args={"nope": 1}), progress=False)
    with pytest.raises(ConfigError, match="unexpected keyword argument"):
        train(tiny(**{"model.args": {"n_loopz": 2}}), progress=False)
    with pytest.raises(ConfigError, match="unknown architecture 'looped'. Did you mean 'looped_lm'"):
        train(tiny(arch="looped"), progress=False)
    with pytest.raises(ConfigError, match="needs seq_len >= 5"):
        train(tiny(eval_lengths=[4, 8]), progress=False)
    with pytest.raises(ConfigError, match="growing KV cache"):
        train(tiny(model="attention", state_passing=True), progress=False)


# Losses of the first release's loop (recur 0.1.0, before the Trainer and its plugins), measured with
# that code on this config (whose head was tied then): the state_noise / state_passing plugins must
# reproduce them.
_PRE_PLUGIN_LOSSES = [
    ({}, 0.6882011413574218),
    ({"state_init": "noise"}, 0.692718455195427),
    ({"state_init": "noise", "state_noise_std": 0.5}, 0.6919426918029785),
    ({"state_passing": True}, 0.6948108285665512),
    ({"state_passing": True, "state_init": "noise"}, 0.6943188071250915),
]


@pytest.mark.parametrize("change,loss", _PRE_PLUGIN_LOSSES)
def test_interventions_as_plugins_reproduce_the_loop_they_replaced(change, loss):
    cfg = RunConfig(task="parity", model={"mixer": "lstm", "tie_embeddings": True}, steps=25, seq_len=16,
                    d_model=16, n_layers=2, batch_size=8, eval_batches=1, early_stop=None, device="cpu", **change)
    assert train(cfg, progress=False).train_loss == pytest.approx(loss, rel=1e-6)
