"""Claims of runs in the store: two sweeps over one store split the grid (no run trained twice, none
lost); a claim whose owner died, or whose lease ran out, is taken over; a lease is renewed while its
run trains; a sweep waits for the runs another sweep trains, or says how many it left to it."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
from harness_tasks import HERE, fake_result, tiny

from recur.config import SweepConfig, config_hash
from recur.results import ResultStore, claim_is_live, new_owner
from recur.sweep import run_sweep

from test_sweep import _sweep_file

REPO = HERE.parent


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # exited and reaped: no such process (until the pid is reused, much later)
    return proc.pid


def _force_claim(store: ResultStore, h: str, owner: str, expires: float) -> None:
    """A claim as another sweep (of another host, or a dead one) left it."""
    conn = sqlite3.connect(store.path)
    conn.execute("INSERT OR REPLACE INTO claims (hash, owner, expires) VALUES (?, ?, ?)", (h, owner, expires))
    conn.commit()
    conn.close()


def test_claim_renew_release_and_put(db):
    a, b = new_owner(), new_owner()
    assert a != b and a.split(":")[:2] == [socket.gethostname(), str(os.getpid())]
    cfg = tiny()
    h = config_hash(cfg)
    with ResultStore(db) as store:
        assert store.claim(a, h, lease=60)
        assert not store.claim(b, h, lease=60)  # a live claim of another owner
        assert store.claim(a, h, lease=60)  # one's own: renewed
        first = store.claims()[h]["expires"]
        time.sleep(0.01)
        assert store.renew(a, lease=120) == {h} and store.claims()[h]["expires"] > first
        assert store.renew(b) == set()
        assert store.release(b, h) == 0 and store.release(a, h) == 1 and store.claims() == {}
        assert store.claim(b, h)  # released: anyone may claim it
        store.put(fake_result(cfg, {8: 0.5}))
        assert store.claims() == {}  # stored: its claim went in the same transaction
        assert not store.claim(a, h) and not store.claim(b, h)  # finished: nobody trains it again
        assert store.claim(a, "x") and store.claim(a, "y") and store.release(a) == 2  # every claim of a


def test_a_claim_of_a_dead_process_or_past_its_lease_is_taken_over(db):
    now = time.time()
    here = socket.gethostname()
    assert not claim_is_live(f"{here}:{_dead_pid()}:abc", now + 3600, now)  # killed sweep of this host: at once
    assert claim_is_live(f"{here}:{os.getpid()}:abc", now + 3600, now)
    assert claim_is_live(f"elsewhere:{_dead_pid()}:abc", now + 3600, now)  # another host: its lease decides
    assert not claim_is_live("elsewhere:1:abc", now - 1, now)
    with ResultStore(db) as store:
        _force_claim(store, "dead", f"{here}:{_dead_pid()}:abc", now + 3600)
        _force_claim(store, "expired", "elsewhere:1:abc", now - 1)
        _force_claim(store, "live", "elsewhere:1:abc", now + 3600)
        me = new_owner()
        assert store.claim(me, "dead") and store.claim(me, "expired") and not store.claim(me, "live")
        assert {h: c["owner"] == me for h, c in store.claims().items()} == {"dead": True, "expired": True,
                                                                               "live": False}


def test_a_sweep_takes_over_a_dead_sweeps_runs_at_once_and_waits_out_a_live_lease(db, capsys):
    configs = [tiny(seed=s, steps=5) for s in range(3)]
    hashes = [config_hash(c) for c in configs]
    with ResultStore(db) as store:
        _force_claim(store, hashes[0], f"{socket.gethostname()}:{_dead_pid()}:abc", time.time() + 3600)
        _force_claim(store, hashes[1], "elsewhere:1:abc", time.time() + 3600)  # live, far from expiry
        summary = run_sweep(configs, store, progress=False, wait_for_others=False)
        assert sorted(summary.done) == sorted([hashes[0], hashes[2]]) and summary.elsewhere == 1
        assert set(store.claims()) == {hashes[1]}  # the other sweep's claim is left alone

        _force_claim(store, hashes[1], "elsewhere:1:abc", time.time() + 2.0)  # its owner stops renewing it
        start = time.monotonic()
        again = run_sweep(configs, store, progress=False, poll=0.2)
        waited = time.monotonic() - start
        assert again.done == [hashes[1]] and again.skipped == 2 and again.elsewhere == 0
        assert waited >= 1.5, "trained before the other sweep's lease ran out"
        assert "waiting for 1 run being trained by another sweep" in capsys.readouterr().err
        assert store.hashes() == set(hashes) and store.claims() == {}


def test_the_lease_is_renewed_while_a_run_trains(db, monkeypatch):
    cfg = tiny(steps=5)
    h = config_hash(cfg)
    seen = []

    def slow_train(c, **kwargs):
        time.sleep(1.6)  # twice the lease: alive only if the heartbeat renewed it
        with ResultStore(db) as other:  # as another sweep sees the store
            seen.append(other.claims()[h])
            seen.append(other.claim(new_owner(), h))
        return fake_result(c, {8: 0.5})

    monkeypatch.setattr("recur.sweep.train", slow_train)
    with ResultStore(db) as store:
        summary = run_sweep([cfg], store, progress=False, lease=0.8, heartbeat=0.1)
        assert summary.done == [h]
    claim, taken = seen
    assert claim["live"] and claim["expires"] > time.time() - 1.0 and taken is False


def test_two_concurrent_sweeps_over_one_store_train_every_run_exactly_once(tmp_path):
    runs = 6
    # runs of a few seconds each: long enough that the second sweep starts before the first is done
    grid = _sweep_file(tmp_path / "grid.yaml", runs, steps=1500)
    db = tmp_path / "runs.sqlite"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]), "OMP_NUM_THREADS": "1"}
    procs = []
    # the sweep with worker processes first, the in-process one (which starts training sooner) once
    # the first is about to train: both then train while the other does, whatever the machine's load
    for name, workers in (("b", 2), ("a", 1)):
        log = tmp_path / f"{name}.log"
        with open(log, "w") as err:
            procs.append((log, subprocess.Popen(
                [sys.executable, "-c", "import sys; from recur.cli import main; sys.exit(main(sys.argv[1:]))",
                 "sweep", str(grid), "--db", str(db), "--workers", str(workers)],
                env=env, stdout=subprocess.DEVNULL, stderr=err)))
        deadline = time.monotonic() + 120
        while name == "b" and "running" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    logs = []
    for log, proc in procs:
        rc = proc.wait(timeout=600)
        logs.append(log.read_text())
        assert rc == 0, logs[-1]
    trained = [re.findall(r"^done +harness_shift elman .* seed=(\d+):", text, re.M) for text in logs]
    everything = [int(s) for seeds in trained for s in seeds]
    assert sorted(everything) == list(range(runs)), logs  # each run trained once, by one of the two
    assert all(trained), f"one sweep trained everything: no overlap to test\n{logs}"
    for text, seeds in zip(logs, trained):
        done = re.search(r"(\d+) runs done, (\d+) skipped, 0 failed(?:, (\d+) stored by another sweep)?", text)
        assert done and int(done[1]) == len(seeds), text
        assert int(done[1]) + int(done[2]) + int(done[3] or 0) == runs, text  # the rest: the other's
    with ResultStore(db) as store:
        assert store.hashes() == {config_hash(c) for c in SweepConfig.from_yaml(grid).expand()}
        assert store.claims() == {}
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


@pytest.mark.parametrize("heartbeat, lease", [(0, 60), (10, 10), (20, 10)])
def test_heartbeat_must_be_shorter_than_the_lease(db, heartbeat, lease):
    with ResultStore(db) as store, pytest.raises(ValueError, match="expected 0 < heartbeat < lease"):
        run_sweep([tiny()], store, heartbeat=heartbeat, lease=lease)
