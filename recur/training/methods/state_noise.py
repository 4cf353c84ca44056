"""``state_noise``: start every training sequence from a Gaussian initial state instead of zeros.

    h_0 ~ N(0, std^2 I) in every floating-point state entry (counters and empty KV caches stay)

A length-generalisation intervention of Buitrago & Gu, "Understanding and Improving Length
Generalization in Recurrent Models" (ICML 2025): it exposes the model to states it will reach on
sequences longer than the training length.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from recur.registry import METHODS
from recur.state import State
from recur.training.method import Method, MethodParams


def noise_state(model, batch_size: int, std: float, generator: torch.Generator, device) -> State:
    """``model.init_state`` with Gaussian values in every float entry; counters and growing KV caches
    (empty at the start) stay. Values are drawn on the CPU, in the state's order, so a run is the
    same on every device."""

    def fill(state: State) -> State:
        out = {}
        for key, t in state.items():
            if isinstance(t, State):
                out[key] = fill(t)
            elif not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
                out[key] = t.to(device)
            else:
                out[key] = (std * torch.randn(t.shape, generator=generator, dtype=t.dtype)).to(device)
        return State(out)

    return fill(model.init_state(batch_size, device="cpu"))


@METHODS.register("state_noise", paper="Buitrago & Gu, Understanding and Improving Length Generalization in "
                                       "Recurrent Models (2025)")
class StateNoise(Method):
    """Gaussian initial states for every training batch (when no other method gave one)."""

    label = "+noise"

    class Params(MethodParams):
        FROZEN: ClassVar[dict[str, Any]] = {"std": 1.0}
        std: float = Field(1.0, ge=0, description="standard deviation of the initial state")

    def initial_state(self, trainer, init):
        if init is not None:
            return init
        return noise_state(trainer.model, trainer.batch_size, self.params.std, trainer.rng("noise"), trainer.device)
