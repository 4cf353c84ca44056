"""Tables and plots from the results store (never from memory).

    build_report(ResultStore("recur-results.sqlite"), "recur-report")   # -> recur-report/index.html
    print_leaderboard(store.leaderboard())                              # rich tables in the terminal

The HTML report holds, per task: the leaderboard (seeds averaged, with their min-max spread; the
best lr per model and size; the steps, batch, training length and run hashes of each row),
accuracy against state size (Zoology's plot, log x), accuracy against the evaluation length
(length generalization), the training-loss curves, and the training time without the one-off
warm-up of the first step (kernel compilation or cache loading). Every accuracy plot has the
task's chance level (``Task.chance``) as a dashed line; points of different models at one x are
dodged sideways and drawn with distinct markers.
"""

from __future__ import annotations

import hashlib
import html
import math
import re
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator
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


def _fmt_state(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    if n >= 1e4:
        return f"{n / 1e3:.3g}k"
    return f"{n:.0f}"


def _fmt_tick(n: float) -> str:
    """An axis label: 500, 1k, 20k, 1.5M."""
    if n >= 1e6:
        return f"{n / 1e6:g}M"
    if n >= 1e3:
        return f"{n / 1e3:g}k"
    return f"{n:g}"


# ------------------------------------------------------------------ terminal
def leaderboard_tables(rows: list[dict[str, Any]]) -> list[Table]:
    """One rich table per task: model, size, state size, accuracy per eval length, time."""
    tables = []
    for task, trs in _by_task(rows).items():
        lengths = _lengths(trs)
        t = Table(title=f"[bold]{task}[/]", title_justify="left")
        for col in ("model", "d_model", "layers", "state", "params"):
            t.add_column(col, justify="left" if col == "model" else "right")
        lower = _lower(trs)
        bpb = lengths if lower else []
        acc_lengths = lengths if _has_accuracy(trs) else []
        for n in bpb:
            t.add_column(f"{LOWER[lower][0]}@{n}", justify="right")
        for n in acc_lengths:
            t.add_column(f"acc@{n}", justify="right")
        # text is scored per byte, not per sequence: no exact-match column
        for col in ("exact@train",) * (not bpb) + ("lr", "seeds", "steps", "time (s)"):
            t.add_column(col, justify="right")
        for r in trs:
            accs = [_acc(r, n) for n in acc_lengths]
            exact = _acc(r, r["train_seq_len"], "exact_match")
            bits = [_acc(r, n, lower) for n in bpb]
            t.add_row(r["model_label"], str(r["d_model"]), str(r["n_layers"]), _fmt_state(r["state_size"]),
                      _fmt_state(r["params"]),
                      *("-" if b is None else f"{b:.3f}" for b in bits),
                      *("-" if a is None else f"{a:.3f}" for a in accs),
                      *(("-" if exact is None else f"{exact:.3f}",) * (not bpb)), f"{r['lr']:g}", str(r["seeds"]),
                      f"{r['steps']:.0f}", f"{r['seconds']:.1f}")
        tables.append(t)
    return tables


def print_leaderboard(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    if not rows:
        console.print("no runs in the store yet")
    for t in leaderboard_tables(rows):
        console.print(t)


# ------------------------------------------------------------------ what the figures read
class _Row:
    """A leaderboard row with its runs (one per seed) and what the figures need of them."""

    def __init__(self, row: dict, runs: list[dict], curves: dict[str, list], evals: dict[str, list] | None = None,
                 depths: dict[str, dict] | None = None):
        self.row, self.runs = row, runs
        self.curves = [curves[r["hash"]] for r in runs if curves.get(r["hash"])]
        self.evals = [evals[r["hash"]] for r in runs if evals and evals.get(r["hash"])]
        # per seed: {iterations: {eval length: metrics}} (eval.loops)
        self.depths = [depths[r["hash"]] for r in runs if depths and depths.get(r["hash"])]
        cfg = runs[0]["config"] if runs else {}
        self.config = cfg
        self.label = row["model_label"]
        self.size = f"d={row['d_model']} L={row['n_layers']}"

    def accs(self, length: int | str, key: str = "accuracy") -> list[float]:
        """This row's per-seed values at ``length`` (the seeds of its best lr)."""
        return [r["metrics"][str(length)][key] for r in self.runs
                if str(length) in r["metrics"] and key in r["metrics"][str(length)]]

    def warm_seconds(self) -> list[float]:
        """Per seed: training seconds without the first step (from the loss curve's clock)."""
        return [c[-1][2] - c[0][2] for c in self.curves if len(c) >= 2 and c[0][0] == 1]

    def first_step_seconds(self) -> list[float]:
        return [c[0][2] for c in self.curves if c and c[0][0] == 1]


def _rows_with_runs(rows: list[dict], runs: list[dict], curves: dict[str, list],
                    evals: dict[str, list] | None = None, depths: dict[str, dict] | None = None) -> list[_Row]:
    by_hash = {r["hash"]: r for r in runs}
    return [_Row(row, [by_hash[h] for h in row["hashes"] if h in by_hash], curves, evals, depths) for row in rows]


def _trained_depth(config: dict) -> int | None:
    """The number of iterations a depth-recurrent run trained with (its depth option's value)."""
    import inspect

    from recur.registry import ARCHITECTURES

    model = config.get("model", {})
    try:
        cls = ARCHITECTURES.get(model.get("arch", "causal_lm")).cls
    except Exception:  # noqa: BLE001 - an architecture not registered in this install
        return None
    if cls.depth_option is None:
        return None
    if cls.depth_option in model.get("args", {}):
        return model["args"][cls.depth_option]
    default = inspect.signature(cls.__init__).parameters.get(cls.depth_option)
    return None if default is None or default.default is inspect.Parameter.empty else default.default


# Metrics where lower is better that head a task's tables and figures in place of accuracy: text's
# bits per byte, a regression task's squared error (icl_regression): key -> (column prefix, name).
LOWER = {"bits_per_byte": ("bpb", "bits per byte"), "mse": ("mse", "squared error / d")}


def _lower(rows: list[dict]) -> str | None:
    """The lower-is-better metric these rows are scored in (``LOWER``), if any."""
    return next((k for k in LOWER if any(k in m for r in rows for m in r["metrics"].values())), None)


def _has_accuracy(rows: list[dict]) -> bool:
    """Whether these rows have a token accuracy (a regression task has none)."""
    return any("accuracy" in m for r in rows for m in r["metrics"].values())


def _headline(rows: list[dict]) -> tuple[str, str]:
    """The metric the figures plot (key, axis name): the lower-is-better one where the task has it."""
    key = _lower(rows)
    return ("accuracy", "accuracy") if key is None else (key, LOWER[key][1])


def _chance(rows: list[_Row]) -> float | None:
    """The task's chance-level accuracy at its training length (None if the task cannot be built here)."""
    from recur.tasks.base import get_task

    for r in rows:
        task = r.config.get("task")
        if task:
            try:
                return get_task(task["name"], **task.get("args", {})).chance(task.get("seq_len"))
            except Exception:  # noqa: BLE001 - a task not registered in this install: no line
                return None
    return None


# ------------------------------------------------------------------ figures
def _slug(label: str) -> str:
    short = re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")[:40]
    return f"{short}_{hashlib.sha1(label.encode()).hexdigest()[:6]}"


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*", "h", "p")


_LINESTYLES = ("-", "--", ":", "-.")


def _styles(rows: list[_Row]) -> dict[str, dict]:
    """One colour and one marker per model label, one line style per size: the same in every figure
    of a task (labels and sizes sorted)."""
    out: dict[str, dict] = {}
    for i, label in enumerate(sorted({r.label for r in rows})):
        out[label] = {"color": f"C{i % 10}", "marker": _MARKERS[i % len(_MARKERS)]}
    sizes = sorted({(r.row["d_model"], r.row["n_layers"]) for r in rows})
    for j, (d, n) in enumerate(sizes):
        out[f"d={d} L={n}"] = {"linestyle": _LINESTYLES[j % len(_LINESTYLES)]}
    return out


def _dodge(index: int, count: int, width: float = 0.035) -> float:
    """Multiplicative x offset of the index-th of ``count`` series on a log axis (0 for one series)."""
    return 10 ** (width * (index - (count - 1) / 2)) if count > 1 else 1.0


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _legend(ax, n: int) -> None:
    """Below the axes, in columns: it never covers the data."""
    if n:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=min(3, n), frameon=False)


def _chance_line(ax, chance: float | None) -> None:
    if chance is not None:
        ax.axhline(chance, color="0.35", linestyle="--", linewidth=1, zorder=1,
                   label=f"chance ({chance:.3g})")


def _log_ticks(ax, values: list[float], fmt) -> None:
    """Readable log-axis ticks: decades (and 2, 5 within few decades) inside the data's range, no minor labels."""
    lo, hi = min(values), max(values)
    decades = math.log10(hi / lo) if hi > lo else 0.0
    subs = (1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,)
    ticks = [m * 10**e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2) for m in subs]
    ticks = [t for t in ticks if lo / 1.5 <= t <= hi * 1.5]
    if len(ticks) < 2:  # inside one 1-2-5 step: label the data's own values
        ticks = sorted(set(values))
    ax.set_xlim(lo / 1.6, hi * 1.6)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: fmt(x)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _errorbar(ax, xs, values: list[list[float]], style: dict, label: str) -> None:
    """Means with min-max bars over seeds (bars only where there are several seeds)."""
    means = [sum(v) / len(v) for v in values]
    low = [m - min(v) for m, v in zip(means, values)]
    high = [max(v) - m for m, v in zip(means, values)]
    ax.errorbar(xs, means, yerr=[low, high] if any(len(v) > 1 for v in values) else None, label=label,
                color=style["color"], marker=style["marker"], markersize=6, linewidth=1.4, capsize=3,
                elinewidth=1, zorder=3)


def plot_state_size(rows: list[_Row], title: str, path: Path, chance: float | None = None,
                    styles: dict | None = None) -> None:
    """Accuracy at the training length vs state size (log x), one line per model (Zoology, Arora et al. 2023);
    bits per byte where the task is scored in them."""
    key, metric = _headline([r.row for r in rows])
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    by_model: dict[str, list[_Row]] = defaultdict(list)
    for r in rows:
        by_model[r.label].append(r)
    styles = styles or _styles(rows)
    at_x: dict[int, list[str]] = defaultdict(list)  # the models with a point at each state size
    for model, rs in sorted(by_model.items()):
        for x in sorted({max(1, r.row["state_size"]) for r in rs if r.accs(r.row["train_seq_len"], key)}):
            at_x[x].append(model)
    for model, rs in sorted(by_model.items()):
        rs = sorted((r for r in rs if r.accs(r.row["train_seq_len"], key)), key=lambda r: r.row["state_size"])
        if not rs:
            continue
        sizes = [max(1, r.row["state_size"]) for r in rs]
        xs = [x * _dodge(at_x[x].index(model), len(at_x[x])) for x in sizes]  # shifted only where shared
        _errorbar(ax, xs, [r.accs(r.row["train_seq_len"], key) for r in rs], styles[model], model)
    xs_all = list(at_x)
    if key == "accuracy":
        _chance_line(ax, chance)
    ax.set_xscale("log")
    if xs_all:
        _log_ticks(ax, xs_all, _fmt_tick)
    ax.set_xlabel("state size (floats per sequence at the training length)")
    ax.set_ylabel(f"{metric} at the training length" + (" (lower is better)" if key != "accuracy" else ""))
    if key == "accuracy":
        ax.set_ylim(-0.03, 1.05)  # a marker at 1.0 stays whole
    ax.set_title(f"{title}\n{metric} vs state size", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, len(by_model) + (chance is not None and key == "accuracy"))
    _save(fig, path)


def plot_length(rows: list[_Row], title: str, path: Path, chance: float | None = None,
                styles: dict | None = None) -> None:
    """Accuracy vs evaluation length for each model's best row (length generalization); bits per
    byte where the task is scored in them (language modelling: does a longer context help or hurt?)."""
    key, metric = _headline([r.row for r in rows])
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    best: dict[str, _Row] = {}
    for r in rows:  # rows come best-first within a task
        best.setdefault(r.label, r)
    styles = styles or _styles(rows)
    train_lens = set()
    for i, (model, r) in enumerate(sorted(best.items())):
        lengths = [n for n in sorted(int(n) for n in r.row["metrics"]) if r.accs(n, key)]
        xs = [n * _dodge(i, len(best), width=0.025) for n in lengths]
        _errorbar(ax, xs, [r.accs(n, key) for n in lengths], styles[model], f"{model} ({r.size})")
        train_lens.add(r.row["train_seq_len"])
    for n in sorted(train_lens):
        ax.axvline(n, color="grey", linestyle=":", linewidth=1)
    if key == "accuracy":
        _chance_line(ax, chance)
    ax.set_xscale("log", base=2)
    ticks = sorted({int(n) for r in best.values() for n in r.row["metrics"]})
    if ticks:
        lo, hi = min(ticks), max(ticks)
        ax.set_xlim(lo / 1.4, hi * 1.4)
        shown, last = [], None
        for n in ticks:  # at least 0.6 octave apart, so labels never overlap
            if last is None or math.log2(n / last) >= 0.6:
                shown.append(n)
                last = n
        ax.xaxis.set_major_locator(FixedLocator(shown))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0f}"))
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("evaluation length (dotted: training length)")
    if key == "accuracy":
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.05)  # a marker at 1.0 stays whole
    else:
        ax.set_ylabel(f"{metric} (lower is better)")
    ax.set_title(f"{title}\nlength generalization (each model's best row)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, len(best) + (chance is not None and key == "accuracy"))
    _save(fig, path)


def plot_curves(rows: list[_Row], title: str, path: Path, styles: dict | None = None) -> bool:
    """Training loss against the step: a colour per model, a line style per size, one line per seed.

    Returns False (and writes nothing) when no run of these rows has a recorded curve."""
    styles = styles or _styles(rows)
    rows = sorted((r for r in rows if r.curves), key=lambda r: (r.label, r.row["d_model"], r.row["n_layers"]))
    if not rows:
        return False
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    losses_all = []
    for r in rows:
        style = {**styles[r.label], **styles[r.size]}
        seeds = f", {len(r.curves)} seeds" if len(r.curves) > 1 else ""
        for j, curve in enumerate(r.curves):
            steps = [p[0] for p in curve]
            losses = [p[1] for p in curve]
            losses_all += losses
            ax.plot(steps, losses, color=style["color"], linestyle=style["linestyle"], linewidth=1.3,
                    alpha=0.9 if j == 0 else 0.5, label=f"{r.label} ({r.size}){seeds}" if j == 0 else None)
            ax.plot(steps[-1:], losses[-1:], color=style["color"], marker=style["marker"], markersize=5)
    log = min(losses_all) > 0 and max(losses_all) / min(losses_all) > 10  # log only over a wide range
    if log:
        ax.set_yscale("log")
        decades = math.log10(max(losses_all) / min(losses_all))
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss" + (" (log scale)" if log else ""))
    ax.set_title(f"{title}\ntraining loss (mean over each plotted interval; marker: last step)", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, len(rows))
    _save(fig, path)
    return True


def plot_depth(rows: list[_Row], title: str, path: Path, chance: float | None = None,
               styles: dict | None = None) -> bool:
    """Test-time compute: the metric at the training length against the number of iterations at
    evaluation (``eval.loops``), one line per depth-recurrent row (mean over seeds, bars the min-max;
    a star at the depth it trained with), and each fixed-depth row of the task as a dotted level.
    False (no figure) when no row was evaluated at other depths."""
    looped = [r for r in rows if r.depths]
    if not looped:
        return False
    key, metric = _headline([r.row for r in rows])
    styles = styles or _styles(rows)
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    n_lines = 0
    for r in looped:
        style = {**styles[r.label], **styles[r.size]}
        n = str(r.row["train_seq_len"])
        depths = [{int(k): m for k, m in d.items()} for d in r.depths]  # the store keys them by int
        loops = sorted({k for d in depths for k in d})
        values = [[d[k][n][key] for d in depths if k in d and key in d[k].get(n, {})] for k in loops]
        xs = [k for k, v in zip(loops, values) if v]
        values = [v for v in values if v]
        means = [sum(v) / len(v) for v in values]
        ax.errorbar(xs, means, yerr=[[m - min(v) for m, v in zip(means, values)],
                                     [max(v) - m for m, v in zip(means, values)]] if any(len(v) > 1 for v in values)
                    else None, color=style["color"], marker=style["marker"], linestyle=style["linestyle"],
                    markersize=5, linewidth=1.4, capsize=3, label=f"{r.label} ({r.size})")
        trained, own = _trained_depth(r.config), r.accs(n, key)
        if trained is not None and own:
            ax.plot([trained], [sum(own) / len(own)], marker="*", markersize=12, color=style["color"], zorder=4,
                    linestyle="none")
        n_lines += 1
    for r in rows:
        own = r.accs(r.row["train_seq_len"], key)
        if not r.depths and own and _trained_depth(r.config) is None:
            style = styles[r.label]
            ax.axhline(sum(own) / len(own), color=style["color"], linestyle=":", linewidth=1.2,
                       label=f"{r.label} ({r.size}, fixed depth)")
            n_lines += 1
    if key == "accuracy":
        _chance_line(ax, chance)
        ax.set_ylim(-0.03, 1.05)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("iterations at evaluation (star: the depth trained with)")
    ax.set_ylabel(metric if key == "accuracy" else f"{metric} (lower is better)")
    ax.set_title(f"{title}\n{metric.split(' (')[0]} at the training length against test-time iterations", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, n_lines + (chance is not None and key == "accuracy"))
    _save(fig, path)
    return True


def plot_evals(rows: list[_Row], title: str, path: Path, styles: dict | None = None) -> bool:
    """The eval curves (``eval.every``): the validation metric against training tokens, a colour per
    model, a line style per size, one line per seed. Bits per byte where the task has it (lower is
    better), else accuracy. Returns False (and writes nothing) when no run has an eval curve."""
    styles = styles or _styles(rows)
    rows = sorted((r for r in rows if r.evals), key=lambda r: (r.label, r.row["d_model"], r.row["n_layers"]))
    if not rows:
        return False
    key = next((k for k in LOWER if any(k in p[2] for r in rows for c in r.evals for p in c)), "accuracy")
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    for r in rows:
        style = {**styles[r.label], **styles[r.size]}
        params = f", {_fmt_state(r.row['params'])} params"
        for j, curve in enumerate(r.evals):
            points = [(p[1], p[2][key]) for p in curve if key in p[2]]
            ax.plot([t for t, _ in points], [v for _, v in points], color=style["color"],
                    linestyle=style["linestyle"], linewidth=1.3, alpha=0.9 if j == 0 else 0.5,
                    label=f"{r.label} ({r.size}{params})" if j == 0 else None)
            ax.plot([points[-1][0]], [points[-1][1]], color=style["color"], marker=style["marker"], markersize=5)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _fmt_tick(x)))
    ax.set_xlabel("training tokens")
    what = f"{LOWER[key][1]} (lower is better)" if key in LOWER else "accuracy"
    ax.set_ylabel(f"validation {what}")
    ax.set_title(f"{title}\nvalidation {what.split(' (')[0]} at the training length during training", fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, len(rows))
    _save(fig, path)
    return True


def plot_time(rows: list[_Row], title: str, path: Path, styles: dict | None = None) -> None:
    """Training time per row (model and size) without the first step, mean over seeds with min-max bars.

    The first step holds the one-off costs (compiling or loading the numba kernels, first
    allocations), so it is left out; the label under each row's name gives the steps timed, the time
    per step and the first step's time. A run stored without a loss curve (an older recur) shows its
    whole wall time (training and evaluation), hatched."""
    styles = styles or _styles(rows)
    entries = []
    for r in rows:
        warm = r.warm_seconds()
        if warm:
            steps = [c[-1][0] - 1 for c in r.curves if len(c) >= 2 and c[0][0] == 1]
            per_step = sum(w / max(1, s) for w, s in zip(warm, steps)) / len(warm)
            first = r.first_step_seconds()
            note = (f"{sum(steps) / len(steps):.0f} steps, {1e3 * per_step:.0f} ms/step; "
                    f"first step {sum(first) / len(first):.2f} s")
            entries.append((f"{r.label} ({r.size})", warm, note, False, styles[r.label]["color"]))
        else:
            secs = [run["seconds"] for run in r.runs] or [r.row["seconds"]]
            entries.append((f"{r.label} ({r.size})", secs, "whole run, with warm-up and evaluation", True,
                            styles[r.label]["color"]))
    entries.sort(key=lambda e: sum(e[1]) / len(e[1]), reverse=True)  # the fastest at the top
    fig = Figure(figsize=(4.6, 1.5 + 0.55 * max(1, len(entries))))  # narrow: the labels add to the left
    ax = fig.add_subplot()
    top = max(max(e[1]) for e in entries)
    for i, (label, secs, note, whole, color) in enumerate(entries):
        mean = sum(secs) / len(secs)
        err = [[mean - min(secs)], [max(secs) - mean]] if len(secs) > 1 else None
        ax.barh(i, mean, xerr=err, color=color, alpha=0.45 if whole else 0.85, hatch="//" if whole else None,
                capsize=3, error_kw={"elinewidth": 1})
        ax.text(max(secs) + 0.02 * top, i, f"{mean:.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(entries)), [f"{label}\n{note}" for label, _, note, _, _ in entries], fontsize=8)
    ax.set_xlim(0, top * 1.25)  # room for the values at the bar ends
    wholes = {e[3] for e in entries}
    if wholes == {True}:  # a store written before curves were recorded
        ax.set_xlabel("seconds per run, training and evaluation\n(mean over seeds; bars: min-max)")
        ax.set_title(f"{title}\ntime per run (no loss curves stored: warm-up included)", fontsize=10)
    else:
        ax.set_xlabel("seconds of training without the first step" + (" (hatched: whole run)" if True in wholes
                                                                       else "") + "\n(mean over seeds; bars: min-max)")
        ax.set_title(f"{title}\ntraining time (warm-up and evaluation excluded)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


# ------------------------------------------------------------------ HTML
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1320px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { padding: 0.25em 0.6em; border-bottom: 1px solid #ddd; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
th { background: #f4f4f4; }
td.hash { font-family: ui-monospace, monospace; font-size: 0.9em; text-align: left; color: #555; }
.spread { color: #888; font-size: 0.85em; display: block; }
.figs { display: flex; flex-wrap: wrap; gap: 1%; align-items: flex-start; }
.figs img { width: 49%; height: auto; margin: 0.5em 0; border: 1px solid #eee; }
.meta, .how { color: #555; font-size: 0.9em; max-width: 60em; }
"""


def _cell(values: list[float], mean: float | None, fmt: str = ".3f") -> str:
    """The mean, and under it the min-max over seeds when there are several (HTML)."""
    if mean is None:
        return "-"
    text = f"{mean:{fmt}}"
    if len(values) > 1:
        text += f'<span class="spread">{min(values):{fmt}}&ndash;{max(values):{fmt}}</span>'
    return text


def _html_table(rows: list[_Row]) -> str:
    lengths = _lengths([r.row for r in rows])
    lower = _lower([r.row for r in rows])
    bpb = [f"{LOWER[lower][0]}@{n}" for n in lengths] if lower else []
    acc_lengths = lengths if _has_accuracy([r.row for r in rows]) else []
    head = ["model", "d_model", "layers", "state size", "params", *bpb, *(f"acc@{n}" for n in acc_lengths),
            *["exact@train"] * (not bpb), "lr", "seeds", "steps run / budget", "batch", "train length", "time (s)", "runs (hash)"]
    out = ["<table>", "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        row = r.row
        optim = r.config.get("optim", {})
        steps = [run["steps"] for run in r.runs] or [row["steps"]]
        steps_text = (f"{min(steps)}" if min(steps) == max(steps) else f"{min(steps)}&ndash;{max(steps)}")
        steps_text += f" / {optim['steps']}" if "steps" in optim else ""
        secs = [run["seconds"] for run in r.runs]
        cells = [html.escape(r.label), row["d_model"], row["n_layers"], f"{row['state_size']:,}", f"{row['params']:,}",
                 *(_cell(r.accs(n, lower), _acc(row, n, lower)) for n in lengths if bpb),
                 *(_cell(r.accs(n), _acc(row, n)) for n in acc_lengths),
                 *[_cell(r.accs(row["train_seq_len"], "exact_match"),
                         _acc(row, row["train_seq_len"], "exact_match"))] * (not bpb),
                 f"{row['lr']:g}", row["seeds"], steps_text, optim.get("batch_size", "-"), row["train_seq_len"],
                 _cell(secs, row["seconds"], ".1f")]
        hashes = "<br>".join(html.escape(h) for h in row["hashes"])
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f'<td class="hash">{hashes}</td></tr>')
    out.append("</table>")
    return "\n".join(out)


_HOW = """<p class="how"><b>How to read this page.</b> Each table row is one model at one size on one
task: its seeds are averaged (grey under a value: the lowest and highest seed), and of the learning
rates tried the one with the best mean accuracy at the training length is shown (on text: the lowest
bits per byte). <i>acc@N</i> is the token accuracy on held-out test sequences of length N (length
generalization beyond the training length); <i>bpb@N</i>, on text, the bits per byte (the next-byte
cross-entropy in bits, lower is better) on the held-out test documents at context length N;
<i>exact@train</i> the share of sequences with every supervised position right. <i>State
size</i> is the floats of memory a model carries per sequence at the training length, summed over
layers. <i>Steps run / budget</i>: a run stops early when its training accuracy saturates. The run
hashes name the runs in the store (<code>recur run ... --json</code> prints a run's hash; the
store is an SQLite file with tables <code>runs</code>, <code>curves</code> and <code>evals</code>, the
validation curve). In the figures the
dashed line is chance: the accuracy of guessing uniformly among the task's possible answers. Points
of different models at one x are shifted a little sideways and carry distinct markers; bars span the
seeds' min-max. Training time leaves out the first step, which holds the one-off compilation (or
cache loading) of the compiled kernels.</p>"""


def build_report(store: ResultStore | str | Path, out_dir: str | Path, hashes: set[str] | None = None) -> Path:
    """Write ``out_dir/index.html`` and its PNG figures from the runs in ``store``; returns the index path."""
    if not isinstance(store, ResultStore):
        store = ResultStore(store)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = store.all_runs(hashes=hashes)
    rows = store.leaderboard(hashes=hashes)
    curves = store.curves(hashes=hashes)
    evals = store.evals(hashes=hashes)
    depths = store.depth_evals(hashes=hashes)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!doctype html>", '<html><head><meta charset="utf-8"><title>recur report</title>',
        f"<style>{_CSS}</style></head><body>", "<h1>recur report</h1>",
        f'<p class="meta">{len(runs)} runs from {html.escape(str(store.path))}; built {now} by recur '
        f"{recur.__version__}.</p>",
    ]
    if not runs:
        parts.append("<p>No runs yet: <code>recur run</code>, <code>recur sweep</code> or <code>recur bench</code> "
                     "fill the store.</p>")
    else:
        parts.append(_HOW)
    tasks = _by_task(rows)
    if tasks:
        parts.append("<ul>" + "".join(f'<li><a href="#{_slug(t)}">{html.escape(t)}</a></li>' for t in tasks) + "</ul>")
    for task, trs in tasks.items():
        slug = _slug(task)
        rs = _rows_with_runs(trs, runs, curves, evals, depths)
        chance, styles = _chance(rs), _styles(rs)
        plot_state_size(rs, task, out / f"{slug}_state_size.png", chance, styles)
        plot_length(rs, task, out / f"{slug}_length.png", chance, styles)
        metric = _headline(trs)[1]
        figs = [(f"{slug}_state_size.png", f"{metric} vs state size"),
                (f"{slug}_length.png", f"{metric} vs evaluation length")]
        if plot_depth(rs, task, out / f"{slug}_depth.png", chance, styles):
            figs.append((f"{slug}_depth.png", f"{metric} against iterations at evaluation"))
        if plot_evals(rs, task, out / f"{slug}_evals.png", styles):
            figs.insert(0, (f"{slug}_evals.png", "validation metric against training tokens"))
        if plot_curves(rs, task, out / f"{slug}_loss.png", styles):
            figs.append((f"{slug}_loss.png", "training loss curves"))
        plot_time(rs, task, out / f"{slug}_time.png", styles)
        figs.append((f"{slug}_time.png", "training time"))
        chance_text = "" if chance is None else f" Chance level: {chance:.3g}."
        parts += [f'<h2 id="{slug}">{html.escape(task)}</h2>',
                  f'<p class="meta">{len(trs)} rows, {sum(len(r.runs) for r in rs)} runs.'
                  f"{chance_text}</p>", _html_table(rs), '<div class="figs">',
                  *(f'<img src="{name}" alt="{html.escape(task)}: {alt}">' for name, alt in figs), "</div>"]
    parts.append("</body></html>")
    index = out / "index.html"
    index.write_text("\n".join(parts))
    return index
