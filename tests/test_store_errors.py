"""Results-store paths that cannot be used as asked: `recur run/sweep/report` say in one line what was
expected and what was found, exit 2, print no traceback, and leave the file as it was. A store on
read-only media is reported (read-only, nothing written to it); writing to it is refused clearly."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from harness_tasks import HERE, fake_result, tiny

from recur.cli import main
from recur.results import ResultStore, StoreError

from test_cli import TINY
from test_sweep import _sweep_file

REPO = HERE.parent


def _store(path: Path, runs: int = 3) -> Path:
    with ResultStore(path) as store:
        for seed in range(runs):
            store.put(fake_result(tiny(seed=seed), {8: 0.5 + seed / 10, 32: 0.25}))
    return path


def _directory(tmp: Path) -> Path:
    (tmp / "adir").mkdir()
    return tmp / "adir"


def _text(tmp: Path) -> Path:
    (tmp / "notes.sqlite").write_text("these are my notes, not a database\n" * 20)
    return tmp / "notes.sqlite"


def _truncated(tmp: Path) -> Path:
    path = _store(tmp / "cut.sqlite", runs=30)
    os.truncate(path, path.stat().st_size // 2)
    return path


def _corrupted(tmp: Path) -> Path:
    path = _store(tmp / "bad.sqlite", runs=30)
    with open(path, "r+b") as f:  # a page of the runs table overwritten
        f.seek(2 * 4096)
        f.write(b"\xa5" * 4096)
    return path


def _other_app(tmp: Path) -> Path:
    conn = sqlite3.connect(tmp / "app.db")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()
    return tmp / "app.db"


def _other_runs(tmp: Path) -> Path:
    conn = sqlite3.connect(tmp / "ci.db")
    conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, status TEXT)")  # someone else's "runs"
    conn.commit()
    conn.close()
    return tmp / "ci.db"


def _newer(tmp: Path) -> Path:
    path = _store(tmp / "future.sqlite")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    return path


CASES = {
    "directory": (_directory, "expected a SQLite file, got a directory"),
    "not sqlite": (_text, "expected a SQLite file, got a text file that is not SQLite (it starts with b'these are"),
    "truncated": (_truncated, "expected an intact SQLite store, got a truncated or corrupted one"),
    "corrupted": (_corrupted, "expected an intact SQLite store, got a truncated or corrupted one"),
    "another application": (_other_app, "expected a recur results store (a runs table), got a SQLite database "
                                        "of another application (tables: users); it was left unchanged"),
    "another runs table": (_other_runs, "expected a recur results store, got a SQLite database whose runs table "
                                        "lacks recur's columns (hash, config, task, model, ...), another "
                                        "application's table; it was left unchanged"),
    "newer schema": (_newer, "expected schema 2 or older, got schema 3, written by a newer recur: upgrade recur"),
}


def _snapshot(path: Path) -> dict:
    """Every file of the store (and its -wal/-shm), byte for byte."""
    if path.is_dir():
        return {"dir": sorted(p.name for p in path.iterdir())}
    return {p.name: p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name)}


@pytest.mark.parametrize("command", ["run", "sweep", "report"])
@pytest.mark.parametrize("case", list(CASES))
def test_an_unusable_store_is_one_clear_line_exit_2_and_left_unchanged(tmp_path, capsys, case, command):
    make, message = CASES[case]
    path = make(tmp_path)
    before = _snapshot(path)
    argv = {"run": ["run", *TINY], "sweep": ["sweep", str(_sweep_file(tmp_path / "grid.yaml", 2, steps=5))],
            "report": ["report", "--out", str(tmp_path / "rep")]}[command]
    assert main([*argv, "--db", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"recur {command}: error: results store {path}: {message}" in " ".join(err.split()), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _snapshot(path) == before
    assert not (tmp_path / "rep").exists()


def test_the_library_raises_store_error_a_value_error(tmp_path):
    for i, (make, message) in enumerate(CASES.values()):
        (tmp_path / str(i)).mkdir()
        path = make(tmp_path / str(i))
        with pytest.raises(StoreError, match="results store") as info:
            ResultStore(path)
        assert message in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(StoreError, match="expected a path in a directory, got one below .*afile, which is a file"):
        (tmp_path / "afile").write_text("x")
        ResultStore(tmp_path / "afile" / "runs.sqlite")


def test_report_out_at_an_existing_file_is_a_clear_error(tmp_path, capsys):
    db = _store(tmp_path / "runs.sqlite")
    (tmp_path / "report.html").write_text("<html>mine</html>")
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "report.html")]) == 2
    err = capsys.readouterr().err
    assert f"recur report: error: --out {tmp_path / 'report.html'}: expected a report directory, got an existing file" \
        in err and "Traceback" not in err
    assert (tmp_path / "report.html").read_text() == "<html>mine</html>"


def test_a_real_recur_process_prints_one_line_and_no_traceback(tmp_path):
    path = _directory(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "recur.cli", "report", "--db", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"recur report: error: results store {path}: expected a SQLite file, got a "
                                   f"directory (pass a file path such as {path / 'recur-results.sqlite'})")


# ------------------------------------------------------------------ read-only media
# One process runs each command line through the CLI's main and prints what it returned and wrote.
_SCRIPT = r"""
import contextlib, io, json, sys
from recur.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    results.append({"code": code, "err": err.getvalue(), "out": out.getvalue()})
print(json.dumps(results))
"""


def _run_read_only(directory: Path, argvs: list[list[str]]) -> list[dict]:
    """Run the command lines with ``directory`` read-only: by its permissions where they bind (not
    root); as root, which they do not bind, by a read-only bind mount in a mount namespace of the
    command's own (``unshare -m``: the test's view and everyone else's stay writable)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    cmd = [sys.executable, "-c", _SCRIPT, json.dumps(argvs)]
    restore = []
    if os.geteuid() != 0:
        for p in [directory, *directory.iterdir()]:
            restore.append((p, p.stat().st_mode))
            p.chmod(p.stat().st_mode & ~0o222)
    else:
        d = shlex.quote(str(directory))
        mount = f"mount --bind {d} {d} && mount -o remount,ro,bind {d}"
        if not shutil.which("unshare"):
            pytest.skip("running as root, where permissions do not make a directory read-only, and no unshare(1)")
        probe = subprocess.run(["unshare", "-m", "sh", "-c", mount], capture_output=True, text=True)
        if probe.returncode != 0:
            pytest.skip(f"running as root, where permissions do not make a directory read-only, and a read-only "
                        f"bind mount cannot be made here: {probe.stderr.strip()}")
        cmd = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *cmd]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    finally:
        for p, mode in reversed(restore):
            p.chmod(mode)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_store_on_read_only_media_is_reported_and_writing_to_it_is_refused(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    db = _store(media / "runs.sqlite")
    assert sorted(p.name for p in media.iterdir()) == ["runs.sqlite"]  # WAL store, closed: no -wal, no -shm
    before = db.read_bytes()
    grid = _sweep_file(tmp_path / "grid.yaml", 2, steps=5)
    report, on_media = tmp_path / "rep", media / "rep"
    results = _run_read_only(media, [
        ["report", "--db", str(db), "--out", str(report), "--json"],
        ["report", "--db", str(db), "--out", str(on_media)],
        ["run", *TINY, "--db", str(db)],
        ["sweep", str(grid), "--db", str(media / "new.sqlite")],
    ])
    ok, out_ro, run_ro, new_ro = results
    assert ok["code"] == 0, ok["err"]
    rows = json.loads(ok["out"].strip().splitlines()[-1])
    assert sum(r["seeds"] for r in rows) == 3 and (report / "index.html").exists()
    assert out_ro["code"] == 2 and f"recur report: error: --out {on_media}: expected a directory that can be " \
        "created, got: " in out_ro["err"], out_ro["err"]
    assert run_ro["code"] == 2 and f"recur run: error: results store {db}: expected a writable store to record " \
        "runs in, got a read-only file (recur report can still read it)" in " ".join(run_ro["err"].split())
    assert new_ro["code"] == 2 and f"results store {media / 'new.sqlite'}: expected a writable directory to create " \
        f"it in, got read-only {media}" in " ".join(new_ro["err"].split())
    for r in results:
        assert "Traceback" not in r["err"]
    assert sorted(p.name for p in media.iterdir()) == ["runs.sqlite"] and db.read_bytes() == before


def test_a_read_only_open_writes_nothing_and_refuses_to_write(tmp_path):
    db = _store(tmp_path / "runs.sqlite")
    before = db.read_bytes()
    with ResultStore(db, readonly=True) as store:
        assert len(store.all_runs()) == 3 and store.readonly
        with pytest.raises(StoreError, match="expected a store opened for writing, got one opened read-only"):
            store.put(fake_result(tiny(seed=9), {8: 0.5}))
    assert db.read_bytes() == before
    with ResultStore(db, readonly=None) as store:  # writable here: opened for writing
        assert not store.readonly
    with pytest.raises(StoreError, match="expected an existing store to read, got no such file"):
        ResultStore(tmp_path / "absent.sqlite", readonly=True)
