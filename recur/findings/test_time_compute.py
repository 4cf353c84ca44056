"""``test-time-compute``: depth-recurrent models get better with more iterations at test time, past
the depth they trained with, where a fixed-depth model of the same parameters cannot (Geiping et
al., "Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach", 2025; Yang
et al., "Looped Transformers are Better at Learning Learning Algorithms", 2024), at CPU scale.

Claims, read at the training length (accuracy per answer digit of multi-digit addition written most
significant digit first, so the first answer digit needs the whole carry chain):
1. the recurrent-depth model (random depth in training, mean 4) is more accurate at 8 or 16
   iterations than at the 4 it is evaluated with by default (by at least ``GAIN``), and its accuracy
   rises from 1 iteration to 4;
2. the looped transformer (4 loops in training) likewise gains at 8 or 16 loops;
3. the best of them at more iterations than trained beats the fixed-depth model of the same blocks.
Rules fixed before the runs.
"""

from __future__ import annotations

from pathlib import Path

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Outcome, Verdict, acc, fmt, line_plot, run_grid
from recur.findings.quick import quick_sweep

SEQ = 15  # D = 4 digits per operand
LOOPS = (1, 2, 4, 8, 16)
TRAINED = 4
GAIN = 0.01
MODELS = {"recurrent_depth:attention": "recurrent depth (mean 4 in training)",
          "looped_lm:attention": "looped (4 loops in training)"}


@FINDINGS.register("test-time-compute")
class TestTimeCompute(Finding):
    title = "Accuracy against iterations at test time, depth-recurrent against fixed depth"
    paper = "Geiping et al., Scaling up Test-Time Compute with Latent Reasoning: A Recurrent Depth Approach (2025)"
    budget = "about 12 min on 2 cores (3 runs)"
    figures = ("depth",)
    notes = f"""
`addition` with `reverse=false` (D = 4 digits, length {SEQ}), 2000 steps of batch 64 at lr 3e-3, no early stop, seed
0, attention blocks of d_model 64 with SwiGLU MLPs. `recurrent_depth`: a prelude, a core and a coda of one block
each, r drawn in training from the Poisson-lognormal schedule of mean {TRAINED} with gradients through the last 4
iterations (`bptt_loops`), seeded s_0 at test. `looped_lm`: one block looped {TRAINED} times with input injection.
Fixed depth: `causal_lm` of 3 blocks (the recurrent-depth model's parameters, less its adapter). Both depth-recurrent
models are evaluated at {', '.join(map(str, LOOPS))} iterations (`eval.loops`).
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        loops = {"eval.loops": list(LOOPS)}
        sweep = SweepConfig.model_validate({
            "models": [{"name": "attention", "arch": "recurrent_depth",
                        "overrides": {"model.args": {"mean_loops": TRAINED, "n_loops": TRAINED, "bptt_loops": 4},
                                      **loops}},
                       {"name": "attention", "arch": "looped_lm", "overrides": {"model.args": {"n_loops": TRAINED},
                                                                               **loops}},
                       {"name": "attention", "overrides": {"model.n_layers": 3}}],
            "tasks": [{"name": "addition", "args": {"reverse": False}}], "sizes": [{"d_model": 64, "n_layers": 1}],
            "seeds": [0], "lrs": [3e-3],
            "task": {"seq_len": SEQ}, "optim": {"steps": 2000, "batch_size": 64, "early_stop": None},
            "eval": {"lengths": [SEQ, 24], "batches": 8},
        })
        return quick_sweep(sweep) if quick else sweep

    def curve(self, m: Measured, model: str) -> dict[int, float]:
        row = m.one(model=model)
        if row is None:
            return {}
        depths = m.extra.get("depth_evals", {}).get(row["hashes"][0], {})
        return {int(k): v[str(SEQ)]["accuracy"] for k, v in depths.items() if str(SEQ) in v}

    def curves(self, m: Measured) -> dict[str, dict[int, float]]:
        return {label: self.curve(m, model) for model, label in MODELS.items()}

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        rd, lp = self.curve(m, "recurrent_depth:attention"), self.curve(m, "looped_lm:attention")
        fixed = acc(m.one(model="attention"))

        def beyond(c):
            return max((c[k] for k in c if k > TRAINED), default=float("nan"))

        def show(c):
            return ", ".join(f"{k}: {fmt(v)}" for k, v in sorted(c.items()))

        return [
            Verdict(f"the recurrent-depth model rises from 1 to {TRAINED} iterations and gains >= {GAIN} at 8 or 16",
                    show(rd), bool(rd) and rd.get(TRAINED, 0) > rd.get(1, 1) and beyond(rd) >= rd[TRAINED] + GAIN),
            Verdict(f"the looped transformer gains >= {GAIN} at 8 or 16 loops over its {TRAINED} trained",
                    show(lp), bool(lp) and beyond(lp) >= lp[TRAINED] + GAIN),
            Verdict("with more iterations than trained, the best depth-recurrent model beats the fixed-depth model "
                    "of the same blocks", f"best beyond training {fmt(max(beyond(rd), beyond(lp)))}; "
                    f"fixed depth (3 blocks) {fmt(fixed)}", max(beyond(rd), beyond(lp)) > fixed),
        ]

    def table(self, m: Measured) -> list[str]:
        lines = ["| model | " + " | ".join(f"{k} it." for k in LOOPS) + " | fixed |", "|" + "---|" * (len(LOOPS) + 2)]
        for model, label in MODELS.items():
            c = self.curve(m, model)
            lines.append(f"| {label} | " + " | ".join(fmt(c.get(k, float('nan'))) for k in LOOPS) + " | |")
        lines.append("| causal_lm, 3 blocks | " + " | " * len(LOOPS) + f"{fmt(acc(m.one(model='attention')))} |")
        return lines

    def run(self, store, quick: bool = False, workers: int = 1, console=None,
            figures_dir: str | Path | None = None) -> Outcome:
        outcome = run_grid(self, store, quick=quick, workers=workers, console=console, figures_dir=figures_dir)
        if figures_dir is not None:
            fixed = acc(outcome.measured.one(model="attention"))
            outcome.figures.append(line_plot(
                self.curves(outcome.measured), Path(figures_dir) / "iterations.png", "iterations at test time",
                f"accuracy at length {SEQ}", "addition (most significant digit first), D = 4",
                {"fixed depth, 3 blocks": fixed}, logx=True))
        return outcome
