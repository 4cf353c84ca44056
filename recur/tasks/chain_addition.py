"""``chain_addition``: single-digit addition solved by chaining increments, the task of
Chateau-Laurent & VanRullen, "Learning to Chain Operations by Routing Information Through a
Global Workspace" (2025): two addends a, b in [0, base) must be summed, which a model can do by
loading a and incrementing it b times; it is scored on unseen addition operations, both
interpolations and extrapolations of the operations seen in training.

    a + b = s [PAD ..]
          ^ '=' predicts s (one token: the sum's value), the only supervised position

Tokens: the values 0 .. 2 (base - 1) (token v is the number v: the addends use 0 .. base - 1, the
sum the whole range), PLUS = 2 base - 1, EQ = 2 base, PAD = 2 base + 1. The sum is one token, as
the paper's one-hot digit workspace holds one value; rows longer than 5 tokens are PAD on the
right, never supervised. Metric: accuracy (= exact match: one answer per row). Chance:
1 / (2 base - 1), a uniform guess among the possible sums.

Splits (which (a, b) operations are trained on; disjoint by construction, the rule a function of
the pair alone, so it holds whatever the seed):

* ``split="interpolation"`` (default): the test operations are a fixed pseudo-random set of
  max(1, round(base^2 / 8)) pairs (``TEST_FRACTION`` of the grid), picked by a generator seeded
  with ``INTERPOLATION_SEED`` and the base alone, never the run's seed, so every run holds out
  the same operations. They are scattered over the grid: in base 10 (tested) every test a and
  every test b also occurs in training, only the combination is new. (``split_of``, the library's content hash, is not used
  here: on pairs of small integers it clusters, e.g. in base 10 it held out b in {8, 9} for most
  of its pairs, an extrapolation rather than an interpolation.)
* ``split="extrapolation"``: test operations are those with b >= ``test_b_from`` (default
  base - max(1, base // 4), i.e. b in {8, 9} in base 10), train operations those with b below
  it: the test needs more increments than any training operation, and its largest sums (above
  base - 1 + test_b_from - 1) are never a training target.

Within a split the operations are drawn uniformly (each row independently, with the generator
only). Choices the abstract leaves open and made here: the addends are single tokens 0 .. base-1
(the paper's one-hot digits; MNIST images are not used), the sum one token, and the held-out sets
above (the paper's exact held-out operations are not stated in what was available).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from recur.tasks.base import TEST_FRACTION, Batch, Task, TaskParams, register_task

SPLIT_RULES = ("interpolation", "extrapolation")
PROBLEM_LEN = 5  # a + b = s
INTERPOLATION_SEED = 20250228  # the held-out interpolation pairs depend on this and the base only


class ChainAdditionParams(TaskParams):
    base: int = Field(10, ge=2, le=64, description="addends lie in [0, base); sums in [0, 2 base - 2]")
    split: Literal["interpolation", "extrapolation"] = Field(
        "interpolation", description="interpolation: held-out (a, b) combinations by content hash; "
                                     "extrapolation: test on b >= test_b_from")
    test_b_from: int | None = Field(None, ge=1, description="extrapolation: the smallest second addend of the "
                                                            "test split (default base - max(1, base // 4))")


@register_task
class ChainAddition(Task):
    """a + b = s with single-token addends, held-out operations at test (interpolation or extrapolation)."""

    name = "chain_addition"
    Params = ChainAdditionParams
    description = ("a + b = s (Chateau-Laurent & VanRullen 2025): 'a + b = s [PAD..]', a, b in [0, base) (base 10), "
                   "s one token in [0, 2 base - 2], PLUS 2 base - 1, EQ 2 base, PAD 2 base + 1. Supervised: '=' "
                   "predicts s. split=interpolation: a fixed scattered 1/8 of the (a, b) pairs held out; "
                   "split=extrapolation: test b >= test_b_from (default base - max(1, base // 4)). Metric: accuracy; "
                   "chance 1/(2 base - 1).")

    def __init__(self, **params):
        super().__init__(**params)
        base = self.params.base
        self.plus, self.eq, self.pad = 2 * base - 1, 2 * base, 2 * base + 1
        if self.params.test_b_from is not None and self.params.split != "extrapolation":
            raise ValueError(f"task 'chain_addition': test_b_from applies to split='extrapolation' only, "
                             f"got split={self.params.split!r}")
        if self.params.split == "extrapolation" and not 1 <= self.test_b_from < base:
            raise ValueError(f"task 'chain_addition': test_b_from must be in [1, base) = [1, {base}) so both splits "
                             f"hold operations, got {self.test_b_from}")
        pairs = torch.cartesian_prod(torch.arange(base), torch.arange(base))  # [base^2, 2]: (a, b)
        test = self.is_test_pair(pairs)
        self._pairs = {"train": pairs[~test], "test": pairs[test]}
        for split, rows in self._pairs.items():
            if rows.shape[0] == 0:
                raise ValueError(f"task 'chain_addition' with base={base}, split={self.params.split!r} has no "
                                 f"{split} operations; use a larger base")

    @property
    def test_b_from(self) -> int:
        base = self.params.base
        return self.params.test_b_from if self.params.test_b_from is not None else base - max(1, base // 4)

    def is_test_pair(self, pairs: torch.Tensor) -> torch.Tensor:
        """bool [m]: which operations (a, b) (int64 [m, 2]) belong to the test split."""
        base = self.params.base
        if self.params.split == "extrapolation":
            return pairs[:, 1] >= self.test_b_from
        order = torch.randperm(base * base, generator=torch.Generator().manual_seed(INTERPOLATION_SEED + base))
        held = torch.zeros(base * base, dtype=torch.bool)
        held[order[:max(1, round(base * base * TEST_FRACTION))]] = True
        return held[pairs[:, 0] * base + pairs[:, 1]]

    def operations(self, split: str) -> torch.Tensor:
        """Every (a, b) of ``split``: int64 [m, 2]."""
        self.check_split(split)
        return self._pairs[split].clone()

    @property
    def vocab_size(self) -> int:
        return self.pad + 1

    def min_seq_len(self) -> int:
        return PROBLEM_LEN

    def answer_tokens(self) -> range:
        return range(self.plus)  # the values 0 .. 2 base - 2

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        pairs = self._pairs[split]
        rows = pairs[torch.randint(pairs.shape[0], (n,), generator=generator)]
        a, b = rows[:, 0], rows[:, 1]
        inputs = torch.full((n, seq_len), self.pad, dtype=torch.int64)
        inputs[:, 0], inputs[:, 1], inputs[:, 2], inputs[:, 3], inputs[:, 4] = a, self.plus, b, self.eq, a + b
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, 3] = a + b
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, 3] = True
        return Batch(inputs, targets, mask)
