"""Evaluation at other numbers of iterations (``eval.loops``): a depth-recurrent run is evaluated at
each depth from one command, the results land in the store (``depth_evals``), the CLI prints them
and the report draws accuracy against iterations; a fixed-depth architecture refuses the option."""

from __future__ import annotations

import json

import pytest

from recur.cli import main
from recur.config import RunConfig
from recur.report import build_report
from recur.results import ResultStore
from recur.training.trainer import ConfigError, Trainer, build, evaluate

TINY = {"task": {"name": "parity", "seq_len": 8}, "model": {"arch": "looped_lm", "mixer": "gla", "d_model": 16,
                                                             "n_layers": 1, "args": {"n_loops": 2}},
        "optim": {"steps": 4, "batch_size": 8}, "eval": {"batches": 1, "loops": [4, 1, 2]}}


def test_each_depth_is_the_evaluation_of_the_model_run_at_that_depth_and_the_model_keeps_its_own():
    cfg = RunConfig.model_validate(TINY)
    assert cfg.eval.loops == [1, 2, 4]  # sorted, as lengths are
    trainer = Trainer(cfg, progress=False)
    result = trainer.fit()
    assert set(result.depth_metrics) == {"1", "2", "4"} and trainer.model.n_loops == 2
    assert result.depth_metrics["2"] == result.metrics  # the trained depth is the main evaluation
    trainer.model.n_loops = 4
    assert result.depth_metrics["4"] == evaluate(trainer.model, trainer.task, cfg, trainer.device)
    assert result.summary()["depth_metrics"] == result.depth_metrics
    no_loops = RunConfig.model_validate({**TINY, "eval": {"batches": 1}})
    assert "depth_metrics" not in Trainer(no_loops, progress=False).fit().summary()  # the JSON of other runs is as before


def test_the_store_keeps_them_with_the_run(tmp_path):
    result = Trainer(RunConfig.model_validate(TINY), progress=False).fit()
    with ResultStore(tmp_path / "s.sqlite") as store:
        store.put(result)
        got = store.depth_evals()
        assert got == {result.config_hash: {int(k): v for k, v in result.depth_metrics.items()}}
        records = dict(store.records())
        assert len(records[result.config_hash]["depth_evals"]) == 3  # they move with the run (store merge)
        store.delete(result.config_hash)
        assert store.depth_evals() == {}


def test_a_fixed_depth_architecture_refuses_eval_loops():
    cfg = RunConfig.model_validate({**TINY, "model": {"arch": "causal_lm", "mixer": "gla", "d_model": 16, "n_layers": 1}})
    with pytest.raises(ConfigError, match="fixed depth.*looped_lm"):
        build(cfg)
    with pytest.raises(ValueError, match="eval loops must be >= 1"):
        RunConfig.model_validate({**TINY, "eval": {"loops": [0]}})


def test_one_command_trains_evaluates_every_depth_and_the_report_draws_them(tmp_path, capsys):
    db = tmp_path / "runs.sqlite"
    base = ["run", "--task", "parity", "--seq-len", "8", "--model", "gla", "--d-model", "16", "--n-layers", "1",
            "--steps", "4", "--batch-size", "8", "--eval-batches", "1", "--device", "cpu", "--db", str(db)]
    assert main([*base, "--arch", "looped_lm", "--eval-loops", "1,2,4,8", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(obj["depth_metrics"]) == {"1", "2", "4", "8"}
    assert main([*base, "--arch", "looped_lm", "--eval-loops", "1,2,4,8"]) == 0  # stored: shown again, with its depths
    shown = capsys.readouterr().out
    assert "other numbers of iterations" in shown and "length 32" in shown
    assert main(base) == 0  # a fixed-depth model of the task: a level in the figure
    capsys.readouterr()
    index = build_report(db, tmp_path / "report")
    page = index.read_text()
    assert "against iterations at evaluation" in page
    assert len(list((tmp_path / "report").glob("parity_*_depth.png"))) == 1
    assert main([*base, "--eval-loops", "2"]) == 2  # causal_lm has no depth to set: a usage error
    assert "fixed depth" in capsys.readouterr().err
