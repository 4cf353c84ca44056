"""``hrm-segments``: HRM's accuracy rises with the number of supervision segments, and its one-step
gradient is cheaper than backpropagating through every cycle at comparable accuracy (Wang et al.,
"Hierarchical Reasoning Model", 2025), on generated 4x4 Sudoku at CPU scale.

Claims:
1. evaluated with more segments, HRM (trained with 4) solves more puzzles: exact match at 4 segments
   above 1 segment, and at 8 not below 4 by more than ``SLACK``;
2. the one-step gradient trains faster per step than full backpropagation through the cycles
   (training seconds), with exact match within ``SLACK`` of it or better.
Rules fixed before the runs. Blank accuracy (the share of blank cells filled right) is reported too.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

SEQ = 33  # 16 cells, SEP, 16 cells
SEGMENTS = (1, 2, 4, 8)
SLACK = 0.02


@FINDINGS.register("hrm-segments")
class HrmSegments(Finding):
    title = "HRM on 4x4 Sudoku: exact match against supervision segments, and the one-step gradient"
    paper = "Wang et al., Hierarchical Reasoning Model (2025)"
    budget = "about 15 min on 2 cores (2 runs)"
    notes = f"""
`sudoku` 4x4 (length {SEQ}: the puzzle, SEP, the solution teacher forced), 1500 steps of batch 32 at lr 1e-3, no early
stop, seed 0. `hrm`: one causal attention block per module (d_model 64), H_cycles = L_cycles = 2, 4 supervision
segments in training on a detached carry, ACT halting with the Q head; evaluated at {', '.join(map(str, SEGMENTS))}
segments (`eval.loops`). The same model with `one_step_grad=false` backpropagates through every cycle of a segment.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [{"name": "attention", "arch": "hrm",
                        "overrides": {"model.args": {"n_supervision": 4}, "eval.loops": list(SEGMENTS)}}],
            "tasks": [{"name": "sudoku", "args": {"size": 4}}], "sizes": [{"d_model": 64, "n_layers": 1}],
            "seeds": [0], "lrs": [1e-3], "axes": {"model.args.one_step_grad": [True, False]},
            "task": {"seq_len": SEQ}, "optim": {"steps": 1500, "batch_size": 32, "early_stop": None},
            "eval": {"lengths": [SEQ], "batches": 8},
        })
        return quick_sweep(sweep) if quick else sweep

    def _row(self, m: Measured, one_step: bool):
        return m.one(model="hrm:attention", model__args__one_step_grad=one_step)

    def segments(self, m: Measured, one_step: bool = True) -> dict[int, dict[str, float]]:
        row = self._row(m, one_step)
        if row is None:
            return {}
        depths = m.extra.get("depth_evals", {}).get(row["hashes"][0], {})
        return {int(k): v[str(SEQ)] for k, v in depths.items() if str(SEQ) in v}

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        seg = self.segments(m)
        exact = {k: v["exact_match"] for k, v in seg.items()}
        one, full = self._row(m, True), self._row(m, False)
        secs = [float("nan") if r is None else r["seconds"] for r in (one, full)]
        em = [acc(r, SEQ, key="exact_match") for r in (one, full)]
        return [
            Verdict(f"exact match rises with the segments at evaluation (4 above 1; 8 within {SLACK} of 4 or above)",
                    ", ".join(f"{k} seg.: {fmt(v)}" for k, v in sorted(exact.items())),
                    bool(exact) and exact.get(4, 0) > exact.get(1, 1) and exact.get(8, 0) >= exact.get(4, 1) - SLACK),
            Verdict(f"the one-step gradient trains faster than full backprop, exact match within {SLACK} or better",
                    f"one-step {secs[0]:.0f} s, exact {fmt(em[0])}; full {secs[1]:.0f} s, exact {fmt(em[1])}",
                    secs[0] < secs[1] and em[0] >= em[1] - SLACK),
        ]

    def table(self, m: Measured) -> list[str]:
        lines = ["| gradient | segments at test | exact match | blank accuracy | accuracy |", "|---|---|---|---|---|"]
        for one_step in (True, False):
            for k, v in sorted(self.segments(m, one_step).items()):
                lines.append(f"| {'one-step' if one_step else 'full'} | {k}{' (trained)' if k == 4 else ''} | "
                             f"{fmt(v['exact_match'])} | {fmt(v.get('blank_accuracy', float('nan')))} | "
                             f"{fmt(v['accuracy'])} |")
        return lines
