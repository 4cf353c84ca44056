"""Sorting by pointing (Vinyals, Fortunato & Jaitly, "Pointer Networks", 2015): n reals drawn
uniformly from [0, 1), the answer their argsort (the indices of the inputs in increasing order),
and ``PointerTask``, the one-stream layout every pointer task shares (``convex_hull`` too).

The layout of a row, for n points and an answer of m indices o_1 .. o_m (each in [0, n)):

    position:  0 .. n-1    n      n+1   ..  n+m-1    n+m   ..
    token:     POINT ...   SEP    o_1   ..  o_{m-1}  o_m   PAD ..
    features:  p_0 .. p_n-1  0    p_o1  ..  p_o{m-1} p_om  0 ..
    target:    -           o_1    o_2   ..  o_m      -          (mask: the m decoder steps)

Each decoder step's input is the point picked at the step before (its index as the token, its
coordinates as the features: teacher forced), the SEP the first step's start; its target is the
index of the next point. The index tokens are ids 0 .. max_points-1, so a target is both an index
into the input and a token; the slot tokens POINT, SEP, PAD follow them.

``n``: fixed, or (the default, None) derived from seq_len (the largest n whose answer fits), so the
same task evaluated at a longer seq_len asks for more points: trained at one n, evaluated at larger
n. ``chance``: with n fixed, 1/n (a pointer guessing uniformly among the inputs); with n derived,
the answer tokens are all max_points indices and the chance is 1/max_points, that of a guess that
does not know n (``Task.chance``'s definition; the pointer's own chance at seq_len is 1/n).

Metrics: token accuracy, and exact match (the whole answer right: the sequence accuracy of greedy
decoding, see ``recur/models/pointer.py``).

Split: by a hash of the points rounded to 1e-4, so no test row's points are a training row's.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split


class PointerParams(TaskParams):
    n: int | None = Field(None, ge=1, le=1024, description="points per row; None: derived from seq_len")
    max_points: int = Field(64, ge=2, le=1024, description="index tokens (the largest n any length may ask for)")


class PointerTask(Task):
    """n points as features, SEP, then the answer's indices teacher forced (see the module docstring).
    A subclass gives the point dimension, the answer of each row and the longest answer for n."""

    Params = PointerParams
    point_dim: ClassVar[int] = 1
    min_points: ClassVar[int] = 1

    # -- the answer, per task ----------------------------------------------------------
    def answer(self, points: torch.Tensor) -> list[list[int]]:
        """The indices to output for each row of ``points`` [m, n, point_dim]."""
        raise NotImplementedError

    def max_answer(self, n: int) -> int:
        """The longest answer n points can have."""
        return n

    # -- the layout ----------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.params.max_points + 3

    @property
    def point_token(self) -> int:
        return self.params.max_points

    @property
    def separator(self) -> int:  # type: ignore[override]
        return self.params.max_points + 1

    @property
    def pad(self) -> int:
        return self.params.max_points + 2

    @property
    def feature_dim(self) -> int:  # type: ignore[override]
        return self.point_dim

    def n_points(self, seq_len: int) -> int:
        """The points of a row at ``seq_len``: the fixed n, or the largest whose answer fits."""
        if self.params.n is not None:
            return self.params.n
        n = self.min_points
        while n + 1 + self.max_answer(n + 1) <= seq_len:
            n += 1
        return n

    def min_seq_len(self) -> int:
        n = self.min_points if self.params.n is None else self.params.n
        return n + self.max_answer(n)

    def answer_tokens(self) -> range:
        return range(self.params.max_points if self.params.n is None else self.params.n)

    def check_points(self, n: int) -> None:
        if n < self.min_points:
            raise ValueError(f"task {self.name!r} needs n >= {self.min_points} points, got {n}")
        if n > self.params.max_points:
            raise ValueError(f"task {self.name!r}: {n} points need more index tokens than max_points="
                             f"{self.params.max_points}; raise max_points")

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        k = self.n_points(seq_len)
        self.check_points(k)
        d = self.point_dim

        def draw(m: int) -> torch.Tensor:
            return torch.rand(m, k * d, generator=generator)

        rows = sample_rows_of_split(draw, n, split, content=lambda r: torch.round(r * 1e4).to(torch.int64))
        points = rows.view(n, k, d)
        return self.layout(points, self.answer(points), seq_len)

    def layout(self, points: torch.Tensor, answers: list[list[int]], seq_len: int) -> Batch:
        """The batch of ``points`` [m, n, point_dim] and their answers (``answers[r]``, indices)."""
        m, k, d = points.shape
        inputs = torch.full((m, seq_len), self.pad, dtype=torch.int64)
        inputs[:, :k] = self.point_token
        inputs[:, k] = self.separator
        targets = torch.zeros(m, seq_len, dtype=torch.int64)
        mask = torch.zeros(m, seq_len, dtype=torch.bool)
        features = torch.zeros(m, seq_len, d)
        features[:, :k] = points
        for r, order in enumerate(answers):
            idx = torch.tensor(order, dtype=torch.int64)
            steps = len(order)
            if k + steps > seq_len:
                raise ValueError(f"an answer of {steps} steps after {k} points does not fit in seq_len={seq_len}")
            targets[r, k:k + steps] = idx
            mask[r, k:k + steps] = True
            fed = min(steps, seq_len - k - 1)  # o_1 .. o_fed are inputs (the last may fall off the end)
            inputs[r, k + 1:k + 1 + fed] = idx[:fed]
            features[r, k + 1:k + 1 + fed] = points[r, idx[:fed]]
        return Batch(inputs, targets, mask, features=features)


@register_task
class Sort(PointerTask):
    """n reals in [0, 1); output the indices in increasing order of value."""

    name = "sort"
    description = ("sorting by pointing (Vinyals et al. 2015): n reals in [0,1) as features at POINT slots, SEP, then "
                   "the argsort's indices teacher forced (each step fed the previous pick's index and value); "
                   "targets: the next index. n fixed or derived from seq_len (n = seq_len // 2). Metrics: accuracy, "
                   "exact_match (sequence accuracy).")
    point_dim = 1

    def answer(self, points: torch.Tensor) -> list[list[int]]:
        return points[..., 0].argsort(dim=1, stable=True).tolist()


__all__ = ["PointerParams", "PointerTask", "Sort"]
