"""``ilr``: Intra-Layer Recurrence, a causal LM whose layer i is applied ``loops[i]`` times in a row
with the same weights (Nguyen & Lin, "Intra-Layer Recurrence in Transformers for Language
Modeling", 2025).

    h = E x
    for layer i = 0 .. n_layers - 1:
        repeat loops[i] times:   h <- Block_i(h)            (same weights each time)
    logits = W_head norm(h)

Block-wise looping (``looped_lm``) repeats the whole stack; ILR spends the depth budget on chosen
layers (the paper finds more iterations on the earlier layers best, e.g. ``loops=[3, 2, 1, 1]``).
``loops=[1] * n_layers`` is exactly ``causal_lm``; the default ``loops=None`` is
``[2, 1, ..., 1]``. ``equal_compute_looped_lm`` builds the
block-wise looping model with the same number of block applications, the comparison the paper makes.

Each application is a causal pass over the sequence with its own memory, so the state holds one
mixer state per (layer, iteration) under ``layer{i}_it{j}`` (plus ``channel{i}_it{j}`` for a
channel mixer that carries a state, RWKV's token shift): carrying it across calls equals one call
on the concatenation, and stepping streams. Deviation: the paper studies Transformers with
absolute/learned positions; here the blocks are recur's pre-norm blocks around any mixer, and
there is no input re-injection between iterations (the paper's ILR has none: h <- Block(h)).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.causal_lm import CausalLM
from recur.models.looped_lm import LoopedLM
from recur.models.loops import check_state_entries, iteration_keys
from recur.registry import ARCHITECTURES
from recur.state import State

PAPER = "Nguyen & Lin, Intra-Layer Recurrence in Transformers for Language Modeling (2025)"


def check_loops(loops: Any, n_layers: int) -> list[int]:
    """``loops`` as a list of ints >= 1, one per layer; a ValueError saying what is wrong otherwise."""
    if isinstance(loops, (str, bytes)) or not isinstance(loops, Sequence):
        raise ValueError(f"loops must be a list of ints >= 1, one per layer (n_layers={n_layers}), got {loops!r}")
    bad = [r for r in loops if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"loops must hold ints >= 1 (iterations of each layer), got {list(loops)!r}")
    if len(loops) != n_layers:
        raise ValueError(f"loops must have one entry per layer: n_layers={n_layers}, got {len(loops)} "
                         f"entries {list(loops)!r}")
    return list(loops)


def equal_compute_loops(loops: Sequence[int]) -> int:
    """``n_loops`` of the block-wise looped model of ``len(loops)`` layers with as many block
    applications as ILR's ``sum(loops)``; a ValueError if no whole number of loops matches."""
    loops = check_loops(loops, len(loops))
    total, n = sum(loops), len(loops)
    if total % n:
        raise ValueError(f"loops={loops} applies {total} blocks, not a multiple of its {n} layers: no looped_lm "
                         f"of {n} layers matches it (choose loops summing to a multiple of {n})")
    return total // n


def equal_compute_looped_lm(vocab_size: int, d_model: int, loops: Sequence[int], pattern="attention",
                            **kwargs) -> LoopedLM:
    """The block-wise looping baseline at ILR's compute: a ``looped_lm`` of ``len(loops)`` layers
    looped ``sum(loops) / len(loops)`` times (the same parameters and block applications).
    ``kwargs``: the other LoopedLM options (``mlp``, ``inject``, ...)."""
    return LoopedLM(vocab_size=vocab_size, d_model=d_model, n_layers=len(loops), pattern=pattern,
                    n_loops=equal_compute_loops(loops), **kwargs)


@ARCHITECTURES.register("ilr", family="depth-recurrent", paper=PAPER)
class IntraLayerRecurrentLM(CausalLM):
    """A CausalLM whose layer i runs loops[i] times in a row with tied weights (Intra-Layer Recurrence)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 loops: Sequence[int] | None = None):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks)
        # default: one extra iteration of the first layer (the paper: earlier layers gain most)
        self.loops = [2] + [1] * (n_layers - 1) if loops is None else loops

    @property
    def loops(self) -> list[int]:
        return list(self._loops)

    @loops.setter
    def loops(self, value: Sequence[int]) -> None:
        # may change after training (more iterations at inference); the state then needs the new entries
        self._loops = check_loops(value, self.backbone.n_layers)

    def _keys(self) -> list[tuple[str, str | None]]:
        """(mixer key, channel key or None) of every block application, in order."""
        keys = []
        for i, (block, r) in enumerate(zip(self.backbone.layers, self.loops)):
            for m, c in zip(iteration_keys(f"layer{i}_it", r), iteration_keys(f"channel{i}_it", r)):
                keys.append((m, c if block.stateful_channel else None))
        return keys

    def _state_keys(self) -> list[str]:
        return [k for pair in self._keys() for k in pair if k is not None]

    @property
    def mixers(self):
        return [b.mixer for b, r in zip(self.backbone.layers, self.loops) for _ in range(r)]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        entries = {}
        for block, r, i in zip(self.backbone.layers, self.loops, range(self.backbone.n_layers)):
            for j in range(r):
                entries[f"layer{i}_it{j}"] = block.mixer.init_state(batch_size, device=device, dtype=dtype)
                if block.stateful_channel:
                    entries[f"channel{i}_it{j}"] = block.channel.init_state(batch_size, device=device, dtype=dtype)
        return State(entries)

    def state_size(self, seq_len: int) -> int:
        return sum(r * (b.mixer.state_size(seq_len) + (b.channel.state_size() if b.stateful_channel else 0))
                   for b, r in zip(self.backbone.layers, self.loops))

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        check_state_entries(state, self._state_keys(), "ilr", f"loops={self.loops}")
        get = (lambda k: None) if state is None else (lambda k: None if k is None else state[k])
        h = self.embed(tokens)
        new = {}
        blocks = [b for b, r in zip(self.backbone.layers, self.loops) for _ in range(r)]
        # the Backbone's own per-layer call (Block.forward), once per application with that application's memory
        for block, (key, channel_key) in zip(blocks, self._keys()):
            h, new[key], ch = block(h, get(key), get(channel_key), resets=resets)
            if ch is not None:
                new[channel_key] = ch
        return self.output(h, State(new), positions)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> IntraLayerRecurrentLM:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="gla", loops=[2, 1])


__all__ = ["IntraLayerRecurrentLM", "check_loops", "equal_compute_loops", "equal_compute_looped_lm"]
