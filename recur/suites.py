"""Built-in benchmark suites (as data): what `recur bench` runs.

The default suite compares six architectures, one or more per family of recurrence, on
three probes that separate them: associative recall (mqar), selective copying and state
tracking (parity), at a small size that trains on two CPU cores in under ten minutes.
Every run is evaluated at its training length and at 4x (length generalization).

Sizing (2 CPU cores, two worker processes of one thread each): at d_model=64, two layers,
batch 32 and length 64, a training step takes 40-120 ms (attention fastest, GLA slowest),
so 600 steps (fewer after an early stop) plus evaluation is 20-100 s per run and the 18
runs about 5 minutes. Mamba is left out: its selective scan ran at ~1.5 s per step here.
"""

from __future__ import annotations

from recur.config import SweepConfig
from recur.registry import list_models, list_patterns
from recur.tasks.base import list_tasks

DEFAULT_SUITE = SweepConfig.model_validate({
    "models": [
        "lstm",        # classic gated RNN (nonlinear recurrence)
        "mingru",      # minimal parallel RNN (real diagonal linear scan)
        "lru",         # diagonal SSM (complex diagonal linear scan)
        "gla",         # gated matrix-state (linear attention family)
        "deltanet",    # delta rule (matrix state, non-diagonal transition)
        "attention",   # softmax attention: the KV cache is the state
    ],
    "tasks": [
        # Zoology's MQAR with a CPU-sized vocabulary (Zoology: 8192).
        {"name": "mqar", "args": {"vocab_size": 256, "num_kv_pairs": 8}, "overrides": {"seq_len": 64}},
        {"name": "selective_copy", "args": {"num_tokens": 8}, "overrides": {"seq_len": 64}},
        {"name": "parity", "overrides": {"seq_len": 16}},
    ],
    "sizes": [{"d_model": 64, "n_layers": 2}],
    "seeds": [0],
    "lrs": [3e-3],
    "steps": 600,
    "batch_size": 32,
    "eval_batches": 2,
    "warmup": 0.1,
})


# The LM suite: byte-level language modelling on the stdlib's source (task `text`), six families at
# about 200k parameters each (d_model chosen per model: 197k-204k at 2 layers, vocab 257; the test
# holds them within 5% of one another). One lr for all (3e-3, the bench suite's), no early stop (a
# language model does not saturate), the validation curve every 100 steps, and 8 eval batches (32k
# bytes at length 256, 128k at 1024; every model reads the same windows, so the comparison is
# paired). Sizing: 800 steps at batch 16, length 256 (3.3M tokens) took 1.5-3.5 min per run on 2
# cores shared with other jobs, the six runs 7.3 minutes with two workers (the budget is 15).
LM_WIDTHS = {"lstm": 72, "mingru": 88, "lru": 80, "gla": 80, "deltanet": 80, "attention": 80}
LM_SUITE = SweepConfig.model_validate({
    "models": [{"name": m, "overrides": {"model.d_model": d}} for m, d in LM_WIDTHS.items()],
    "tasks": [{"name": "text", "args": {"corpus": "code"}, "overrides": {"seq_len": 256}}],
    "sizes": [{"n_layers": 2}],
    "seeds": [0],
    "lrs": [3e-3],
    "shared": {"optim": {"steps": 800, "batch_size": 16, "warmup": 0.05, "early_stop": None},
               "eval": {"every": 100, "batches": 8, "lengths": [256, 1024]}},
})
SUITES = {"default": DEFAULT_SUITE, "lm": LM_SUITE}


def quick(suite: SweepConfig) -> SweepConfig:
    """A smoke-test version of ``suite``: a few steps at a tiny width, one eval batch."""
    shared = {k: v for k, v in suite.shared.items() if k not in ("optim", "eval")}
    for section in ("optim", "eval"):  # nested sections: their keys flat, so the smoke values below win
        shared.update({f"{section}.{k}": v for k, v in suite.shared.get(section, {}).items()})
    shared.update({"optim.steps": 4, "optim.batch_size": 8, "eval.batches": 1, "optim.early_stop": None,
                   "eval.lengths": []})
    if shared.get("eval.every"):
        shared["eval.every"] = 2
    sizes = [{"d_model": 16, "n_layers": 1}]
    tasks = [{**t.model_dump(), "overrides": {**t.overrides, "seq_len": min(t.overrides.get("seq_len", 64), 32)}}
             for t in suite.tasks]
    return SweepConfig.model_validate({**suite.model_dump(), "shared": shared, "sizes": sizes, "tasks": tasks,
                                       "seeds": suite.seeds[:1], "lrs": suite.lrs[:1] if suite.lrs else None})


def missing(suite: SweepConfig) -> dict[str, list[str]]:
    """Models and tasks the suite names that are not registered (empty lists: ready to run)."""
    known_models = set(list_models()) | set(list_patterns())
    names = []
    for m in suite.models:
        names += [m.name] if isinstance(m.name, str) else list(m.name)
    models = sorted({n for n in names if n not in known_models})
    tasks = sorted({t.name for t in suite.tasks if t.name not in set(list_tasks())})
    return {"models": models, "tasks": tasks}
