"""Tables and plots from the results store (never from memory).

    build_report(ResultStore("recur-results.sqlite"), "recur-report")   # -> recur-report/index.html
    print_leaderboard(store.leaderboard())                              # rich tables in the terminal

The HTML report holds, per task: the leaderboard (seeds averaged, best lr per model and
size), accuracy against state size (Zoology's plot, log x), and accuracy against the
evaluation length (length generalization); and, over all runs, the training time per model.
"""

from __future__ import annotations

import hashlib
import html
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

import recur
from recur.results import ResultStore


def _acc(row: dict, length: int | str, key: str = "accuracy") -> float | None:
    m = row["metrics"].get(str(length))
    return None if m is None else m.get(key)


def _by_task(rows: list[dict]) -> dict[str, list[dict]]:
    tasks: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        tasks[row["task_label"]].append(row)
    return dict(tasks)


def _lengths(rows: list[dict]) -> list[int]:
    return sorted({int(n) for r in rows for n in r["metrics"]})


def _fmt_state(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else str(n)


# ------------------------------------------------------------------ terminal
def leaderboard_tables(rows: list[dict[str, Any]]) -> list[Table]:
    """One rich table per task: model, size, state size, accuracy per eval length, time."""
    tables = []
    for task, trs in _by_task(rows).items():
        lengths = _lengths(trs)
        t = Table(title=f"[bold]{task}[/]", title_justify="left")
        for col in ("model", "d_model", "layers", "state", "params"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for n in lengths:
            t.add_column(f"acc@{n}", justify="right")
        for col in ("exact@train", "lr", "seeds", "steps", "time (s)"):
            t.add_column(col, justify="right")
        for r in trs:
            accs = [_acc(r, n) for n in lengths]
            exact = _acc(r, r["train_seq_len"], "exact_match")
            t.add_row(r["model_label"], str(r["d_model"]), str(r["n_layers"]), _fmt_state(r["state_size"]),
                      _fmt_state(r["params"]),
                      *("-" if a is None else f"{a:.3f}" for a in accs),
                      "-" if exact is None else f"{exact:.3f}", f"{r['lr']:g}", str(r["seeds"]),
                      f"{r['steps']:.0f}", f"{r['seconds']:.1f}")
        tables.append(t)
    return tables


def print_leaderboard(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    if not rows:
        console.print("no runs in the store yet")
    for t in leaderboard_tables(rows):
        console.print(t)


# ------------------------------------------------------------------ figures
def _slug(label: str) -> str:
    short = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")[:40]
    return f"{short}_{hashlib.sha1(label.encode()).hexdigest()[:6]}"


def _save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_state_size(rows: list[dict], title: str, path: Path) -> None:
    """Accuracy at the training length vs state size (log x), one line per model (Zoology, Arora et al. 2023)."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    by_model: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_model[r["model_label"]].append(r)
    for model, rs in sorted(by_model.items()):
        rs = sorted(rs, key=lambda r: r["state_size"])
        xs = [max(1, r["state_size"]) for r in rs]
        ys = [_acc(r, r["train_seq_len"]) or 0.0 for r in rs]
        ax.plot(xs, ys, marker="o", label=model)
    ax.set_xscale("log")
    ax.set_xlabel("state size (floats per sequence, at the training length)")
    ax.set_ylabel("accuracy at the training length")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}: accuracy vs state size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def plot_length(rows: list[dict], title: str, path: Path) -> None:
    """Accuracy vs evaluation length for each model's best row (length generalization)."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    best: dict[str, dict] = {}
    for r in rows:  # rows come best-first within a task
        best.setdefault(r["model_label"], r)
    train_lens = set()
    for model, r in sorted(best.items()):
        lengths = sorted(int(n) for n in r["metrics"])
        ax.plot(lengths, [_acc(r, n) for n in lengths], marker="o", label=f"{model} (d={r['d_model']})")
        train_lens.add(r["train_seq_len"])
    for n in sorted(train_lens):
        ax.axvline(n, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(n) for r in best.values() for n in r["metrics"]})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("evaluation length (dotted: training length)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}: length generalization")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def plot_time(runs: list[dict], path: Path) -> None:
    """Mean wall time of one run (training and evaluation) per model, over all runs."""
    secs: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        secs[r["model"]].append(r["seconds"])
    models = sorted(secs, key=lambda m: sum(secs[m]) / len(secs[m]))
    fig = Figure(figsize=(6.4, 0.8 + 0.35 * max(1, len(models))))
    ax = fig.add_subplot()
    ax.barh(models, [sum(secs[m]) / len(secs[m]) for m in models], color="tab:blue")
    for i, m in enumerate(models):
        ax.text(sum(secs[m]) / len(secs[m]), i, f" {len(secs[m])} runs", va="center", fontsize=7)
    ax.set_xlabel("seconds per run (mean)")
    ax.set_title("training time per model")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


# ------------------------------------------------------------------ HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
img { max-width: 48%; margin: 0.5em 1% 0 0; border: 1px solid #eee; }
.meta { color: #666; font-size: 0.85em; }
"""


def _html_table(rows: list[dict]) -> str:
    lengths = _lengths(rows)
    head = ["model", "d_model", "layers", "state size", "params", *(f"acc@{n}" for n in lengths),
            "exact@train", "lr", "seeds", "steps", "time (s)"]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        exact = _acc(r, r["train_seq_len"], "exact_match")
        cells = [r["model_label"], r["d_model"], r["n_layers"], f"{r['state_size']:,}", f"{r['params']:,}",
                 *("-" if _acc(r, n) is None else f"{_acc(r, n):.3f}" for n in lengths),
                 "-" if exact is None else f"{exact:.3f}", f"{r['lr']:g}", r["seeds"], f"{r['steps']:.0f}",
                 f"{r['seconds']:.1f}"]
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def build_report(store: ResultStore | str | Path, out_dir: str | Path, hashes: set[str] | None = None) -> Path:
    """Write ``out_dir/index.html`` and its PNG figures from the runs in ``store``; returns the index path."""
    if not isinstance(store, ResultStore):
        store = ResultStore(store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = store.all_runs(hashes=hashes)
    rows = store.leaderboard(hashes=hashes)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!doctype html>", '<html><head><meta charset="utf-8"><title>recur report</title>',
        f"<style>{_CSS}</style></head><body>", "<h1>recur report</h1>",
        f'<p class="meta">{len(runs)} runs from {html.escape(str(store.path))}; built {now} by recur '
        f"{recur.__version__}. Seeds are averaged; for each model and size the learning rate with the best "
        "accuracy at the training length is shown. State size: floats of memory per sequence at the training "
        "length, summed over layers.</p>",
    ]
    if not runs:
        parts.append("<p>No runs yet: <code>recur run</code>, <code>recur sweep</code> or <code>recur bench</code> "
                     "fill the store.</p>")
    tasks = _by_task(rows)
    if tasks:
        parts.append("<ul>" + "".join(f'<li><a href="#{_slug(t)}">{html.escape(t)}</a></li>' for t in tasks) + "</ul>")
    for task, trs in tasks.items():
        slug = _slug(task)
        plot_state_size(trs, task, out / f"{slug}_state_size.png")
        plot_length(trs, task, out / f"{slug}_length.png")
        parts += [f'<h2 id="{slug}">{html.escape(task)}</h2>', _html_table(trs),
                  f'<img src="{slug}_state_size.png" alt="{html.escape(task)}: accuracy vs state size">',
                  f'<img src="{slug}_length.png" alt="{html.escape(task)}: accuracy vs evaluation length">']
    if runs:
        plot_time(runs, out / "time.png")
        parts += ["<h2>Training time</h2>", '<img src="time.png" alt="training time per model">']
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index
