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


def quick(suite: SweepConfig) -> SweepConfig:
    """A smoke-test version of ``suite``: a few steps at a tiny width, one eval batch."""
    shared = {**suite.shared, "steps": 4, "batch_size": 8, "eval_batches": 1, "early_stop": None}
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
