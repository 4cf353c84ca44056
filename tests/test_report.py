"""The report is built from the store alone: index.html, one PNG per figure, a terminal table; every
row names its steps, batch, length and run hashes, seeds show their spread, every accuracy plot its
chance level, and the training time leaves out the first step (the kernels' one-off compilation)."""

from __future__ import annotations

import io

import pytest
from harness_tasks import fake_result, tiny
from matplotlib.figure import Figure
from rich.console import Console

from recur import report
from recur.report import build_report, print_leaderboard
from recur.results import ResultStore


def _curve(steps: int, first: float = 2.0, per_step: float = 0.01) -> list[tuple[int, float, float]]:
    return [(s, 2.0 / s, first + per_step * (s - 1)) for s in (1, *range(5, steps + 1, 5))]


def _with_curve(result, curve):
    return result.model_copy(update={"curve": curve})


def test_report_builds_figures_and_index_from_a_store(db, tmp_path):
    with ResultStore(db) as store:
        for model, sizes in (("elman", (16, 32)), ("lstm", (16,))):
            for d in sizes:
                store.put(_with_curve(fake_result(tiny(model=model, d_model=d), {8: d / 40, 32: d / 80},
                                                  state_size=d * 2), _curve(30)))
        store.put(fake_result(tiny(task_args={"lag": 2}, state_init="noise"), {8: 0.2, 32: 0.1}))  # no curve
    index = build_report(db, tmp_path / "report")  # from the path: nothing in memory
    html = index.read_text()
    pngs = sorted(p.name for p in index.parent.glob("*.png"))
    # task 1: state size, length, loss, time; task 2 (no curve recorded): state size, length, time
    assert len(pngs) == 4 + 3
    assert sum(p.endswith("_loss.png") for p in pngs) == 1 and sum(p.endswith("_time.png") for p in pngs) == 2
    assert all((index.parent / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert all(f'src="{p}"' in html for p in pngs)
    assert "harness_shift(lag=2)" in html and "elman {mlp=null} +noise" in html and "acc@32" in html
    for header in ("steps run / budget", "batch", "train length", "runs (hash)"):
        assert f"<th>{header}</th>" in html
    with ResultStore(db) as store:
        assert all(h in html for h in store.hashes())
    assert "30 / 30" in html and "Chance level: 0.125" in html  # harness_shift: 1 / vocab 8

    buf = io.StringIO()
    with ResultStore(db) as store:
        print_leaderboard(store.leaderboard(), Console(file=buf, width=200))
    text = buf.getvalue()
    assert "harness_shift" in text and "lstm" in text and "acc@8" in text


def test_the_table_shows_the_spread_over_seeds(db, tmp_path):
    with ResultStore(db) as store:
        store.put(fake_result(tiny(seed=0), {8: 0.25, 32: 0.1}))
        store.put(fake_result(tiny(seed=1), {8: 0.75, 32: 0.3}))
    html = build_report(db, tmp_path / "report").read_text()
    assert "<td>0.500" in html and "0.250&ndash;0.750" in html and "0.100&ndash;0.300" in html


def test_empty_store_gives_a_page_that_says_so(db, tmp_path):
    index = build_report(db, tmp_path / "report")
    assert "No runs yet" in index.read_text() and not list(index.parent.glob("*.png"))


class _Recorder:
    """Figure.savefig replaced: keeps the figure for inspection instead of writing it."""

    def __init__(self):
        self.figures: dict[str, Figure] = {}

    def __call__(self, fig, path):
        fig.canvas.draw()  # lay out the text, so the tick labels have their extents
        self.figures[path.name.rsplit("_", 1)[-1]] = fig
        path.write_bytes(b"")


@pytest.fixture
def figures(monkeypatch, db, tmp_path):
    """The figures of one task with three models at one state size, two seeds each, curves recorded."""
    with ResultStore(db) as store:
        for i, model in enumerate(("elman", "lstm", "gru")):
            for seed in (0, 1):
                result = fake_result(tiny(model=model, seed=seed), {8: 0.3 + 0.1 * seed, 32: 0.2}, state_size=64)
                store.put(_with_curve(result, _curve(30, first=3.0 + i, per_step=0.02 * (i + 1))))
    rec = _Recorder()
    monkeypatch.setattr(report, "_save", rec)
    build_report(db, tmp_path / "report")
    return rec.figures


def _tick_labels_overlap(ax) -> bool:
    boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
    return any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))


def test_accuracy_plots_show_chance_and_separate_models_at_one_state_size(figures):
    for name in ("size.png", "length.png"):
        ax = figures[name].axes[0]
        chance = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(1 / 8)
        assert not _tick_labels_overlap(ax)
        series = [c.lines[0] for c in ax.containers]  # each errorbar's line of means
        assert len({ln.get_marker() for ln in series}) == 3  # one marker per model
        if name == "size.png":
            xs = [float(ln.get_xdata()[0]) for ln in series]
            assert len(set(xs)) == 3  # equal state sizes, dodged apart
        labels = ax.get_legend_handles_labels()[1]
        assert any(label.startswith("chance") for label in labels)


def test_time_chart_leaves_out_the_first_step(figures):
    ax = figures["time.png"].axes[0]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    # curves end at step 30: the first step's seconds (3, 4, 5) are left out, 29 steps remain
    assert widths == sorted(round(29 * 0.02 * (i + 1), 6) for i in range(3))
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 3 and all("29 steps" in t and "ms/step" in t and "first step" in t for t in labels)
    assert "first step 3.00 s" in " ".join(labels)


def test_loss_curves_plot_every_seed(figures):
    ax = figures["loss.png"].axes[0]
    curves = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]
    assert len(curves) == 6 and ax.get_yscale() == "log"
