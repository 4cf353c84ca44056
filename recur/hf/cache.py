"""``RecurCache``: the cache object Hugging Face ``generate`` carries between steps, holding a recur ``State``.

    out = model(input_ids, use_cache=True)          # out.cache: RecurCache(state after the prompt)
    out = model(next_ids, cache=out.cache)          # continues from it (and updates it in place)
    out.cache.reorder_cache(beam_idx)               # beam search: row i becomes row beam_idx[i]

A recur model's memory is one ``State`` per batch row: a fixed-size recurrent state for the
recurrent mixers, a KV cache for attention (which is its state, by recur's contract). There is
nothing per layer or per position for transformers to manage, so this is not a subclass of
``transformers.Cache`` (as transformers' own xLSTM and RWKV caches are not): it is a small holder
with the methods ``generate`` calls. It imports nothing from transformers.

Stateful models cannot go back: a recurrent state has no record of the tokens it read, so
``crop`` (assisted decoding, rolling back a step) is refused; ``_is_stateful`` on the model makes
``generate`` refuse assisted decoding before it would need it.
"""

from __future__ import annotations

import torch

from recur.state import State


class RecurCache:
    """The state of a recur model after ``seen`` tokens per row (None: nothing read yet).

    ``unusable`` is set when the state read padding that a continuation would carry (a
    right-padded batch): the logits of that call are right, continuing from its state would not
    be, so using the cache raises ``ValueError(unusable)`` instead of generating from it."""

    # generate's checks: no torch.compile'd static cache, no cropping (see the module docstring).
    is_compileable = False
    is_croppable = False

    def __init__(self, state: State | None = None, seen: int = 0, unusable: str | None = None):
        if state is not None and not isinstance(state, State):
            raise TypeError(f"RecurCache holds a recur.State, got {type(state).__name__}")
        self.state = state
        self.seen = int(seen)
        self.unusable = unusable

    @property
    def is_linear(self) -> list[bool]:
        """False, so that ``generate`` called with a cache from an earlier call and the full
        sequence so far feeds only the tokens the cache has not read (its prefill slices the inputs
        by ``get_seq_length`` for caches that are not all linear-attention layers)."""
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens read per row (the padded length: left padding counts, as in the attention mask)."""
        return self.seen

    def update(self, state: State, new_tokens: int) -> RecurCache:
        """The state after ``new_tokens`` more tokens per row; in place, as transformers' caches."""
        self.state = state
        self.seen += int(new_tokens)
        return self

    def check_usable(self) -> None:
        if self.unusable is not None:
            raise ValueError(self.unusable)

    # ---------------------------------------------------------------- batch rows
    def _rows(self, index: torch.Tensor) -> None:
        if self.state is not None:
            index = torch.as_tensor(index, dtype=torch.long)
            device = next((t.device for _, t in self.state.tensors()), index.device)
            self.state = self.state.select(index.to(device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` continues the state of row ``beam_idx[i]`` (rows may repeat)."""
        self._rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (in that order)."""
        self._rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times in a row (rows 0, 0, 1, 1, ... for 2), as ``Tensor.repeat_interleave``."""
        if self.state is not None:
            self.state = self.state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, max_length: int) -> None:
        """Refused: a recurrent state cannot forget its last tokens (see the module docstring)."""
        raise NotImplementedError("a recur model's cache is a recurrent state: it cannot be cropped back to "
                                  f"{max_length} tokens (assisted / speculative decoding needs that; use plain "
                                  "greedy, sampling or beam search)")

    def reset(self) -> None:
        self.state, self.seen, self.unusable = None, 0, None

    def __repr__(self) -> str:
        return f"RecurCache(seen={self.seen}, state={self.state!r}" + (", unusable" if self.unusable else "") + ")"
