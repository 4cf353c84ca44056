"""``jrt``: reading the context twice helps recurrent models recall (Arora et al., "Just Read Twice:
Closing the Recall Gap for Recurrent Language Models", 2024).

Claim: on set disjointness, a recurrent model given the context twice (``jrt=true``: the first set
repeated after the second) answers more often than with the context once.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

RECURRENT = ("gla", "mingru")


@FINDINGS.register("jrt")
class JustReadTwice(Finding):
    title = "Set disjointness, context read once or twice"
    paper = "Arora et al., Just Read Twice: Closing the Recall Gap for Recurrent Language Models (2024)"
    budget = "about 8 min on 2 cores (6 runs)"
    figures = ("state_size",)
    notes = """
Two layers, d_model 64, vocabulary 256, set sizes 4 and 16 (`grow: padding`), length 48, 1500 steps,
lr 3e-3. Accuracy: the shared token predicted at the last position. Attention is run for contrast.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [*RECURRENT, "attention"],
            "tasks": [{"name": "set_disjointness", "args": {"vocab_size": 256, "jrt": jrt, "grow": "padding"}}
                      for jrt in (False, True)],
            "sizes": [{"d_model": 64, "n_layers": 2}], "seeds": [0], "lrs": [3e-3],
            "task": {"seq_len": 48}, "optim": {"steps": 1500, "batch_size": 64},
            "eval": {"lengths": [48], "batches": 4},
        })
        return quick_sweep(sweep) if quick else sweep

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        out = []
        for model in RECURRENT:
            once = acc(m.one(model=model, task__args__jrt=False))
            twice = acc(m.one(model=model, task__args__jrt=True))
            out.append(Verdict(f"reading the context twice raises {model}'s set-disjointness accuracy",
                               f"once {fmt(once)}, twice {fmt(twice)}", twice > once))
        return out
