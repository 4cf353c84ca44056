"""``negative-eigenvalues``: a linear RNN tracks parity once its transition may have negative eigenvalues
(Grazzi et al., "Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues", 2024).

Claim: DeltaNet with beta in (0, 2) (``negative_eigenvalues=true``: the transition I - beta k k^T has the
eigenvalue 1 - beta in (-1, 1)) learns parity and keeps it beyond the training length; the same model
with beta in (0, 1) (every eigenvalue in [0, 1]) does not.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

TRAIN, FACTOR = 32, 4


@FINDINGS.register("negative-eigenvalues")
class NegativeEigenvalues(Finding):
    title = "Parity with negative eigenvalues"
    paper = "Grazzi et al., Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues (2024)"
    budget = "about 6 min on 2 cores (4 runs)"
    figures = ("length",)
    notes = f"""
DeltaNet, one layer, d_model 64, parity trained at length {TRAIN} (every position supervised), up to 3000
steps, learning rates 1e-3 and 3e-3 (the best kept), tested at {TRAIN} and {FACTOR}x. The only
difference between the two models is the range of beta.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [{"name": "deltanet"}, {"name": "deltanet", "args": {"negative_eigenvalues": True}}],
            "tasks": ["parity"], "sizes": [{"d_model": 64, "n_layers": 1}], "seeds": [0], "lrs": [1e-3, 3e-3],
            "task": {"seq_len": TRAIN}, "optim": {"steps": 3000, "batch_size": 64},
            "eval": {"lengths": [TRAIN, FACTOR * TRAIN], "batches": 4},
        })
        return quick_sweep(sweep) if quick else sweep

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        neg = m.one(model="deltanet", model__mixer_args__negative_eigenvalues=True)
        pos = m.one(model="deltanet", model__mixer_args={})
        n = (acc(neg, TRAIN), acc(neg, FACTOR * TRAIN))
        p = (acc(pos, TRAIN), acc(pos, FACTOR * TRAIN))
        return [
            Verdict(f"deltanet with beta in (0, 2) solves parity (>= 0.99) and keeps it at {FACTOR}x",
                    f"@{TRAIN}: {fmt(n[0])}, @{FACTOR * TRAIN}: {fmt(n[1])}", n[0] >= 0.99 and n[1] >= 0.99),
            Verdict("deltanet with beta in (0, 1) does not (< 0.99 at the training length)",
                    f"@{TRAIN}: {fmt(p[0])}, @{FACTOR * TRAIN}: {fmt(p[1])}", p[0] < 0.99),
        ]
