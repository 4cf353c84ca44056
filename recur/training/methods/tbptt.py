"""``tbptt``: truncated backpropagation through time over segments, TBPTT(k1, k2).

Every k1 tokens, the losses of those k1 positions are backpropagated through the last k2 tokens
only (Williams & Peng 1990, "An Efficient Gradient-Based Algorithm for On-Line Training of
Recurrent Network Trajectories"; the k1/k2 form of Sutskever 2013). With windows
W_j = [max(0, e_j - k2), e_j), e_j = min((j + 1) k1, T):

    S_j = stop_gradient(state at the start of W_j)
    L_j = (n_j / n) * loss(model(x[W_j], S_j) at positions [j k1, e_j))     n_j: their supervised count
    grad = sum_j dL_j / dtheta;   one optimiser step per batch

so k2 >= T gives exactly the full gradient, and when k1 divides T, k2 = k1 detaches the state at
every segment edge (a last, shorter segment still backpropagates through k2 tokens back from T).
Each window's forward is split where the next window starts, so S_{j+1} comes from the same pass
(the state contract: carrying a state equals one call) and no token is run more than
ceil(k2 / k1) + 1 times. The model must predict per position, causally (a causal LM, or an
encoder with causal mixers and a token head): a sequence is then the same read in segments.
k2 defaults to k1.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator

from recur.models.base import ModelOutput
from recur.registry import METHODS
from recur.tasks.base import Batch
from recur.training.method import Method, MethodParams


@METHODS.register("tbptt", paper="Williams & Peng, An Efficient Gradient-Based Algorithm for On-Line Training of "
                                 "Recurrent Network Trajectories (1990)")
class TBPTT(Method):
    """Losses of each k1-token segment backpropagate through the last k2 tokens only."""

    owns_forward = True

    class Params(MethodParams):
        FROZEN: ClassVar[dict[str, Any]] = {"k2": None}
        k1: int = Field(ge=1, description="tokens between truncations (a segment)")
        k2: int | None = Field(None, ge=1, description="tokens backpropagated through (>= k1); None: k1")

        @model_validator(mode="after")
        def _k2_covers_k1(self):
            if self.k2 is not None and self.k2 < self.k1:
                raise ValueError(f"k2={self.k2} must be >= k1={self.k1}: the losses of a segment backpropagate "
                                 "through at least the segment")
            return self

    @property
    def label(self) -> str:  # type: ignore[override]
        p = self.params
        return f"+tbptt({p.k1},{p.k2 or p.k1})"

    def setup(self, trainer) -> None:
        from recur.training.trainer import ConfigError

        if not trainer.model.segmentable:
            raise ConfigError(f"tbptt reads each sequence in segments, so the model must predict every position "
                              f"causally; {trainer.cfg.model_name!r} does not (a pooled head or a mixer that "
                              f"reads the future)")

    def windows(self, T: int) -> list[tuple[int, int, int]]:
        """(window start, loss start, end) of every segment of a length-T sequence."""
        k1, k2 = self.params.k1, self.params.k2 or self.params.k1
        ends = [min(e, T) for e in range(k1, T + k1, k1)]
        return [(max(0, end - k2), j * k1, end) for j, end in enumerate(ends)]

    def forward_backward(self, trainer, batch: Batch, init):
        model = trainer.model
        T = batch.inputs.shape[1]
        total = int(batch.mask.sum())
        if total == 0:
            raise ValueError("a training batch has no supervised position (mask is all False)")
        trainer.opt.zero_grad(set_to_none=True)
        wins = self.windows(T)
        state, loss_sum, logits = init, 0.0, []
        for j, (start, loss_start, end) in enumerate(wins):
            split = wins[j + 1][0] if j + 1 < len(wins) else end  # where the next window starts
            split = min(max(split, start), end)
            parts, carry = [], None
            for a, b in ((start, split), (split, end)):
                if b > a:
                    out = model(batch.inputs[:, a:b], state, **batch.model_inputs(a, b))
                    parts.append(out.logits)
                    state = out.state
                if b == split:
                    carry = state.detach() if state is not None else None  # S_{j+1}
            window_logits = torch.cat(parts, dim=1)
            sub = batch.window(start, end, supervised_from=loss_start)
            n = int(sub.mask.sum())
            if n:
                loss = trainer.compute_loss(ModelOutput(window_logits, state), sub) * (n / total)
                loss.backward()
                loss_sum += loss.detach()
            logits.append(window_logits[:, loss_start - start:].detach())
            final_state = state
            state = carry
        return torch.as_tensor(loss_sum), ModelOutput(torch.cat(logits, dim=1), final_state.detach())
