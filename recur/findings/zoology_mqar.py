"""``zoology-mqar``: associative recall against state size (Arora, Eyuboglu et al., "Zoology", 2023).

Claims: attention solves MQAR at every width; the recall of recurrent models rises with their state
size; at equal width the matrix-state models (GLA, DeltaNet) beat the vector-state ones (minGRU, LRU).
Protocol as the paper's, at CPU scale: two layers without MLPs, the best of a small learning-rate
grid per (model, width), accuracy at the value positions of the queried keys.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

MATRIX, VECTOR = ("gla", "deltanet"), ("mingru", "lru")
WIDTHS = (32, 64)


@FINDINGS.register("zoology-mqar")
class ZoologyMQAR(Finding):
    title = "MQAR against state size"
    paper = "Arora, Eyuboglu et al., Zoology: Measuring and Improving Recall in Efficient Language Models (2023)"
    budget = "about 15 min on 2 cores (20 runs)"
    figures = ("state_size",)
    notes = """
Two layers without MLPs (as in Zoology), vocabulary 256 (Zoology: 8192), 8 key-value pairs, length 64,
widths 32 and 64, 1500 steps of batch 64, learning rates 1e-3 and 3e-3 with the best kept per (model,
width) as the paper does. Accuracy: the value predicted at each query position.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": ["attention", *MATRIX, *VECTOR],
            "tasks": [{"name": "mqar", "args": {"vocab_size": 256, "num_kv_pairs": 8}}],
            "sizes": [{"d_model": d, "n_layers": 2} for d in WIDTHS],
            "seeds": [0], "lrs": [1e-3, 3e-3],
            "task": {"seq_len": 64}, "model": {"block": {"mlp": None}},
            "optim": {"steps": 1500, "batch_size": 64}, "eval": {"lengths": [64], "batches": 4},
        })
        return quick_sweep(sweep) if quick else sweep

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        widths = sorted({r["d_model"] for r in m.rows})
        a = {(name, d): acc(m.one(model=name, d_model=d)) for name in ("attention", *MATRIX, *VECTOR) for d in widths}
        att = [a["attention", d] for d in widths]
        rising = {n: [a[n, d] for d in widths] for n in (*MATRIX, *VECTOR)}
        beats = [min(a[n, d] for n in MATRIX) > max(a[n, d] for n in VECTOR) for d in widths]
        return [
            Verdict("attention solves MQAR (accuracy >= 0.99) at every width",
                    ", ".join(f"d={d}: {fmt(x)}" for d, x in zip(widths, att)), all(x >= 0.99 for x in att)),
            Verdict("each recurrent model's recall rises with its state size (width)",
                    "; ".join(f"{n} " + " -> ".join(fmt(x) for x in xs) for n, xs in rising.items()),
                    len(widths) > 1 and all(all(b > a_ for a_, b in zip(xs, xs[1:])) for xs in rising.values())),
            Verdict("at equal width the matrix-state models (gla, deltanet) beat the vector-state ones (mingru, lru)",
                    "; ".join(f"d={d}: min(matrix) {fmt(min(a[n, d] for n in MATRIX))} vs max(vector) "
                              f"{fmt(max(a[n, d] for n in VECTOR))}" for d in widths), all(beats)),
        ]
