"""``universal_transformer``: one weight-tied Backbone applied up to ``max_steps`` times over the
sequence, a step embedding added before every step, and per-position Adaptive Computation Time
(Dehghani et al., "Universal Transformers", ICLR 2019; ACT from Graves, "Adaptive Computation Time
for Recurrent Neural Networks", 2016).

    z_0 = E x
    x_n = z_{n-1} + s_n                       step (depth) embedding s_n, n = 1 .. S (S = max_steps)
    z_n = Backbone(x_n)                       a causal pass over the sequence, its own memory per step
    p_n = sigmoid(w . x_n + b)                halting unit, per position (b initialised to 1.0)

ACT, per position (tensor2tensor ``universal_transformer_util.py``; ``act_halting`` below):

    H_0 = 0;  the position runs while it has not halted
    halts at n  if  H_{n-1} + p_n > 1 - eps  or  n = S   (eps = 0.01: threshold 0.99, Graves' forced
                                                           halt at the last step)
    w_n = p_n                  while running and not halting (H_n = H_{n-1} + p_n)
    w_n = R = 1 - H_{n-1}      at the halting step N (the remainder)
    w_n = 0                    after it
    h = sum_n w_n z_n          (sum_n w_n = 1 exactly)
    logits = W_head norm(h)
    ponder cost rho = N + R,   aux["ponder_loss"] = ponder_weight * mean(rho) over batch and time

N is an integer count (no gradient); R = 1 - sum_{n<N} p_n carries the gradient into the halting
unit, as in Graves and tensor2tensor. ``act=False`` is the fixed-depth UT: ``h = z_S`` and there is
no halting unit and no ponder loss.

State: every step is a causal pass with its own memory, so the state is one Backbone state per
step, ``State(step0=<backbone state>, ..., step{S-1}=...)`` (as ``looped_lm`` keys per loop). The
ACT quantities H, R, N are per token and end with it: they are not carried.

Interpretations (and why):

* Halted positions keep being transformed. tensor2tensor passes ``transformed_state`` (computed
  at every position) to the next step and only masks the halted positions' contribution
  (``update_weights = 0``); so does this module: z_n is computed for all positions at all S steps
  and a halted position contributes w_n = 0. Later positions' attention at step n therefore reads
  every earlier position's step-n value whether or not it halted, the computation does not depend
  on other positions' halting, and each step's memory covers every token: carrying the state
  across calls equals one call on the concatenation, and stepping token by token works.
  For the same reason all S steps always run (tensor2tensor stops the loop once no position of
  the batch is running; that would make a step's memory depend on the batch and the split).
* The output is Graves' halting-weighted sum ``sum_n w_n z_n``, tensor2tensor's
  ``act_type="accumulated"``. Its ``"basic"`` form writes ``transformed * w + previous * 1 - w``,
  which by operator precedence is ``transformed * w + previous - w``, not a convex mix.
* At n = S a still-running position is forced to halt with its remainder (Graves' cap on N), so
  the weights sum to 1; tensor2tensor's loop just stops there with sum_n w_n = H < 1.
* The halting unit reads the step input x_n (the state after the step signal is added), as
  tensor2tensor computes ``p`` after ``step_preprocess`` and before the transition.
* Step signal: ``step_embedding="learned"`` (tensor2tensor's default ``step_timing_signal_type``),
  a table [max_steps, d_model] initialised N(0, 0.02) like the token embedding; or
  ``"sinusoid"``, the transformer's timing signal at the step index (no parameters, unit scale).
  The paper also re-adds the position signal each step; recur's attention applies rotary
  positions inside every attention call, so no position signal is added here.
* ``max_steps`` is fixed at construction (the learned step table has that many rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.causal_lm import CausalLM
from recur.models.loops import check_state_entries, iteration_keys, iteration_states
from recur.registry import ARCHITECTURES
from recur.state import State

STEP_EMBEDDINGS = ("learned", "sinusoid")


def act_halting(p: torch.Tensor, epsilon: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position ACT weights from the halting probabilities ``p`` [steps, ...] (any trailing
    shape, e.g. [steps, batch, time]). Returns ``(w, n_steps, remainder)``: ``w`` [steps, ...] with
    ``w.sum(0) == 1``, N (steps run, float) and R (the remainder), each of the trailing shape.
    A position halts at the first step where its cumulative p would exceed ``1 - epsilon``, or at
    the last step."""
    threshold = 1.0 - epsilon
    total = torch.zeros_like(p[0])           # H: the cumulative halting probability
    remainder = torch.zeros_like(p[0])       # R
    n_steps = torch.zeros_like(p[0])         # N
    running = torch.ones_like(p[0], dtype=torch.bool)
    weights = []
    for n in range(p.shape[0]):
        halt = running & ((total + p[n] > threshold) | (n == p.shape[0] - 1))
        keep = running & ~halt
        w = torch.where(keep, p[n], torch.where(halt, 1.0 - total, torch.zeros_like(total)))
        remainder = torch.where(halt, 1.0 - total, remainder)
        n_steps = n_steps + running.to(p.dtype)
        total = total + w
        running = keep
        weights.append(w)
    return torch.stack(weights), n_steps, remainder


def sinusoid_signal(step: int, d_model: int, dtype=None, device=None) -> torch.Tensor:
    """The transformer timing signal at position ``step`` [d_model]: sines then cosines over
    geometric timescales 1 .. 1e4 (tensor2tensor ``get_timing_signal_1d``)."""
    half = d_model // 2
    scales = torch.exp(-math.log(1e4) * torch.arange(half, dtype=torch.float64) / max(half - 1, 1))
    angle = step * scales
    signal = torch.cat([angle.sin(), angle.cos(), torch.zeros(d_model - 2 * half, dtype=torch.float64)])
    return signal.to(dtype=dtype, device=device)


def _finite(name: str, value, *, low: float | None = None, high: float | None = None, what: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"universal_transformer: {name} must be a finite number{what}, got {value!r}")
    return float(value)


@ARCHITECTURES.register("universal_transformer", family="depth-recurrent",
                        paper="Dehghani et al., Universal Transformers (ICLR 2019); Graves, Adaptive Computation "
                              "Time for Recurrent Neural Networks (2016)")
class UniversalTransformer(CausalLM):
    """A weight-tied Backbone applied ``max_steps`` times with a step embedding and per-position
    ACT halting (the output a halting-weighted mix of the steps' states, a ponder loss in aux)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int = 1, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 max_steps: int = 8, act: bool = True, act_epsilon: float = 0.01, ponder_weight: float = 0.01,
                 halting_bias_init: float = 1.0, step_embedding: str = "learned"):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks)
        self._max_steps = positive_int("max_steps", max_steps, owner="universal_transformer")
        if not isinstance(act, bool):
            raise ValueError(f"universal_transformer: act must be True (ACT halting) or False (fixed depth: "
                             f"every position runs max_steps steps), got {act!r}")
        self.act = act
        self.act_epsilon = _finite("act_epsilon", act_epsilon, low=0.0, high=1.0,
                                   what=" in (0, 1) (the halting threshold is 1 - act_epsilon)")
        if self.act_epsilon == 0.0:
            raise ValueError("universal_transformer: act_epsilon must be in (0, 1) (the halting threshold is "
                             "1 - act_epsilon; 0 would never halt before max_steps), got 0")
        self.ponder_weight = _finite("ponder_weight", ponder_weight, low=0.0, what=" >= 0 (the ponder loss weight)")
        halting_bias_init = _finite("halting_bias_init", halting_bias_init)
        if step_embedding not in STEP_EMBEDDINGS:
            raise ValueError(f"universal_transformer: step_embedding must be one of {', '.join(STEP_EMBEDDINGS)}, "
                             f"got {step_embedding!r}")
        self.step_embedding = step_embedding
        if step_embedding == "learned":
            self.step_embed = nn.Embedding(self._max_steps, d_model)
            nn.init.normal_(self.step_embed.weight, std=0.02)
        if act:
            self.halting = nn.Linear(d_model, 1)
            nn.init.constant_(self.halting.bias, halting_bias_init)

    @property
    def max_steps(self) -> int:
        return self._max_steps

    @property
    def mixers(self):
        return self.backbone.mixers * self.max_steps

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return State(iteration_states(self.backbone, iteration_keys("step", self.max_steps), batch_size,
                                      device=device, dtype=dtype or self.dtype))

    def state_size(self, seq_len: int) -> int:
        return self.max_steps * self.backbone.state_size(seq_len)

    def step_signal(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """s_{n+1}, the signal added before step n (0-based) [d_model]."""
        if self.step_embedding == "learned":
            return self.step_embed.weight[n]
        return sinusoid_signal(n, like.shape[-1], dtype=like.dtype, device=like.device)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        keys = iteration_keys("step", self.max_steps)
        check_state_entries(state, keys, "universal_transformer", f"max_steps={self.max_steps}")
        z = self.embed(tokens)
        zs, ps, new = [], [], {}
        for n, key in enumerate(keys):
            x = z + self.step_signal(n, z)
            if self.act:
                ps.append(torch.sigmoid(self.halting(x)).squeeze(-1))  # p_n [batch, time]
            z, new[key] = self.backbone(x, None if state is None else state[key], resets=resets)
            zs.append(z)
        if not self.act:
            return self.output(z, State(new), positions)
        w, n_steps, remainder = act_halting(torch.stack(ps), self.act_epsilon)
        h = torch.einsum("sbt,sbtd->btd", w, torch.stack(zs))
        out = self.output(h, State(new), positions)
        count = max(n_steps.numel(), 1)  # a call of zero tokens ponders nothing
        out.aux = {"ponder_loss": self.ponder_weight * (n_steps + remainder).sum() / count,
                   "ponder_steps": (n_steps.sum() / count).detach(),
                   "ponder_remainder": (remainder.sum() / count).detach()}
        return out

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> UniversalTransformer:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="attention", max_steps=3)
