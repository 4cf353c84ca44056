"""A finding of the field as a runnable claim: its runs, its verdicts, its section of docs/results.md.

    finding = FINDINGS.get("zoology-mqar").cls()
    outcome = reproduce(finding, store, quick=False, workers=2)
    for v in outcome.verdicts:           # Verdict(claim, measured, reproduced)
        print(v.claim, v.measured, v.reproduced)

A finding names its paper, the claims it tests (one ``Verdict`` each), the grid of runs that
measures them (a ``SweepConfig``: every run goes to the results store, resumably, as any sweep)
and the CPU budget it was sized for. The verdicts are computed from the stored runs by the
finding's own rule, fixed before the runs were made; a claim that does not reproduce is reported
as measured. ``write_section`` puts a finding's measured table, verdicts and figures into
docs/results.md between its markers, so the page holds only numbers the command produced.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from recur.config import RunConfig, SweepConfig, config_hash
from recur.registry import Registry

FINDINGS: Registry[type] = Registry("finding")


@dataclass(frozen=True)
class Verdict:
    """One claim of a paper, what was measured, and whether the measurement reproduces it."""

    claim: str
    measured: str
    reproduced: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def word(self) -> str:
        return "reproduced" if self.reproduced else "not reproduced"


class Measured:
    """The leaderboard rows of a finding's runs (seeds averaged, the best lr kept per row), with
    the lookups the claims read."""

    def __init__(self, rows: list[dict[str, Any]], runs: list[dict[str, Any]]):
        self.rows, self.runs = rows, runs
        self.extra: dict[str, Any] = {}  # measurements that are not training runs (e.g. step times)

    def find(self, model: str | None = None, task: str | None = None, d_model: int | None = None,
             label: str | None = None, **config: Any) -> list[dict[str, Any]]:
        """Rows matching every given field; ``config`` keys are dotted paths into a run's config
        (``{"task.args.group": "Z5"}`` as ``task__args__group="Z5"``)."""
        out = []
        for row in self.rows:
            if model is not None and row["model"] != model and row["model_label"].split(" ")[0] != model:
                continue
            if task is not None and row["task"] != task:
                continue
            if d_model is not None and row["d_model"] != d_model:
                continue
            if label is not None and row["model_label"] != label:
                continue
            cfg = self.config_of(row)
            if all(_dig(cfg, key.split("__")) == value for key, value in config.items()):
                out.append(row)
        return out

    def one(self, **query: Any) -> dict[str, Any] | None:
        """The row matching ``query`` (see ``find``), or None; more than one is a bug in the finding."""
        rows = self.find(**query)
        if len(rows) > 1:
            raise ValueError(f"{len(rows)} rows match {query}: {[r['model_label'] for r in rows]}")
        return rows[0] if rows else None

    def config_of(self, row: dict[str, Any]) -> dict[str, Any]:
        by_hash = {r["hash"]: r for r in self.runs}
        return by_hash[row["hashes"][0]]["config"]


def _dig(data: Any, keys: list[str]) -> Any:
    for k in keys:
        if not isinstance(data, dict) or k not in data:
            return None
        data = data[k]
    return data


def acc(row: dict[str, Any] | None, length: int | None = None, key: str = "accuracy") -> float:
    """A row's mean ``key`` at ``length`` (default: its training length); NaN when absent."""
    if row is None:
        return math.nan
    n = str(row["train_seq_len"] if length is None else length)
    return row["metrics"].get(n, {}).get(key, math.nan)


def fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


class Finding(ABC):
    """A reproducible finding (registered in ``FINDINGS``; one file each under ``recur/findings``)."""

    name: str = "finding"  # set by FINDINGS.register
    title: str = ""
    paper: str = ""
    budget: str = ""  # what the full version was sized for, e.g. "about 12 min on 2 cores"
    quick_budget: str = "about 1 min on 2 cores"
    figures: tuple[str, ...] = ()  # figure kinds for results.md: "state_size", "length"
    notes: str = ""  # the protocol in a few sentences: what the runs are and why

    def sweep(self, quick: bool = False) -> SweepConfig | None:
        """The runs (``quick``: a smoke version of the same grid at a tiny budget); None for a
        finding measured without training runs (it overrides ``run``)."""
        return None

    @abstractmethod
    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        """One verdict per claim, from the measured rows."""

    def configs(self, quick: bool = False) -> list[RunConfig]:
        sweep = self.sweep(quick)
        return [] if sweep is None else sweep.expand()

    def run(self, store, quick: bool = False, workers: int = 1, console=None,
            figures_dir: str | Path | None = None) -> Outcome:
        """Measure the finding: by default, train its grid (``run_grid``)."""
        return run_grid(self, store, quick=quick, workers=workers, console=console, figures_dir=figures_dir)

    def table(self, m: Measured) -> list[str]:
        """The measured rows as a markdown table (model, size, state, lr, accuracy per length)."""
        lengths = sorted({int(n) for r in m.rows for n in r["metrics"]})
        head = "| task | model | d | layers | state (floats) | best lr | steps | " + \
            " | ".join(f"acc @{n}" for n in lengths) + " |"
        lines = [head, "|" + "---|" * (7 + len(lengths))]
        for r in m.rows:
            cells = [fmt(acc(r, n)) for n in lengths]
            lines.append(f"| {r['task_label']} | {r['model_label']} | {r['d_model']} | {r['n_layers']} | "
                         f"{r['state_size']} | {r['lr']:g} | {r['steps']:.0f} | " + " | ".join(cells) + " |")
        return lines


@dataclass
class Outcome:
    """What ``reproduce`` returns: the verdicts, the rows they were read from, and the run."""

    finding: str
    quick: bool
    verdicts: list[Verdict]
    measured: Measured
    seconds: float
    runs: int
    figures: list[Path] = field(default_factory=list)

    @property
    def train_seconds(self) -> float:
        """Training seconds summed over the stored runs (as they were made, whichever call made
        them); ``seconds`` is only this call's wall time, which is short when the runs were stored."""
        return sum(float(r.get("seconds") or 0.0) for r in self.measured.runs)

    def as_json(self) -> dict[str, Any]:
        return {"finding": self.finding, "quick": self.quick, "seconds": round(self.seconds, 1),
                "train_seconds": round(self.train_seconds, 1), "runs": self.runs,
                "reproduced": all(v.reproduced for v in self.verdicts),
                "verdicts": [v.as_json() for v in self.verdicts]}


def measure(finding: Finding, store, quick: bool = False) -> Measured:
    """The stored rows of ``finding``'s runs (whatever is in ``store`` of them)."""
    hashes = {config_hash(c) for c in finding.configs(quick)}
    m = Measured(store.leaderboard(hashes=hashes), store.all_runs(hashes=hashes))
    m.extra["depth_evals"] = store.depth_evals(hashes=hashes)  # {hash: {iterations: {length: metrics}}}
    return m


def reproduce(finding: Finding, store, quick: bool = False, workers: int = 1, console=None,
              figures_dir: str | Path | None = None) -> Outcome:
    """Run ``finding`` (its grid into ``store``: runs already there are skipped), read its verdicts,
    and draw its figures into ``figures_dir``."""
    return finding.run(store, quick=quick, workers=workers, console=console, figures_dir=figures_dir)


def run_grid(finding: Finding, store, quick: bool = False, workers: int = 1, console=None,
             figures_dir: str | Path | None = None) -> Outcome:
    """``Finding.run`` for a grid of training runs: sweep, verdicts, and the HTML report's figures."""
    from recur.report import build_report
    from recur.sweep import SweepError, run_sweep

    start = time.perf_counter()
    configs = finding.configs(quick)
    summary = run_sweep(configs, store, workers=workers, console=console)
    if summary.failed:
        raise SweepError(f"{len(summary.failed)} of the finding's runs failed; the first: {summary.failed[0][1]}")
    m = measure(finding, store, quick)
    figures = []
    if figures_dir is not None:
        index = build_report(store, figures_dir, hashes={config_hash(c) for c in configs})
        figures = sorted(index.parent.glob("*.png"))
    return Outcome(finding.name, quick, finding.verdicts(m, quick), m, time.perf_counter() - start,
                   len(configs), figures)


def line_plot(curves: dict[str, dict[float, float]], path: str | Path, xlabel: str, ylabel: str, title: str,
              lines: dict[str, float] | None = None, logx: bool = False) -> Path:
    """A finding's own figure: one line per curve (label -> {x: y}), horizontal reference ``lines``
    (label -> y, dotted), y in [0, 1]."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), marker="o", label=label)
    for label, y in (lines or {}).items():
        ax.axhline(y, color="grey", linestyle=":", linewidth=1, label=label)
    if logx:
        ax.set_xscale("log", base=2)
        xs = sorted({x for c in curves.values() for x in c})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.03, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


# ------------------------------------------------------------------ docs/results.md
def _markers(name: str) -> tuple[str, str]:
    return f"<!-- reproduce:{name} -->", f"<!-- /reproduce:{name} -->"


def section(finding: Finding, outcome: Outcome, command: str, figures: list[str]) -> str:
    """A finding's section of docs/results.md, from its outcome (no hand-copied number)."""
    lines = [f"## {finding.title} (`{finding.name}`)", "", f"Paper: {finding.paper}.", "",
             "```bash", command, "```", "",
             _cost(finding, outcome),
             "", finding.notes.strip(), "",
             "| claim | measured | verdict |", "|---|---|---|"]
    for v in outcome.verdicts:
        lines.append(f"| {v.claim} | {v.measured} | **{v.word}** |")
    lines += ["", *finding.table(outcome.measured), ""]
    lines += [f"![{finding.name}: {Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines).rstrip() + "\n"


def _cost(finding: Finding, outcome: Outcome) -> str:
    """What the finding cost here: the runs' summed training time (what a fresh reproduction pays,
    divided among its workers) and the wall time of the call that wrote the section."""
    call = f"{outcome.seconds / 60:.1f} min wall time for the call that wrote this section"
    if outcome.runs == 0:
        return f"{call} (budget: {finding.budget})."
    return (f"{outcome.runs} runs, {outcome.train_seconds / 60:.1f} min of training summed over the runs; "
            f"{call} (budget: {finding.budget}).")


def write_section(path: str | Path, finding: Finding, outcome: Outcome, command: str) -> Path:
    """Replace (or append) ``finding``'s section of the results page at ``path``; its figures are
    copied next to it under ``findings/`` as ``<finding>_<figure>.png``."""
    path = Path(path)
    fig_dir = path.parent / "findings"
    fig_dir.mkdir(parents=True, exist_ok=True)
    shown = []
    for src in outcome.figures:
        if any(src.stem.endswith(kind) for kind in finding.figures):
            dest = fig_dir / f"{finding.name}_{src.name}"
            shutil.copyfile(src, dest)
            shown.append(f"findings/{dest.name}")
    begin, end = _markers(finding.name)
    body = f"{begin}\n{section(finding, outcome, command, shown)}{end}"
    text = path.read_text() if path.exists() else "# Findings reproduced at CPU scale\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + body + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + body + "\n"
    path.write_text(text)
    return path


def dumps(outcome: Outcome) -> str:
    return json.dumps(outcome.as_json())
