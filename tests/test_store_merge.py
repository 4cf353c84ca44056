"""Merging results stores: every run carried whole (its curves, evals and info), one per hash; identical
copies kept once; differing copies resolved to the newest whatever the order of the inputs, and
reported; inputs only read; the output never one of them; an existing output merged into, idempotently."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from harness_tasks import fake_result, tiny

from recur.cli import main
from recur.results import _SCHEMA, PER_RUN_TABLES, ResultStore, StoreError
from recur.store_merge import merge_stores


def _result(seed: int, acc: float = 0.5, **update):
    """A finished run with a loss curve, an eval curve and data facts, so every per-run table has rows."""
    r = fake_result(tiny(seed=seed), {8: acc, 32: acc / 2})
    return r.model_copy(update={"curve": [(1, 2.0, 0.1), (2, 1.5, 0.2), (3, 1.25, 0.3)],
                                "evals": [(2, 256, {"accuracy": acc / 3}), (3, 384, {"accuracy": acc})],
                                "info": {"corpus_sha256": f"{seed:064x}"}, **update})


def _store(path: Path, results) -> Path:
    with ResultStore(path) as store:
        for r in results:
            store.put(r)
    return path


def _records(path: Path) -> dict[str, dict]:
    with ResultStore(path, readonly=True) as store:
        return dict(store.records())


def _set_created(path: Path, h: str, created: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE runs SET created = ? WHERE hash = ?", (created, h))
    conn.commit()
    conn.close()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merge_carries_every_run_whole_with_its_curves_evals_and_info(tmp_path):
    a = _store(tmp_path / "a.sqlite", [_result(0), _result(1)])
    b = _store(tmp_path / "b.sqlite", [_result(2), _result(3), _result(4)])
    summary = merge_stores([a, b], tmp_path / "c.sqlite")
    merged = _records(tmp_path / "c.sqlite")
    assert merged == {**_records(a), **_records(b)}  # every column of every table, run by run
    assert all(len(r["curves"]) == 3 and len(r["evals"]) == 2 and len(r["run_info"]) == 1 for r in merged.values())
    assert (summary.runs, summary.written, summary.duplicates, summary.already) == (5, 5, 0, 0)
    assert summary.held == {str(a): 2, str(b): 3}
    assert summary.line() == f"{tmp_path / 'c.sqlite'}: 5 runs: 2 from {a}, 3 from {b}; 0 duplicates"
    with ResultStore(tmp_path / "c.sqlite") as store:  # what reports read
        assert store.evals()[_result(0).config_hash][1] == (3, 384, {"accuracy": 0.5})
        assert {r["info"]["corpus_sha256"][-1] for r in store.all_runs()} == set("01234")


def test_every_per_run_table_of_the_schema_is_carried(tmp_path):
    """A table added to the schema with a hash column is a per-run table: merged, and deleted with its run."""
    with ResultStore(tmp_path / "s.sqlite") as store:
        conn = sqlite3.connect(store.path)
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        keyed = {t for t in tables if "hash" in {c[1] for c in conn.execute(f"PRAGMA table_info({t})")}}
        conn.close()
    assert keyed - {"runs", "claims"} == set(PER_RUN_TABLES)
    assert all(f"CREATE TABLE IF NOT EXISTS {t} " in _SCHEMA for t in PER_RUN_TABLES)


def test_identical_copies_are_kept_once(tmp_path):
    a = _store(tmp_path / "a.sqlite", [_result(0), _result(1)])
    b = tmp_path / "b.sqlite"
    shutil.copy(a, b)  # the same runs, byte for byte
    _store(b, [_result(2)])
    summary = merge_stores([a, b], tmp_path / "c.sqlite")
    assert (summary.runs, summary.duplicates, summary.identical, summary.conflicts) == (3, 2, 2, [])
    assert summary.line().endswith("; 2 duplicates of 2 runs (2 identical, 0 differing: newest kept)")
    assert _records(tmp_path / "c.sqlite") == {**_records(a), **_records(b)}


def test_differing_copies_keep_the_newest_whatever_the_input_order_and_are_reported(tmp_path):
    old, new = _result(0, acc=0.25), _result(0, acc=0.75, seconds=9.0)
    h = old.config_hash
    a = _store(tmp_path / "a.sqlite", [old, _result(1)])
    b = _store(tmp_path / "b.sqlite", [new])
    _set_created(a, h, "2025-01-01T00:00:00+00:00")
    _set_created(b, h, "2025-06-01T00:00:00+00:00")
    ab = merge_stores([a, b], tmp_path / "ab.sqlite")
    merge_stores([b, a], tmp_path / "ba.sqlite")
    assert _records(tmp_path / "ab.sqlite") == _records(tmp_path / "ba.sqlite")
    assert _records(tmp_path / "ab.sqlite")[h] == _records(b)[h]  # the newer copy, whole
    (conflict,) = ab.conflicts
    assert (conflict.hash, conflict.kept, conflict.dropped) == (h, str(b), [str(a)])
    assert conflict.fields == ["created", "evals", "metrics", "seconds"]
    assert conflict.line() == (f"run {h} differs between {b}, {a} (created, evals, metrics, seconds): kept {b}'s, "
                               "the newest (created 2025-06-01T00:00:00+00:00)")
    assert (ab.runs, ab.duplicates, ab.identical) == (2, 1, 0)
    # The same creation time: the tie goes by content, still the same whatever the order.
    _set_created(a, h, "2025-06-01T00:00:00+00:00")
    merge_stores([a, b], tmp_path / "tie-ab.sqlite")
    merge_stores([b, a], tmp_path / "tie-ba.sqlite")
    assert _records(tmp_path / "tie-ab.sqlite") == _records(tmp_path / "tie-ba.sqlite")


def test_inputs_are_only_read_and_the_output_is_never_one_of_them(tmp_path):
    a = _store(tmp_path / "a.sqlite", [_result(0)])
    b = _store(tmp_path / "b.sqlite", [_result(1)])
    before = {p: _file_digest(p) for p in (a, b)}
    merge_stores([a, b], tmp_path / "c.sqlite")
    assert {p: _file_digest(p) for p in (a, b)} == before
    link = tmp_path / "also-a.sqlite"
    link.symlink_to(a)
    for inputs, output, message in (([a, b], a, "is also an input"),
                                    ([a, b], link, "is also an input"),
                                    ([a, link], tmp_path / "d.sqlite", "is given twice"),
                                    ([a, tmp_path / "none.sqlite"], tmp_path / "d.sqlite", "no such file"),
                                    ([], tmp_path / "d.sqlite", "at least one store")):
        with pytest.raises(StoreError, match=message):
            merge_stores(inputs, output)
    assert not (tmp_path / "d.sqlite").exists()  # refused before anything was written
    assert {p: _file_digest(p) for p in (a, b)} == before


def test_an_existing_output_keeps_its_runs_and_merging_again_changes_nothing(tmp_path):
    a = _store(tmp_path / "a.sqlite", [_result(0)])
    c = _store(tmp_path / "c.sqlite", [_result(9)])
    first = merge_stores([a], c)
    assert (first.already, first.runs, first.written) == (1, 2, 1)
    assert first.line().startswith(f"{c}: 2 runs: 1 already there, 1 from {a}")
    snapshot = _records(c)
    _store(a, [_result(1)])  # the shard grew
    again = merge_stores([a], c)
    assert (again.already, again.runs, again.written, again.identical) == (2, 3, 1, 1)
    assert _records(c) == {**snapshot, **_records(a)}


def test_cli_store_merge(tmp_path, capsys):
    a = _store(tmp_path / "a.sqlite", [_result(0), _result(1)])
    b = _store(tmp_path / "b.sqlite", [_result(1), _result(2)])
    _set_created(b, _result(1).config_hash, "2999-01-01T00:00:00+00:00")
    c = tmp_path / "c.sqlite"
    assert main(["store", "merge", str(a), str(b), "-o", str(c)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == (f"{c}: 3 runs: 2 from {a}, 2 from {b}; 1 duplicate of 1 run "
                                    "(0 identical, 1 differing: newest kept)")
    assert f"run {_result(1).config_hash} differs between {b}, {a} (created)" in captured.err
    assert main(["store", "merge", str(a), "-o", str(tmp_path / "j.sqlite"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["runs"] == 2 and out["held"] == {str(a): 2} and out["conflicts"] == []
    assert main(["store", "merge", str(a), str(b), "-o", str(a)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert main(["store", "merge", str(a)]) == 2
    assert "-o/--out" in capsys.readouterr().err
