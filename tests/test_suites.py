"""The built-in suites: the lm suite compares six families at equal parameter count, and every
suite's --quick version is a real smoke test of it (the same models and tasks, a few steps)."""

from __future__ import annotations

import pytest

from recur import suites
from recur.cli import main
from recur.results import ResultStore
from recur.suites import LM_SUITE, LM_WIDTHS, SUITES, missing, quick
from recur.training import build


def test_the_lm_suite_compares_six_families_at_equal_parameter_count():
    configs = LM_SUITE.expand()
    assert {c.model_name for c in configs} == set(LM_WIDTHS) and len(configs) == 6
    params = {}
    for cfg in configs:
        _, model = build(cfg)
        params[cfg.model_name] = sum(p.numel() for p in model.parameters())
        assert cfg.task.name == "text" and cfg.task.seq_len == 256 and cfg.eval.every > 0
        assert cfg.optim.early_stop is None and 1024 in cfg.eval.lengths
    assert max(params.values()) / min(params.values()) < 1.05, params
    assert not any(missing(LM_SUITE).values())


@pytest.mark.parametrize("name", sorted(SUITES))
def test_quick_keeps_the_models_and_tasks_and_shrinks_the_budget(name):
    suite = SUITES[name]
    small = quick(suite).expand()
    full = suite.expand()
    assert {c.model_name for c in small} == {c.model_name for c in full}
    assert {c.task.name for c in small} == {c.task.name for c in full}
    for cfg in small:
        assert cfg.optim.steps == 4 and cfg.optim.batch_size == 8 and cfg.eval.batches == 1
        assert cfg.task.seq_len <= 32
        assert cfg.eval.every in (0, 2) and (cfg.eval.every == 2) == any(c.eval.every for c in full)


def test_bench_runs_the_lm_suite_quickly_and_reports_bits_per_byte(tmp_path, capsys):
    argv = ["bench", "--suite", "lm", "--quick", "--db", str(tmp_path / "b.sqlite"), "--out", str(tmp_path / "rep"),
            "--workers", "1", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    import json

    rows = json.loads(captured.out.strip().splitlines()[-1])
    assert {r["model"] for r in rows} == set(LM_WIDTHS)
    assert all("bits_per_byte" in m for r in rows for m in r["metrics"].values())
    with ResultStore(tmp_path / "b.sqlite") as store:
        assert len(store) == 6 and all(len(v) == 2 for v in store.evals().values())  # steps 2 and 4
    assert "bpb@" in (tmp_path / "rep" / "index.html").read_text()


def test_an_unknown_suite_is_refused_with_the_choices(tmp_path, capsys):
    assert main(["bench", "--suite", "lmm", "--db", str(tmp_path / "b.sqlite"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unknown suite 'lmm'" in err and "default, lm" in err and not (tmp_path / "b.sqlite").exists()
    assert suites.SUITES["default"] is suites.DEFAULT_SUITE
