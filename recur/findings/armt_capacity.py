"""``armt-capacity``: ARMT stores many more key-value pairs than RMT with the same memory tokens
(Rodkin et al., "Associative Recurrent Memory Transformer", 2024), at CPU scale.

Claim: on associative retrieval (ARMT's generator: one base-16 key-value pair per segment, then a
query), with M = 4 memory tokens each, ARMT's exact match stays high up to more pairs than RMT's. The
capacity of a model is the largest number of pairs at which its exact match is at least CAPABLE.
Each point of the curve is its own run, trained and tested at that number of pairs.
"""

from __future__ import annotations

import math
from pathlib import Path

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Outcome, Verdict, acc, fmt, line_plot, run_grid
from recur.findings.quick import quick_sweep

PAIRS = (2, 4, 8, 15)  # 15: every key of one base-16 digit but one
BLOCK = 4  # key_size 1 + value_size 1 + SEP + EOS: one pair per segment
MEMORY = 4
CAPABLE = 0.9
ARCHS = ("rmt", "armt")


def seq_len(pairs: int) -> int:
    return (pairs + 1) * BLOCK  # the pairs and the query block


def capacity(points: dict[int, float]) -> int:
    """The largest number of pairs retrieved with exact match >= CAPABLE (0: none)."""
    return max((n for n, x in points.items() if x >= CAPABLE), default=0)


@FINDINGS.register("armt-capacity")
class ARMTCapacity(Finding):
    title = "ARMT against RMT: key-value pairs stored in four memory tokens"
    paper = "Rodkin, Kuratov, Bulatov, Burtsev, Associative Recurrent Memory Transformer (2024)"
    budget = "about 15 min on 2 cores (8 runs)"
    figures = ("capacity",)
    notes = f"""
Associative retrieval with keys and values of one base-16 digit (segment = one pair = {BLOCK} tokens),
{', '.join(map(str, PAIRS))} pairs (length {', '.join(str(seq_len(n)) for n in PAIRS)}), each trained for 1500 steps of batch
32, lr 1e-3, no early stop, with the paper's curriculum over segments (one pair at first, the run's own number
of pairs from half-way; `--train curriculum:start={seq_len(1)}`), and tested at its own number of pairs. Without
the curriculum ARMT did not learn 8 pairs in 1000 steps (exact match 0.055; RMT 0.28); with it, 1.0. `rmt` and `armt`:
an attention cell of 2 layers, d_model 64, M = {MEMORY} memory tokens, full BPTT. Metric: exact match of the
value (chance 1/16). Capacity: the most pairs with exact match >= {CAPABLE}, fixed before the runs.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [{"name": "attention", "arch": arch,
                        "overrides": {"model.args": {"segment_len": BLOCK, "n_memory": MEMORY}}} for arch in ARCHS],
            "tasks": [{"name": "associative_retrieval", "args": {"key_size": 1, "value_size": 1},
                       "overrides": {"task.seq_len": seq_len(n), "eval.lengths": [seq_len(n)]}} for n in PAIRS],
            "sizes": [{"d_model": 64, "n_layers": 2}], "seeds": [0], "lrs": [1e-3],
            "optim": {"steps": 1500, "batch_size": 32, "early_stop": None}, "eval": {"batches": 4},
            # the paper's curriculum over the number of segments: from one pair up to the run's own
            "training": [{"name": "curriculum", "args": {"start": seq_len(1)}}],
        })
        return quick_sweep(sweep) if quick else sweep

    def curves(self, m: Measured) -> dict[str, dict[int, float]]:
        """Exact match against the number of pairs, per architecture."""
        out: dict[str, dict[int, float]] = {}
        for arch in ARCHS:
            for row in m.find(model=f"{arch}:attention"):
                pairs = row["train_seq_len"] // BLOCK - 1
                out.setdefault(arch, {})[pairs] = acc(row, key="exact_match")
        return {a: dict(sorted(c.items())) for a, c in out.items()}

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        c = self.curves(m)
        rmt, armt = c.get("rmt", {}), c.get("armt", {})
        shared = sorted(set(rmt) & set(armt))
        return [
            Verdict(f"ARMT stores more key-value pairs than RMT with M = {MEMORY} memory tokens (capacity: the most "
                    f"pairs at exact match >= {CAPABLE})",
                    f"capacity armt {capacity(armt)}, rmt {capacity(rmt)}",
                    bool(shared) and capacity(armt) > capacity(rmt)),
            Verdict("ARMT's exact match is at least RMT's at every number of pairs",
                    "; ".join(f"{n} pairs: armt {fmt(armt[n])}, rmt {fmt(rmt[n])}" for n in shared),
                    bool(shared) and all(armt[n] >= rmt[n] for n in shared)),
        ]

    def table(self, m: Measured) -> list[str]:
        c = self.curves(m)
        pairs = sorted({n for curve in c.values() for n in curve})
        lines = ["| pairs | length | " + " | ".join(f"{a} exact match" for a in c) + " |", "|" + "---|" * (2 + len(c))]
        for n in pairs:
            lines.append(f"| {n} | {seq_len(n)} | " + " | ".join(fmt(c[a].get(n, math.nan)) for a in c) + " |")
        return lines

    def run(self, store, quick: bool = False, workers: int = 1, console=None,
            figures_dir: str | Path | None = None) -> Outcome:
        outcome = run_grid(self, store, quick=quick, workers=workers, console=console, figures_dir=figures_dir)
        if figures_dir is not None:
            outcome.figures.append(self.plot(outcome.measured, Path(figures_dir) / "capacity.png"))
        return outcome

    def plot(self, m: Measured, path: Path) -> Path:
        """Exact match against the number of pairs, one line per architecture."""
        return line_plot({f"{a} (M = {MEMORY})": c for a, c in self.curves(m).items()}, path,
                         "key-value pairs (one per segment)", "exact match",
                         f"associative retrieval: pairs stored in {MEMORY} memory tokens",
                         {"chance (1/16)": 1 / 16, f"capacity threshold ({CAPABLE})": CAPABLE})
