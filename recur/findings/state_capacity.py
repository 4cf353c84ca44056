"""``state-capacity``: how far a recurrent state retrieves, and the training length that avoids state
collapse, against state size (Chen et al., "Stuffed Mamba: Oversized States Lead to the Inability to
Forget", 2024).

Claims: (1) passkey retrieval fails beyond a length that grows with the state size; (2) the shortest
training length at which a model still retrieves at 4x its training length (no state collapse) grows
with the state size, about linearly.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

MODEL = "gla"
WIDTHS = (16, 32, 64)
TRAIN_LENGTHS = (32, 64, 128)
EVAL_LENGTHS = (32, 64, 128, 256, 512)
OK = 0.9  # retrieval works at a length when token accuracy on the answer digits is at least this


def reach(m: Measured, row) -> int:
    """The longest evaluated length up to which ``row`` retrieves (accuracy >= OK at it and every shorter one)."""
    best = 0
    for n in sorted(int(k) for k in row["metrics"]):
        if acc(row, n) < OK:
            break
        best = n
    return best


@FINDINGS.register("state-capacity")
class StateCapacity(Finding):
    title = "Passkey retrieval against state size"
    paper = "Chen et al., Stuffed Mamba: Oversized States Lead to the Inability to Forget (2024)"
    budget = "about 18 min on 2 cores (9 runs)"
    figures = ("length", "state_size")
    notes = f"""
GLA (2 layers) at widths {', '.join(map(str, WIDTHS))} (its matrix state grows with the width), passkey
retrieval (5 digits, 10 depth bins) trained at lengths {', '.join(map(str, TRAIN_LENGTHS))} for up to 1000
steps, lr 3e-3, tested at {', '.join(map(str, EVAL_LENGTHS))}. A model retrieves at a length when its
answer-digit accuracy there is >= {OK}; its reach is the longest such length with every shorter one also
retrieved.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [MODEL],
            "tasks": [{"name": "passkey", "args": {"digits": 5, "depths": 10}, "overrides": {"seq_len": n}}
                      for n in TRAIN_LENGTHS],
            "sizes": [{"d_model": d, "n_layers": 2} for d in WIDTHS], "seeds": [0], "lrs": [3e-3],
            "optim": {"steps": 1000, "batch_size": 64}, "eval": {"lengths": list(EVAL_LENGTHS), "batches": 2},
        })
        return quick_sweep(sweep) if quick else sweep

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        widths = sorted({r["d_model"] for r in m.rows})
        states, reaches, shortest = [], [], []
        for d in widths:
            rows = sorted(m.find(model=MODEL, d_model=d), key=lambda r: r["train_seq_len"])
            if not rows:
                continue
            states.append(rows[0]["state_size"])
            reaches.append(max(reach(m, r) for r in rows))
            ok = [r["train_seq_len"] for r in rows if acc(r, 4 * r["train_seq_len"]) >= OK]
            shortest.append(min(ok) if ok else None)
        grows = len(reaches) > 1 and all(b > a for a, b in zip(reaches, reaches[1:]))
        known = [s for s in shortest if s is not None]
        rises = len(known) == len(shortest) > 1 and all(b >= a for a, b in zip(known, known[1:])) and known[-1] > known[0]
        return [
            Verdict("retrieval fails beyond a length that grows with the state size",
                    "; ".join(f"state {s}: reach {r}" for s, r in zip(states, reaches)), grows),
            Verdict("the shortest training length that still retrieves at 4x grows with the state size",
                    "; ".join(f"state {s}: {'none of ' + str(TRAIN_LENGTHS) if t is None else t}"
                              for s, t in zip(states, shortest)), rises),
        ]
