"""``looped_lm``: one Backbone applied ``n_loops`` times with tied weights, the input re-injected
before every loop (the plain looped transformer of Yang et al., "Looped Transformers are Better at
Learning Learning Algorithms", ICLR 2024; input injection as in Giannou et al. 2023).

    e = E x;   z_0 = 0;   z_{j+1} = Backbone(z_j + e)   for j = 0 .. n_loops - 1
    logits = W_head norm(z_{n_loops})

Every loop is a causal pass over the sequence with its own memory, so the state is keyed per
loop, ``State(loop0=<backbone state>, loop1=...)``: carrying it across calls equals one call on the
concatenation, and stepping token by token streams in constant memory for recurrent mixers.
``n_loops`` may be changed after training (more loops at inference than in training, or a loop
curriculum); the state then needs the new number of entries (``init_state``).

**Loss over the last T loops** (``loss_loops=T``; the paper's truncated loss window): in training,
the first max(0, b - T) of the b = ``n_loops`` loops run under ``torch.no_grad()``, the head reads
each of the last min(T, b) loops' outputs, and the loss is the mean of their losses

    L = 1/min(T, b) * sum_{j = b - min(T, b) + 1}^{b} loss(W_head norm(z_j))

(the reference's defaults for linear regression: b = 30, T = 15). ``loss_loops=None``: the loss of
the final loop, with gradients through every loop. Evaluation always reads the final loop.

Real-valued data: ``feature_dim`` / ``target_dim`` as in ``causal_lm`` (the injected input e is then
E x + W_in f, the looped model of Garg-style in-context regression).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from recur.layers.common import positive_int
from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.causal_lm import CausalLM
from recur.models.loops import check_state_entries, iteration_keys, iteration_states
from recur.registry import ARCHITECTURES
from recur.state import State


@dataclass
class LoopedOutput(ModelOutput):
    """A training output with the last-T-loops loss: ``earlier`` holds the head's outputs of the
    supervised loops before the final one (each laid out as ``logits``), oldest first."""

    earlier: list[torch.Tensor] = field(default_factory=list)


@ARCHITECTURES.register("looped_lm", family="depth-recurrent",
                        paper="Yang et al., Looped Transformers are Better at Learning Learning Algorithms (2024)")
class LoopedLM(CausalLM):
    """A weight-tied Backbone looped ``n_loops`` times over the sequence with input injection
    (a CausalLM whose Backbone runs several times)."""

    depth_option = "n_loops"

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 n_loops: int = 2, inject: bool = True, loss_loops: int | None = None,
                 feature_dim: int = 0, target_dim: int = 0):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks, feature_dim=feature_dim, target_dim=target_dim)
        self.n_loops = n_loops
        self.inject = bool(inject)
        self.loss_loops = None if loss_loops is None else positive_int("loss_loops", loss_loops, owner="looped_lm")

    @property
    def n_loops(self) -> int:
        return self._n_loops

    @n_loops.setter
    def n_loops(self, value: int) -> None:
        self._n_loops = positive_int("n_loops", value)

    @property
    def mixers(self):
        return self.backbone.mixers * self.n_loops

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return State(iteration_states(self.backbone, iteration_keys("loop", self.n_loops), batch_size,
                                      device=device, dtype=dtype or self.dtype))

    def state_size(self, seq_len: int) -> int:
        return self.n_loops * self.backbone.state_size(seq_len)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        keys = iteration_keys("loop", self.n_loops)
        check_state_entries(state, keys, "looped_lm", f"n_loops={self.n_loops}")
        e = self.embed_inputs(tokens, features)
        z = torch.zeros_like(e)
        windowed = self.training and self.loss_loops is not None
        supervised = min(self.loss_loops, self.n_loops) if windowed else 1
        new, earlier = {}, []
        for j, key in enumerate(keys):
            # the loops before the loss window take no gradient (their states still carry exactly)
            with torch.set_grad_enabled(torch.is_grad_enabled() and (not windowed or j >= self.n_loops - supervised)):
                z, new[key] = self.backbone(z + e if self.inject or key == "loop0" else z,
                                            None if state is None else state[key], resets=resets)
            if windowed and self.n_loops - supervised <= j < self.n_loops - 1:
                earlier.append(self.output(z, State({}), positions).logits)
        out = self.output(z, State(new), positions)
        if not windowed:
            return out
        return LoopedOutput(out.logits, out.state, out.aux, out.positions, earlier=earlier)

    def loss(self, out: ModelOutput, batch) -> torch.Tensor:
        """The mean of the supervised loops' head losses (the final loop's alone without
        ``loss_loops``), plus the weighted auxiliary losses."""
        earlier = getattr(out, "earlier", [])
        if not earlier:
            return super().loss(out, batch)
        outputs = [ModelOutput(logits, None, positions=out.positions) for logits in earlier] + [out]
        return sum(self.head_loss(o, batch) for o in outputs) / len(outputs) + self.aux_loss(out)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> LoopedLM:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", n_loops=3)
