"""Nested arithmetic expressions: the value of a fully parenthesised expression mod 10, a probe of
constituent structure (the task ReCAT-style recursive composition is built for; cf. ListOps,
Nangia & Bowman 2018, and the nested arithmetic of Hu et al., "Augmenting Transformers with
Recursively Composed Multi-grained Representations", 2024).

    [PAD ..] ( 3 + ( 4 * 5 ) ) =
                               ^ '=' (the last position) predicts (3 + 4 * 5) mod 10 = 3

Grammar: ``expr := digit | ( expr op expr )`` with op in {+, -, *}, digits 0-9; the answer is the
expression's integer value mod 10 (Python's ``%``, so a negative value still maps to 0-9). The
expression is right aligned (left-padded with PAD) so that '=' is the last token: a
sequence-level model reads the whole expression and nothing after it, and a causal LM predicts
the answer at '=' (the one supervised position of each row).

Size: an expression with m operators takes 4 m + 1 tokens, so m <= (seq_len - 2) // 4; its
nesting depth (the deepest parenthesis level) is at most ``max_depth``, so m <= 2^max_depth - 1.
Each row draws m uniformly from [1, that bound] and a binary tree of m operators uniformly over
the left/right operator counts that keep the depth bound, digits and operators uniformly.

Split: by a hash of the row (the expression), so a test expression never appears in training.
``train_max_depth`` adds a depth split: training expressions nest at most that deep, test
expressions deeper (up to ``max_depth``): generalisation to deeper structure.

Evaluation (``evaluate``) parses the tokens back by recursive descent and computes with Python's
own integer arithmetic; the tests check it against ``eval`` of the rendered string.

Tokens: digits 0-9, PLUS 10, MINUS 11, TIMES 12, LPAREN 13, RPAREN 14, EQ 15, PAD 16. Metric:
accuracy (= exact match: one answer per row). Chance 1/10 (the answer's distribution is not
uniform: products favour 0 and even digits; a majority guess scores more).
"""

from __future__ import annotations

import random

import torch
from pydantic import Field, model_validator

from recur.tasks.base import Batch, Task, TaskParams, register_task, row_rngs, sample_rows_of_split

PLUS, MINUS, TIMES, LPAREN, RPAREN, EQ, PAD = 10, 11, 12, 13, 14, 15, 16
OPS = {PLUS: "+", MINUS: "-", TIMES: "*"}
SYMBOLS = {**{d: str(d) for d in range(10)}, **OPS, LPAREN: "(", RPAREN: ")", EQ: "=", PAD: ""}
MAX_TREE_DRAWS = 1000  # rejection rounds for a tree deeper than train_max_depth (a test row)


class NestedExpressionsParams(TaskParams):
    max_depth: int = Field(4, ge=1, le=30, description="deepest parenthesis nesting of an expression")
    train_max_depth: int | None = Field(None, ge=1, description="depth split: training expressions nest at "
                                                                  "most this deep, test ones deeper (None: no depth split)")

    @model_validator(mode="after")
    def _depths(self):
        if self.train_max_depth is not None and self.train_max_depth >= self.max_depth:
            raise ValueError(f"train_max_depth must be < max_depth={self.max_depth} (test rows nest deeper), "
                             f"got {self.train_max_depth}")
        return self


def min_depth(ops: int) -> int:
    """The shallowest nesting of a tree with ``ops`` binary operators: ceil(log2(ops + 1))."""
    return (ops).bit_length()


def grow(ops: int, depth: int, rng: random.Random) -> list[int]:
    """Tokens of a random expression with ``ops`` operators nesting at most ``depth`` deep."""
    if ops == 0:
        return [rng.randrange(10)]
    # left operator counts whose subtrees both fit in depth - 1
    lefts = [a for a in range(ops) if min_depth(a) <= depth - 1 and min_depth(ops - 1 - a) <= depth - 1]
    a = rng.choice(lefts)
    return [LPAREN, *grow(a, depth - 1, rng), rng.choice(list(OPS)), *grow(ops - 1 - a, depth - 1, rng), RPAREN]


def depth_of(tokens: list[int]) -> int:
    """The deepest parenthesis nesting of an expression's tokens."""
    level = deepest = 0
    for t in tokens:
        level += (t == LPAREN) - (t == RPAREN)
        deepest = max(deepest, level)
    return deepest


def render(tokens: list[int]) -> str:
    """The expression as a Python arithmetic string (PAD dropped, '=' and after dropped)."""
    out = []
    for t in tokens:
        if t == EQ:
            break
        out.append(SYMBOLS[t])
    return " ".join(s for s in out if s)


def evaluate(tokens: list[int]) -> int:
    """The integer value of an expression's tokens (PAD ignored, read up to '='), by recursive
    descent and Python's integer arithmetic."""
    seq = [t for t in tokens if t != PAD]
    if EQ in seq:
        seq = seq[:seq.index(EQ)]
    pos = 0

    def take() -> int:
        nonlocal pos
        if pos >= len(seq):
            raise ValueError(f"malformed expression {render(tokens)!r}: it ends early")
        pos += 1
        return seq[pos - 1]

    def expr() -> int:
        t = take()
        if t < 10:
            return t
        if t != LPAREN:
            raise ValueError(f"malformed expression {render(tokens)!r}: expected a digit or '(' at {pos - 1}")
        left = expr()
        op = take()
        right = expr()
        if take() != RPAREN:
            raise ValueError(f"malformed expression {render(tokens)!r}: expected ')' at {pos - 1}")
        if op == PLUS:
            return left + right
        if op == MINUS:
            return left - right
        if op == TIMES:
            return left * right
        raise ValueError(f"malformed expression {render(tokens)!r}: expected an operator")

    value = expr()
    if pos != len(seq):
        raise ValueError(f"malformed expression {render(tokens)!r}: tokens left after position {pos}")
    return value


@register_task
class NestedExpressions(Task):
    """The value mod 10 of a nested arithmetic expression, predicted at '='."""

    name = "nested_expressions"
    Params = NestedExpressionsParams
    description = ("nested arithmetic: '[PAD..] ( a op ( b op c ) ) =', expr := digit | ( expr op expr ), op in "
                   "+ - *, nesting <= max_depth, up to (seq_len - 2) // 4 operators; the answer (value mod 10) is "
                   "supervised at '=' (the last position). Digits 0-9, + 10, - 11, * 12, ( 13, ) 14, = 15, PAD 16. "
                   "train_max_depth: test rows nest deeper than training ones. Metric: accuracy; chance 1/10.")

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    def min_seq_len(self) -> int:
        ops = 1 if self.params.train_max_depth is None else self.params.train_max_depth + 1
        return 4 * ops + 2  # the test split's shallowest expression (and '=') must fit

    def answer_tokens(self) -> range:
        return range(10)

    def max_ops(self, seq_len: int) -> int:
        return min((seq_len - 2) // 4, 2 ** self.params.max_depth - 1)

    def _expression(self, seq_len: int, rng: random.Random, split: str) -> list[int]:
        p = self.params
        hi = self.max_ops(seq_len)
        if p.train_max_depth is None or split == "train":
            depth = p.max_depth if p.train_max_depth is None else p.train_max_depth
            return grow(rng.randint(1, min(hi, 2 ** depth - 1)), depth, rng)
        for _ in range(MAX_TREE_DRAWS):  # a test row: deeper than training, by rejection
            expression = grow(rng.randint(p.train_max_depth + 1, hi), p.max_depth, rng)
            if depth_of(expression) > p.train_max_depth:
                return expression
        raise ValueError(f"could not draw an expression deeper than train_max_depth={p.train_max_depth} "
                         f"at seq_len={seq_len}")

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)

        def draw(m: int) -> torch.Tensor:
            rows = torch.full((m, seq_len), PAD, dtype=torch.int64)
            for r, rng in enumerate(row_rngs(m, generator)):
                e = self._expression(seq_len, rng, split) + [EQ]
                rows[r, seq_len - len(e):] = torch.tensor(e)
            return rows

        inputs = sample_rows_of_split(draw, n, split)
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, -1] = torch.tensor([evaluate(row) % 10 for row in inputs.tolist()], dtype=torch.int64)
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, -1] = True
        return Batch(inputs, targets, mask)
