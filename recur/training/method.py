"""The training-method protocol: a small registered object the one Trainer calls at fixed hooks.

    @METHODS.register("gradient_noise", paper="Neelakantan et al., Adding Gradient Noise ... (2015)")
    class GradientNoise(Method):
        class Params(MethodParams):
            FROZEN = {"eta": 0.3, "gamma": 0.55}
            eta: float = 0.3
            gamma: float = 0.55
        def after_backward(self, trainer): ...

Hooks, in the order the Trainer calls them each step (every one optional):
``schedule(trainer, step)`` (curricula: training length, difficulty, loops),
``initial_state(trainer, init) -> init`` (the batch's initial state: noise, a carried state),
``forward_backward(trainer, batch, init) -> (loss, out)`` (at most one method: owns the
forward and backward passes, e.g. truncated BPTT), ``loss(trainer, loss, out, batch) -> loss``
(regularisers), ``after_backward(trainer)`` (gradient transforms, before clipping),
``step_end(trainer, out)``; ``finish(trainer)`` once after the last step, before evaluation.
``setup(trainer)`` runs once before training and raises
``ConfigError`` for a model or task the method cannot serve. A method with memory across steps
returns it from ``state_dict`` (tensors, or States) so checkpoints resume it exactly.
"""

from __future__ import annotations

from typing import Any, ClassVar

from recur.config import Section


class MethodParams(Section):
    """Options of a training method (validated; FROZEN values as every config section)."""


class Method:
    """Base class of the training methods; ``Params`` holds its options."""

    name: ClassVar[str] = "method"  # set by METHODS.register
    label: ClassVar[str] = ""  # shown after the model's name in reports ("+noise"); default "+name"
    Params: ClassVar[type[MethodParams]] = MethodParams
    owns_forward: ClassVar[bool] = False  # True for a method that implements forward_backward

    def __init__(self, params: MethodParams):
        self.params = params

    # -- hooks (no-ops) ---------------------------------------------------------------------
    def setup(self, trainer) -> None:
        pass

    def schedule(self, trainer, step: int) -> None:
        pass

    def initial_state(self, trainer, init):
        return init

    def forward_backward(self, trainer, batch, init):
        """The step's passes (called only for a method with ``owns_forward``): by default the
        Trainer's own, one forward and one backward."""
        return trainer.forward_backward(batch, init)

    def loss(self, trainer, loss, out, batch):
        return loss

    def after_backward(self, trainer) -> None:
        pass

    def step_end(self, trainer, out) -> None:
        pass

    def finish(self, trainer) -> None:
        pass

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
