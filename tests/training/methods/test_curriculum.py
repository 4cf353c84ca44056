"""``curriculum``: a schedule of the training length, a task parameter or the number of loops; the
Trainer trains at the scheduled values and evaluates on the run's own configuration."""

from __future__ import annotations

import pytest
import torch
from harness_tasks import tiny

import recur.training.trainer as trainer_module
from recur.training import ConfigError, train
from recur.training.trainer import Trainer


def cur(**args) -> dict:
    return {"name": "curriculum", **args}


def schedule_of(trainer: Trainer) -> list[int]:
    (method,) = trainer.methods
    return [method.value(s, trainer.cfg.optim.steps) for s in range(1, trainer.cfg.optim.steps + 1)]


def recording(trainer: Trainer) -> list[dict]:
    """Wrap the trainer's passes: what each step really trained on."""
    seen = []
    inner = trainer.forward_backward

    def forward_backward(batch, init):
        loss, out = inner(batch, init)
        seen.append({"step": trainer.step, "T": batch.inputs.shape[1], "lag": trainer.train_task.params.lag,
                     "loops": len(out.state) if trainer.cfg.model.arch == "looped_lm" else None,
                     "n_loops": getattr(trainer.model, "n_loops", None), "mask": batch.mask})
        return loss, out

    trainer.forward_backward = forward_backward
    return seen


# ------------------------------------------------------------------ the schedule's values
def test_linear_ramp_of_seq_len_ends_on_the_runs_own_length():
    trainer = Trainer(tiny(seq_len=16, steps=10, training=[cur(start=5)]), progress=False)
    assert trainer.methods[0].end == 16  # end defaults to the config's seq_len
    # ramp 0.5 * 10 = 5 steps: round(5 + 11 * min(1, (step - 1) / 5))
    assert schedule_of(trainer) == [5, 7, 9, 12, 14, 16, 16, 16, 16, 16]
    assert trainer.methods[0].label == "+curriculum(seq_len)"


@pytest.mark.parametrize("args,steps,want", [
    ({"start": 5, "end": 13, "ramp": 4}, 8, [5, 7, 9, 11, 13, 13, 13, 13]),  # ramp >= 1: a number of steps
    ({"start": 6, "ramp": 0.25}, 8, [6, 7, 8, 8, 8, 8, 8, 8]),  # 2 steps; end: seq_len 8
    ({"start": 5, "end": 9, "ramp": 1}, 4, [5, 9, 9, 9]),
    ({"start": 16}, 6, [16, 13, 11, 8, 8, 8]),  # a decreasing ramp is the same formula
    ({"start": 5, "ramp": 100}, 3, [5, 5, 5]),  # a ramp longer than the run: round(5 + 3 * 2/100)
])
def test_ramp_values(args, steps, want):
    trainer = Trainer(tiny(steps=steps, training=[cur(**args)]), progress=False)
    assert schedule_of(trainer) == want


def test_stages_are_piecewise_constant():
    trainer = Trainer(tiny(seq_len=16, steps=8, training=[cur(stages=[[0, 5], [3, 8], [6, 16]])]), progress=False)
    assert schedule_of(trainer) == [5, 5, 8, 8, 8, 16, 16, 16]
    trainer = Trainer(tiny(steps=4, training=[cur(stages=[[1, 6], [2, 7]])]), progress=False)
    assert schedule_of(trainer) == [6, 7, 7, 7]
    assert trainer.methods[0].end == 8  # the run's own value, restored after the last stage


@pytest.mark.parametrize("args,match", [
    ({}, "give either start"),
    ({"start": 5, "stages": [[0, 5]]}, "give either start"),
    ({"stages": []}, "stages must start at step 0 or 1"),
    ({"stages": [[2, 5]]}, "stages must start at step 0 or 1"),
    ({"stages": [[0, 5], [4, 6], [4, 8]]}, "increasing steps"),
    ({"stages": [[0, 5], [3, 0]]}, "stage values must be >= 1"),
    ({"start": 0}, "start"),
    ({"start": 5, "ramp": 0}, "ramp"),
    ({"start": 5, "key": "depth"}, "key must be seq_len, n_loops or task.<param>, got 'depth'"),
    ({"start": 5, "key": "task."}, "key must be seq_len, n_loops or task.<param>"),
])
def test_bad_options_are_refused_by_the_config(args, match):
    with pytest.raises(ValueError, match=match):
        tiny(training=[cur(**args)])


# ------------------------------------------------------------------ training follows the schedule
def test_trainer_trains_at_the_scheduled_lengths_and_ends_on_its_own():
    trainer = Trainer(tiny(seq_len=16, steps=10, early_stop=None, training=[cur(start=5)]), progress=False)
    seen = recording(trainer)
    result = trainer.fit()
    assert [s["T"] for s in seen] == [5, 7, 9, 12, 14, 16, 16, 16, 16, 16]
    assert trainer.seq_len == 16 and result.train_seq_len == 16
    assert set(result.metrics) == {"16", "64"}


def test_finish_restores_the_runs_value_when_the_ramp_did_not_end():
    trainer = Trainer(tiny(seq_len=16, steps=4, early_stop=None, training=[cur(start=5, ramp=50)]), progress=False)
    seen = recording(trainer)
    trainer.fit()
    assert [s["T"] for s in seen] == [5, 5, 5, 6]  # round(5 + 11 * 3/50) = 6
    assert trainer.seq_len == 16


def test_n_loops_curriculum_on_a_looped_model_is_restored_before_evaluation(monkeypatch):
    evaluated = []
    original = trainer_module.evaluate

    def evaluate(model, task, cfg, device):
        evaluated.append(model.n_loops)
        out = model(torch.zeros(2, 5, dtype=torch.long))
        assert set(out.state) == {"loop0", "loop1", "loop2"}  # evaluation really runs three loops
        return original(model, task, cfg, device)

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)
    cfg = tiny(model="gla", arch="looped_lm", steps=6, early_stop=None, **{"model.args": {"n_loops": 3}},
               training=[cur(key="n_loops", start=1)])
    trainer = Trainer(cfg, progress=False)
    assert trainer.methods[0].end == 3 and trainer.methods[0].label == "+curriculum(n_loops)"
    seen = recording(trainer)
    trainer.fit()
    # ramp 3 steps: round(1 + 2 * (step - 1) / 3)
    assert [s["n_loops"] for s in seen] == [1, 2, 2, 3, 3, 3]
    assert [s["loops"] for s in seen] == [1, 2, 2, 3, 3, 3]  # the forward ran that many loops
    assert trainer.model.n_loops == 3 and evaluated == [3]


def test_n_loops_restored_after_an_early_stop():
    cfg = tiny(model="gla", arch="looped_lm", steps=50, early_stop=0.01, early_stop_window=2, early_stop_patience=0,
               **{"model.args": {"n_loops": 3}}, training=[cur(key="n_loops", start=1)])
    trainer = Trainer(cfg, progress=False)
    seen = recording(trainer)
    result = trainer.fit()
    assert result.early_stopped and result.steps == 2 and [s["n_loops"] for s in seen] == [1, 1]
    assert trainer.model.n_loops == 3


def test_task_parameter_curriculum_changes_the_training_task_only():
    cfg = tiny(steps=6, early_stop=None, task_args={"lag": 3}, training=[cur(key="task.lag", start=1)])
    trainer = Trainer(cfg, progress=False)
    assert trainer.methods[0].end == 3  # the run's own task parameter
    seen = recording(trainer)
    trainer.fit()
    assert [s["lag"] for s in seen] == [1, 2, 2, 3, 3, 3]
    for s in seen:  # the batches are the scheduled task's: positions t < lag unsupervised
        lag = s["lag"]
        assert not s["mask"][:, :lag].any() and s["mask"][:, lag:].all()
    assert trainer.task.params.lag == 3 and trainer.train_task.params.lag == 3
    assert trainer.seq_len == 8


def test_task_parameter_stages():
    cfg = tiny(steps=5, early_stop=None, task_args={"vocab": 8},
               training=[cur(key="task.vocab", stages=[[0, 2], [3, 4]])])
    trainer = Trainer(cfg, progress=False)
    seen = []
    inner = trainer.forward_backward
    trainer.forward_backward = lambda b, i: seen.append(int(b.inputs.max())) or inner(b, i)
    trainer.fit()
    assert seen[:2] == [1, 1] and all(2 <= m <= 3 for m in seen[2:])  # tokens from [0, vocab)
    assert trainer.train_task.params.vocab == 8  # finish: the run's own task


# ------------------------------------------------------------------ refused before training
@pytest.fixture
def no_training(monkeypatch):
    def fail(self):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "train_step", fail)


@pytest.mark.parametrize("fields,match", [
    (dict(training=[cur(key="task.nope", start=1)]),
     r"task 'harness_shift' has no such parameter \(it has vocab, lag\)"),
    (dict(training=[cur(key="n_loops", start=1)]), "needs an architecture with loops; 'causal_lm' has none"),
    (dict(training=[cur(start=3)]), "needs seq_len >= 5, got 3"),
    (dict(seq_len=16, training=[cur(stages=[[0, 8], [5, 4], [9, 16]])]), "needs seq_len >= 5, got 4"),
    (dict(training=[cur(start=8, end=2)]), "needs seq_len >= 5, got 2"),
    (dict(training=[cur(key="task.lag", start=5)]), "needs seq_len >= 9, got 8"),  # lag 5 needs 9 tokens
    (dict(training=[cur(key="task.vocab", start=1)]), "vocab"),  # harness_shift needs vocab >= 2
    (dict(training=[cur(key="task.vocab", stages=[[0, 8], [3, 16]])]), "vocab_size 16.*vocab_size 8"),
    (dict(model="gla", arch="looped_lm", training=["state_passing", cur(key="n_loops", start=1)]),
     "cannot be combined with state_passing"),
])
def test_impossible_schedules_raise_config_errors_before_training(no_training, fields, match):
    with pytest.raises(ConfigError, match=match):
        train(tiny(**fields), progress=False)
