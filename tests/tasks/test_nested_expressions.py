"""nested_expressions: Python's ``eval`` of the rendered string gives every answer; the layout
(right aligned, '=' last, one supervised position); the depth and length bounds; the hash split
and the depth split are disjoint; the draws are seeded; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task
from recur.tasks.nested_expressions import depth_of, evaluate

SYMBOL = {**{d: str(d) for d in range(10)}, 10: "+", 11: "-", 12: "*", 13: "(", 14: ")"}  # written out here
EQ, PAD = 15, 16


def expression(row: list[int]) -> list[int]:
    """The row's expression: after the left padding, before '='."""
    body = [t for t in row if t != PAD]
    assert body[-1] == EQ and EQ not in body[:-1]
    return body[:-1]


@pytest.mark.parametrize("max_depth,seq_len", [(1, 6), (3, 32), (5, 64)])
def test_python_eval_of_the_rendered_expression_gives_every_answer(max_depth, seq_len):
    task = get_task("nested_expressions", max_depth=max_depth)
    batch = task.batch(200, seq_len, torch.Generator().manual_seed(0), split="train")
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets, batch.mask):
        e = expression(row)
        text = " ".join(SYMBOL[t] for t in e)
        assert target[-1] == eval(text) % 10  # noqa: S307 - digits, + - * and parentheses only
        assert evaluate(row) == eval(text)  # noqa: S307
        assert mask.nonzero().flatten().tolist() == [seq_len - 1]
        assert row[seq_len - 1] == EQ and row[:seq_len - len(e) - 1] == [PAD] * (seq_len - len(e) - 1)
        assert 1 <= depth_of(e) <= max_depth and len(e) + 1 <= seq_len


def test_depths_reach_the_bound_and_answers_cover_the_digits():
    task = get_task("nested_expressions", max_depth=4)
    batch = task.batch(1000, 34, torch.Generator().manual_seed(1))  # up to 8 operators
    depths = {depth_of(expression(r)) for r in batch.inputs.tolist()}
    assert depths == {1, 2, 3, 4}
    assert set(batch.targets[:, -1].tolist()) == set(range(10))


def test_evaluate_rejects_malformed_expressions():
    with pytest.raises(ValueError, match="malformed"):
        evaluate([13, 1, 10, 2])  # no closing parenthesis
    with pytest.raises(ValueError, match="malformed"):
        evaluate([1, 2, EQ])  # tokens left over
    assert evaluate([PAD, 13, 3, 11, 13, 4, 12, 5, 14, 14, EQ]) == 3 - 4 * 5


def test_train_and_test_are_disjoint():
    task = get_task("nested_expressions", max_depth=3)
    g = torch.Generator().manual_seed(2)
    train = {tuple(r) for r in task.batch(2000, 18, g, split="train").inputs.tolist()}
    test = {tuple(r) for r in task.batch(300, 18, g, split="test").inputs.tolist()}
    assert train and test and not train & test


def test_the_depth_split_tests_deeper_than_it_trains():
    task = get_task("nested_expressions", max_depth=5, train_max_depth=2)
    g = torch.Generator().manual_seed(3)
    train = task.batch(300, 40, g, split="train").inputs.tolist()
    test = task.batch(300, 40, g, split="test").inputs.tolist()
    assert max(depth_of(expression(r)) for r in train) == 2
    assert min(depth_of(expression(r)) for r in test) == 3 and max(depth_of(expression(r)) for r in test) <= 5
    with pytest.raises(ValueError, match="seq_len >= 14"):
        task.batch(2, 13, g, split="test")


def test_draws_are_seeded():
    task = get_task("nested_expressions")
    a = task.batch(16, 32, torch.Generator().manual_seed(4))
    b = task.batch(16, 32, torch.Generator().manual_seed(4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_bad_parameters_and_lengths_are_clear_errors():
    with pytest.raises(ValueError, match="max_depth"):
        get_task("nested_expressions", max_depth=0)
    with pytest.raises(ValueError, match="train_max_depth"):
        get_task("nested_expressions", max_depth=3, train_max_depth=3)
    with pytest.raises(ValueError, match="needs seq_len >= 6"):
        get_task("nested_expressions").batch(2, 5, torch.Generator())
    task = get_task("nested_expressions")
    assert task.vocab_size == 17 and task.chance(32) == 0.1 and list(task.answer_tokens()) == list(range(10))
