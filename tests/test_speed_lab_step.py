"""``recur speed``'s lab_step case: recur's CausalLM against plain PyTorch models, one training
step each, side by side. Run at a tiny shape; no timing is asserted (the benchmark measures speed)."""

from __future__ import annotations

import math

import pytest

from recur import SPEED_CASES, speed

KEYS = {"name", "shape", "pass", "ours_s", "baseline", "baseline_s", "speedup", "fraction_of_limit", "target", "met", "extra"}


@pytest.fixture(scope="module")
def rows():
    return [r.as_json() for r in speed.lab_step_rows(B=2, T=8, d_model=16, n_layers=1, vocab=32, repeats=1)]


def test_every_family_gets_one_well_formed_row(rows):
    assert [r["name"] for r in rows] == [speed.lab_step_name(p, o) for p, _, _, o in speed.LAB_FAMILIES]
    assert "lab_step_lstm_no_mlp" in {r["name"] for r in rows}
    for r, (pattern, base, ratio, _) in zip(rows, speed.LAB_FAMILIES):
        assert KEYS <= set(r) and r["pass"] == "train step" and r["shape"] == "B=2 T=8 d=16 L=1 V=32"
        assert r["baseline"] == speed.LAB_BASELINES[base]
        assert r["ours_s"] > 0 and r["baseline_s"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_s"] / r["ours_s"])
        assert str(ratio) in r["target"] and r["met"] == (r["speedup"] >= 1 / ratio)


def test_both_sides_trained_on_a_finite_loss_with_sizes_recorded(rows):
    for r in rows:
        e = r["extra"]
        assert e["params_ours"] > 0 and e["params_baseline"] > 0
        for side in ("loss_ours", "loss_baseline"):
            first, last = e[side]
            assert math.isfinite(first) and math.isfinite(last)
            assert abs(first - math.log(32)) < 1.0  # an untrained LM starts near uniform over the vocabulary


def test_the_registered_case_runs_the_lab_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(speed, "lab_step_rows", lambda *a, **kw: calls.append((a, kw)) or [])
    SPEED_CASES.get("lab_step").obj(None, True)
    assert calls == [((32, 64, 64, 2, 256), {"repeats": 5})]
    calls.clear()
    SPEED_CASES.get("lab_step").obj(None, False)
    assert [a for a, _ in calls] == [(32, 64, 64, 2, 256), (32, 256, 128, 2, 256)]


def test_sparse_head_row_compares_one_model_both_ways_on_mqar_batches():
    r = speed.sparse_head_rows(vocab=64, B=4, T=32, d_model=16, n_layers=1, repeats=1).as_json()
    assert KEYS <= set(r) and r["name"] == "sparse_head_v64" and r["pass"] == "train step"
    assert r["baseline"] == "the head at every position"
    assert r["speedup"] == pytest.approx(r["baseline_s"] / r["ours_s"])
    # the same function both ways: the losses agree (the lr is 0, so every call sees one model)
    assert r["extra"]["max_loss_gap"] < 1e-4
    assert 0 < r["extra"]["supervised_fraction"] < 0.5  # MQAR supervises only its queries
    assert "sparse_head" in SPEED_CASES
