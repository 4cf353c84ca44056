"""Passkey retrieval: a short numeric key hidden at a chosen depth of repetitive filler.

Layout (token 1 opens the key, 2 asks for it, digits 0-9 are tokens 3-12, filler tokens
13 .. 13+F-1 repeat in a fixed cycle, "the grass is green ..." of the LLM version):

    f f f .. f  1 d_1 .. d_D  f f .. f  2 d_1 .. d_{D-1}
                                        ^ targets d_1 .. d_D (teacher forced)

The haystack is H = L - 2D - 1 filler tokens, the i-th being 13 + (i mod F) whatever
the key, and the key block (1 d_1 .. d_D) is inserted after h = round(b H / (depths-1))
of them, for a depth bin b uniform in [0, depths) (b = 0: the key opens the sequence,
b = depths-1: it sits just before the query; with depths=1 always at the start). The
answer is supervised on the last D positions: at the query the model outputs d_1, then
each given digit predicts the next. Longer sequences: more filler.

Source: Mohtashami & Jaggi, "Landmark Attention" (2023) passkey retrieval, as used by
Chen et al., "Stuffed Mamba" (2024): 5-digit passkeys at 10 evenly spaced depths.
Train/test split by the digits of the key, so a test key never appears in training.
"""

from __future__ import annotations

import torch
from pydantic import Field

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

KEY, QUERY = 1, 2
FIRST_DIGIT = 3
FIRST_FILLER = FIRST_DIGIT + 10


class PasskeyParams(TaskParams):
    digits: int = Field(5, ge=3, le=64, description="D: digits of the passkey (at least 3: 1000 keys)")
    depths: int = Field(10, ge=1, le=4096, description="evenly spaced depth bins of the key in the filler")
    filler_period: int = Field(8, ge=1, le=4096, description="F: distinct filler tokens, repeating in a cycle")


@register_task
class Passkey(Task):
    name = "passkey"
    Params = PasskeyParams
    description = ("filler (13.. repeating with period F) with '1 d_1..d_D' inserted at one of `depths` evenly "
                   "spaced depths, then '2 d_1..d_{D-1}'; digits are tokens 3-12. Supervised on the last D "
                   "positions: targets d_1..d_D. Longer seq_len: more filler. Metric: accuracy / exact match.")

    @property
    def vocab_size(self) -> int:
        return FIRST_FILLER + self.params.filler_period

    def min_seq_len(self) -> int:
        # the shortest haystack where every depth bin is its own insertion point
        return 2 * self.params.digits + 1 + self.params.depths - 1

    def answer_tokens(self) -> range:
        return range(FIRST_DIGIT, FIRST_DIGIT + 10)  # the digits

    def haystack_len(self, seq_len: int) -> int:
        return seq_len - 2 * self.params.digits - 1

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        p = self.params
        d, hay = p.digits, self.haystack_len(seq_len)
        key = sample_rows_of_split(lambda m: torch.randint(10, (m, d), generator=generator), n, split)
        depth = torch.randint(p.depths, (n, 1), generator=generator)
        before = torch.div(2 * depth * hay + max(p.depths - 1, 1), 2 * max(p.depths - 1, 1),
                           rounding_mode="floor")  # round(b H / (depths-1)), halves up
        t = torch.arange(hay + d + 1)
        filler_index = torch.where(t < before, t, t - d - 1)  # position in the cycle, skipping the key
        offset = (t - before - 1).clamp(0, d - 1)
        context = torch.where((t >= before) & (t <= before + d),
                              torch.where(t == before, KEY, FIRST_DIGIT + key.gather(1, offset)),
                              FIRST_FILLER + filler_index % p.filler_period)
        answer = FIRST_DIGIT + key
        inputs = torch.cat([context, torch.full((n, 1), QUERY), answer[:, :-1]], dim=1)
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, -d:] = answer
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, -d:] = True
        return Batch(inputs, targets, mask)
