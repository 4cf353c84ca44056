"""``act-ponder``: Adaptive Computation Time ponders longer on harder inputs, and a Universal
Transformer with ACT beats a fixed-depth transformer of the same size on a state-tracking task
(Dehghani et al., "Universal Transformers", 2019; Graves, "Adaptive Computation Time for Recurrent
Neural Networks", 2016), at CPU scale.

Claims:
1. the mean ponder count (steps + remainder per position, UT's ``ponder_steps``) grows with the
   input's difficulty, here the length of a parity sequence: larger at 4x the training length than
   at it, and non-decreasing over the lengths tested;
2. UT + ACT is more accurate than a fixed-depth transformer of the same size (a causal LM of as many
   attention blocks as UT's ``max_steps``, its parameters unshared) on parity at the training length or
   at 2x, by at least ``MARGIN``.
Rules fixed before the runs.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

TRAIN = 16
LENGTHS = (TRAIN, 2 * TRAIN, 4 * TRAIN)
MAX_STEPS = 4
MARGIN = 0.02


@FINDINGS.register("act-ponder")
class ActPonder(Finding):
    title = "ACT: ponder count against length, and UT + ACT against a fixed-depth transformer"
    paper = "Dehghani, Gouws, Vinyals, Uszkoreit, Kaiser, Universal Transformers (2019)"
    budget = "about 8 min on 2 cores (2 runs)"
    figures = ("length",)
    notes = f"""
`parity` (the running parity at every position) trained at length {TRAIN}, tested at {', '.join(map(str, LENGTHS))};
2000 steps of batch 64 at lr 3e-3, no early stop, seed 0, d_model 64. `universal_transformer`: one attention block
applied up to {MAX_STEPS} times with a learned step embedding, ACT halting (threshold 0.99, ponder weight 0.01).
Fixed depth: `causal_lm` of {MAX_STEPS} attention blocks. The ponder count is the test batches' mean of N + R per
position (recorded with every evaluation as `ponder_steps`).
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [{"name": "attention", "arch": "universal_transformer",
                        "overrides": {"model.args": {"max_steps": MAX_STEPS}}},
                       {"name": "attention", "overrides": {"model.n_layers": MAX_STEPS}}],
            "tasks": ["parity"], "sizes": [{"d_model": 64, "n_layers": 1}], "seeds": [0], "lrs": [3e-3],
            "task": {"seq_len": TRAIN}, "optim": {"steps": 2000, "batch_size": 64, "early_stop": None},
            "eval": {"lengths": list(LENGTHS), "batches": 8},
        })
        return quick_sweep(sweep) if quick else sweep

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        ut, fixed = m.one(model="universal_transformer:attention"), m.one(model="attention")
        ponder = [acc(ut, n, key="ponder_steps") for n in LENGTHS]
        ut_acc = [acc(ut, n) for n in LENGTHS[:2]]
        fixed_acc = [acc(fixed, n) for n in LENGTHS[:2]]
        return [
            Verdict("the ponder count grows with the input's length (difficulty)",
                    ", ".join(f"length {n}: {fmt(p)}" for n, p in zip(LENGTHS, ponder)),
                    ponder[-1] > ponder[0] and all(b >= a for a, b in zip(ponder, ponder[1:]))),
            Verdict(f"UT + ACT beats the fixed-depth transformer of {MAX_STEPS} blocks by >= {MARGIN} at the training "
                    "length or at 2x",
                    "; ".join(f"length {n}: UT {fmt(a)} vs fixed {fmt(b)}"
                              for n, a, b in zip(LENGTHS, ut_acc, fixed_acc)),
                    any(a >= b + MARGIN for a, b in zip(ut_acc, fixed_acc))),
        ]

    def table(self, m: Measured) -> list[str]:
        lines = ["| model | params | " + " | ".join(f"acc @{n}" for n in LENGTHS) + " | " +
                 " | ".join(f"ponder @{n}" for n in LENGTHS) + " |", "|" + "---|" * (2 + 2 * len(LENGTHS))]
        for model in ("universal_transformer:attention", "attention"):
            row = m.one(model=model)
            if row is None:
                continue
            lines.append(f"| {row['model_label']} | {row['params']} | " +
                         " | ".join(fmt(acc(row, n)) for n in LENGTHS) + " | " +
                         " | ".join(fmt(acc(row, n, key='ponder_steps')) for n in LENGTHS) + " |")
        return lines
