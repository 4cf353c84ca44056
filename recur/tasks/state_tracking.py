"""State tracking: parity, counting modulo m and group word problems (prefix products).

At every position t the target is the running "state" of the prefix x_1 .. x_t:

    parity          y_t = x_1 xor x_2 xor ... xor x_t            (bits)
    modular_count   y_t = (x_1 + x_2 + ... + x_t) mod m           (integers in [0, m))
    word_problem    y_t = g_1 g_2 ... g_t                          (elements of a finite group G)

Sources: Merrill, Petty & Sabharwal, "The Illusion of State in State-Space Models" (2024),
reference code jopetty/word-problem (src/generate_data.py: the target is the scan
``acc = G.op(acc, x)``, i.e. each new element multiplies the running product on the
right); Grazzi et al., "Unlocking State-Tracking in Linear RNNs Through Negative
Eigenvalues" (2024) for parity (train lengths 3-40, test 40-256).

Train/test split: by the input row (``split_of(inputs)``), so a sequence is in exactly one
split; prefixes of test sequences do appear in training, as in the reference, where every
shorter sequence is training data. ``min_seq_len`` is the shortest length holding at
least 256 distinct sequences, so the test split is never empty.
"""

from __future__ import annotations

import functools
from abc import abstractmethod
import itertools
import math
import re

import torch
from pydantic import Field, field_validator

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

_MIN_SPACE = 256  # distinct sequences a length must hold before both splits are non-empty


class StateTrackingParams(TaskParams):
    final_only: bool = Field(False, description="supervise only the last position (default: every position)")


class _StateTracking(Task):
    """Uniform random tokens in [0, num_tokens); the target at t is the state after x_1..x_t."""

    Params = StateTrackingParams

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Size of the input alphabet (and of the state space)."""

    @abstractmethod
    def prefix_states(self, inputs: torch.Tensor) -> torch.Tensor:
        """int64 [n, T] -> int64 [n, T]: the state after each prefix."""

    @property
    def vocab_size(self) -> int:
        return self.num_tokens

    def min_seq_len(self) -> int:
        k, t = self.num_tokens, 1
        while k**t < _MIN_SPACE:
            t += 1
        return t

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        inputs = sample_rows_of_split(
            lambda m: torch.randint(self.num_tokens, (m, seq_len), generator=generator), n, split)
        targets = self.prefix_states(inputs)
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        if self.params.final_only:
            mask[:, -1] = True
        else:
            mask[:] = True
        return Batch(inputs, targets, mask)


@register_task
class Parity(_StateTracking):
    name = "parity"
    description = ("Bits x_1..x_T (tokens 0/1); target at t = parity of the prefix (running xor). "
                   "Supervised at every position (final_only: the last). Metric: token accuracy / exact match.")

    @property
    def num_tokens(self) -> int:
        return 2

    def prefix_states(self, inputs):
        return inputs.cumsum(1) % 2


class ModularCountParams(StateTrackingParams):
    modulus: int = Field(5, ge=2, le=1024, description="m: tokens and targets are integers in [0, m)")


@register_task
class ModularCount(_StateTracking):
    name = "modular_count"
    Params = ModularCountParams
    description = ("Integers x_1..x_T in [0, m) (tokens); target at t = (x_1 + ... + x_t) mod m. "
                   "Supervised at every position (final_only: the last). Metric: token accuracy / exact match.")

    @property
    def num_tokens(self) -> int:
        return self.params.modulus

    def prefix_states(self, inputs):
        return inputs.cumsum(1) % self.params.modulus


# -- finite groups --------------------------------------------------------------------------

_MAX_GROUP_ORDER = 1024
_FACTOR = re.compile(r"([SAZ])(\d+)")


def _parse_group(name: str) -> tuple[tuple[str, int], ...]:
    """'A4xZ5' / 'A4_x_Z5' / 'a5' -> (('A', 4), ('Z', 5)); raises ValueError with the accepted forms."""
    factors = []
    for part in name.strip().upper().replace("_X_", "X").split("X"):
        m = _FACTOR.fullmatch(part)
        if m is None:
            raise ValueError(f"cannot read group {name!r}: write factors Z<m> (cyclic), S<n> (symmetric) or "
                             f"A<n> (alternating), joined by 'x' for a direct product, e.g. 'A5', 'Z60', 'A4xZ5'")
        kind, k = m.group(1), int(m.group(2))
        if kind == "Z" and k < 2:
            raise ValueError(f"cyclic group Z{k}: the order must be at least 2")
        if kind in "SA" and not 2 <= k <= 6:
            raise ValueError(f"{kind}{k}: permutation groups are supported on 2 to 6 points")
        factors.append((kind, k))
    return tuple(factors)


def _factor_order(kind: str, k: int) -> int:
    return k if kind == "Z" else math.factorial(k) // (2 if kind == "A" else 1)


def _is_even(perm: tuple[int, ...]) -> bool:
    inversions = sum(perm[i] > perm[j] for i in range(len(perm)) for j in range(i + 1, len(perm)))
    return inversions % 2 == 0


def _factor_elements(kind: str, k: int) -> list:
    if kind == "Z":
        return list(range(k))
    perms = list(itertools.permutations(range(k)))  # lexicographic: the identity comes first
    return perms if kind == "S" else [p for p in perms if _is_even(p)]


def _factor_table(kind: str, k: int, elements: list) -> torch.Tensor:
    """Cayley table [order, order]: table[a, b] = index of a*b."""
    if kind == "Z":
        idx = torch.arange(k)
        return (idx[:, None] + idx[None, :]) % k
    p = torch.tensor(elements)  # [order, k]
    composed = p[:, p]  # composed[a, b, i] = p[a, p[b, i]]: apply b first, then a
    radix = k ** torch.arange(k)
    lookup = torch.full((k**k,), -1, dtype=torch.int64)
    lookup[(p * radix).sum(-1)] = torch.arange(len(elements))
    return lookup[(composed * radix).sum(-1)]


@functools.lru_cache(maxsize=None)
def group_structure(name: str) -> tuple[tuple, torch.Tensor]:
    """The elements of a group (in the enumeration order of the tokens) and its Cayley table.

    Enumeration: Z_m -> 0..m-1; S_n -> ``itertools.permutations(range(n))`` (lexicographic);
    A_n -> the even ones among those, same order; a direct product -> tuples of factor
    elements in ``itertools.product`` order (first factor slowest). Index 0 is the identity.
    Product of permutations: (a * b)[i] = a[b[i]] (b applied first, as abstract_algebra's
    ``Perm.__mul__`` used by jopetty/word-problem); products componentwise.
    Computed once per group and cached; treat the returned table as read-only.
    """
    factors = _parse_group(name)
    per_factor = [_factor_elements(kind, k) for kind, k in factors]
    tables = [_factor_table(kind, k, els) for (kind, k), els in zip(factors, per_factor)]
    table = tables[0]
    for t in tables[1:]:  # (a1, a2) * (b1, b2) = (a1 b1, a2 b2), index = i1 * |G2| + i2
        g1, g2 = table.shape[0], t.shape[0]
        table = (table[:, None, :, None] * g2 + t[None, :, None, :]).reshape(g1 * g2, g1 * g2)
    elements = tuple(per_factor[0]) if len(factors) == 1 else tuple(itertools.product(*per_factor))
    return elements, table


class WordProblemParams(StateTrackingParams):
    group: str = Field("A5", description="Z<m>, S<n>, A<n> or a direct product such as A4xZ5 (order <= 1024)")

    @field_validator("group")
    @classmethod
    def _canonical_group(cls, value: str) -> str:
        factors = _parse_group(value)
        order = math.prod(_factor_order(kind, k) for kind, k in factors)
        if order > _MAX_GROUP_ORDER:
            raise ValueError(f"group {value!r} has order {order}; at most {_MAX_GROUP_ORDER} is supported")
        return "x".join(f"{kind}{k}" for kind, k in factors)


@register_task
class WordProblem(_StateTracking):
    name = "word_problem"
    Params = WordProblemParams
    description = ("Group elements g_1..g_T (token = index of the element, vocab = |G|; index 0 = identity); "
                   "target at t = index of g_1 g_2 ... g_t (new element multiplied on the right). "
                   "Groups: Z<m>, S<n>, A<n>, products (A4xZ5). Supervised at every position (final_only: the "
                   "last). Metric: token accuracy / exact match.")

    @property
    def elements(self) -> tuple:
        """Group element of each token index (see ``group_structure``)."""
        return group_structure(self.params.group)[0]

    @property
    def num_tokens(self) -> int:
        return len(self.elements)

    def prefix_states(self, inputs):
        """Inclusive scan with the Cayley table (Hillis-Steele: log2 T rounds of table lookups)."""
        table = group_structure(self.params.group)[1]
        order = table.shape[0]
        flat = table.reshape(-1)
        p, d = inputs.clone(), 1
        while d < p.shape[1]:
            # p[t] = (product of the window before) * p[t]: the earlier factor stays on the left
            p = torch.cat([p[:, :d], flat[p[:, :-d] * order + p[:, d:]]], dim=1)
            d *= 2
        return p
