"""``hrm``: the Hierarchical Reasoning Model (Wang et al., "Hierarchical Reasoning Model", 2025;
reference ``sapientinc/HRM``, ``models/hrm/hrm_act_v1.py``): a slow high-level module H and a fast
low-level module L, separate networks, refined over deep-supervision segments with Q-learning
halting (``recur.models.deep_supervision``, which also lists the deviations from the reference).

One segment, from the carry (z_H, z_L) and the input embedding x:

    for h = 1 .. H_cycles:
        for l = 1 .. L_cycles:  z_L = L(z_L + z_H + x)       input injection, then L's layers
        z_H = H(z_H + z_L)
    module(z + inj) = norm(Backbone(z + inj)), H and L each n_layers deep

**One-step gradient** (``one_step_grad=True``, the reference's approximation of the implicit
gradient): every update but the last L update and the last H update runs under ``torch.no_grad()``,
so gradients flow through ``z_L = L(z_L + z_H + x); z_H = H(z_H + z_L)`` only (and into the
embedding through that last injection). ``one_step_grad=False`` backpropagates through all cycles
of the segment (never across segments: the carry is detached).

Halting (``act=True``): ``q_halt, q_continue = W_q z_H[:, 0] + b_q`` (zero weights, bias -5); a row
halts when q_halt > q_continue (training, with exploration) or after ``n_supervision`` segments; the
Q-continue target is sigma(max(q_halt', q_continue')) of the next segment, sigma(q_halt') after the
last (one more no-grad segment in training). ``n_supervision`` (the reference's halt_max_steps, 16)
defaults to 4 here so that a CPU run stays short; it is settable after training
(``model.n_supervision = 8``) to measure accuracy against segments.

State: ``State(seg{k}_L{i}=..., seg{k}_H{h}=...)``, one Backbone state per segment k < n_supervision
(k = n_supervision too: the bootstrap, with act in training mode), L application
i < H_cycles * L_cycles and H application h < H_cycles.
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


@ARCHITECTURES.register("hrm", family="depth-recurrent",
                        paper="Wang et al., Hierarchical Reasoning Model (2025)")
class HRM(DeepSupervisedLM):
    """Two recurrent modules at two time scales, deep supervision and Q-learning halting (HRM).

    A slow H and a fast L module with input injection, the one-step gradient, segments on a
    detached carry and a Q-learning halting head."""

    q_outputs = 2

    def __init__(self, vocab_size: int, d_model: int, n_layers: int = 4, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, H_cycles: int = 2, L_cycles: int = 2,
                 n_supervision: int = 4, one_step_grad: bool = True, act: bool = True,
                 halt_exploration_prob: float = 0.1, halt_position: str = "first"):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp, mlp_ratio, tie_embeddings, norm,
                         channel_options, H_cycles=H_cycles, L_cycles=L_cycles, n_supervision=n_supervision,
                         one_step_grad=one_step_grad, act=act, halt_exploration_prob=halt_exploration_prob,
                         halt_position=halt_position, owner="hrm")
        self.L_level = self.reasoning_module(n_layers)
        self.H_norm = build_norm(norm, d_model)
        self.L_norm = build_norm(norm, d_model)

    @property
    def H_level(self) -> Backbone:
        """The high-level module (``self.backbone``)."""
        return self.backbone

    def applications(self) -> list[tuple[str, Backbone]]:
        n_L = self.H_cycles * self.L_cycles
        return [(f"L{i}", self.L_level) for i in range(n_L)] + [(f"H{h}", self.H_level) for h in range(self.H_cycles)]

    def module_norm(self, name: str) -> nn.Module:
        return self.L_norm if name.startswith("L") else self.H_norm

    def bootstrap(self) -> bool:
        return True  # the last segment's Q-continue target reads one more segment's q_halt

    def segment(self, x, z_H, z_L, apply):
        grad = torch.is_grad_enabled()
        i = 0
        for h in range(self.H_cycles):
            for l in range(self.L_cycles):
                last = h == self.H_cycles - 1 and l == self.L_cycles - 1
                with torch.set_grad_enabled(grad and (last or not self.one_step_grad)):
                    z_L = apply(f"L{i}", z_L, z_H + x)
                i += 1
            with torch.set_grad_enabled(grad and (h == self.H_cycles - 1 or not self.one_step_grad)):
                z_H = apply(f"H{h}", z_H, z_L)
        return z_H, z_L

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> HRM:
        """One GLA layer per module, 2 x 2 cycles, 2 segments, without the halting head (its q values
        reach the loss, not the logits, which the suite differentiates)."""
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", H_cycles=2, L_cycles=2,
                   n_supervision=2, act=False)
