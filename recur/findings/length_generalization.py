"""``length-generalization``: training interventions that expose a recurrent model to the states of long
sequences (Buitrago & Gu, "Understanding and Improving Length Generalization in Recurrent Models", 2025).

Claim: a recurrent model that fails beyond its training length on passkey retrieval does better there
when trained from a Gaussian-noise initial state (``state_noise``) or from the previous batch's final
state (``state_passing``). The paper does not state the noise scale in the text this library could
read; std 1.0 is used (the scale of a normalised activation), and the method's ``std`` option changes it.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

MODELS = ("lru", "gla")
METHODS = ("state_noise", "state_passing")
TRAIN, LONG = 64, 256


@FINDINGS.register("length-generalization")
class LengthGeneralization(Finding):
    title = "Length generalisation: state noise and state passing"
    paper = "Buitrago & Gu, Understanding and Improving Length Generalization in Recurrent Models (2025)"
    budget = "about 12 min on 2 cores (6 runs)"
    figures = ("length",)
    notes = f"""
Passkey retrieval (5 digits, 10 depth bins), two layers, d_model 64, trained at length {TRAIN} for up to
1500 steps, tested at {TRAIN} and {LONG}. `+noise`: each training sequence starts from a Gaussian state
(std 1.0: the paper's scale was not found); `+passing`: each batch starts from the previous batch's
final state. The paper applies both as 500 steps of post-training after pre-training; here they run
from the start. A claim is tested only for a model that fails at {LONG} (accuracy < 0.9) without them.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        models = []
        for name in MODELS:
            models += [{"name": name}] + [{"name": name, "overrides": {"training": [m]}} for m in METHODS]
        sweep = SweepConfig.model_validate({
            "models": models,
            "tasks": [{"name": "passkey", "args": {"digits": 5, "depths": 10}}],
            "sizes": [{"d_model": 64, "n_layers": 2}], "seeds": [0], "lrs": [3e-3],
            "task": {"seq_len": TRAIN}, "optim": {"steps": 1500, "batch_size": 64},
            "eval": {"lengths": [TRAIN, LONG], "batches": 4},
        })
        return quick_sweep(sweep) if quick else sweep

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        out = []
        for name in MODELS:
            base = [r for r in m.find(model=name) if not m.config_of(r).get("training")]
            plain = acc(base[0] if base else None, LONG)
            for method in METHODS:
                rows = [r for r in m.find(model=name)
                        if [t["name"] for t in m.config_of(r).get("training", [])] == [method]]
                with_it = acc(rows[0] if rows else None, LONG)
                fails = plain < 0.9
                out.append(Verdict(
                    f"{method} raises {name}'s passkey accuracy at {LONG} (4x), where it fails without it",
                    f"@{LONG}: without {fmt(plain)}, with {fmt(with_it)}"
                    + ("" if fails else f" ({name} does not fail without it, so the claim does not apply)"),
                    fails and with_it > plain))
        return out
