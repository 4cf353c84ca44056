"""The report is built from the store alone: index.html, one PNG per figure, a terminal table."""

from __future__ import annotations

import io

from harness_tasks import fake_result, tiny
from rich.console import Console

from recur.report import build_report, print_leaderboard
from recur.results import ResultStore


def test_report_builds_figures_and_index_from_a_store(db, tmp_path):
    with ResultStore(db) as store:
        for model, sizes in (("elman", (16, 32)), ("lstm", (16,))):
            for d in sizes:
                store.put(fake_result(tiny(model=model, d_model=d), {8: d / 40, 32: d / 80}, state_size=d * 2))
        store.put(fake_result(tiny(task_args={"lag": 2}, state_init="noise"), {8: 0.2, 32: 0.1}))
    index = build_report(db, tmp_path / "report")  # from the path: nothing in memory
    html = index.read_text()
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    assert len(pngs) == 2 * 2 + 1  # two tasks x (state size, length) + time
    assert all((index.parent / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(f'src="{p}"' in html for p in pngs)
    assert "harness_shift(lag=2)" in html and "elman {mlp=null} +noise" in html and "acc@32" in html

    buf = io.StringIO()
    with ResultStore(db) as store:
        print_leaderboard(store.leaderboard(), Console(file=buf, width=200))
    text = buf.getvalue()
    assert "harness_shift" in text and "lstm" in text and "acc@8" in text


def test_empty_store_gives_a_page_that_says_so(db, tmp_path):
    index = build_report(db, tmp_path / "report")
    assert "No runs yet" in index.read_text() and not list(index.parent.glob("*.png"))
