"""``tmaze-memory``: a memory transformer solves T-Maze far past its segment, a model without memory
guesses (Cherepanov et al., "Recurrent Action Transformer with Memory", 2023), at CPU scale.

Claims: on T-Maze (the cue at the first step only; the turn it asks for at the end of the corridor),
RATE trained on short corridors keeps a high success rate as the corridor grows far past its segment
length; a same-size transformer that sees one segment at a time (sliding-window attention, the window
one segment) falls to 50% (a guess between the two arms) once the cue is out of its window.

Success is the authors' metric: a greedy closed-loop rollout of the model in the environment
(``tmaze``'s ``success``), averaged over three seeds.
"""

from __future__ import annotations

from pathlib import Path

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Outcome, Verdict, acc, fmt, line_plot, run_grid
from recur.findings.quick import quick_sweep

STEPS_PER_SEGMENT = 3
SEGMENT = 2 * STEPS_PER_SEGMENT  # an observation and an action per step
TRAIN = 24  # corridor L = 11: the cue is 4 segments before the junction
LENGTHS = (24, 48, 96, 192, 768)  # corridors of 11, 23, 47, 95, 383 steps
HIGH, GUESS, NEAR = 0.9, 0.5, 0.1  # rules fixed before the runs: "high" >= 0.9; "50%" within 0.1 of 0.5
SEEDS = (0, 1, 2)


def corridor(seq_len: int) -> int:
    return seq_len // 2 - 1


@FINDINGS.register("tmaze-memory")
class TMazeMemory(Finding):
    title = "T-Maze: success against corridor length, with and without memory"
    paper = "Cherepanov, Staroverov, Yudin, Kovalev, Panov, Recurrent Action Transformer with Memory (2023)"
    budget = "about 3 min on 2 cores (6 runs)"
    figures = ("success",)
    notes = f"""
T-Maze expert trajectories (`tmaze`: an observation and an action per step, the cue at step 0 only, the
authors' time limit of L + 2 steps), trained at corridor L = {corridor(TRAIN)} (length {TRAIN}) for 1000 steps of
batch 32, lr 3e-3, no early stop (token accuracy saturates without memory), seeds {', '.join(map(str, SEEDS))}
(mean shown); tested at corridors {', '.join(str(corridor(n)) for n in LENGTHS)}. Both models: one layer,
d_model 32, attention over segments of {STEPS_PER_SEGMENT} steps ({SEGMENT} tokens): `rate` (2 memory tokens,
the Memory Retention Valve with 2 heads) and, without memory, the causal LM of sliding-window attention
with a {SEGMENT}-token window. Success: a greedy rollout in the environment reaches the goal.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [{"name": "attention", "arch": "rate",
                        "overrides": {"model.args": {"segment_len": SEGMENT, "n_memory": 2, "mrv_heads": 2}}},
                       {"name": "swa", "args": {"window": SEGMENT}}],
            "tasks": ["tmaze"], "sizes": [{"d_model": 32, "n_layers": 1}], "seeds": list(SEEDS), "lrs": [3e-3],
            "task": {"seq_len": TRAIN}, "optim": {"steps": 1000, "batch_size": 32, "early_stop": None},
            "eval": {"lengths": list(LENGTHS), "batches": 4},
        })
        return quick_sweep(sweep) if quick else sweep

    def curves(self, m: Measured) -> dict[str, dict[int, float]]:
        """Success rate against corridor length, per model (seeds averaged)."""
        out = {}
        for label, model in (("rate", "rate:attention"), ("swa (no memory)", "swa")):
            row = m.one(model=model)
            if row is not None:
                out[label] = {corridor(n): acc(row, n, key="success") for n in LENGTHS}
        return out

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        c = self.curves(m)
        rate, swa = c.get("rate", {}), c.get("swa (no memory)", {})
        past = [corridor(n) for n in LENGTHS if corridor(n) > corridor(TRAIN)]
        beyond_window = [L for L in (corridor(n) for n in LENGTHS) if L > STEPS_PER_SEGMENT]

        def show(curve, keys):
            return ", ".join(f"L={k}: {fmt(curve.get(k, float('nan')))}" for k in keys)

        return [
            Verdict(f"RATE's success stays high (>= {HIGH}) as the corridor grows past its training length and far "
                    f"past its segment ({STEPS_PER_SEGMENT} steps)", show(rate, [corridor(TRAIN), *past]),
                    bool(rate) and all(rate.get(k, 0.0) >= HIGH for k in [corridor(TRAIN), *past])),
            Verdict("a model that sees one segment at a time falls to 50% once the cue is out of its window",
                    show(swa, beyond_window), bool(swa) and all(abs(swa.get(k, 0.0) - GUESS) <= NEAR
                                                               for k in beyond_window)),
        ]

    def table(self, m: Measured) -> list[str]:
        c = self.curves(m)
        lines = ["| corridor L | length | " + " | ".join(f"{k} success" for k in c) + " |", "|" + "---|" * (2 + len(c))]
        for n in LENGTHS:
            lines.append(f"| {corridor(n)} | {n} | " + " | ".join(fmt(c[k].get(corridor(n), float('nan'))) for k in c)
                         + " |")
        return lines

    def run(self, store, quick: bool = False, workers: int = 1, console=None,
            figures_dir: str | Path | None = None) -> Outcome:
        outcome = run_grid(self, store, quick=quick, workers=workers, console=console, figures_dir=figures_dir)
        if figures_dir is not None:
            outcome.figures.append(line_plot(
                self.curves(outcome.measured), Path(figures_dir) / "success.png", "corridor length L (steps)",
                "success rate (greedy rollout)", f"T-Maze: segments of {STEPS_PER_SEGMENT} steps, trained at "
                f"L = {corridor(TRAIN)}", {"guess (0.5)": GUESS}, logx=True))
        return outcome
