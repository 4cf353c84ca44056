"""``recur speed`` runs end to end and reports what the issue asks, in the documented schema.
No timing is asserted here (speed is measured by the benchmark, never by tests)."""

from __future__ import annotations

import json

import pytest

from recur import peers, speed
from recur.cli import main

KEYS = {"name", "shape", "pass", "ours_s", "baseline", "baseline_s", "speedup", "fraction_of_limit"}


def test_speed_json_last_line_has_the_documented_schema(capsys, tmp_path):
    out_md = tmp_path / "RESULTS.md"
    assert main(["speed", "--quick", "--json", "--only", "scan", "rnn", "--threads", "1", "--markdown", str(out_md)]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(doc["machine"]) == {"threads", "matmul_gflops", "bandwidth_gbs"}
    assert doc["machine"]["threads"] == 1 and doc["machine"]["matmul_gflops"] > 0 and doc["machine"]["bandwidth_gbs"] > 0
    rows = doc["results"]
    assert {(r["name"], r["pass"]) for r in rows} >= {("diagonal_scan", "fwd"), ("diagonal_scan", "fwd+bwd"),
                                                      ("lstm", "fwd+bwd"), ("gru", "fwd+bwd")}
    for r in rows:
        assert KEYS <= set(r)
        assert r["speedup"] == pytest.approx(r["baseline_s"] / r["ours_s"])
        assert r["extra"]["max_rel_diff"] < 1e-3, f"{r['name']}: ours and the baseline compute different things"
    scan_fwd = next(r for r in rows if r["name"] == "diagonal_scan" and r["pass"] == "fwd")
    assert 0 < scan_fwd["fraction_of_limit"] and scan_fwd["target"] and isinstance(scan_fwd["met"], bool)
    table = out_md.read_text()
    assert "recur speed --quick --only scan rnn --threads 1" in table and "| diagonal_scan |" in table


def test_unknown_case_is_a_clear_usage_error(capsys):
    assert main(["speed", "--only", "scann"]) == 2
    assert "did you mean 'scan'" in capsys.readouterr().err


class FakeClock:
    """perf_counter for ``speed.measure``: each call of the timed function advances it by the
    next scripted duration."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def run(self):
        self.now += self.durations[self.calls]
        self.calls += 1


def test_measure_warms_quick_functions_up_twice_and_takes_the_median(monkeypatch):
    clock = FakeClock([5.0, 1.0, 3.0, 1.0, 2.0, 9.0])  # two warm-ups (the first slow), four timed
    monkeypatch.setattr(speed.time, "perf_counter", clock.perf_counter)
    assert speed.measure(clock.run, repeats=4, budget_s=100.0) == 2.5  # median of 3, 1, 2, 9
    assert clock.calls == 6


def test_measure_warms_slow_functions_up_once_and_stays_in_budget(monkeypatch):
    clock = FakeClock([4.0, 4.0, 4.0, 4.0])  # a run is 4 s: 2 runs fit in a 10 s budget
    monkeypatch.setattr(speed.time, "perf_counter", clock.perf_counter)
    assert speed.measure(clock.run, repeats=5, budget_s=10.0) == 4.0
    assert clock.calls == 3  # one warm-up, two timed


def test_measure_times_quick_functions_at_least_quick_repeats_times(monkeypatch):
    clock = FakeClock([0.1] * 2 + [0.1] * speed.QUICK_REPEATS)  # 0.1 s: under 1% of the budget
    monkeypatch.setattr(speed.time, "perf_counter", clock.perf_counter)
    assert speed.measure(clock.run, repeats=3, budget_s=100.0) == pytest.approx(0.1)
    assert clock.calls == 2 + speed.QUICK_REPEATS


def test_peer_loader_reports_absence(monkeypatch):
    peers._fla_root.cache_clear()
    peers._load.cache_clear()
    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    try:
        assert peers.fla_naive("fla_naive_recurrent_gla") is None
    finally:
        peers._fla_root.cache_clear()
        peers._load.cache_clear()
