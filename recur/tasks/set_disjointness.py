"""Set disjointness: two sets share exactly one token; after reading both, output it.

Layout (tokens 1, 2, 3 are markers, 0 is padding; set tokens are drawn from [4, V)):

    0 .. 0  1  a_1 .. a_|A|  2  b_1 .. b_|B|  3        -> target at the last position: the shared token
    0 .. 0  1  A  2  B  1  A  2  B  3                   (jrt=True: the context is read twice)

Source: Arora et al., "Just read twice: closing the recall gap for recurrent language
models" (2024), reference code HazyResearch/prefix-linear-attention,
synthetic/zoology/data/non_autoreg.py (``disjoint_sets``, output mode ``intersect_token``,
V = 2048): A and B are random distinct tokens from disjoint halves of the vocabulary,
then one token of A overwrites a random position of B, so the sets share exactly one
token; only the position of the answer marker is supervised. Here A ‖ B is a uniform
random tuple of |A| + |B| distinct tokens of [4, V) (``base.distinct_rows``), the same
distribution, without the half-vocabulary cap (|A| + |B| <= V - 4 instead of each at
most half). ``jrt`` is the JRT-Prompt of the paper: the whole context repeated before
the question.

Longer sequences (``grow``): "sets" multiplies both set sizes by the largest integer k
that fits seq_len (and the vocabulary), so (4, 16) at 23 tokens becomes (8, 32) from 43,
as the paper's larger test sizes; "padding" keeps the sizes and pads on the left. The
rest of the row is left padding either way. Train/test split by the content A ‖ B (not
its layout), so the same sets are in the same split at every length and with ``jrt``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from recur.tasks.base import Batch, Task, TaskParams, distinct_rows, register_task, sample_rows_of_split

PAD, START_A, START_B, ASK = 0, 1, 2, 3
FIRST_SET_TOKEN = 4


class SetDisjointnessParams(TaskParams):
    vocab_size: int = Field(2048, ge=8, le=1 << 20, description="V: set tokens are drawn from [4, V)")
    size_a: int = Field(4, ge=1, description="|A| at the shortest length (first set)")
    size_b: int = Field(16, ge=1, description="|B| at the shortest length (second set)")
    jrt: bool = Field(False, description="Just-Read-Twice prompt: the context A, B appears twice")
    grow: Literal["sets", "padding"] = Field("sets", description="what fills longer sequences")

    @model_validator(mode="after")
    def _sets_fit_vocabulary(self):
        if self.size_a + self.size_b > self.vocab_size - FIRST_SET_TOKEN:
            raise ValueError(f"size_a + size_b = {self.size_a + self.size_b} distinct tokens do not fit in the "
                             f"{self.vocab_size - FIRST_SET_TOKEN} set tokens of vocab_size={self.vocab_size}")
        return self


@register_task
class SetDisjointness(Task):
    name = "set_disjointness"
    Params = SetDisjointnessParams
    description = ("[0 pad..] 1 A 2 B 3 -> the one token A and B share (jrt: 1 A 2 B 1 A 2 B 3). Tokens 1-3 are "
                   "markers, set tokens in [4, V). Only the last position is supervised. Longer seq_len: "
                   "larger sets (grow='sets', sizes times k) or left padding (grow='padding'). Metric: accuracy.")

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    def _layout_len(self, body: int) -> int:
        """Tokens used by sets of total size ``body``: markers, and the repeat with jrt."""
        once = body + 2
        return 2 * once + 1 if self.params.jrt else once + 1

    def min_seq_len(self) -> int:
        return self._layout_len(self.params.size_a + self.params.size_b)

    def answer_tokens(self) -> range:
        return range(FIRST_SET_TOKEN, self.params.vocab_size)  # the set tokens

    def set_sizes(self, seq_len: int) -> tuple[int, int]:
        """(|A|, |B|) used at ``seq_len``."""
        p = self.params
        base = p.size_a + p.size_b
        k = 1
        if p.grow == "sets":
            while (self._layout_len((k + 1) * base) <= seq_len
                   and (k + 1) * base <= p.vocab_size - FIRST_SET_TOKEN):
                k += 1
        return k * p.size_a, k * p.size_b

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        size_a, size_b = self.set_sizes(seq_len)
        num_set_tokens = self.params.vocab_size - FIRST_SET_TOKEN

        def draw(m: int) -> torch.Tensor:
            ab = distinct_rows(m, size_a + size_b, num_set_tokens, generator) + FIRST_SET_TOKEN
            shared_at = torch.randint(size_a, (m,), generator=generator)
            replace_at = size_a + torch.randint(size_b, (m,), generator=generator)
            rows = torch.arange(m)
            ab[rows, replace_at] = ab[rows, shared_at]
            return ab

        ab = sample_rows_of_split(draw, n, split)  # [n, |A| + |B|]: the content that decides the split
        a, b = ab[:, :size_a], ab[:, size_a:]
        in_b = (b[:, :, None] == a[:, None, :]).any(1)  # [n, |A|]: exactly one True per row
        answer = a[in_b]

        def marker(tok):
            return torch.full((n, 1), tok, dtype=torch.int64)

        context = torch.cat([marker(START_A), a, marker(START_B), b], dim=1)
        parts = [context, context] if self.params.jrt else [context]
        body = torch.cat([*parts, marker(ASK)], dim=1)
        inputs = torch.cat([torch.full((n, seq_len - body.shape[1]), PAD, dtype=torch.int64), body], dim=1)
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, -1] = answer
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, -1] = True
        return Batch(inputs, targets, mask)
