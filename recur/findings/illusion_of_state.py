"""``illusion-of-state``: state tracking separates nonlinear RNNs from attention and diagonal linear
recurrences (Merrill, Petty & Sabharwal, "The Illusion of State in State-Space Models", 2024).

Claims: a 1-layer LSTM and GRU learn parity and the Z5 and S5 word problems at the training length
and keep them at 4x (a finite-state solution holds at every length); attention and a diagonal
linear recurrence with positive real eigenvalues (minGRU) do not.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

RNNS, OTHERS = ("lstm", "gru"), ("attention", "mingru")
TASKS = (("parity", {}), ("word_problem", {"group": "Z5"}), ("word_problem", {"group": "S5"}))
TRAIN, FACTOR = 32, 4


def _task_name(name: str, args: dict) -> str:
    return name if not args else f"{name} {args['group']}"


@FINDINGS.register("illusion-of-state")
class IllusionOfState(Finding):
    title = "State tracking and length generalisation"
    paper = "Merrill, Petty & Sabharwal, The Illusion of State in State-Space Models (2024)"
    budget = "about 15 min on 2 cores (12 runs)"
    figures = ("length",)
    notes = f"""
One layer, d_model 64, trained at length {TRAIN} (every position supervised: the running product),
learning rate 3e-3, batch 64, up to 3000 steps with the default early stop; test accuracy per
position at the training length and at {FACTOR}x.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [*RNNS, *OTHERS],
            "tasks": [{"name": n, "args": a} for n, a in TASKS],
            "sizes": [{"d_model": 64, "n_layers": 1}],
            "seeds": [0], "lrs": [3e-3],
            "task": {"seq_len": TRAIN},
            "optim": {"steps": 3000, "batch_size": 64}, "eval": {"lengths": [TRAIN, FACTOR * TRAIN], "batches": 4},
        })
        return quick_sweep(sweep) if quick else sweep

    def _cell(self, m: Measured, model: str, name: str, args: dict, length: int) -> float:
        query = {"task__args__group": args["group"]} if args else {}
        return acc(m.one(model=model, task=name, **query), length)

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        out = []
        for model in RNNS:
            cells = [(self._cell(m, model, n, a, TRAIN), self._cell(m, model, n, a, FACTOR * TRAIN)) for n, a in TASKS]
            out.append(Verdict(
                f"a 1-layer {model} reaches >= 0.99 on parity, Z5 and S5 at the training length and keeps >= 0.99 at {FACTOR}x",
                "; ".join(f"{_task_name(n, a)}: {fmt(x)} / {fmt(y)}" for (n, a), (x, y) in zip(TASKS, cells)),
                all(x >= 0.99 and y >= 0.99 for x, y in cells)))
        for model in OTHERS:
            cells = [self._cell(m, model, n, a, FACTOR * TRAIN) for n, a in TASKS]
            out.append(Verdict(
                f"{model} does not track the state at {FACTOR}x (accuracy < 0.99 on every task)",
                "; ".join(f"{_task_name(n, a)} @{FACTOR * TRAIN}: {fmt(y)}" for (n, a), y in zip(TASKS, cells)),
                all(y < 0.99 for y in cells)))
        return out
