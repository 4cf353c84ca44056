"""Sweeps: resumable after SIGKILL with no finished run lost, worker processes, failures reported."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml
from harness_tasks import HERE, tiny

from recur.cli import main
from recur.config import SweepConfig, config_hash
from recur.results import ResultStore
from recur.sweep import run_sweep

REPO = HERE.parent


def _sweep_file(path: Path, runs: int, steps: int) -> Path:
    path.write_text(yaml.safe_dump({
        "imports": ["harness_tasks"], "models": ["elman"], "tasks": ["harness_shift"],
        "seeds": list(range(runs)), "steps": steps, "d_model": 16, "n_layers": 1, "seq_len": 8, "batch_size": 16,
        "eval_batches": 1, "mlp": None, "early_stop": None, "device": "cpu", "lr": 1e-2,
    }))
    return path


def _stored(db: Path) -> dict[str, tuple]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(db, timeout=30)
    try:
        return {r[0]: r[1:] for r in conn.execute("SELECT hash, seconds, metrics, created FROM runs")}
    except sqlite3.OperationalError:  # the table is not created yet
        return {}
    finally:
        conn.close()


def test_sweep_killed_with_sigkill_loses_no_finished_run_and_resumes(tmp_path, capsys):
    runs = 8
    grid = _sweep_file(tmp_path / "grid.yaml", runs, steps=150)
    db = tmp_path / "runs.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from recur.cli import main; sys.exit(main(sys.argv[1:]))",
         "sweep", str(grid), "--db", str(db)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_stored(db)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the sweep wrote no run in 120 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    before = _stored(db)
    assert 2 <= len(before) < runs, "the sweep finished before it could be killed: make its runs longer"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()

    assert main(["sweep", str(grid), "--db", str(db)]) == 0
    err = capsys.readouterr().err
    assert f"{len(before)} of {runs} runs already in" in err
    after = _stored(db)
    expected = {config_hash(c) for c in SweepConfig.from_yaml(grid).expand()}
    assert set(after) == expected
    assert all(after[h] == row for h, row in before.items())  # finished runs kept, not re-run


def test_sweep_in_worker_processes_records_every_run_and_reports_failures(tmp_path):
    ok = [tiny(seed=s, steps=5) for s in range(2)]
    bad = tiny(model_args={"nope": 1})  # fails in the worker: reported, not written
    with ResultStore(tmp_path / "runs.sqlite") as store:
        summary = run_sweep([*ok, bad], store, workers=2, imports=["harness_tasks"], progress=False)
        assert sorted(summary.done) == sorted(config_hash(c) for c in ok)
        assert len(summary.failed) == 1 and "'nope'" in summary.failed[0][1]
        assert store.hashes() == {config_hash(c) for c in ok}
        again = run_sweep([*ok, bad], store, workers=2, progress=False, imports=["harness_tasks"])
        assert again.skipped == 2 and again.done == [] and len(again.failed) == 1


# ------------------------------------------------------------------ schema 1 (the first release) -> 2
# A run as the first release wrote it: the flat config, every field, hashed over all of them.
