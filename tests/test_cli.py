"""`recur ...`: the JSON schema of `run`, skipping stored configs, clear errors (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest

from recur.cli import main, parse_value
from recur.results import ResultStore
from recur import suites
from recur.config import SweepConfig
from recur.suites import DEFAULT_SUITE, missing

TINY = ["--task", "harness_shift", "--model", "elman", "--d-model", "16", "--n-layers", "1", "--seq-len", "8",
        "--steps", "5", "--batch-size", "8", "--eval-batches", "1", "--mlp", "None", "--device", "cpu"]


def test_run_json_schema_then_skip_when_stored(db, capsys):
    assert main(["run", *TINY, "--eval-lengths", "8,16", "--db", str(db), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    obj = json.loads(out)
    assert set(obj) == {"task", "model", "seed", "params", "state_size", "train_seq_len", "steps", "seconds", "metrics"}
    assert (obj["task"], obj["model"], obj["seed"], obj["train_seq_len"], obj["steps"]) == ("harness_shift", "elman", 0, 8, 5)
    assert isinstance(obj["params"], int) and obj["state_size"] == 16 and obj["seconds"] > 0
    assert set(obj["metrics"]) == {"8", "16"}
    assert all(set(m) == {"accuracy", "exact_match"} and 0 <= m["accuracy"] <= 1 for m in obj["metrics"].values())

    assert main(["run", *TINY, "--eval-lengths", "8,16", "--db", str(db), "--json"]) == 0
    captured = capsys.readouterr()
    assert "already in" in captured.err and json.loads(captured.out.strip().splitlines()[-1]) == obj
    with ResultStore(db) as store:
        assert len(store) == 1


def test_run_passes_task_and_model_args(db, capsys):
    assert main(["run", *TINY, "--task-arg", "lag=2", "--task-arg", "vocab=4", "--db", str(db), "--json"]) == 0
    with ResultStore(db) as store:
        (run,) = store.all_runs()
    assert run["config"]["task"]["args"] == {"lag": 2, "vocab": 4} and run["config"]["model"]["block"]["mlp"] is None


@pytest.mark.parametrize("argv, message", [
    (["--task", "harness_shiftt", "--model", "elman"], "unknown task 'harness_shiftt'. Did you mean 'harness_shift'"),
    (["--task", "harness_shift", "--model", "elmann"], "unknown model or pattern 'elmann'. Did you mean 'elman'"),
    (["--task", "harness_shift", "--model", "elman", "--task-arg", "lag"], "bad --task-arg 'lag': expected KEY=VALUE"),
    (["--task", "harness_shift", "--model", "elman", "--task-arg", "lag=zero"], "bad parameters for task 'harness_shift': lag"),
    (["--task", "harness_shift", "--model", "elman", "--task-arg", "colour=1"], "colour: Extra inputs are not permitted"),
    (["--task", "harness_shift", "--model", "elman", "--model-arg", "nope=1"], "bad options for model 'elman' (model.mixer_args {'nope': 1}"),
    (["--task", "harness_shift", "--model", "elman", "--steps", "0"], "bad run config: optim.steps: Input should be greater than or equal to 1"),
    (["--task", "harness_shift", "--model", "elman", "--seq-len", "3"], "needs seq_len >= 5, got 3"),
])
def test_bad_names_and_arguments_exit_2_with_a_clear_message(db, capsys, argv, message):
    assert main(["run", *argv, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not db.exists() or len(ResultStore(db)) == 0


def test_argparse_errors_exit_2(capsys):
    assert main(["run", "--task", "parity"]) == 2
    assert main(["run", "--task", "parity", "--model", "lstm", "--eval-lengths", "a,b"]) == 2
    assert "expected comma-separated integers" in capsys.readouterr().err


def test_parse_value():
    assert [parse_value(v) for v in ("3", "0.5", "1e-3", "true", "False", "None", "[1,2]", "gla")] == \
        [3, 0.5, 1e-3, True, False, None, [1, 2], "gla"]


def test_tasks_and_models_listings(capsys):
    assert main(["tasks", "--json"]) == 0
    tasks = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert tasks["harness_shift"]["params"]["lag"]["default"] == 1 and tasks["harness_shift"]["description"]
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    elman = next(m for m in listing["models"] if m["name"] == "elman")
    assert elman["family"] and elman["paper"] and elman["modes"] == ["recurrent"] and elman["state_size"] == 64 and elman["state_formula"] == "d_model"
    assert main(["models"]) == 0 and "elman" in capsys.readouterr().out


def test_report_command(db, tmp_path, capsys):
    assert main(["report", "--db", str(db)]) == 2  # no store yet
    assert main(["run", *TINY, "--db", str(db), "--json"]) == 0
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    assert f"report written to {tmp_path / 'rep' / 'index.html'}" in capsys.readouterr().out
    assert (tmp_path / "rep" / "index.html").exists()


def test_bench_quick(tmp_path, capsys):
    absent = missing(DEFAULT_SUITE)
    argv = ["bench", "--quick", "--db", str(tmp_path / "b.sqlite"), "--out", str(tmp_path / "rep"), "--workers", "1"]
    code = main(argv)
    captured = capsys.readouterr()
    if absent["models"] or absent["tasks"]:
        # Until every model and task of the suite is registered, bench fails clearly, before any run.
        assert code == 2
        for name in absent["models"] + absent["tasks"]:
            assert name in captured.err
        assert "not registered" in captured.err and not (tmp_path / "b.sqlite").exists()
    else:
        assert code == 0, captured.err
        assert "report written to" in captured.out and (tmp_path / "rep" / "index.html").exists()
        with ResultStore(tmp_path / "b.sqlite") as store:
            assert len(store) == len(DEFAULT_SUITE.models) * len(DEFAULT_SUITE.tasks)


def test_bench_names_unregistered_models_and_tasks_and_runs_nothing(tmp_path, monkeypatch, capsys):
    suite = SweepConfig.model_validate({"models": ["elman", "not_a_model"], "tasks": ["harness_shift", "not_a_task"]})
    monkeypatch.setitem(suites.SUITES, "default", suite)
    assert main(["bench", "--db", str(tmp_path / "b.sqlite"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "needs models not_a_model; tasks not_a_task, which are not registered" in err and "Traceback" not in err
    assert not (tmp_path / "b.sqlite").exists()


def test_archs_and_methods_list_the_registries(capsys):
    assert main(["archs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} >= {"causal_lm", "looped_lm", "encoder"}
    looped = next(r for r in rows if r["name"] == "looped_lm")
    assert looped["options"]["n_loops"] == 2 and looped["paper"]
    assert main(["methods", "--json"]) == 0
    methods = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert methods["gradient_noise"]["options"] == {"eta": 0.3, "gamma": 0.55}
    assert methods["tbptt"]["options"] == {"k1": "<required>", "k2": None}
    assert main(["archs"]) == 0 and "looped_lm" in capsys.readouterr().out


@pytest.mark.parametrize("arch,extra", [
    ("looped_lm", ["--set", "model.args.n_loops=3"]),
    ("encoder", ["--set", "model.args.head=pooled", "--model", "bidirectional", "--set", "model.mixer_args.mixer=lstm"]),
])
def test_other_architectures_train_from_the_cli_on_an_existing_task(db, capsys, arch, extra):
    argv = ["run", "--task", "parity", "--model", "gla", "--arch", arch, "--task-arg", "final_only=true", "--d-model", "16",
            "--n-layers", "1", "--seq-len", "16", "--steps", "6", "--batch-size", "8", "--eval-batches", "1",
            "--device", "cpu", "--db", str(db), "--json", *extra]
    assert main(argv) == 0, capsys.readouterr().err
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["model"].startswith(f"{arch}:") and obj["steps"] == 6 and set(obj["metrics"]) == {"16", "64"}
    with ResultStore(db) as store:
        (run,) = store.all_runs()
    assert run["config"]["model"]["arch"] == arch


def test_set_and_train_reach_any_nested_key(db, capsys):
    argv = ["run", *TINY, "--set", "model.block.mlp=gelu", "--set", "optim.lr=0.003", "--set", "model.block.norm=layernorm",
            "--train", "tbptt:k1=3,k2=5", "--train", "gradient_noise:eta=0.01", "--db", str(db), "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    with ResultStore(db) as store:
        (run,) = store.all_runs()
    cfg = run["config"]
    assert cfg["model"]["block"]["mlp"] == "gelu" and cfg["model"]["block"]["norm"] == "layernorm"
    assert cfg["optim"]["lr"] == 0.003 and run["lr"] == 0.003
    assert [m["name"] for m in cfg["training"]] == ["tbptt", "gradient_noise"]
    assert cfg["training"][0]["args"] == {"k1": 3, "k2": 5}


@pytest.mark.parametrize("extra,message", [
    (["--set", "optim.lrr=1"], "optim.lrr: Extra inputs are not permitted"),
    (["--set", "model.block.mlp=glu"], "unknown channel mixer 'glu'"),
    (["--set", "novalue"], "bad --set 'novalue'"),
    (["--train", "tbptt:k1=4,k2=2"], "k2=2 must be >= k1=4"),
    (["--train", "tbtt"], "Did you mean 'tbptt'"),
    (["--arch", "looped"], "unknown architecture 'looped'. Did you mean 'looped_lm'"),
    (["--resume"], "--resume: no checkpoint of run"),
])
def test_bad_nested_keys_and_methods_exit_2_naming_them(db, capsys, extra, message):
    assert main(["run", *TINY, "--db", str(db), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
