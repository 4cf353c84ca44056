"""``trm``: the Tiny Recursive Model (Jolicoeur-Martineau, "Less is More: Recursive Reasoning with
Tiny Networks", 2025; reference ``SamsungSAILMontreal/TinyRecursiveModels``,
``models/recursive_reasoning/trm.py``): HRM simplified to one network for both updates, refined over
deep-supervision segments with a single halting logit (``recur.models.deep_supervision``, which
also lists the deviations from the reference).

One segment, from the carry (z_H, z_L) (the paper's answer y and latent z) and the embedding x:

    for h = 1 .. H_cycles:
        for l = 1 .. L_cycles:  z_L = net(z_L + z_H + x)
        z_H = net(z_H + z_L)
    net(z + inj) = norm(Backbone(z + inj)), n_layers deep (the reference: 2)

**Gradient** (``one_step_grad=True``): the first H_cycles - 1 cycles run under ``torch.no_grad()``;
gradients flow through the whole last cycle (L_cycles + 1 net calls). ``one_step_grad=False``
backpropagates through every cycle of the segment (never across segments: the carry is detached).

Halting (``act=True``): one logit ``q_halt = w_q . z_H[:, 0] + b_q`` (zero weights, bias -5), trained
by BCE against the segment's sequence correctness; a row halts when q_halt > 0 (training, with
exploration) or after ``n_supervision`` segments (the reference's ``no_ACT_continue``: no
Q-continue target, so no extra forward). ``n_supervision`` (the reference's halt_max_steps, 16)
defaults to 4 here for CPU runs and is settable after training. Not implemented: the reference's
EMA of the weights (a training-loop matter) and ``mlp_t`` (an MLP over positions instead of
attention: not causal, so not a mixer of this library).

State: ``State(seg{k}_L{i}=..., seg{k}_H{h}=...)``, one state of the net's Backbone per segment
k < n_supervision and application (L: i < H_cycles * L_cycles, H: h < H_cycles).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.norms import build_norm
from recur.models.blocks import Backbone
from recur.models.deep_supervision import DeepSupervisedLM
from recur.registry import ARCHITECTURES


@ARCHITECTURES.register("trm", family="depth-recurrent",
                        paper="Jolicoeur-Martineau, Less is More: Recursive Reasoning with Tiny Networks (2025)")
class TRM(DeepSupervisedLM):
    """One tiny network recursed at two time scales, deep supervision and BCE halting (TRM).

    The same network updates the latent z_L and the answer z_H, segments run on a detached carry
    and a single halting logit is trained on sequence correctness."""

    q_outputs = 1

    def __init__(self, vocab_size: int, d_model: int, n_layers: int = 2, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, H_cycles: int = 3, L_cycles: int = 6,
                 n_supervision: int = 4, one_step_grad: bool = True, act: bool = True,
                 halt_exploration_prob: float = 0.1, halt_position: str = "first"):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp, mlp_ratio, tie_embeddings, norm,
                         channel_options, H_cycles=H_cycles, L_cycles=L_cycles, n_supervision=n_supervision,
                         one_step_grad=one_step_grad, act=act, halt_exploration_prob=halt_exploration_prob,
                         halt_position=halt_position, owner="trm")
        self.net_norm = build_norm(norm, d_model)

    @property
    def net(self) -> Backbone:
        """The one network of both updates (``self.backbone``)."""
        return self.backbone

    def applications(self) -> list[tuple[str, Backbone]]:
        n_L = self.H_cycles * self.L_cycles
        return [(f"L{i}", self.net) for i in range(n_L)] + [(f"H{h}", self.net) for h in range(self.H_cycles)]

    def module_norm(self, name: str) -> nn.Module:
        return self.net_norm

    def segment(self, x, z_H, z_L, apply):
        grad = torch.is_grad_enabled()
        i = 0
        for h in range(self.H_cycles):
            with torch.set_grad_enabled(grad and (h == self.H_cycles - 1 or not self.one_step_grad)):
                for _ in range(self.L_cycles):
                    z_L = apply(f"L{i}", z_L, z_H + x)
                    i += 1
                z_H = apply(f"H{h}", z_H, z_L)
        return z_H, z_L

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> TRM:
        """One GLA layer, 2 x 2 cycles, 2 segments, without the halting head (its logit reaches the
        loss, not the logits, which the suite differentiates)."""
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", H_cycles=2, L_cycles=2,
                   n_supervision=2, act=False)
