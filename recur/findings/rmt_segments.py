"""``rmt-segments``: memory transformers trained on a few segments keep retrieving far beyond them
(Bulatov et al., "Scaling Transformer to 1M tokens and beyond with RMT", 2023; Rodkin et al.,
"Associative Recurrent Memory Transformer", 2024), at CPU scale.

Claims: RMT and ARMT trained on passkey retrieval over at most N = 4 segments keep their accuracy at
16, 32 and 64 segments, while a transformer of the same size that sees one segment at a time (sliding
window attention, the window one segment) sits at chance there.

The probe is passkey retrieval with the key at the start (``depths=1``: the RMT paper's "memorize"
task, a fact at the start of the input and a question at the end, with filler between), so at 64
segments the memory must carry the key across 63 segment transitions; the models were trained across 3.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.findings.base import FINDINGS, Finding, Measured, Verdict, acc, fmt
from recur.findings.quick import quick_sweep

SEGMENT, MEMORY = 32, 4
TRAIN_SEGMENTS, EVAL_SEGMENTS = 4, (4, 16, 32, 64)
LEARNED = 0.9  # trained: answer-digit accuracy at the training length at least this
KEPT = 0.05  # keeps its accuracy: within this of the training length's at every longer length
CHANCE = 0.1  # a uniform guess among the 10 digits
NEAR_CHANCE = 0.05  # "at chance": within this of CHANCE


def memory_model(arch: str) -> dict:
    return {"name": "attention", "arch": arch,
            "overrides": {"model.args": {"segment_len": SEGMENT, "n_memory": MEMORY}}}


@FINDINGS.register("rmt-segments")
class RMTSegments(Finding):
    title = "Memory transformers beyond their training segments"
    paper = ("Bulatov et al., Scaling Transformer to 1M tokens and beyond with RMT (2023); Rodkin et al., "
             "Associative Recurrent Memory Transformer (2024)")
    budget = "about 8 min on 2 cores (3 runs)"
    figures = ("length",)
    notes = f"""
Passkey retrieval (5 digits, the key opening the sequence, tokens 3-12 the digits: chance {CHANCE}) trained at
{TRAIN_SEGMENTS * SEGMENT} tokens = {TRAIN_SEGMENTS} segments of {SEGMENT}, 1500 steps of batch 32, lr 3e-3,
no early stop; tested at {', '.join(str(n) for n in EVAL_SEGMENTS)} segments (up to {EVAL_SEGMENTS[-1] * SEGMENT}
tokens). `rmt` and `armt` have {MEMORY} memory tokens and an attention cell (2 layers, d_model 64); the
baseline is the same-size causal LM of sliding-window attention with a {SEGMENT}-token window. Rules fixed
before the runs: a model keeps its accuracy when it reaches {LEARNED} at the training length and is within
{KEPT} of that at every longer length; the baseline is at chance when within {NEAR_CHANCE} of {CHANCE}.
"""

    def sweep(self, quick: bool = False) -> SweepConfig:
        sweep = SweepConfig.model_validate({
            "models": [memory_model("rmt"), memory_model("armt"), {"name": "swa", "args": {"window": SEGMENT}}],
            "tasks": [{"name": "passkey", "args": {"digits": 5, "depths": 1}}],
            "sizes": [{"d_model": 64, "n_layers": 2}], "seeds": [0], "lrs": [3e-3],
            "task": {"seq_len": TRAIN_SEGMENTS * SEGMENT},
            "optim": {"steps": 1500, "batch_size": 32, "early_stop": None},
            "eval": {"lengths": [n * SEGMENT for n in EVAL_SEGMENTS], "batches": 4},
        })
        return quick_sweep(sweep) if quick else sweep

    def verdicts(self, m: Measured, quick: bool = False) -> list[Verdict]:
        train, longer = TRAIN_SEGMENTS * SEGMENT, [n * SEGMENT for n in EVAL_SEGMENTS if n > TRAIN_SEGMENTS]
        out = []
        for arch in ("rmt", "armt"):
            row = m.one(model=f"{arch}:attention")
            at_train, beyond = acc(row, train), [acc(row, n) for n in longer]
            kept = at_train >= LEARNED and all(b >= at_train - KEPT for b in beyond)
            out.append(Verdict(
                f"{arch} trained on {TRAIN_SEGMENTS} segments keeps its passkey accuracy at "
                f"{', '.join(str(n // SEGMENT) for n in longer)} segments",
                f"{TRAIN_SEGMENTS} segments: {fmt(at_train)}; " +
                ", ".join(f"{n // SEGMENT}: {fmt(b)}" for n, b in zip(longer, beyond)), kept))
        row = m.one(model="swa")
        beyond = [acc(row, n) for n in longer]
        out.append(Verdict(
            f"a same-size transformer that sees one segment at a time sits at chance ({CHANCE}) beyond "
            f"{TRAIN_SEGMENTS} segments",
            f"{TRAIN_SEGMENTS} segments: {fmt(acc(row, train))}; " +
            ", ".join(f"{n // SEGMENT}: {fmt(b)}" for n, b in zip(longer, beyond)),
            all(abs(b - CHANCE) <= NEAR_CHANCE for b in beyond)))
        return out
