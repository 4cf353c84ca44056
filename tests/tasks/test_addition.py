"""addition: Python's integer addition of the decoded operands gives every target, in both digit
orders; the carry chain 99..9 + 1 is right; the length sets the digits; the splits are disjoint;
the draws are seeded; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task

PLUS, EQ, PAD = 10, 11, 12  # written out here, not imported


def decode(row: list[int], reverse: bool) -> tuple[int, int, list[int], int]:
    """Plain Python: (a, b, the answer's digits as the model must write them, the position of '=')."""
    plus, eq = row.index(PLUS), row.index(EQ)
    a_digits, b_digits = row[:plus], row[plus + 1:eq]
    read = (lambda ds: int("".join(map(str, reversed(ds))))) if reverse else (lambda ds: int("".join(map(str, ds))))
    a, b = read(a_digits), read(b_digits)
    width = len(a_digits) + 1
    c = str(a + b).zfill(width)  # Python's addition, the answer zero-padded to D + 1 digits
    answer = [int(ch) for ch in (reversed(c) if reverse else c)]
    return a, b, answer, eq


@pytest.mark.parametrize("reverse", [True, False])
@pytest.mark.parametrize("seq_len", [18, 20, 64])
def test_integer_addition_of_the_decoded_operands_gives_the_targets(reverse, seq_len):
    task = get_task("addition", reverse=reverse)
    batch = task.batch(128, seq_len, torch.Generator().manual_seed(0), split="train")
    D = (seq_len - 3) // 3
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets, batch.mask):
        a, b, answer, eq = decode(row, reverse)
        assert eq == 2 * D + 1 and len(answer) == D + 1
        assert row[eq + 1:eq + 2 + D] == answer  # teacher forced: the answer follows '='
        assert row[eq + 2 + D:] == [PAD] * (seq_len - 3 * D - 3)
        assert mask.nonzero().flatten().tolist() == list(range(eq, eq + D + 1))
        assert target[mask].tolist() == answer


@pytest.mark.parametrize("reverse", [True, False])
def test_the_carry_chain_of_nines_plus_one_is_right(reverse):
    task = get_task("addition", reverse=reverse)
    D = 7
    a = torch.full((1, D), 9)
    b = torch.tensor([[1] + [0] * (D - 1)])  # least significant first
    row = task.problems(a, b)[0].tolist()
    a_, b_, answer, eq = decode(row, reverse)
    assert (a_, b_) == (10 ** D - 1, 1)
    c = row[eq + 1:]
    assert c == answer == ([0] * D + [1] if reverse else [1] + [0] * D)


def test_operands_are_uniform_digits_and_the_carry_digit_is_as_often_one_as_python_says():
    task = get_task("addition")
    batch = task.batch(4000, 12, torch.Generator().manual_seed(1))  # D = 3
    digits = batch.inputs[:, [0, 1, 2, 4, 5, 6]]
    counts = torch.bincount(digits.flatten(), minlength=10).float() / digits.numel()
    assert (counts - 0.1).abs().max() < 0.01
    carry_out = batch.inputs[:, 11].float().mean()  # P(a + b >= 1000) for a, b uniform in [0, 1000): 0.4995
    assert carry_out == pytest.approx(0.4995, abs=0.03)


def test_a_fixed_number_of_digits_pads_longer_sequences_and_rejects_shorter_ones():
    task = get_task("addition", digits=4)
    assert task.min_seq_len() == 15 and task.num_digits(40) == 4
    batch = task.batch(16, 40, torch.Generator().manual_seed(2))
    assert (batch.inputs[:, 4] == PLUS).all() and (batch.inputs[:, 9] == EQ).all() and (batch.inputs[:, 15:] == PAD).all()
    assert batch.mask.sum(1).tolist() == [5] * 16
    with pytest.raises(ValueError, match="needs seq_len >= 15"):
        task.batch(2, 14, torch.Generator())
    with pytest.raises(ValueError, match="needs seq_len >= 6"):
        get_task("addition").batch(2, 5, torch.Generator())
    with pytest.raises(ValueError, match="digits"):
        get_task("addition", digits=0)
    assert get_task("addition").chance(64) == 0.1 and get_task("addition").vocab_size == 13


def test_train_and_test_are_disjoint_and_the_test_split_is_an_eighth():
    task = get_task("addition")  # D = 1: 100 problems
    train = task.batch(1500, 6, torch.Generator().manual_seed(3), split="train").inputs
    test = task.batch(300, 6, torch.Generator().manual_seed(4), split="test").inputs
    seen_train, seen_test = set(map(tuple, train.tolist())), set(map(tuple, test.tolist()))
    assert not seen_train & seen_test and len(seen_train) + len(seen_test) == 100 and 5 <= len(seen_test) <= 22
    assert len(set(map(tuple, task.batch(64, 30, torch.Generator().manual_seed(5), "test").inputs.tolist()))) == 64


def test_batches_are_seeded():
    task = get_task("addition")
    a = task.batch(8, 30, torch.Generator().manual_seed(6))
    b = task.batch(8, 30, torch.Generator().manual_seed(6))
    c = task.batch(8, 30, torch.Generator().manual_seed(7))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and not torch.equal(a.inputs, c.inputs)
