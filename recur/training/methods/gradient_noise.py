"""``gradient_noise``: annealed Gaussian noise added to every gradient (Neelakantan et al., "Adding
Gradient Noise Improves Learning for Very Deep Networks", 2015).

    g_t <- g_t + N(0, sigma_t^2),   sigma_t^2 = eta / (1 + t)^gamma,   t = 0, 1, ... the step

with the paper's gamma = 0.55 and eta from {0.01, 0.3, 1.0} (default 0.3). The noise is added after
the backward pass and before gradient clipping, drawn from the run's own random stream (so a run
is reproducible and resumes exactly).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from pydantic import Field

from recur.registry import METHODS
from recur.training.method import Method, MethodParams


@METHODS.register("gradient_noise", paper="Neelakantan et al., Adding Gradient Noise Improves Learning for Very Deep "
                                          "Networks (2015)")
class GradientNoise(Method):
    """Annealed Gaussian gradient noise, variance eta / (1 + t)^gamma."""

    label = "+gradnoise"

    class Params(MethodParams):
        FROZEN: ClassVar[dict[str, Any]] = {"eta": 0.3, "gamma": 0.55}
        eta: float = Field(0.3, ge=0, description="noise variance at step 0")
        gamma: float = Field(0.55, ge=0, description="decay exponent of the variance")

    def std(self, step: int) -> float:
        """sigma_t for the 1-based optimisation step ``step`` (t = step - 1)."""
        return math.sqrt(self.params.eta / (1 + (step - 1)) ** self.params.gamma)

    def after_backward(self, trainer) -> None:
        sigma = self.std(trainer.step)
        gen = trainer.rng("gradient_noise")
        for p in trainer.model.parameters():
            if p.grad is not None:
                noise = torch.randn(p.grad.shape, generator=gen, dtype=p.grad.dtype)
                p.grad.add_(noise.to(p.grad.device), alpha=sigma)
