"""The validation curve (``eval.every``): points at every N steps and at the end, on the validation
split, against training tokens; kept by checkpoints, stored with the run, drawn and tabled by the report."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from harness_tasks import tiny

from recur.config import RunConfig
from recur.report import build_report
from recur.results import ResultStore
from recur.training import Trainer, evaluate, train


def text_run(**fields) -> RunConfig:
    base = dict(task="text", task_args={"corpus": "prose"}, model="elman", d_model=16, n_layers=1, seq_len=32,
                steps=12, batch_size=4, lr=3e-3, eval_batches=1, mlp=None, device="cpu", early_stop=None,
                eval_lengths=[32, 64])
    cfg = RunConfig(**{**base, **fields})
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": 5})})


def test_eval_points_every_n_steps_and_at_the_end_on_the_validation_split():
    cfg = text_run()
    result = train(cfg, progress=False)
    assert [s for s, _, _ in result.evals] == [5, 10, 12]
    assert [n for _, n, _ in result.evals] == [s * 4 * 32 for s in (5, 10, 12)]  # tokens: steps x batch x length
    for _, _, m in result.evals:
        assert set(m) == {"bits_per_byte", "accuracy"} and 0 < m["bits_per_byte"] < 9
    assert result.info["corpus_sha256"] and result.info["corpus"] == "prose"
    # the last point is the final model on validation; the final metrics are on test: other text
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    val = evaluate(trainer.model, trainer.task, cfg, trainer.device, split="validation", lengths=[32])
    test = evaluate(trainer.model, trainer.task, cfg, trainer.device, lengths=[32])
    assert val["32"] == result.evals[-1][2] and test["32"] == result.metrics["32"] and val != test
    assert trainer.model.training  # evaluation put the model back in its training mode


def test_no_eval_curve_unless_asked():
    assert train(tiny(steps=6), progress=False).evals == []


def test_a_task_without_a_validation_split_evaluates_its_curve_on_test():
    cfg = tiny(steps=6, early_stop=None)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": 3})})
    result = train(cfg, progress=False)
    assert [s for s, _, _ in result.evals] == [3, 6]
    assert result.evals[-1][2] == result.metrics[str(cfg.task.seq_len)]  # the test split at the training length


def test_a_resumed_run_keeps_its_eval_curve(tmp_path):
    from recur.training import checkpoint

    cfg = text_run(steps=12)
    expected = train(cfg, progress=False)
    trainer = Trainer(cfg, progress=False)
    for _ in range(7):
        trainer.train_step()
    checkpoint.save(trainer, tmp_path)
    resumed = Trainer(cfg, progress=False, checkpoint_dir=tmp_path, resume=True).fit()
    assert resumed.evals == expected.evals and resumed.metrics == expected.metrics


def test_the_store_keeps_evals_and_info_and_reads_an_older_store(tmp_path):
    result = train(text_run(steps=6), progress=False)
    db = tmp_path / "runs.sqlite"
    with ResultStore(db) as store:
        store.put(result)
        assert store.evals() == {result.config_hash: [tuple(e) for e in result.evals]}
        assert store.get(result.config_hash)["info"] == result.info == store.all_runs()[0]["info"]
        store.put(result)  # replacing a run replaces its rows, not adds to them
        assert len(store.evals()[result.config_hash]) == len(result.evals)
    conn = sqlite3.connect(db)  # a store written before these tables existed
    conn.execute("DROP TABLE evals")
    conn.execute("DROP TABLE run_info")
    conn.commit()
    conn.close()
    db.chmod(0o444)
    try:
        with ResultStore(db, readonly=None) as store:
            assert len(store) == 1 and store.evals() == {} and store.all_runs()[0]["info"] == {}
    finally:
        db.chmod(0o644)
    with ResultStore(db) as store:  # opened for writing: the tables are created
        store.put(result)
        assert store.evals()[result.config_hash]


def test_the_report_tables_bits_per_byte_and_draws_the_eval_curve(tmp_path):
    db = tmp_path / "runs.sqlite"
    with ResultStore(db) as store:
        for model in ("elman", "gru"):
            store.put(train(text_run(model=model, steps=6), progress=False))
        rows = store.leaderboard()
        assert {r["model"] for r in rows} == {"elman", "gru"}
        index = build_report(store, tmp_path / "rep")
    html = index.read_text()
    assert "bpb@32" in html and "bpb@64" in html
    figure = next((tmp_path / "rep").glob("text*_evals.png"))
    assert figure.name in html
    # lower bits per byte ranks first
    bpb = [r["metrics"]["32"]["bits_per_byte"] for r in rows]
    assert bpb == sorted(bpb)


def test_eval_every_must_be_a_non_negative_int():
    with pytest.raises(ValueError):
        RunConfig.model_validate({"task": {"name": "text"}, "model": {"mixer": "gla"}, "eval": {"every": -1}})
    assert torch.tensor(0).item() == RunConfig.model_validate({"task": {"name": "text"}, "model": {"mixer": "gla"}}).eval.every
