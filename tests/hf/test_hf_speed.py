"""``recur speed``'s hf_generate case: transformers' generate against recur's own on the same
model, side by side. Run at a tiny shape; no timing is asserted (the benchmark measures speed)."""

from __future__ import annotations

import sys

import pytest

from recur import SPEED_CASES, speed

KEYS = {"name", "shape", "pass", "ours_s", "baseline", "baseline_s", "speedup", "fraction_of_limit", "target", "met",
        "extra"}


def test_each_pattern_gets_one_row_with_both_rates_and_the_same_tokens():
    rows = [r.as_json() for r in speed.hf_generate_rows(16, 1, 4, 3, repeats=1, patterns=("gla", "lstm"), vocab=32)]
    assert [r["name"] for r in rows] == ["hf_generate_gla", "hf_generate_lstm"]
    for r in rows:
        assert KEYS <= set(r) and r["pass"] == "generate" and r["shape"] == "B=1 prompt=4 new=3 d=16 L=1 V=32"
        assert r["baseline"] == "recur CausalLM.generate" and r["ours_s"] > 0 and r["baseline_s"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_s"] / r["ours_s"])
        e = r["extra"]
        assert e["same_tokens"] is True
        assert e["tokens_per_s_hf"] == pytest.approx(3 / r["ours_s"], rel=0.01)
        assert e["tokens_per_s_native"] == pytest.approx(3 / r["baseline_s"], rel=0.01)
        assert r["met"] == (r["ours_s"] <= speed.HF_GENERATE_TARGET * r["baseline_s"])


def test_the_registered_case_runs_the_documented_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "hf_generate_rows", lambda *a, **kw: calls.append((a, kw)) or [])
    SPEED_CASES.get("hf_generate").obj(None, False)
    SPEED_CASES.get("hf_generate").obj(None, True)
    assert calls == [((128, 2, 16, 128), {"repeats": 7}), ((128, 2, 16, 32), {"repeats": 3})]


def test_without_transformers_the_case_says_what_to_install_and_gives_no_rows(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    for name in [m for m in sys.modules if m == "recur.hf" or m.startswith("recur.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    assert speed.hf_generate_rows(16, 1, 4, 3, repeats=1) == []
    err = capsys.readouterr().err
    assert "hf_generate skipped" in err and "pip install 'recur[hf]'" in err
