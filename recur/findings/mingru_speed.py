"""``mingru-speed``: minGRU trains in parallel over time (Feng et al., "Were RNNs All We Needed?", 2024).

Claim: a training step (forward and backward) of minGRU's parallel forms (Heinsen's log-space scan, the
``parallel`` mode, and the chunked diagonal scan, ``chunk``) is faster than its sequential form, and the
advantage grows with the sequence length, because the parallel forms' work per token does not depend
on T while the sequential form pays a step of Python-level overhead per token.

Measured side by side in one process with ``recur.speed.measure`` (median of repeats after warm-up):
one minGRU layer, batch 8, d_model 128, T = 64 .. 4096 (quick: T = 64, 256).
"""

from __future__ import annotations

from pathlib import Path

import torch

from recur.findings.base import FINDINGS, Finding, Measured, Outcome, Verdict

LENGTHS, QUICK_LENGTHS = (64, 256, 1024, 4096), (64, 256)
FAST = ("parallel", "chunk")


def step_times(lengths, batch: int = 8, d_model: int = 128, budget_s: float = 10.0) -> dict[str, dict[int, float]]:
    """Seconds per forward + backward of one minGRU layer in each mode, per length."""
    import recur
    from recur.speed import _fwd_bwd, _randn, measure

    torch.manual_seed(0)
    layer = recur.build("mingru", d_model=d_model)
    times: dict[str, dict[int, float]] = {m: {} for m in (*FAST, "recurrent")}
    for T in lengths:
        x = _randn(batch, T, d_model, seed=3)
        for mode in times:
            layer.mode = mode
            times[mode][T] = measure(_fwd_bwd(lambda xx: layer(xx)[0], [x]), repeats=5, budget_s=budget_s)
    return times


@FINDINGS.register("mingru-speed")
class MinGRUSpeed(Finding):
    title = "minGRU: parallel against sequential training"
    paper = "Feng et al., Were RNNs All We Needed? (2024)"
    budget = "about 3 min on 2 cores"
    figures = ("speed",)
    notes = """
One minGRU layer (batch 8, d_model 128), the time of a training step's forward and backward in each
mode, measured side by side in one process (median after warm-up, `recur.speed.measure`). The paper's
figures are on a GPU; on a CPU the parallel forms cannot use more cores than it has, so the speed-up
here is the removal of the per-token loop, not parallel hardware.
"""

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        times = m.extra["times"]
        lengths = sorted(times["recurrent"])
        out = []
        for mode in FAST:
            speedups = [times["recurrent"][T] / times[mode][T] for T in lengths]
            shown = ", ".join(f"T={T}: {s:.2g}x" for T, s in zip(lengths, speedups))
            out.append(Verdict(f"minGRU's {mode} form trains faster than its sequential form at every length",
                               shown, all(s > 1 for s in speedups)))
            out.append(Verdict(f"the {mode} form's speed-up grows with the sequence length",
                               f"{speedups[0]:.2g}x at T={lengths[0]} -> {speedups[-1]:.2g}x at T={lengths[-1]}",
                               len(speedups) > 1 and speedups[-1] > speedups[0]))
        return out

    def table(self, m: Measured) -> list[str]:
        times = m.extra["times"]
        lengths = sorted(times["recurrent"])
        lines = ["| T | " + " | ".join(f"{mode} (ms)" for mode in times) + " | " +
                 " | ".join(f"speed-up {mode}" for mode in FAST) + " |", "|---|" + "---|" * (len(times) + len(FAST))]
        for T in lengths:
            lines.append(f"| {T} | " + " | ".join(f"{times[mode][T] * 1e3:.2f}" for mode in times) + " | " +
                         " | ".join(f"{times['recurrent'][T] / times[mode][T]:.1f}x" for mode in FAST) + " |")
        return lines

    def run(self, store, quick: bool = False, workers: int = 1, console=None, figures_dir=None) -> Outcome:
        import time

        start = time.perf_counter()
        lengths = QUICK_LENGTHS if quick else LENGTHS
        if console is not None:
            console.print(f"timing minGRU training steps at T = {', '.join(map(str, lengths))}")
        times = step_times(lengths, budget_s=2.0 if quick else 10.0)
        m = Measured([], [])
        m.extra = {"times": times}
        figures = []
        if figures_dir is not None:
            figures.append(self.plot(times, Path(figures_dir) / "speed.png"))
        return Outcome(self.name, quick, self.verdicts(m, quick), m, time.perf_counter() - start, 0, figures)

    @staticmethod
    def plot(times: dict[str, dict[int, float]], path: Path) -> Path:
        from matplotlib.figure import Figure

        path.parent.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(6.4, 4.6))
        ax = fig.add_subplot()
        for mode, by_length in times.items():
            lengths = sorted(by_length)
            ax.plot(lengths, [by_length[T] * 1e3 for T in lengths], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("forward + backward (ms, median)")
        ax.set_title("minGRU training step by mode", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.savefig(path, dpi=110, bbox_inches="tight")
        return path
