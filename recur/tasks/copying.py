"""Copying and selective copying: hold a span of tokens over a delay, then reproduce it.

Token 0 is the blank (filler / noise), token 1 the delimiter or marker, data tokens are
drawn uniformly with replacement from [2, V):

    copy            d_1 .. d_n  0 .. 0  1  0 .. 0        -> d_1 .. d_n at the last n positions
    selective_copy  0 d_1 0 0 d_2 .. 0 d_n 0  1 1 .. 1   -> d_j at the j-th marker

Sources: the copying memory task (Hochreiter & Schmidhuber 1997; Arjovsky et al. 2016)
as MAD defines it, athms/mad-lab ``mad/data/instances.py`` (``generate_copying_instance``:
data, blanks, the copy token, then n blanks whose targets are the data; V=16, 16 tokens);
selective copying from Gu & Dao, "Mamba" (2023), Fig. 2 (data tokens at random positions
among noise tokens, then one marker per output), also used by MAD (V=16, L=256) and
Feng et al., "Were RNNs All We Needed?" (minGRU, BorealisAI/minRNNs, vocabulary 16).

Train/test split: by the data span d_1 .. d_n alone, so a test span never appears in
training at any length or position. Longer sequences: a longer delay (copy) or more
noise around the data (selective_copy).
"""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from recur.tasks.base import Batch, Task, TaskParams, distinct_rows, register_task, sample_rows_of_split

BLANK, MARK = 0, 1
FIRST_DATA = 2
_MIN_SPACE = 256  # distinct spans needed before both splits are non-empty


class _CopyParams(TaskParams):
    vocab_size: int = Field(16, ge=3, le=1 << 24, description="V: 0 blank, 1 delimiter/marker, data in [2, V)")

    def _check_space(self, length: int, name: str):
        if (self.vocab_size - FIRST_DATA) ** length < _MIN_SPACE:
            raise ValueError(f"{name}={length} with {self.vocab_size - FIRST_DATA} data tokens gives fewer than "
                             f"{_MIN_SPACE} distinct spans, too few for a test split; raise {name} or vocab_size")
        return self


class CopyParams(_CopyParams):
    copy_len: int = Field(16, ge=1, le=4096, description="n: tokens to copy")

    @model_validator(mode="after")
    def _enough_spans(self):
        return self._check_space(self.copy_len, "copy_len")


@register_task
class Copy(Task):
    """Copying memory: d_1..d_n, L-2n-1 blanks, the delimiter, n blanks; the targets at
    the n final blanks are d_1..d_n (only those positions are supervised)."""

    name = "copy"
    Params = CopyParams
    description = ("d_1..d_n (data [2,V)) 0..0 (blanks) 1 (delimiter) 0 x n; targets at the last n positions = "
                   "d_1..d_n, only those supervised. Longer seq_len: more blanks (longer delay). "
                   "Metric: accuracy / exact match.")

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    def min_seq_len(self) -> int:
        return 2 * self.params.copy_len + 1

    def answer_tokens(self) -> range:
        return range(FIRST_DATA, self.params.vocab_size)

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        span = self.params.copy_len
        data = sample_rows_of_split(
            lambda m: torch.randint(FIRST_DATA, self.params.vocab_size, (m, span), generator=generator), n, split)
        inputs = torch.full((n, seq_len), BLANK, dtype=torch.int64)
        inputs[:, :span] = data
        inputs[:, -span - 1] = MARK
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, -span:] = data
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, -span:] = True
        return Batch(inputs, targets, mask)


class SelectiveCopyParams(_CopyParams):
    num_tokens: int = Field(16, ge=1, le=4096, description="n: data tokens scattered among the noise")

    @model_validator(mode="after")
    def _enough_spans(self):
        return self._check_space(self.num_tokens, "num_tokens")


@register_task
class SelectiveCopy(Task):
    """Selective copying: the first L-n positions hold the n data tokens at a uniformly
    random set of positions (in order) and blanks elsewhere; then n markers, and the
    target at the j-th marker is d_j (only the markers are supervised)."""

    name = "selective_copy"
    Params = SelectiveCopyParams
    description = ("L-n positions of blanks (0) with n data tokens ([2,V)) at random positions, then n markers (1); "
                   "target at the j-th marker = the j-th data token, only markers supervised. Longer seq_len: more "
                   "noise between the data. Metric: accuracy / exact match.")

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    def min_seq_len(self) -> int:
        return 2 * self.params.num_tokens

    def answer_tokens(self) -> range:
        return range(FIRST_DATA, self.params.vocab_size)

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        span = self.params.num_tokens
        region = seq_len - span
        data = sample_rows_of_split(
            lambda m: torch.randint(FIRST_DATA, self.params.vocab_size, (m, span), generator=generator), n, split)
        where = distinct_rows(n, span, region, generator).sort(dim=1).values  # uniform subset, in order
        inputs = torch.full((n, seq_len), BLANK, dtype=torch.int64)
        inputs.scatter_(1, where, data)
        inputs[:, region:] = MARK
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, region:] = data
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, region:] = True
        return Batch(inputs, targets, mask)
