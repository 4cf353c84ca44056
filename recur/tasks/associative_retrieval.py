"""Associative retrieval, the generator of ARMT (Rodkin et al., "Associative Recurrent Memory
Transformer", 2024; RodkinIvan/associative-recurrent-memory-transformer,
``run_finetuning_associative_retrieval.py``): key-value pairs of base-16 digits, one pair per
block of K + V + 2 tokens, then a query for one key; the answer is its value.

    k_1 SEP v_1 EOS  k_2 SEP v_2 EOS  ..  k_n SEP v_n EOS  k_q GEN v_q EOS  [PAD ..]
                                                                 ^ targets v_q (teacher forced)

Keys are K digits, values V digits (16 symbols, tokens 0-15; SEP 16, GEN 17, EOS 18, PAD 19; the
authors' ids are 100, 101, 102). Keys are distinct (a uniformly random ordered choice of n of the
16^K codes, written least significant digit first as the authors do) and the queried pair is
uniform among the n; with ``rewrite`` keys are uniform with repeats, the queried key is uniform
among the distinct keys shown, and the answer is the value of its latest occurrence. Values are
uniform. A block of K + V + 2 tokens holds one pair, so a segment model whose segment is that
long (``rmt`` / ``armt`` with ``segment_len = key_size + value_size + 2``) sees one pair per
segment, and the sequence has n + 1 segments.

The length sets the number of pairs: n = seq_len // (K + V + 2) - 1 (a curriculum over seq_len is
one over the number of segments); a length that is not a multiple of the block is padded on the
right with PAD, after the query, so the blocks stay aligned with the segments. The supervised
positions are those whose target is a digit of the answer: GEN and the first V - 1 digits of v_q
(the authors' loss also covers the EOS after it, which tells nothing). Metric: accuracy and exact
match of the value. Train/test split by a hash of the whole sequence's content (the keys, values
and the queried index).
"""

from __future__ import annotations

import torch
from pydantic import Field

from recur.tasks.base import Batch, Task, TaskParams, distinct_rows, register_task, sample_rows_of_split
from recur.tasks.recall import pick_uniform, seen_before

NUM_SYMBOLS = 16
SEP, GEN, EOS, PAD = 16, 17, 18, 19


class AssociativeRetrievalParams(TaskParams):
    key_size: int = Field(2, ge=1, le=8, description="K: base-16 digits per key (16^K distinct keys)")
    value_size: int = Field(1, ge=1, le=8, description="V: base-16 digits per value")
    rewrite: bool = Field(False, description="keys may repeat; the answer is the latest value of the queried key")


@register_task
class AssociativeRetrieval(Task):
    """ARMT's associative retrieval: n key-value pairs of base-16 digits, then a query for one key."""

    name = "associative_retrieval"
    Params = AssociativeRetrievalParams
    description = ("k_1 SEP v_1 EOS .. k_n SEP v_n EOS k_q GEN v_q EOS [PAD..] (ARMT's generator): keys of K and values "
                   "of V base-16 digits (tokens 0-15; SEP 16, GEN 17, EOS 18, PAD 19), one pair per block of K+V+2 "
                   "tokens, n = seq_len // (K+V+2) - 1; keys distinct (rewrite=true: repeats, the latest value "
                   "counts). Supervised: the V digits of the answer. Metric: accuracy / exact match.")

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    @property
    def block(self) -> int:
        """Tokens per pair (and per query): K + V + 2."""
        return self.params.key_size + self.params.value_size + 2

    def num_pairs(self, seq_len: int) -> int:
        return seq_len // self.block - 1

    def min_seq_len(self) -> int:
        return 2 * self.block  # one pair and the query

    def check_seq_len(self, seq_len: int) -> None:
        super().check_seq_len(seq_len)
        keys = NUM_SYMBOLS ** self.params.key_size
        if not self.params.rewrite and self.num_pairs(seq_len) > keys:
            raise ValueError(f"task {self.name!r} with {self.params.model_dump()} has {keys} distinct keys, so at most "
                             f"{keys} pairs: seq_len <= {(keys + 2) * self.block - 1}, got {seq_len} "
                             f"({self.num_pairs(seq_len)} pairs); use a larger key_size or rewrite=true")

    def answer_tokens(self) -> range:
        return range(NUM_SYMBOLS)  # the value digits

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        K, V, P = self.params.key_size, self.params.value_size, self.num_pairs(seq_len)
        codes_of = NUM_SYMBOLS ** K

        def draw(m: int) -> torch.Tensor:
            if self.params.rewrite:
                keys = torch.randint(codes_of, (m, P), generator=generator)
                last = ~seen_before(keys.flip(1)).flip(1)  # each distinct key once, at its latest occurrence
                query = pick_uniform(last, generator)
            else:
                keys = distinct_rows(m, P, codes_of, generator)
                query = torch.randint(P, (m,), generator=generator)
            values = torch.randint(NUM_SYMBOLS, (m, P * V), generator=generator)
            return torch.cat([keys, values, query[:, None]], dim=1)  # the whole content of a sequence

        rows = sample_rows_of_split(draw, n, split)
        keys, values, query = rows[:, :P], rows[:, P:P + P * V].view(n, P, V), rows[:, -1]
        weights = NUM_SYMBOLS ** torch.arange(K)
        key_digits = keys[..., None] // weights % NUM_SYMBOLS  # [n, P, K], least significant first
        col = lambda token: torch.full((n, P + 1, 1), token, dtype=torch.int64)  # noqa: E731
        at = query[:, None, None]
        q_key = key_digits.gather(1, at.expand(n, 1, K))
        q_value = values.gather(1, at.expand(n, 1, V))
        blocks = torch.cat([torch.cat([key_digits, q_key], dim=1),
                            torch.cat([col(SEP)[:, :P], col(GEN)[:, :1]], dim=1),
                            torch.cat([values, q_value], dim=1), col(EOS)], dim=2)
        seq = blocks.reshape(n, (P + 1) * self.block)
        inputs = torch.full((n, seq_len), PAD, dtype=torch.int64)
        inputs[:, :seq.shape[1]] = seq
        first = P * self.block + K  # the GEN position: it and the next V - 1 predict the answer's digits
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, first:first + V] = q_value[:, 0]
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, first:first + V] = True
        return Batch(inputs, targets, mask)
