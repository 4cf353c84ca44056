"""chain_addition: the layout is 'a + b = s [PAD..]' with '=' predicting Python's a + b; the
interpolation and extrapolation splits hold disjoint operations by their stated rules; the draws
are seeded; bad parameters fail clearly."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task


def tokens_of(base: int) -> tuple[int, int, int]:
    """PLUS, EQ, PAD written out from the documented layout (not imported)."""
    return 2 * base - 1, 2 * base, 2 * base + 1


def pairs_of(batch) -> set[tuple[int, int]]:
    return {(row[0], row[2]) for row in batch.inputs.tolist()}


@pytest.mark.parametrize("base", [3, 10, 16])
@pytest.mark.parametrize("seq_len", [5, 8, 32])
@pytest.mark.parametrize("split", ["train", "test"])
def test_layout_and_the_answer_is_pythons_sum(base, seq_len, split):
    task = get_task("chain_addition", base=base)
    plus, eq, pad = tokens_of(base)
    assert task.vocab_size == pad + 1 and task.min_seq_len() == 5
    batch = task.batch(200, seq_len, torch.Generator().manual_seed(0), split=split)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64 and batch.mask.dtype == torch.bool
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
        a, b = row[0], row[2]
        assert 0 <= a < base and 0 <= b < base
        assert row[1] == plus and row[3] == eq and row[4] == a + b  # teacher forced: the sum follows '='
        assert row[5:] == [pad] * (seq_len - 5)
        assert [i for i, m in enumerate(mask) if m] == [3]
        assert target[3] == a + b


def test_a_sequence_shorter_than_the_problem_is_an_error():
    with pytest.raises(ValueError, match="seq_len >= 5"):
        get_task("chain_addition").batch(4, 4, torch.Generator().manual_seed(0))


def test_interpolation_holds_out_a_scattered_eighth_of_the_pairs_and_only_new_combinations():
    task = get_task("chain_addition")
    train = {tuple(p) for p in task.operations("train").tolist()}
    test = {tuple(p) for p in task.operations("test").tolist()}
    assert not train & test and len(train | test) == 100 and len(test) == round(100 / 8)
    # every test addend value occurs in training, in either role: only the combination is unseen
    assert {a for a, _ in test} <= {a for a, _ in train} and {b for _, b in test} <= {b for _, b in train}
    assert len({b for _, b in test}) > 2  # scattered, not a band of large b
    # the held-out pairs are a property of the task, the same for every instance and seed
    assert {tuple(p) for p in get_task("chain_addition").operations("test").tolist()} == test
    drawn = task.batch(4000, 5, torch.Generator().manual_seed(1), split="test")
    assert pairs_of(drawn) == test  # every held-out pair is drawn, and only those
    assert pairs_of(task.batch(4000, 5, torch.Generator().manual_seed(2), split="train")) == train


@pytest.mark.parametrize("test_b_from, expected", [(None, 8), (3, 3), (9, 9)])
def test_extrapolation_tests_on_larger_second_addends(test_b_from, expected):
    args = {} if test_b_from is None else {"test_b_from": test_b_from}
    task = get_task("chain_addition", split="extrapolation", **args)
    train = task.batch(3000, 6, torch.Generator().manual_seed(0), split="train")
    test = task.batch(3000, 6, torch.Generator().manual_seed(0), split="test")
    assert max(b for _, b in pairs_of(train)) == expected - 1
    assert {b for _, b in pairs_of(test)} == set(range(expected, 10))
    assert pairs_of(train) == {(a, b) for a in range(10) for b in range(expected)}
    assert not pairs_of(train) & pairs_of(test)


@pytest.mark.parametrize("base, first_test_b", [(2, 1), (3, 2), (4, 3), (16, 12)])
def test_the_default_extrapolation_cut_leaves_both_splits_operations(base, first_test_b):
    task = get_task("chain_addition", base=base, split="extrapolation")
    assert task.operations("test")[:, 1].min() == first_test_b == task.operations("train")[:, 1].max() + 1


def test_draws_are_deterministic_given_the_generator():
    task = get_task("chain_addition")
    one = task.batch(64, 8, torch.Generator().manual_seed(7))
    two = task.batch(64, 8, torch.Generator().manual_seed(7))
    other = task.batch(64, 8, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    assert not torch.equal(one.inputs, other.inputs)


def test_answer_tokens_and_chance_cover_the_possible_sums():
    task = get_task("chain_addition", base=10)
    assert task.answer_tokens() == range(19) and task.chance(8) == pytest.approx(1 / 19)


def test_perfect_predictions_score_one_and_shifted_ones_zero():
    task = get_task("chain_addition")
    batch = task.batch(32, 8, torch.Generator().manual_seed(0))
    assert task.score_predictions(batch.targets, batch) == {"accuracy": 1.0, "exact_match": 1.0}
    assert task.score_predictions(batch.targets + 1, batch)["accuracy"] == 0.0


@pytest.mark.parametrize("params, match", [
    ({"base": 1}, "base"),
    ({"base": 65}, "base"),
    ({"split": "sideways"}, "split"),
    ({"test_b_from": 3}, "test_b_from"),                    # only with split=extrapolation
    ({"split": "extrapolation", "test_b_from": 10}, "test_b_from"),  # no training operation left
    ({"split": "extrapolation", "test_b_from": 0}, "test_b_from"),
    ({"digits": 2}, "digits"),
])
def test_bad_parameters_raise(params, match):
    with pytest.raises(ValueError, match=match):
        get_task("chain_addition", **params)


def test_bad_split_name_raises():
    with pytest.raises(ValueError, match="split"):
        get_task("chain_addition").batch(4, 8, torch.Generator().manual_seed(0), split="validation")
