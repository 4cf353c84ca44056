"""Associative recall: MQAR (Zoology) and the MAD recall family (induction, noisy, fuzzy).

Every task stores key -> value pairs in context and is asked, later, for the value of a
key it has seen. A key keeps its value within a sequence; keys and values come from
disjoint halves of the vocabulary. Token 0 is padding (left, when a layout leaves a gap).

    mqar          k1 v1 k2 v2 .. kN vN | q . . q . q . . . ;  target at a query q = its value
    induction     [0] k v k v .. k v MARK q                  ;  target at q (last) = its value
    noisy_recall  [0] k v n n k v k v n n .. k v .. q       ;  target at every key seen before
    fuzzy_recall  0 .. 0 K V K V .. K V Q                    ;  K, V motifs of 1..k / 1..v tokens

The model is a causal LM: at position t it predicts ``targets[t]``; for the MAD tasks the
target at a supervised position is the next token of the stream (the value), for MQAR the
value at a query position (Zoology's labels, the query slots are not followed by values).

Sources: Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient
Language Models" (2023), HazyResearch/zoology ``zoology/data/multiquery_ar.py``;
Poli et al., "Mechanistic Design and Scaling of Hybrid Architectures" (MAD, 2024),
athms/mad-lab ``mad/data/instances.py`` (in-context recall, noisy and fuzzy variants;
MAD's multi-query evaluation supervises only values whose key appeared before).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from recur.tasks.base import Batch, Task, TaskParams, distinct_rows, register_task, sample_rows_of_split

PAD = 0
_MIN_SPACE = 256  # distinct sequences the shortest length must hold, so the test split is not empty


def seen_before(ids: torch.Tensor) -> torch.Tensor:
    """bool [m, S]: True where ``ids[r, j]`` equals some ``ids[r, i]`` with i < j."""
    return first_index(ids) != torch.arange(ids.shape[1])


def first_index(ids: torch.Tensor) -> torch.Tensor:
    """int64 [m, S]: the index of the first occurrence of ``ids[r, j]`` in row r."""
    values, order = ids.sort(dim=1, stable=True)  # equal ids keep their positions' order
    s = torch.arange(ids.shape[1]).expand_as(ids)
    new_group = torch.ones_like(ids, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group_start = torch.where(new_group, s, 0).cummax(dim=1).values
    return torch.empty_like(order).scatter_(1, order, order.gather(1, group_start))


def pick_uniform(allowed: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """int64 [m]: a uniformly random index among the True entries of each row of ``allowed``."""
    score = torch.rand(allowed.shape, generator=generator) + 1.0
    return (score * allowed).argmax(dim=1)


def pairs_for_space(num_keys: int) -> int:
    """Fewest key-value pairs whose key sequences alone number at least ``_MIN_SPACE``."""
    return max(1, math.ceil(math.log(_MIN_SPACE) / math.log(num_keys)))


def motif_ids(motifs: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 [m, C]: equal ids exactly for equal motifs ([m, C, k] tokens in [0, num_tokens), -1 = unused)."""
    ids = torch.zeros(motifs.shape[:2], dtype=torch.int64)
    for i in range(motifs.shape[2]):  # mixed radix, renumbered densely after each digit to stay small
        ids = torch.unique(ids * (num_tokens + 1) + motifs[:, :, i] + 1, return_inverse=True)[1]
    return ids


def shown_keys(keys: torch.Tensor, is_pair: torch.Tensor, num_keys: int) -> torch.Tensor:
    """bool [m, num_keys]: the keys that occur in a pair slot."""
    counts = torch.zeros(keys.shape[0], num_keys, dtype=torch.int64).scatter_add_(1, keys, is_pair.long())
    return counts > 0


# -- MQAR ----------------------------------------------------------------------------------

class MQARParams(TaskParams):
    vocab_size: int = Field(8192, ge=4, le=1 << 24, description="V: keys in [1, V/2), values in [V/2, V)")
    num_kv_pairs: int = Field(8, ge=1, description="distinct keys per sequence, each queried once")
    power_a: float = Field(0.01, gt=0.0, le=1.0, description="power law of the query gaps, p(g) ~ g^(a-1)")
    placement: Literal["power_law", "uniform"] = Field("power_law", description="how query slots are drawn")
    random_non_queries: bool = Field(True, description="fill the non-query slots with random tokens (else 0)")

    @model_validator(mode="after")
    def _keys_fit_vocabulary(self):
        keys, values = self.vocab_size // 2 - 1, self.vocab_size - self.vocab_size // 2
        if self.num_kv_pairs > min(keys, values):
            raise ValueError(f"num_kv_pairs={self.num_kv_pairs} distinct keys and values do not fit in "
                             f"vocab_size={self.vocab_size} ({keys} keys in [1, V/2), {values} values in [V/2, V))")
        return self


@register_task
class MQAR(Task):
    """Multi-query associative recall (Zoology).

    Layout: k_1 v_1 .. k_N v_N (N distinct keys from [1, V/2), N distinct values from
    [V/2, V)), then the query region: every key is queried once, at an even offset
    2g of the region; the slots g are drawn without replacement with p(g) ~ (g+1)^(a-1)
    (``placement="power_law"``, Zoology's sampler) or uniformly. The target at a query
    is the key's value; the other query-region tokens are 0 or, with
    ``random_non_queries``, uniform random tokens other than the row's keys (Zoology
    draws them from the whole vocabulary, so a filler can repeat a key before its query
    and make the query ambiguous; without the keys every key after the context is a query).
    Longer sequences widen the query region (queries further from the context).
    Split by the key -> value assignment (pairs sorted by key), not by its order or layout.
    """

    name = "mqar"
    Params = MQARParams
    description = ("k1 v1 .. kN vN (keys [1,V/2), values [V/2,V), distinct) then a query region where every key "
                   "appears once at an even offset (power-law gaps, a=0.01); the target at a query is its value, "
                   "only queries are supervised; other slots random non-key tokens. Longer seq_len: wider query "
                   "region. Metric: accuracy / exact match.")

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    def min_seq_len(self) -> int:
        return 4 * self.params.num_kv_pairs  # 2N for the pairs, N query slots at even offsets

    def answer_tokens(self) -> range:
        return range(self.params.vocab_size // 2, self.params.vocab_size)  # the values

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        p = self.params
        kv, half = p.num_kv_pairs, p.vocab_size // 2
        context = 2 * kv
        space = (seq_len - context) // 2  # query slots: even offsets of the region
        exponent = p.power_a - 1.0 if p.placement == "power_law" else 0.0
        log_p = exponent * torch.arange(1, space + 1, dtype=torch.float64).log()

        def draw(m: int) -> torch.Tensor:
            keys = distinct_rows(m, kv, half - 1, generator) + 1
            values = distinct_rows(m, kv, p.vocab_size - half, generator) + half
            # Gumbel top-k = sequential sampling without replacement with probabilities ~ p
            u = torch.rand(m, space, generator=generator, dtype=torch.float64).clamp_min(1e-300)
            gaps = (log_p - (-u.log()).log()).topk(kv, dim=1).indices
            return torch.cat([keys, values, gaps], dim=1)

        def assignment(rows: torch.Tensor) -> torch.Tensor:
            keys, values = rows[:, :kv], rows[:, kv:2 * kv]
            by_key = keys.argsort(dim=1)
            return torch.cat([keys.gather(1, by_key), values.gather(1, by_key)], dim=1)

        rows = sample_rows_of_split(draw, n, split, content=assignment)
        keys, values, gaps = rows[:, :kv], rows[:, kv:2 * kv], rows[:, 2 * kv:]
        if p.random_non_queries:  # uniform over the tokens that are not keys of the row
            fill = torch.randint(p.vocab_size - kv, (n, seq_len), generator=generator)
            shifted = keys.sort(dim=1).values - torch.arange(kv)
            inputs = fill + torch.searchsorted(shifted, fill, right=True)
        else:
            inputs = torch.zeros(n, seq_len, dtype=torch.int64)
        inputs[:, 0:context:2] = keys
        inputs[:, 1:context:2] = values
        query_at = context + 2 * gaps
        inputs.scatter_(1, query_at, keys)
        targets = torch.zeros(n, seq_len, dtype=torch.int64).scatter_(1, query_at, values)
        mask = torch.zeros(n, seq_len, dtype=torch.bool).scatter_(1, query_at, True)
        return Batch(inputs, targets, mask)


# -- induction (single associative recall) ----------------------------------------------------

class InductionParams(TaskParams):
    vocab_size: int = Field(16, ge=6, le=1 << 24,
                            description="V: 0 pad, keys and values split [1, V-1) in halves, V-1 the query marker")


@register_task
class Induction(Task):
    """Single associative recall (MAD in-context recall, V=16, L=128).

    Layout: [0] k v k v .. k v MARK q. P = (L-2)//2 pairs, keys uniform with replacement
    from K = (V-2)//2 key tokens [1, 1+K), each key's value drawn once per sequence from
    the value tokens [1+K, V-1) (values may repeat across keys), MARK = V-1, q a key that
    appeared, uniform over the distinct keys shown. A left pad makes odd lengths fit. Only
    the last position is supervised: the value of q. Longer sequences: more pairs.
    Split by the input row.
    """

    name = "induction"
    Params = InductionParams
    description = ("[0] k v k v .. k v MARK q (keys [1,1+K), values [1+K,V-1), a key keeps its value, MARK=V-1, "
                   "K=(V-2)//2); target at the last position = the value of q, which appeared earlier. Only the "
                   "last position is supervised. Longer seq_len: more pairs. Metric: accuracy.")

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    @property
    def num_keys(self) -> int:
        return (self.params.vocab_size - 2) // 2

    @property
    def num_values(self) -> int:
        return self.params.vocab_size - 2 - self.num_keys

    def min_seq_len(self) -> int:
        return 2 * pairs_for_space(self.num_keys) + 2

    def answer_tokens(self) -> range:
        return range(1 + self.num_keys, 1 + self.num_keys + self.num_values)  # the values

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        num_keys, marker = self.num_keys, self.params.vocab_size - 1
        num_pairs = (seq_len - 2) // 2
        pad = seq_len - 2 - 2 * num_pairs

        def draw(m: int) -> torch.Tensor:
            value_of = torch.randint(self.num_values, (m, num_keys), generator=generator)
            keys = torch.randint(num_keys, (m, num_pairs), generator=generator)
            shown = torch.zeros(m, num_keys, dtype=torch.bool).scatter_(1, keys, True)
            query = pick_uniform(shown, generator)
            pairs = torch.stack([1 + keys, 1 + num_keys + value_of.gather(1, keys)], dim=2).reshape(m, -1)
            answer = 1 + num_keys + value_of.gather(1, query[:, None])
            return torch.cat([torch.full((m, pad), PAD), pairs, torch.full((m, 1), marker), 1 + query[:, None],
                              answer], dim=1)

        stream = sample_rows_of_split(draw, n, split, content=lambda rows: rows[:, :seq_len])
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, -1] = stream[:, -1]
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, -1] = True
        return Batch(stream[:, :seq_len], targets, mask)


# -- noisy recall (multi-query, with noise) -----------------------------------------------

class NoisyRecallParams(TaskParams):
    vocab_size: int = Field(32, ge=6, le=1 << 24, description="V: 0 pad, keys, values, then the noise tokens")
    noise_vocab_size: int = Field(16, ge=1, description="noise tokens, the last ones of the vocabulary")
    noise_frac: float = Field(0.2, ge=0.0, le=0.9, description="probability that a pair slot holds noise")

    @model_validator(mode="after")
    def _keys_fit_vocabulary(self):
        if self.vocab_size - 1 - self.noise_vocab_size < 4:
            raise ValueError(f"vocab_size={self.vocab_size} leaves {self.vocab_size - 1 - self.noise_vocab_size} "
                             f"key/value tokens after the pad and noise_vocab_size={self.noise_vocab_size}; "
                             f"at least 4 are needed")
        return self


@register_task
class NoisyRecall(Task):
    """Multi-query associative recall with noise (MAD noisy in-context recall).

    The stream of L+1 tokens is [0] then S = (L+1)//2 slots of two tokens. Each of the
    first S-1 slots is, with probability ``noise_frac``, two noise tokens (uniform from
    the noise vocabulary, the last ``noise_vocab_size`` tokens), else a pair k v (key
    uniform from [1, 1+K), its value fixed per sequence from [1+K, V-N)); one random slot
    is forced to be a pair. The last slot is a key shown earlier (uniform over the distinct
    keys shown) and its value. Inputs are the first L tokens, targets the next token.
    Supervised: the key position of every pair whose key appeared in an earlier pair
    (MAD: "eval only values whose key appeared"), always including the last position.
    Longer sequences: more slots. Split by the input row.
    """

    name = "noisy_recall"
    Params = NoisyRecallParams
    description = ("[0] slots of two tokens: k v pairs (a key keeps its value) or, with probability noise_frac, "
                   "two noise tokens; the last slot queries a shown key. Supervised at each key seen in an earlier "
                   "pair: target = its value (next token). Longer seq_len: more slots. Metric: accuracy / exact "
                   "match.")

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    @property
    def num_keys(self) -> int:
        return (self.params.vocab_size - 1 - self.params.noise_vocab_size) // 2

    @property
    def num_values(self) -> int:
        return self.params.vocab_size - 1 - self.params.noise_vocab_size - self.num_keys

    def min_seq_len(self) -> int:
        return 2 * pairs_for_space(self.num_keys) + 1

    def answer_tokens(self) -> range:
        return range(1 + self.num_keys, 1 + self.num_keys + self.num_values)  # the values

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        p = self.params
        num_keys, noise0 = self.num_keys, p.vocab_size - p.noise_vocab_size
        slots = (seq_len + 1) // 2
        pad = seq_len + 1 - 2 * slots
        free = slots - 1  # slots before the final query

        def draw(m: int) -> torch.Tensor:
            is_noise = torch.rand(m, free, generator=generator) < p.noise_frac
            is_noise[torch.arange(m), torch.randint(free, (m,), generator=generator)] = False
            value_of = torch.randint(self.num_values, (m, num_keys), generator=generator)
            keys = torch.randint(num_keys, (m, free), generator=generator)
            noise = noise0 + torch.randint(p.noise_vocab_size, (m, free, 2), generator=generator)
            shown = shown_keys(keys, ~is_noise, num_keys)
            keys = torch.cat([keys, pick_uniform(shown, generator)[:, None]], dim=1)  # [m, S]
            is_noise = torch.cat([is_noise, torch.zeros(m, 1, dtype=torch.bool)], dim=1)
            pairs = torch.stack([1 + keys, 1 + num_keys + value_of.gather(1, keys)], dim=2)
            noise = torch.cat([noise, torch.zeros(m, 1, 2, dtype=torch.int64)], dim=1)
            tokens = torch.where(is_noise[:, :, None], noise, pairs).reshape(m, -1)
            slot = torch.arange(slots)
            recalled = seen_before(torch.where(is_noise, num_keys + slot, keys)) & ~is_noise
            flags = torch.stack([torch.zeros_like(recalled), recalled], dim=2).reshape(m, -1)
            pads = torch.zeros(m, pad, dtype=torch.int64)
            return torch.cat([pads, tokens, pads, flags.long()], dim=1)  # stream [L+1] | flags [L+1]

        rows = sample_rows_of_split(draw, n, split, content=lambda r: r[:, :seq_len])
        stream, flags = rows[:, :seq_len + 1], rows[:, seq_len + 1:].bool()
        return Batch(stream[:, :-1], stream[:, 1:], flags[:, 1:])


# -- fuzzy recall (keys and values are motifs) ----------------------------------------------

class FuzzyRecallParams(TaskParams):
    vocab_size: int = Field(16, ge=5, le=1 << 24, description="V: 0 pad, keys [1, 1+K), values [1+K, V)")
    k_motif_size: int = Field(3, ge=1, le=16, description="a key is 1..k_motif_size distinct key tokens")
    v_motif_size: int = Field(3, ge=1, le=16, description="a value is 1..v_motif_size distinct value tokens")

    @model_validator(mode="after")
    def _motifs_fit_vocabulary(self):
        keys = (self.vocab_size - 1) // 2
        values = self.vocab_size - 1 - keys
        if self.k_motif_size > keys or self.v_motif_size > values:
            raise ValueError(f"motifs of distinct tokens: k_motif_size={self.k_motif_size} must be <= {keys} key "
                             f"tokens and v_motif_size={self.v_motif_size} <= {values} value tokens of "
                             f"vocab_size={self.vocab_size}")
        return self


@register_task
class FuzzyRecall(Task):
    """Multi-query recall with multi-token keys and values (MAD fuzzy in-context recall).

    A key is a motif of 1..k distinct key tokens (size uniform, then uniform over the
    ordered tuples of that size), a value 1..v distinct value tokens; key and value tokens
    are disjoint, so every maximal run of key tokens is one key. The first time a key
    appears its value is drawn; later it repeats that value. Pairs are drawn while they
    fit in L+1-(k+v) tokens; then a final pair repeats a key shown earlier (uniform over
    the distinct keys shown), and the stream of L+1 tokens is left-padded with 0. Inputs
    are the first L tokens, targets the next token. Supervised: the positions whose next
    token is a value token of a key that appeared earlier (always the final value).
    Longer sequences: more pairs. Split by the input row.
    """

    name = "fuzzy_recall"
    Params = FuzzyRecallParams
    description = ("0 .. 0 K V K V .. K V Q: keys are motifs of 1..k key tokens, values 1..v value tokens (disjoint "
                   "halves of [1, V)); a key keeps its value; the last key Q appeared before. Supervised where the "
                   "next token belongs to the value of a repeated key (target = that token). Longer seq_len: more "
                   "pairs. Metric: accuracy / exact match.")

    @property
    def vocab_size(self) -> int:
        return self.params.vocab_size

    @property
    def num_keys(self) -> int:
        return (self.params.vocab_size - 1) // 2

    @property
    def num_values(self) -> int:
        return self.params.vocab_size - 1 - self.num_keys

    @property
    def width(self) -> int:
        return self.params.k_motif_size + self.params.v_motif_size

    def min_seq_len(self) -> int:
        distinct_keys = sum(math.perm(self.num_keys, s) for s in range(1, self.params.k_motif_size + 1))
        return (pairs_for_space(distinct_keys) + 1) * self.width - 1

    def answer_tokens(self) -> range:
        return range(1 + self.num_keys, 1 + self.num_keys + self.num_values)  # the value tokens

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        p = self.params
        k, v, width = p.k_motif_size, p.v_motif_size, self.width
        budget = seq_len + 1 - width  # tokens for the pairs before the final one
        num_cand = max(1, budget // 2)  # pairs that could fit, at two tokens each

        def draw(m: int) -> torch.Tensor:
            ksize = torch.randint(1, k + 1, (m, num_cand), generator=generator)
            vsize = torch.randint(1, v + 1, (m, num_cand), generator=generator)
            kmotif = distinct_rows(m * num_cand, k, self.num_keys, generator).view(m, num_cand, k)
            vmotif = distinct_rows(m * num_cand, v, self.num_values, generator).view(m, num_cand, v)
            kmotif = torch.where(torch.arange(k) < ksize[:, :, None], kmotif, -1)  # -1 beyond the size
            first = first_index(motif_ids(kmotif, self.num_keys))
            recalled = first != torch.arange(num_cand)
            vsize, vmotif = vsize.gather(1, first), vmotif[torch.arange(m)[:, None], first]
            kept = (ksize + vsize).cumsum(dim=1) <= budget  # a prefix of the candidates
            query = pick_uniform(kept & ~recalled, generator)
            at = (torch.arange(m), query)
            kmotif = torch.cat([kmotif, kmotif[at][:, None]], dim=1)  # [m, C+1, k]
            vmotif = torch.cat([vmotif, vmotif[at][:, None]], dim=1)
            vsize = torch.cat([vsize, vsize[at][:, None]], dim=1)
            recalled = torch.cat([recalled, torch.ones(m, 1, dtype=torch.bool)], dim=1)
            kept = torch.cat([kept, torch.ones(m, 1, dtype=torch.bool)], dim=1)
            tokens = torch.cat([1 + kmotif, 1 + self.num_keys + vmotif], dim=2)  # [m, C+1, k+v]
            valid = torch.cat([kmotif >= 0, torch.arange(v) < vsize[:, :, None]], dim=2) & kept[:, :, None]
            flag = torch.cat([torch.zeros_like(kmotif, dtype=torch.bool),
                              recalled[:, :, None].expand(-1, -1, v)], dim=2)
            tokens, valid, flag = (t.reshape(m, -1) for t in (tokens, valid, flag))
            # right-align the valid tokens in a stream of L+1 (left padding), dump the rest
            dest = (seq_len + 1 - valid.sum(1, keepdim=True)) + valid.cumsum(1) - 1
            dest = torch.where(valid, dest, seq_len + 1)
            stream = torch.zeros(m, seq_len + 2, dtype=torch.int64).scatter_(1, dest, torch.where(valid, tokens, 0))
            flags = torch.zeros(m, seq_len + 2, dtype=torch.int64).scatter_(1, dest, (flag & valid).long())
            return torch.cat([stream[:, :-1], flags[:, :-1]], dim=1)

        rows = sample_rows_of_split(draw, n, split, content=lambda r: r[:, :seq_len])
        stream, flags = rows[:, :seq_len + 1], rows[:, seq_len + 1:].bool()
        return Batch(stream[:, :-1], stream[:, 1:], flags[:, 1:])
