"""A tiny task and helpers for the harness tests (config, store, sweep, trainer, CLI), registered on import (also by sweep subprocesses via
``imports: [harness_tasks]``), so the tests do not depend on the probe tasks' tuning.

``harness_shift``: uniform random tokens; the target at t is the token ``lag`` positions back
(a one-token memory: an Elman RNN learns it in a few dozen steps). Positions t < lag are
not supervised. Train and test rows are disjoint by ``split_of``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from recur.config import RunConfig, config_hash
from recur.tasks.base import Batch, Task, TaskParams, register_task, split_of
from recur.training import RunResult


class ShiftParams(TaskParams):
    vocab: int = Field(8, ge=2, le=256, description="tokens are drawn from [0, vocab)")
    lag: int = Field(1, ge=1, description="the target is the token this many positions back")


@register_task
class HarnessShift(Task):
    name = "harness_shift"
    Params = ShiftParams
    description = "x_1..x_T uniform in [0, vocab); target at t = x_{t-lag} (t > lag). Harness test task."

    @property
    def vocab_size(self) -> int:
        return self.params.vocab

    def min_seq_len(self) -> int:
        length = self.params.lag + 4
        while self.params.vocab**length < 256:  # enough distinct rows for both splits
            length += 1
        return length

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        want_test, rows = split == "test", []
        for _ in range(100):
            cand = torch.randint(self.params.vocab, (4 * n, seq_len), generator=generator)
            rows.append(cand[split_of(cand) == want_test])
            if sum(len(r) for r in rows) >= n:
                break
        else:
            raise RuntimeError("could not draw enough rows of the split")
        inputs = torch.cat(rows)[:n]
        lag = self.params.lag
        targets = torch.zeros_like(inputs)
        targets[:, lag:] = inputs[:, :-lag]
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, lag:] = True
        return Batch(inputs, targets, mask)


# ------------------------------------------------------------------ helpers of the harness tests
HERE = Path(__file__).resolve().parent


def tiny(**fields) -> RunConfig:
    """A run that trains in about a second: Elman on harness_shift."""
    base = dict(task="harness_shift", model="elman", d_model=16, n_layers=1, seq_len=8, steps=30, batch_size=16,
                lr=1e-2, eval_batches=1, mlp=None, device="cpu")
    return RunConfig(**{**base, **fields})


def fake_result(cfg: RunConfig, accs: dict[int, float], state_size: int = 100, seconds: float = 1.0) -> RunResult:
    """A RunResult without training, for store and report tests."""
    return RunResult(config=cfg, config_hash=config_hash(cfg), task=cfg.task.name, model=cfg.model_name, seed=cfg.seed,
                     params=1000, state_size=state_size, train_seq_len=cfg.task.seq_len, steps=cfg.optim.steps,
                     seconds=seconds,
                     metrics={str(n): {"accuracy": a, "exact_match": a / 2} for n, a in accs.items()},
                     train_loss=0.5, train_accuracy=0.9, early_stopped=False)
