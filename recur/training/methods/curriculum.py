"""``curriculum``: a training schedule of one integer knob: the training length, a task's difficulty
(any integer task parameter) or an architecture's depth of recurrence (``n_loops``).

    value(step) = round(start + (end - start) * min(1, (step - 1) / ramp_steps))   (linear ramp)
    or piecewise constant: stages [[0, 16], [500, 32], [1000, 64]] (from step s on, the value v)

Curricula of the training length (Bengio et al., "Curriculum Learning", 2009), of difficulty, and of
recurrence as in "Teaching Pretrained Language Models to Think Deeper with Retrofitted Recurrence"
(2025), where the number of loops grows over training. ``end`` defaults to the run's own value (the
config's seq_len, task parameter or n_loops), so the run ends on the configuration it is evaluated in.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, model_validator

from recur.registry import METHODS
from recur.tasks.base import get_task
from recur.training.method import Method, MethodParams


@METHODS.register("curriculum", paper="Bengio et al., Curriculum Learning (2009)")
class Curriculum(Method):
    """Schedule ``seq_len``, ``n_loops`` or ``task.<param>`` over training."""

    class Params(MethodParams):
        FROZEN: ClassVar[dict[str, Any]] = {"key": "seq_len", "start": None, "end": None, "ramp": 0.5, "stages": None}
        key: str = Field("seq_len", description="seq_len, n_loops, or task.<integer parameter>")
        start: int | None = Field(None, ge=1, description="value at step 1 (linear ramp)")
        end: int | None = Field(None, ge=1, description="value after the ramp (default: the run's own value)")
        ramp: float = Field(0.5, gt=0, description="ramp length: a fraction of the steps if < 1, else steps")
        stages: list[tuple[int, int]] | None = Field(None, description="[[from_step, value], ...] instead of a ramp")

        @model_validator(mode="after")
        def _one_schedule(self):
            if (self.stages is None) == (self.start is None):
                raise ValueError("give either start (a linear ramp to end) or stages ([[from_step, value], ...])")
            if self.stages is not None:
                if not self.stages or self.stages[0][0] > 1:
                    raise ValueError("stages must start at step 0 or 1")
                if any(b[0] <= a[0] for a, b in zip(self.stages, self.stages[1:])):
                    raise ValueError("stages must have increasing steps")
                if any(v < 1 for _, v in self.stages):
                    raise ValueError("stage values must be >= 1")
            if not (self.key in ("seq_len", "n_loops") or (self.key.startswith("task.") and len(self.key) > 5)):
                raise ValueError(f"key must be seq_len, n_loops or task.<param>, got {self.key!r}")
            return self

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"+curriculum({self.params.key})"

    def _own_value(self, trainer) -> int:
        key = self.params.key
        if key == "seq_len":
            return trainer.cfg.task.seq_len
        if key == "n_loops":
            return trainer.model.n_loops
        return getattr(trainer.task.params, key.removeprefix("task."))

    def setup(self, trainer) -> None:
        from recur.training.trainer import ConfigError

        key = self.params.key
        if key == "n_loops" and not hasattr(trainer.model, "n_loops"):
            raise ConfigError(f"curriculum over n_loops needs an architecture with loops; "
                              f"{trainer.cfg.model.arch!r} has none")
        if key.startswith("task.") and key.removeprefix("task.") not in type(trainer.task.params).model_fields:
            raise ConfigError(f"curriculum key {key!r}: task {trainer.task.name!r} has no such parameter "
                              f"(it has {', '.join(type(trainer.task.params).model_fields) or 'none'})")
        if any(m.name == "state_passing" for m in trainer.methods) and key == "n_loops":
            raise ConfigError("curriculum over n_loops changes the state's layout; it cannot be combined with state_passing")
        self.end = self.params.end if self.params.end is not None else self._own_value(trainer)
        self._tasks: dict[int, Any] = {}
        values = [v for _, v in self.params.stages] if self.params.stages else [self.params.start, self.end]
        try:  # every value the schedule can take must be valid before training starts
            for v in values:
                self._apply(trainer, v, check_only=True)
        except ValueError as e:
            raise ConfigError(f"curriculum: {e}") from None

    def value(self, step: int, steps: int) -> int:
        p = self.params
        if p.stages is not None:
            return next(v for s, v in reversed(p.stages) if step >= s)
        ramp = max(1, int(round(p.ramp * steps)) if p.ramp < 1 else int(p.ramp))
        frac = min(1.0, (step - 1) / ramp)
        return int(round(p.start + (self.end - p.start) * frac))

    def _apply(self, trainer, v: int, check_only: bool = False) -> None:
        key = self.params.key
        if key == "seq_len":
            trainer.task.check_seq_len(v)
            if not check_only:
                trainer.seq_len = v
        elif key == "n_loops":
            if not check_only:
                trainer.model.n_loops = v
        else:
            if v not in self._tasks:
                args = {**trainer.cfg.task.args, key.removeprefix("task."): v}
                task = get_task(trainer.cfg.task.name, **args)
                task.check_seq_len(trainer.seq_len)
                if task.vocab_size > trainer.task.vocab_size:  # the model's embedding and head are this size
                    raise ValueError(f"{key}={v} gives the task vocab_size {task.vocab_size}, but the model is built "
                                     f"for the run's task, vocab_size {trainer.task.vocab_size}")
                self._tasks[v] = task
            if not check_only:
                trainer.train_task = self._tasks[v]

    def schedule(self, trainer, step: int) -> None:
        self._apply(trainer, self.value(step, trainer.cfg.optim.steps))

    def finish(self, trainer) -> None:
        # Evaluation runs on the run's own configuration, whatever step training stopped at.
        self._apply(trainer, self.end)
