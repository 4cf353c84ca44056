"""``state_passing``: start each training batch from the (detached) final state of the previous one.

    init_{n+1} = stop_gradient(final state of batch n)

A length-generalisation intervention of Buitrago & Gu, "Understanding and Improving Length
Generalization in Recurrent Models" (ICML 2025). It needs a bounded state: a growing KV cache
would grow without end.
"""

from __future__ import annotations

from typing import Any

from recur.registry import METHODS
from recur.state import State
from recur.training.method import Method


@METHODS.register("state_passing", paper="Buitrago & Gu, Understanding and Improving Length Generalization in "
                                         "Recurrent Models (2025)")
class StatePassing(Method):
    """Carry the final state of each training batch into the next one, detached."""

    label = "+passing"

    def __init__(self, params):
        super().__init__(params)
        self.carried: State | None = None

    def setup(self, trainer) -> None:
        from recur.training.trainer import ConfigError

        growing = sorted({m.name for m in trainer.model.mixers if m.growing and m.state_size(10**6) > m.state_size(10**3)})
        if growing:
            raise ConfigError(f"state_passing needs a bounded state, but {growing} keep a growing KV cache")

    def initial_state(self, trainer, init):
        return self.carried if self.carried is not None else init

    def step_end(self, trainer, out) -> None:
        self.carried = out.state.detach()  # keep no graph alive between steps

    def state_dict(self) -> dict[str, Any]:
        return {} if self.carried is None else {"carried": self.carried}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carried = state.get("carried")
