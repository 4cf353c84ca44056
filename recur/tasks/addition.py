"""Multi-digit addition as a causal LM task: ``a + b = c`` in base 10, the answer teacher forced,
a probe of length generalisation in arithmetic and of depth recurrence (the CPU experiment
suggested for Huginn, Geiping et al., "Scaling up Test-Time Compute with Latent Reasoning", 2025;
the reversed layout of Lee et al., "Teaching Arithmetic to Small Transformers", 2023, and McLeish
et al., "Transformers Can Do Arithmetic with the Right Embeddings", 2024).

    a_0 .. a_{D-1} + b_0 .. b_{D-1} = c_0 .. c_D [PAD ..]
                                    ^ '=' and c_0 .. c_{D-1} predict c_0 .. c_D (teacher forced)

Tokens: digits 0-9, PLUS 10, EQ 11, PAD 12. Both operands have exactly D digits (zero-padded: a
and b uniform in [0, 10^D)) and the answer D + 1 (its top digit is the carry out, 0 or 1). With
``reverse`` (the default) every number is written least significant digit first, so each answer
digit depends only on the digits already seen and one carry: a left-to-right model can add
digit by digit (McLeish et al. 2024 reverse operands and answer; Lee et al. 2023 reverse the
answer). ``reverse=false`` writes them most significant digit first, the school layout, in which
the first answer digit already depends on the whole carry chain.

Length: D = (seq_len - 3) // 3 digits per operand (the problem takes 3 D + 3 tokens); a length
that is not 3 (D + 1) is padded on the right with PAD, never supervised. Evaluation at a longer
seq_len is therefore addition of longer numbers (length generalisation). ``digits`` fixes D
instead: then seq_len must be at least 3 D + 3 (shorter is an error) and the rest is PAD.

Supervised: the D + 1 positions whose next token is an answer digit ('=' and the first D answer
digits). Metrics: accuracy (per answer digit) and exact match (the whole sum right). Chance: 1/10.
Split: by a hash of the operands' digits (a, b), so a test problem never appears in training
(at the same D; the same values at another width are another sequence).
"""

from __future__ import annotations

import torch
from pydantic import Field

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

PLUS, EQ, PAD = 10, 11, 12


class AdditionParams(TaskParams):
    digits: int | None = Field(None, ge=1, le=1000, description="D digits per operand; default "
                                                                "(seq_len - 3) // 3, so longer sequences add longer numbers")
    reverse: bool = Field(True, description="write operands and answer least significant digit first "
                                            "(false: most significant first)")


def add_digits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Digit-wise sum with carries: a, b int64 [m, D] least significant first -> [m, D + 1]."""
    m, D = a.shape
    out = torch.zeros(m, D + 1, dtype=torch.int64)
    carry = torch.zeros(m, dtype=torch.int64)
    for j in range(D):
        s = a[:, j] + b[:, j] + carry
        out[:, j], carry = s % 10, s // 10
    out[:, D] = carry
    return out


@register_task
class Addition(Task):
    """a + b = c in base 10 with D-digit operands, the answer teacher forced."""

    name = "addition"
    Params = AdditionParams
    description = ("a + b = c: 'a_0..a_{D-1} + b_0..b_{D-1} = c_0..c_D [PAD..]', digits 0-9, PLUS 10, EQ 11, PAD 12; "
                   "D = (seq_len - 3) // 3 digits per operand (or digits=D, the rest PAD), answer D + 1 digits; "
                   "reverse=true (default): every number least significant digit first. Supervised: the answer "
                   "digits (teacher forced). Metric: accuracy / exact match; chance 1/10.")

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    def num_digits(self, seq_len: int) -> int:
        """D at ``seq_len``."""
        return self.params.digits or (seq_len - 3) // 3

    def min_seq_len(self) -> int:
        return 3 * (self.params.digits or 1) + 3

    def answer_tokens(self) -> range:
        return range(10)

    def problems(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The token rows of the problems with operand digits a, b (int64 [m, D], least significant
        first): int64 [m, 3 D + 3]."""
        m = a.shape[0]
        c = add_digits(a, b)
        if not self.params.reverse:
            a, b, c = a.flip(1), b.flip(1), c.flip(1)
        col = lambda token: torch.full((m, 1), token, dtype=torch.int64)  # noqa: E731
        return torch.cat([a, col(PLUS), b, col(EQ), c], dim=1)

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        D = self.num_digits(seq_len)
        # the content: the operands' digits, least significant first (a uniform in [0, 10^D), and b)
        rows = sample_rows_of_split(lambda m: torch.randint(10, (m, 2 * D), generator=generator), n, split)
        seq = self.problems(rows[:, :D], rows[:, D:])
        inputs = torch.full((n, seq_len), PAD, dtype=torch.int64)
        inputs[:, :seq.shape[1]] = seq
        first = 2 * D + 1  # the EQ position: it and the next D predict the D + 1 answer digits
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        targets[:, first:first + D + 1] = seq[:, first + 1:]
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        mask[:, first:first + D + 1] = True
        return Batch(inputs, targets, mask)
