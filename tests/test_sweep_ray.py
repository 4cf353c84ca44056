"""Sweeps on Ray (a real local Ray of 2 CPUs, no mocks): each run a task, the driver alone writes the
store; a Ray run stores what a local run stores; resume skips finished runs; a worker killed mid-run
is retried, or its run is reported failed and nothing of it is written; Ctrl-C stops the tasks and
keeps every finished run; without Ray installed the error says how to install it."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import yaml
from harness_hold import wait_for_holder
from harness_tasks import HERE, tiny
from rich.console import Console

from recur.cli import main
from recur.config import RunConfig, config_hash
from recur.ray_executor import start_local_ray
from recur.results import PER_RUN_TABLES, ResultStore
from recur.sweep import run_sweep

REPO = HERE.parent


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module, started as the executor starts its own (this process's sys.path,
    so its workers import harness_tasks and harness_hold)."""
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200, soft_wrap=True), buf


def _with_evals(cfg: RunConfig, every: int = 2) -> RunConfig:
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": every})})


def _held(tmp_path: Path, **fields) -> RunConfig:
    hold = tmp_path / "hold"
    hold.mkdir()
    return _with_evals(tiny(task="harness_hold", task_args={"hold_dir": str(hold)}, steps=4, **fields))


def _rows(db: Path, h: str) -> dict[str, int]:
    """How many rows each table holds for run ``h``."""
    conn = sqlite3.connect(db)
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t} WHERE hash = ?", (h,)).fetchone()[0]
                for t in ("runs", *PER_RUN_TABLES, "claims")}
    finally:
        conn.close()


def _kill_when_held(hold: Path, killed: list[int]) -> threading.Thread:
    def kill():
        pid = wait_for_holder(hold)
        assert pid != os.getpid()  # a Ray worker, never the driver
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


def test_ray_sweep_stores_what_a_local_sweep_stores_and_resumes(local_ray, tmp_path):
    ok = [_with_evals(tiny(seed=0, steps=4)), tiny(seed=1, steps=4), tiny(seed=2, steps=4)]
    bad = tiny(steps=4, model_args={"nope": 1})  # raises in the task: reported, not written, not retried
    console, out = _console()
    with ResultStore(tmp_path / "ray.sqlite") as store:
        summary = run_sweep([*ok, bad], store, executor="ray", imports=["harness_tasks"], console=console,
                            progress=False)
        assert sorted(summary.done) == sorted(config_hash(c) for c in ok)
        assert len(summary.failed) == 1 and "'nope'" in summary.failed[0][1]
        assert store.hashes() == {config_hash(c) for c in ok} and store.claims() == {}
        text = out.getvalue()
        assert "running 4 runs as Ray tasks on the Ray this process is connected to" in text
        assert text.count("done ") == 3 and text.count("failed ") == 1
        again = run_sweep([*ok, bad], store, executor="ray", imports=["harness_tasks"], console=console,
                          progress=False)
        assert again.skipped == 3 and again.done == [] and len(again.failed) == 1
        by_ray = {r["hash"]: r for r in store.all_runs()}
        ray_curves, ray_evals = store.curves(), store.evals()
    with ResultStore(tmp_path / "local.sqlite") as store:  # the same configs in this process
        run_sweep(ok, store, progress=False, console=_console()[0])
        here = {r["hash"]: r for r in store.all_runs()}
        curves, evals = store.curves(), store.evals()
    assert by_ray.keys() == here.keys()
    for h, run in here.items():  # one thread each, same seeds: the same numbers, bit for bit
        assert (by_ray[h]["metrics"], by_ray[h]["train_loss"], by_ray[h]["params"]) == \
            (run["metrics"], run["train_loss"], run["params"])
        assert [p[:2] for p in ray_curves[h]] == [p[:2] for p in curves[h]]
    assert ray_evals == evals and len(evals[config_hash(ok[0])]) == 2  # eval.every=2 over 4 steps


def test_a_killed_ray_worker_is_retried_and_its_run_stored_whole(local_ray, tmp_path):
    cfg = _held(tmp_path)
    h, killed = config_hash(cfg), []
    killer = _kill_when_held(tmp_path / "hold", killed)
    with ResultStore(tmp_path / "runs.sqlite") as store:
        summary = run_sweep([cfg], store, executor="ray", retries=1, imports=["harness_hold"],
                            console=_console()[0], progress=False)
        killer.join(timeout=5)
        assert killed, "the first attempt was never killed"
        assert summary.done == [h] and summary.failed == []
        run = store.get(h)
        assert run["steps"] == 4 and store.all_runs()[0]["info"] == {"hold_dir": str(tmp_path / "hold")}
        assert [p[0] for p in store.curves()[h]] == [1, 2, 3, 4]  # the retry's whole curve
        assert [e[0] for e in store.evals()[h]] == [2, 4]
    assert _rows(tmp_path / "runs.sqlite", h) == {"runs": 1, "curves": 4, "evals": 2, "run_info": 1, "claims": 0, "depth_evals": 0}


def test_a_ray_worker_killed_with_no_retry_left_fails_its_run_and_writes_nothing_of_it(local_ray, tmp_path):
    cfg, other = _held(tmp_path), tiny(seed=5, steps=4)
    h, killed = config_hash(cfg), []
    killer = _kill_when_held(tmp_path / "hold", killed)
    console, out = _console()
    with ResultStore(tmp_path / "runs.sqlite") as store:
        summary = run_sweep([cfg, other], store, executor="ray", retries=0, imports=["harness_hold"],
                            console=console, progress=False)
        killer.join(timeout=5)
        assert killed
        assert summary.done == [config_hash(other)]  # the sweep went on
        assert [c for c, _ in summary.failed] == [cfg]
        why = summary.failed[0][1]
        assert why.startswith("its Ray worker died (WorkerCrashedError") and "the run was not recorded" in why
        assert "its Ray worker died" in out.getvalue()
    assert _rows(tmp_path / "runs.sqlite", h) == {"runs": 0, "curves": 0, "evals": 0, "run_info": 0, "claims": 0, "depth_evals": 0}


def _grid(path: Path, runs: list[dict], imports: list[str]) -> Path:
    """A sweep file of tiny harness runs, one model per entry of ``runs`` ({"task": ..., "seeds": [...]})."""
    shared = {"models": ["elman"], "steps": 4, "d_model": 16, "n_layers": 1, "seq_len": 8, "batch_size": 16,
              "eval_batches": 1, "mlp": None, "early_stop": None, "device": "cpu", "lr": 1e-2}
    path.write_text(yaml.safe_dump({"imports": imports, "tasks": runs, **shared}))
    return path


def test_cli_sweep_with_executor_ray_and_its_usage_errors(local_ray, tmp_path, capsys):
    grid = _grid(tmp_path / "grid.yaml", [{"name": "harness_shift"}], ["harness_tasks"])
    db = tmp_path / "runs.sqlite"
    assert main(["sweep", str(grid), "--executor", "ray", "--db", str(db)]) == 0
    err = capsys.readouterr().err
    assert "as Ray tasks" in err and "1 runs done, 0 skipped, 0 failed" in err
    assert main(["sweep", str(grid), "--executor", "ray", "--db", str(db)]) == 0
    assert "1 of 1 runs already in" in capsys.readouterr().err
    for argv, message in ((["--address", "auto"], "--address is an option of --executor ray"),
                          (["--executor", "ray", "--retries", "-1"], "--retries must be >= 0"),
                          (["--executor", "dask"], "invalid choice: 'dask'")):
        assert main(["sweep", str(grid), "--db", str(db), *argv]) == 2
        assert message in capsys.readouterr().err


def test_without_ray_installed_the_error_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is absent
    grid = _grid(tmp_path / "grid.yaml", [{"name": "harness_shift"}], ["harness_tasks"])
    db = tmp_path / "runs.sqlite"
    assert main(["sweep", str(grid), "--executor", "ray", "--db", str(db)]) == 2
    assert "pip install 'recur[ray]'" in capsys.readouterr().err
    assert not db.exists()  # refused before the store was opened
    with ResultStore(db) as store:
        with pytest.raises(ImportError, match=r"recur\[ray\]"):
            run_sweep([tiny(steps=4)], store, executor="ray", progress=False, console=_console()[0])
        assert len(store) == 0 and store.claims() == {}


def test_ctrl_c_on_a_ray_sweep_stops_its_tasks_and_keeps_every_finished_run(tmp_path):
    """`recur sweep --executor ray` on its own local Ray, Ctrl-C'd as a terminal does (SIGINT to the
    process group) while one run is stored and another runs: exit 130, the finished run stored, the
    running one's worker killed and nothing of it written; the sweep then resumes."""
    hold = tmp_path / "hold"
    hold.mkdir()
    grid = _grid(tmp_path / "grid.yaml", [{"name": "harness_shift"},
                                          {"name": "harness_hold", "args": {"hold_dir": str(hold)}}],
                 ["harness_tasks", "harness_hold"])
    db = tmp_path / "runs.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from recur.cli import main; sys.exit(main(sys.argv[1:]))",
         "sweep", str(grid), "--executor", "ray", "--workers", "2", "--db", str(db)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        holder = wait_for_holder(hold, timeout=90)
        deadline = time.monotonic() + 60
        while not (db.exists() and _stored_count(db) == 1):
            assert proc.poll() is None and time.monotonic() < deadline, "the quick run was not stored"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted: 1 run stored, 1 not run (1 stopped while running), 0 failed" in err
    deadline = time.monotonic() + 10
    while _alive(holder):  # its worker was killed (ray.cancel force), not left training
        assert time.monotonic() < deadline, f"the held run's worker {holder} still runs"
        time.sleep(0.1)
    held = next(c for c in _configs(grid) if c.task.name == "harness_hold")
    assert _rows(db, config_hash(held)) == {"runs": 0, "curves": 0, "evals": 0, "run_info": 0, "claims": 0, "depth_evals": 0}
    assert main(["sweep", str(grid), "--db", str(db)]) == 0  # resumed here (the hold is spent): both stored
    with ResultStore(db) as store:
        assert store.hashes() == {config_hash(c) for c in _configs(grid)}


def _configs(grid: Path) -> list[RunConfig]:
    from recur.config import SweepConfig

    return SweepConfig.from_yaml(grid).expand()


def _stored_count(db: Path) -> int:
    conn = sqlite3.connect(db, timeout=30)
    try:
        return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0
    finally:
        conn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:  # a zombie is dead
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:
        return False
