"""The results store: round trip, one transaction per run, the leaderboard, migration of older schemas."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from harness_tasks import HERE, fake_result, tiny

from recur.config import RunConfig, config_hash
from recur.results import SCHEMA_VERSION, ResultStore
from recur.sweep import run_sweep

REPO = HERE.parent


def test_round_trip_and_queries(db):
    cfg = tiny(seed=3)
    result = fake_result(cfg, {8: 0.75, 32: 0.5}, state_size=123)
    with ResultStore(db) as store:
        assert not store.has(result.config_hash) and store.get(result.config_hash) is None
        store.put(result)
    with ResultStore(db) as store:  # reopened: it was committed
        assert store.has(result.config_hash) and len(store) == 1
        run = store.get(result.config_hash)
        assert run["config"] == cfg.model_dump(mode="json") and run["metrics"] == result.metrics
        assert (run["task"], run["model"], run["seed"], run["state_size"], run["train_seq_len"]) == \
            ("harness_shift", "elman", 3, 123, 8)
        assert run["recur_version"] and run["created"]
        assert store.all_runs() == [run] and store.all_runs(task="other") == [] and store.tasks() == ["harness_shift"]


def test_leaderboard_averages_seeds_and_keeps_the_best_lr(db):
    with ResultStore(db) as store:
        for seed, acc in ((0, 0.6), (1, 0.8)):
            store.put(fake_result(tiny(seed=seed, lr=1e-3), {8: acc, 32: acc / 2}))
        store.put(fake_result(tiny(lr=1e-2), {8: 0.5, 32: 0.1}))
        store.put(fake_result(tiny(model="lstm"), {8: 0.9, 32: 0.9}, state_size=200))
        rows = store.leaderboard()
    assert [r["model"] for r in rows] == ["lstm", "elman"]  # best accuracy first
    elman = rows[1]
    assert elman["lr"] == 1e-3 and elman["seeds"] == 2
    assert elman["metrics"]["8"]["accuracy"] == 0.7 and elman["metrics"]["32"]["accuracy"] == 0.35


FIRST_RELEASE = {"task": "harness_shift", "task_args": {}, "model": "elman", "model_args": {}, "d_model": 16,
                 "n_layers": 1, "mlp": None, "seq_len": 8, "eval_lengths": [8, 32], "steps": 30, "batch_size": 16,
                 "lr": 0.01, "weight_decay": 0.1, "warmup": 0.1, "min_lr_ratio": 0.0, "grad_clip": 1.0, "seed": 0,
                 "device": "cpu", "eval_batches": 1, "early_stop": 0.99, "early_stop_window": 20,
                 "state_init": "zeros", "state_noise_std": 1.0, "state_passing": False}
# The first release's table, as it created it (not results._SCHEMA: that one may change with later schemas).
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash           TEXT PRIMARY KEY,   -- config_hash(config)
    config         TEXT NOT NULL,      -- canonical JSON of the RunConfig
    task           TEXT NOT NULL,
    model          TEXT NOT NULL,      -- model name, preset, or pattern joined by '+'
    seed           INTEGER NOT NULL,
    d_model        INTEGER NOT NULL,
    n_layers       INTEGER NOT NULL,
    lr             REAL NOT NULL,
    params         INTEGER NOT NULL,
    state_size     INTEGER NOT NULL,   -- floats per sequence at the training length
    train_seq_len  INTEGER NOT NULL,
    steps          INTEGER NOT NULL,   -- steps actually run
    seconds        REAL NOT NULL,
    metrics        TEXT NOT NULL,      -- JSON {eval length: {"accuracy", "exact_match"}}
    train_loss     REAL,
    train_accuracy REAL,
    early_stopped  INTEGER NOT NULL,
    created        TEXT NOT NULL,      -- ISO 8601, UTC
    recur_version  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_task_model ON runs (task, model);
"""
V1_RUNS = [FIRST_RELEASE,
           {**FIRST_RELEASE, "seed": 1, "state_init": "noise", "state_noise_std": 0.5},
           {**FIRST_RELEASE, "state_passing": True, "lr": 0.003}]


def _v1_json(flat: dict) -> str:
    return json.dumps(flat, sort_keys=True, separators=(",", ":"))


def _v1_hash(flat: dict) -> str:
    return hashlib.sha256(_v1_json(flat).encode()).hexdigest()[:16]


def _write_v1_store(path: Path, configs: list[dict]) -> None:
    """A store as the first release left it: its table and index, WAL journal, user_version 1."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    conn.execute("PRAGMA user_version = 1")
    for i, flat in enumerate(configs):
        acc = 0.9 - 0.1 * i
        row = {"hash": _v1_hash(flat), "config": _v1_json(flat), "task": flat["task"], "model": flat["model"],
               "seed": flat["seed"], "d_model": flat["d_model"], "n_layers": flat["n_layers"], "lr": flat["lr"],
               "params": 704 + i, "state_size": 16, "train_seq_len": flat["seq_len"], "steps": flat["steps"] - i,
               "seconds": 1.25 + i,
               "metrics": json.dumps({"8": {"accuracy": acc, "exact_match": acc / 2},
                                      "32": {"accuracy": acc / 3, "exact_match": 0.0}}, sort_keys=True),
               "train_loss": 0.5 + i, "train_accuracy": 0.75, "early_stopped": i % 2,
               "created": f"2025-01-0{i + 1}T12:00:00+00:00", "recur_version": "0.1.0"}
        conn.execute(f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    conn.close()


def _snapshot(path: Path) -> tuple:
    """Everything a migration could change: the schema version, the schema, every row."""
    conn = sqlite3.connect(path)
    try:
        return (conn.execute("PRAGMA user_version").fetchone()[0],
                sorted(conn.execute("SELECT type, name, sql FROM sqlite_master")),
                conn.execute("SELECT * FROM runs ORDER BY hash").fetchall())
    finally:
        conn.close()


def test_a_schema_1_store_is_migrated_and_a_sweep_skips_its_runs(db, monkeypatch):
    _write_v1_store(db, V1_RUNS)
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    old = {r["hash"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    conn.close()
    # The same runs written today: the tiny() helper, and the nested shape.
    today = [tiny(),
             tiny(seed=1, training=[{"name": "state_noise", "args": {"std": 0.5}}]),
             RunConfig(task={"name": "harness_shift", "seq_len": 8},
                       model={"mixer": "elman", "d_model": 16, "n_layers": 1, "block": {"mlp": None}},
                       optim={"steps": 30, "batch_size": 16, "lr": 3e-3}, eval={"batches": 1}, device="cpu",
                       training=["state_passing"])]
    new_hashes = [config_hash(RunConfig.model_validate(flat)) for flat in V1_RUNS]
    assert new_hashes == [config_hash(c) for c in today]
    assert not set(new_hashes) & set(old), "the old hashes are renamed"

    with ResultStore(db) as store:
        assert store.migrated == len(V1_RUNS)
        assert store.hashes() == set(new_hashes) and len(store) == len(V1_RUNS)
        for flat, h, cfg in zip(V1_RUNS, new_hashes, today):
            before, run = old[_v1_hash(flat)], store.get(h)
            assert run["config"] == cfg.model_dump(mode="json")  # nested, every field
            assert "lr" not in run["config"] and run["config"]["optim"]["lr"] == flat["lr"]
            assert run["metrics"] == json.loads(before["metrics"])
            for column in ("task", "model", "seed", "d_model", "n_layers", "lr", "params", "state_size",
                           "train_seq_len", "steps", "seconds", "train_loss", "train_accuracy", "created",
                           "recur_version"):
                assert run[column] == before[column], column
            assert run["early_stopped"] == bool(before["early_stopped"])
        assert [m["name"] for m in store.get(new_hashes[1])["config"]["training"]] == ["state_noise"]
        assert store.get(new_hashes[1])["config"]["training"][0]["args"]["std"] == 0.5
        assert [m["name"] for m in store.get(new_hashes[2])["config"]["training"]] == ["state_passing"]
    migrated = _snapshot(db)
    assert migrated[0] == SCHEMA_VERSION == 2

    def no_training(cfg, **kwargs):
        raise AssertionError(f"{config_hash(cfg)} was trained again")

    monkeypatch.setattr("recur.sweep.train", no_training)
    with ResultStore(db) as store:  # opened again: nothing left to migrate
        assert store.migrated == 0
        summary = run_sweep(today, store, progress=False)
    assert (summary.total, summary.skipped, summary.done, summary.failed) == (3, 3, [], [])
    assert _snapshot(db) == migrated


def test_two_schema_1_runs_of_one_config_become_one_run_the_newer_kept(db):
    # The old hash counted the noise std of a run without state noise; the new one does not.
    _write_v1_store(db, [FIRST_RELEASE, {**FIRST_RELEASE, "state_noise_std": 2.0}])
    with ResultStore(db) as store:
        assert store.migrated == 2 and store.hashes() == {config_hash(tiny())}
        assert store.get(config_hash(tiny()))["created"] == "2025-01-02T12:00:00+00:00"


def test_a_failed_migration_leaves_the_schema_1_store_as_it_was(db):
    bad = {**FIRST_RELEASE, "seed": 7, "lr": 0.0}  # the first release wrote it; lr > 0 is checked now
    _write_v1_store(db, [*V1_RUNS, bad])  # the newest: migrated last, after the others were rewritten
    before = _snapshot(db)
    assert before[0] == 1 and len(before[2]) == 4
    with pytest.raises(ValueError, match="cannot migrate run .*optim.lr"):
        ResultStore(db)
    assert _snapshot(db) == before  # schema 1, the old rows under their old hashes, nothing half-done

    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM runs WHERE hash = ?", (_v1_hash(bad),))
    conn.commit()
    conn.close()
    with ResultStore(db) as store:  # repaired: the migration now goes through
        assert store.migrated == len(V1_RUNS) and len(store) == len(V1_RUNS)
