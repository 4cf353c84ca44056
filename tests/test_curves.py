"""The training-loss curve: the Trainer records it (step 1, every steps//200-th step, the last step),
a checkpoint carries it, the store keeps it in its own table, written and deleted with the run."""

from __future__ import annotations

import sqlite3

import pytest
from harness_tasks import fake_result, tiny

from recur.results import ResultStore
from recur.training import RunResult, Trainer, checkpoint, train
from recur.training.trainer import curve_every


def test_curve_points_are_step_one_every_kth_step_and_the_last():
    assert curve_every(30) == 1 and curve_every(1000) == 5 and curve_every(2001) == 10
    result = train(tiny(steps=30, early_stop=None), progress=False)
    steps = [p[0] for p in result.curve]
    assert steps == list(range(1, 31))
    assert all(loss > 0 for _, loss, _ in result.curve)
    seconds = [p[2] for p in result.curve]
    assert seconds == sorted(seconds) and seconds[-1] <= result.seconds


def test_a_point_is_the_mean_loss_of_its_interval_and_an_early_stop_closes_the_last(monkeypatch):
    cfg = tiny(steps=1000, early_stop=None)
    trainer = Trainer(cfg, progress=False)
    losses = iter(float(i) for i in range(1, 100))
    original = trainer._record_curve
    monkeypatch.setattr(trainer, "_record_curve", lambda loss, last=False: original(next(losses), last))
    for _ in range(12):
        trainer.train_step()
    # step 1 alone (loss 1), then steps 2-5 (mean 3.5), 6-10 (mean 8); 11, 12 pending
    assert [(s, l) for s, l, _ in trainer.curve] == [(1, 1.0), (5, 3.5), (10, 8.0)]
    original(0.0, last=True)  # what fit() does when the run stops early at step 12
    assert trainer.curve[-1][:2] == (12, 11.5)


def test_an_early_stopped_run_ends_its_curve_at_its_last_step():
    result = train(tiny(steps=400, early_stop=0.5), progress=False)
    assert result.early_stopped and result.steps < 400
    assert result.curve[0][0] == 1 and result.curve[-1][0] == result.steps


def test_a_resumed_run_has_the_curve_of_an_uninterrupted_one(tmp_path):
    cfg = tiny(steps=24, early_stop=None, training=["state_passing"])
    expected = Trainer(cfg, progress=False).fit()
    trainer = Trainer(cfg, progress=False)
    for _ in range(10):
        trainer.train_step()
    checkpoint.save(trainer, tmp_path)
    resumed = Trainer(cfg, progress=False, checkpoint_dir=tmp_path, resume=True).fit()
    assert [p[:2] for p in resumed.curve] == [p[:2] for p in expected.curve]
    assert resumed.curve[9][2] <= resumed.curve[10][2]  # the clock goes on from the checkpoint


def test_store_keeps_the_curve_in_its_own_table_with_the_run(db):
    cfg = tiny()
    curve = [(1, 2.0, 1.5), (10, 1.0, 1.6), (30, 0.5, 1.8)]
    result = fake_result(cfg, {8: 0.5}).model_copy(update={"curve": curve})
    with ResultStore(db) as store:
        store.put(result)
        assert store.curves() == {result.config_hash: curve}
        store.put(result.model_copy(update={"curve": curve[:2]}))  # a rerun replaces the curve
        assert store.curves({result.config_hash}) == {result.config_hash: curve[:2]}
        assert store.curves({"other"}) == {}
        assert store.delete(result.config_hash) and store.curves() == {}
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM curves").fetchone()[0] == 0


def test_a_result_without_a_curve_still_loads_and_stores(db):
    data = fake_result(tiny(), {8: 0.5}).model_dump(mode="json")
    del data["curve"]  # as a result written before curves were recorded
    result = RunResult.model_validate(data)
    assert result.curve == []
    with ResultStore(db) as store:
        store.put(result)
        assert store.curves() == {} and len(store) == 1


@pytest.mark.parametrize("steps", [1, 7])
def test_short_runs_record_every_step(steps):
    result = train(tiny(steps=steps, early_stop=None), progress=False)
    assert [p[0] for p in result.curve] == list(range(1, steps + 1))
