"""``looped-icl``: a 1-layer looped transformer learns in-context linear regression to least-squares
error and keeps it when looped past its training loops (Yang, Lee, Nowak, Papailiopoulos, "Looped
Transformers are Better at Learning Learning Algorithms", ICLR 2024), at the CPU scale the reference
suggests (d = 5, 11 examples, width 64, b = 12 loops with the loss over the last T = 6).

Claims:
1. once the prompt holds at least d examples, the looped 1-layer model's error is near least squares'
   (which is exactly 0 there, noiseless): ``mse@i`` <= ``NEAR_LS`` for every i > d;
2. it stays there when looped past the b loops it trained with (2b and 4b loops at test time);
3. the same 1-layer model without loops does not get there (its error for i > d stays above
   ``FAR``), so the loops, not the layer, do the work.
The rules were fixed before the runs; the error is the squared error / d, so 1 is predicting 0.
"""

from __future__ import annotations

from pathlib import Path

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Outcome, Verdict, fmt, line_plot, run_grid
from recur.findings.quick import quick_sweep

D, EXAMPLES = 5, 11
SEQ = 2 * EXAMPLES  # x_1 y_1 ... x_11 y_11
LOOPS, WINDOW = 12, 6  # b and T of the reference's CPU experiment
TEST_LOOPS = (1, 3, 6, 12, 24, 48)
STEPS = 5000
NEAR_LS, FAR = 0.1, 0.3  # "near least squares": a tenth of the zero predictor's error; "does not get there"


def after_d(metrics: dict[str, float]) -> list[float]:
    """The error at every example i > d (least squares is exact there)."""
    return [metrics[f"mse@{i}"] for i in range(D + 1, EXAMPLES + 1) if f"mse@{i}" in metrics]


@FINDINGS.register("looped-icl")
class LoopedICL(Finding):
    title = "In-context linear regression: a looped 1-layer transformer against iterations"
    paper = "Yang, Lee, Nowak, Papailiopoulos, Looped Transformers are Better at Learning Learning Algorithms (2024)"
    budget = "about 10 min on 2 cores (2 runs)"
    figures = ()
    notes = f"""
`icl_regression` with d = {D} and {EXAMPLES} examples per prompt (sequence length {SEQ}; w, x ~ N(0, I), y = w.x, no
noise), {STEPS} steps of batch 64 at lr 1e-3, no curriculum. `looped_lm` of one attention layer (d_model 64,
SwiGLU MLP) looped b = {LOOPS} times with the input re-injected before each loop and the loss over the last
T = {WINDOW} loops (the first {LOOPS - WINDOW} without gradient), evaluated at {', '.join(map(str, TEST_LOOPS))} loops
(`eval.loops`); the same one-layer `causal_lm` unlooped. Error: squared error / d at each example (`mse@i`);
least squares is exact from example d + 1 = {D + 1} on, predicting 0 scores 1.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [{"name": "attention", "arch": "looped_lm",
                        "overrides": {"model.args": {"n_loops": LOOPS, "loss_loops": WINDOW},
                                      "eval.loops": list(TEST_LOOPS)}},
                       {"name": "attention"}],
            "tasks": [{"name": "icl_regression", "args": {"n_dims": D}}], "sizes": [{"d_model": 64, "n_layers": 1}],
            "seeds": [0], "lrs": [1e-3],
            "task": {"seq_len": SEQ}, "optim": {"steps": STEPS, "batch_size": 64, "early_stop": None},
            "eval": {"lengths": [SEQ], "batches": 8},
        })
        return quick_sweep(sweep) if quick else sweep

    def depth_curve(self, m: Measured) -> dict[int, dict[str, float]]:
        """The looped model's metrics at the training length per number of loops at test time."""
        row = m.one(model="looped_lm:attention")
        if row is None:
            return {}
        depths = m.extra.get("depth_evals", {}).get(row["hashes"][0], {})
        return {int(k): v[str(SEQ)] for k, v in depths.items() if str(SEQ) in v}

    def curves(self, m: Measured) -> dict[str, dict[int, float]]:
        """Error against the number of in-context examples, per model (and least squares: 0 from d + 1)."""
        out = {}
        for label, model in ((f"looped, {LOOPS} loops", "looped_lm:attention"), ("1 layer, unlooped", "attention")):
            row = m.one(model=model)
            if row is not None:
                metrics = row["metrics"][str(SEQ)]
                out[label] = {i: metrics[f"mse@{i}"] for i in range(1, EXAMPLES + 1)}
        depth = self.depth_curve(m)
        for loops in (2 * LOOPS, 4 * LOOPS):
            if loops in depth:
                out[f"looped, {loops} loops at test"] = {i: depth[loops][f"mse@{i}"] for i in range(1, EXAMPLES + 1)}
        return out

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        looped, flat = m.one(model="looped_lm:attention"), m.one(model="attention")
        lm = looped["metrics"][str(SEQ)] if looped else {}
        fm = flat["metrics"][str(SEQ)] if flat else {}
        depth = self.depth_curve(m)
        past = [(k, after_d(depth[k])) for k in (2 * LOOPS, 4 * LOOPS) if k in depth]

        def worst(values: list[float]) -> float:
            return max(values) if values else float("nan")

        return [
            Verdict(f"with at least d = {D} examples the looped 1-layer model's error is near least squares' (0): "
                    f"<= {NEAR_LS} at every example i > d", f"max mse@{D + 1}..{EXAMPLES} = {fmt(worst(after_d(lm)))}"
                    f" (mse@1 = {fmt(lm.get('mse@1', float('nan')))})",
                    bool(after_d(lm)) and worst(after_d(lm)) <= NEAR_LS),
            Verdict(f"looped past its {LOOPS} training loops it stays there (<= {NEAR_LS} at i > d)",
                    "; ".join(f"{k} loops: max {fmt(worst(v))}" for k, v in past) or "n/a",
                    len(past) == 2 and all(bool(v) and worst(v) <= NEAR_LS for _, v in past)),
            Verdict(f"the same layer without loops does not get there (error > {FAR} at i > d)",
                    f"min mse@{D + 1}..{EXAMPLES} = {fmt(min(after_d(fm)) if after_d(fm) else float('nan'))}",
                    bool(after_d(fm)) and min(after_d(fm)) > FAR),
        ]

    def table(self, m: Measured) -> list[str]:
        depth = self.depth_curve(m)
        lines = ["| loops at test | mse (mean over examples) | mse@1 | " +
                 " | ".join(f"mse@{i}" for i in range(D, EXAMPLES + 1)) + " |",
                 "|" + "---|" * (3 + EXAMPLES - D + 1)]
        for k in sorted(depth):
            v = depth[k]
            lines.append(f"| {k}{' (trained)' if k == LOOPS else ''} | {fmt(v['mse'])} | {fmt(v['mse@1'])} | " +
                         " | ".join(fmt(v[f'mse@{i}']) for i in range(D, EXAMPLES + 1)) + " |")
        flat = m.one(model="attention")
        if flat is not None:
            v = flat["metrics"][str(SEQ)]
            lines.append(f"| unlooped 1 layer | {fmt(v['mse'])} | {fmt(v['mse@1'])} | " +
                         " | ".join(fmt(v[f'mse@{i}']) for i in range(D, EXAMPLES + 1)) + " |")
        return lines

    def run(self, store, quick: bool = False, workers: int = 1, console=None,
            figures_dir: str | Path | None = None) -> Outcome:
        outcome = run_grid(self, store, quick=quick, workers=workers, console=console, figures_dir=figures_dir)
        if figures_dir is not None:
            outcome.figures.append(line_plot(
                self.curves(outcome.measured), Path(figures_dir) / "error.png", "in-context examples i",
                "squared error / d", f"in-context linear regression, d = {D}", {"least squares (from i = d + 1)": 0.0}))
        return outcome
