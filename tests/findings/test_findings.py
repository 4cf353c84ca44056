"""`recur reproduce`: every finding is registered and runnable, its verdicts follow its rule, and its
section of the results page is written from the outcome (replaced, never duplicated)."""

from __future__ import annotations

import json

import pytest
from harness_tasks import fake_result

from recur.cli import main
from recur.config import RunConfig
from recur.findings import FINDINGS, Measured, write_section
from recur.findings.base import Outcome
from recur.findings.mingru_speed import MinGRUSpeed
from recur.findings.state_capacity import StateCapacity
from recur.findings.zoology_mqar import ZoologyMQAR
from recur.results import ResultStore

SEVEN = {"zoology-mqar", "illusion-of-state", "negative-eigenvalues", "jrt", "length-generalization",
         "state-capacity", "mingru-speed"}
SEGMENT_MEMORY = {"rmt-segments", "armt-capacity", "brt-windows", "tmaze-memory"}  # issue 15's findings
DEPTH = {"looped-icl", "test-time-compute", "act-ponder", "hrm-segments", "relaxed-lora"}  # issue 16's findings
TRANSDUCTION = {"scan-splits"}  # issue 18's
ALL = SEVEN | SEGMENT_MEMORY | DEPTH | TRANSDUCTION


def test_the_findings_are_registered_with_their_papers():
    assert set(FINDINGS.names()) == ALL
    for name in FINDINGS.names():
        cls = FINDINGS.get(name).cls
        assert cls.title and cls.paper and cls.budget and cls.notes.strip()


# mingru-speed measures without training; relaxed-lora's grid is a pretraining run and fine-tunes of it
# (their configs name its checkpoint, so they exist once it is trained: tested by its quick run)
@pytest.mark.parametrize("name", sorted(ALL - {"mingru-speed", "relaxed-lora"}))
def test_every_finding_grid_and_its_quick_version_are_valid_runs(name):
    finding = FINDINGS.get(name).cls()
    full, quick = finding.configs(), finding.configs(quick=True)
    assert full and len(quick) == len({c.model_dump_json() for c in quick})
    assert all(c.optim.steps <= 4 for c in quick) and all(c.optim.steps >= 1000 for c in full)


def _store_with(tmp_path, results, name="s.sqlite"):
    store = ResultStore(tmp_path / name)
    for r in results:
        store.put(r)
    return store


def test_zoology_verdicts_follow_the_measured_rows(tmp_path):
    finding = ZoologyMQAR()
    accs = {("attention", 32): 1.0, ("attention", 64): 0.995, ("gla", 32): 0.3, ("gla", 64): 0.8,
            ("deltanet", 32): 0.5, ("deltanet", 64): 0.99, ("mingru", 32): 0.1, ("mingru", 64): 0.2,
            ("lru", 32): 0.05, ("lru", 64): 0.25}
    results = []
    for cfg in finding.configs():
        a = accs[cfg.model.mixer, cfg.model.d_model]
        results.append(fake_result(cfg, {64: a if cfg.optim.lr == 3e-3 else a / 2}))  # the best lr is kept
    with _store_with(tmp_path, results) as store:
        from recur.findings.base import measure

        verdicts = finding.verdicts(measure(finding, store))
    assert [v.reproduced for v in verdicts] == [True, True, True]
    assert "d=64: 0.995" in verdicts[0].measured
    accs["attention", 64] = 0.9  # attention misses at one width
    accs["lru", 64] = 0.9  # a vector-state model beats a matrix-state one at d=64
    results = [fake_result(cfg, {64: accs[cfg.model.mixer, cfg.model.d_model]}) for cfg in finding.configs()]
    with _store_with(tmp_path, results, "b.sqlite") as store:
        verdicts = finding.verdicts(measure(finding, store))
    assert [v.reproduced for v in verdicts] == [False, True, False]


def test_state_capacity_reach_and_shortest_training_length(tmp_path):
    finding = StateCapacity()
    results = []
    for cfg in finding.configs():
        d, n = cfg.model.d_model, cfg.task.seq_len
        limit = {16: 128, 32: 256, 64: 512}[d]  # the state holds the key up to this length
        works = 4 * n if n >= 2 * d else n  # trained long enough for the state size: no collapse beyond n
        accs = {L: (1.0 if L <= min(limit, works) else 0.2) for L in cfg.eval.lengths}
        results.append(fake_result(cfg, accs, state_size=d * d))
    with _store_with(tmp_path, results) as store:
        from recur.findings.base import measure

        verdicts = finding.verdicts(measure(finding, store))
    assert [v.reproduced for v in verdicts] == [True, True]
    assert "reach 128" in verdicts[0].measured and "reach 512" in verdicts[0].measured
    assert verdicts[1].measured.endswith("state 4096: 128")


def test_mingru_speed_verdicts_read_the_step_times():
    m = Measured([], [])
    m.extra = {"times": {"parallel": {64: 1.0, 1024: 2.0}, "chunk": {64: 1.0, 1024: 1.0},
                         "recurrent": {64: 2.0, 1024: 30.0}}}
    verdicts = MinGRUSpeed().verdicts(m)
    assert [v.reproduced for v in verdicts] == [True, True, True, True]
    m.extra["times"]["parallel"][64] = 3.0
    assert [v.reproduced for v in MinGRUSpeed().verdicts(m)][:2] == [False, True]
    assert MinGRUSpeed().table(m)[2].startswith("| 64 |")


def test_reproduce_quick_runs_stores_prints_json_and_writes_its_section(tmp_path, capsys):
    db, page = tmp_path / "f.sqlite", tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Findings\n\nhand-written introduction\n")
    argv = ["reproduce", "negative-eigenvalues", "--quick", "--workers", "1", "--db", str(db),
            "--out", str(tmp_path / "figs"), "--results", str(page), "--json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["finding"] == "negative-eigenvalues" and doc["quick"] and doc["runs"] == 2
    assert len(doc["verdicts"]) == 2 and all(set(v) == {"claim", "measured", "reproduced"} for v in doc["verdicts"])
    with ResultStore(db, readonly=True) as store:
        assert len(store) == 2  # every run stored
    text = page.read_text()
    assert "hand-written introduction" in text and text.count("<!-- reproduce:negative-eigenvalues -->") == 1
    assert "recur reproduce negative-eigenvalues --quick" in text
    assert list((tmp_path / "docs" / "findings").glob("negative-eigenvalues_*length.png"))
    assert main(argv) == 0  # again: runs skipped, the section replaced, not appended
    capsys.readouterr()
    assert page.read_text().count("<!-- reproduce:negative-eigenvalues -->") == 1
    with ResultStore(db, readonly=True) as store:  # the cost stated is the stored runs', not the rewrite's
        trained = sum(r["seconds"] for r in store.all_runs())
    assert f"{trained / 60:.1f} min of training summed over the runs" in page.read_text()


def test_reproduce_list_and_errors(capsys):
    assert main(["reproduce", "--list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {f["name"] for f in listed} == ALL and all(f["paper"] for f in listed)
    assert main(["reproduce"]) == 2
    assert "--list" in capsys.readouterr().err
    assert main(["reproduce", "zoology-mqr"]) == 2
    assert "zoology-mqar" in capsys.readouterr().err


def test_write_section_keeps_the_rest_of_the_page(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("intro\n\n<!-- reproduce:jrt -->\nold\n<!-- /reproduce:jrt -->\n\ntail\n")
    finding = FINDINGS.get("jrt").cls()
    runs = [{"hash": str(i), "seconds": 45.0, "config": {}} for i in range(4)]
    outcome = Outcome("jrt", False, [], Measured([], runs), 6.0, 4)
    write_section(page, finding, outcome, "recur reproduce jrt")
    text = page.read_text()
    assert text.startswith("intro") and text.rstrip().endswith("tail") and "old" not in text
    assert "recur reproduce jrt" in text
    assert "4 runs, 3.0 min of training summed over the runs; 0.1 min wall time" in text


def _verdicts(finding, tmp_path, accs_of, name="v.sqlite", exact_of=None):
    """The finding's verdicts on fake runs: ``accs_of(cfg)`` -> {length: accuracy}."""
    from recur.findings.base import measure

    results = []
    for cfg in finding.configs():
        r = fake_result(cfg, accs_of(cfg))
        if exact_of is not None:
            for n in r.metrics:
                r.metrics[n]["exact_match"] = exact_of(cfg)
        results.append(r)
    with _store_with(tmp_path, results, name) as store:
        return finding.verdicts(measure(finding, store))


def test_rmt_segments_verdicts_need_the_accuracy_kept_at_every_longer_length(tmp_path):
    from recur.findings.rmt_segments import RMTSegments

    finding = RMTSegments()
    drop = {"rmt": 0.0, "armt": 0.0}

    def accs(cfg):
        if cfg.model.arch == "causal_lm":  # the sliding-window baseline: the key in its window only at 4 segments
            return {n: 0.5 if n == 128 else 0.11 for n in cfg.eval.lengths}
        return {n: 1.0 if n == 128 else 1.0 - drop[cfg.model.arch] for n in cfg.eval.lengths}

    assert [v.reproduced for v in _verdicts(finding, tmp_path, accs)] == [True, True, True]
    drop["rmt"] = 0.3  # rmt forgets beyond its training segments
    verdicts = _verdicts(finding, tmp_path, accs, "b.sqlite")
    assert [v.reproduced for v in verdicts] == [False, True, True]
    assert "64: 0.700" in verdicts[0].measured


def test_armt_capacity_is_the_most_pairs_retrieved(tmp_path):
    from recur.findings.armt_capacity import BLOCK, ARMTCapacity, capacity

    assert capacity({2: 1.0, 4: 0.95, 8: 0.5, 15: 0.91}) == 15 and capacity({2: 0.5}) == 0
    finding = ARMTCapacity()
    limit = {"rmt": 4, "armt": 8}

    def exact(cfg):
        return 1.0 if cfg.task.seq_len // BLOCK - 1 <= limit[cfg.model.arch] else 0.2

    verdicts = _verdicts(finding, tmp_path, lambda cfg: {n: 0.5 for n in cfg.eval.lengths}, exact_of=exact)
    assert [v.reproduced for v in verdicts] == [True, True]
    assert verdicts[0].measured == "capacity armt 8, rmt 4"
    limit["rmt"] = 8  # equal capacity: not "more"
    assert [v.reproduced for v in _verdicts(finding, tmp_path, lambda cfg: {n: 0.5 for n in cfg.eval.lengths},
                                            "b.sqlite", exact_of=exact)] == [False, True]
    table = finding.table(Measured([], []))
    assert table[0].startswith("| pairs | length |")


def test_brt_windows_verdicts(tmp_path):
    from recur.findings.brt_windows import BRTWindows

    def accs(cfg):
        brt = cfg.model.arch == "block_recurrent"
        return {n: (1.0 if n == 64 else 0.95) if brt else 0.12 for n in cfg.eval.lengths}

    assert [v.reproduced for v in _verdicts(BRTWindows(), tmp_path, accs)] == [True, True]


def test_tmaze_verdicts_read_the_rollout_success(tmp_path):
    from recur.findings.base import measure
    from recur.findings.tmaze_memory import TMazeMemory

    finding = TMazeMemory()
    results = []
    for cfg in finding.configs():
        r = fake_result(cfg, {n: 0.99 for n in cfg.eval.lengths})  # token accuracy says nothing here
        for n in r.metrics:
            r.metrics[n]["success"] = 1.0 if cfg.model.arch == "rate" else 0.5 + 0.02 * cfg.seed
        results.append(r)
    with _store_with(tmp_path, results) as store:
        m = measure(finding, store)
        verdicts = finding.verdicts(m)
        assert finding.curves(m)["swa (no memory)"][383] == pytest.approx(0.52)  # the mean of the seeds
    assert [v.reproduced for v in verdicts] == [True, True]
    assert "L=95: 1.000" in verdicts[0].measured


def test_test_time_compute_reads_the_depth_evaluations(tmp_path):
    from recur.findings.base import measure
    from recur.findings.test_time_compute import TestTimeCompute

    finding = TestTimeCompute()
    curves = {"recurrent_depth": {1: 0.3, 2: 0.5, 4: 0.6, 8: 0.7, 16: 0.72}, "looped_lm": {1: 0.2, 2: 0.4, 4: 0.6,
                                                                                       8: 0.6, 16: 0.55}}
    results = []
    for cfg in finding.configs():
        r = fake_result(cfg, {15: 0.5, 24: 0.3})
        if cfg.model.arch in curves:
            r = r.model_copy(update={"depth_metrics": {str(k): {"15": {"accuracy": v}}
                                                       for k, v in curves[cfg.model.arch].items()}})
        results.append(r)
    with _store_with(tmp_path, results) as store:
        verdicts = finding.verdicts(measure(finding, store))
    assert [v.reproduced for v in verdicts] == [True, False, True]  # the looped model does not gain past 4
    assert "8: 0.700" in verdicts[0].measured and "fixed depth (3 blocks) 0.500" in verdicts[2].measured


def test_scan_verdicts_read_each_splits_exact_match(tmp_path):
    from recur.findings.base import measure
    from recur.findings.scan_splits import ScanSplits

    finding = ScanSplits()
    exact = {"simple": 0.99, "length": 0.12, "addprim_jump": 0.08, "addprim_turn_left": 0.9}
    results = [fake_result(cfg, {60: 2 * exact[cfg.task.args["split"]]}) for cfg in finding.configs()]
    with _store_with(tmp_path, results) as store:
        verdicts = finding.verdicts(measure(finding, store))
    assert [v.reproduced for v in verdicts] == [True, True, False]  # jump at 8% is not "under 2%"


def test_relaxed_lora_runs_its_pretraining_then_the_conversions_from_its_checkpoint(tmp_path):
    from recur.findings.relaxed_lora import RelaxedLoRA

    with ResultStore(tmp_path / "s.sqlite") as store:
        outcome = RelaxedLoRA().run(store, quick=True)
        assert outcome.runs == 5 and len(store) == 5
        assert set(outcome.measured.extra["bpb"]) == {"tied", "lora_random", "lora_svd", "untied"}
        assert (tmp_path / "relaxed-lora-base").is_dir()
        again = RelaxedLoRA().run(store, quick=True)  # everything stored: nothing is trained again
        assert again.measured.extra == outcome.measured.extra
