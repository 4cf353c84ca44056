"""Set disjointness (Just Read Twice): [pad] 1 A 2 B 3 -> the token A and B share."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.tasks import get_task, split_of
from recur.tasks.base import distinct_rows

CONFIGS = [
    {},
    {"jrt": True},
    {"vocab_size": 64, "size_a": 16, "size_b": 4},
    {"vocab_size": 64, "size_a": 3, "size_b": 5, "jrt": True, "grow": "padding"},
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def parse(row: list[int], jrt: bool) -> tuple[list[int], list[int], int]:
    """Independent reading of one row: (A, B, number of padding tokens); checks the layout."""
    pad = 0
    while row[pad] == 0:
        pad += 1
    body = row[pad:]
    assert body[-1] == 3 and body[0] == 1
    context = body[:-1]
    if jrt:
        half = len(context) // 2
        assert len(context) % 2 == 0 and context[:half] == context[half:], "the context is not repeated"
        context = context[:half]
    sep = context.index(2)
    a, b = context[1:sep], context[sep + 1:]
    assert all(t >= 4 for t in a + b)
    return a, b, pad


def solve(row: list[int], jrt: bool) -> int:
    a, b, _ = parse(row, jrt)
    shared = set(a) & set(b)
    assert len(shared) == 1 and len(set(a)) == len(a), "sets must share exactly one token"
    assert len(set(b)) == len(b)
    return shared.pop()


@pytest.mark.parametrize("params", CONFIGS)
def test_same_seed_same_batch_other_seed_other_batch(params):
    task = get_task("set_disjointness", **params)
    a, b, c = (task.batch(8, task.min_seq_len() + 5, gen(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("params", CONFIGS)
def test_shapes_range_and_only_the_last_position_is_supervised(params):
    task = get_task("set_disjointness", **params)
    for split in ("train", "test"):
        for seq_len in (task.min_seq_len(), 3 * task.min_seq_len() + 1):
            inputs, targets, mask = task.batch(7, seq_len, gen(2), split)
            assert inputs.shape == targets.shape == mask.shape == (7, seq_len)
            assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
            assert int(inputs.max()) < task.vocab_size and int(targets.max()) < task.vocab_size
            assert int(inputs.min()) >= 0
            assert mask[:, -1].all() and not mask[:, :-1].any()
            assert (inputs[:, -1] == 3).all()


@pytest.mark.parametrize("params", CONFIGS)
def test_target_is_the_shared_token_of_an_independent_solver(params):
    task = get_task("set_disjointness", **params)
    jrt = params.get("jrt", False)
    for split in ("train", "test"):
        batch = task.batch(20, 2 * task.min_seq_len() + 3, gen(3), split)
        for row, target in zip(batch.inputs.tolist(), batch.targets[:, -1].tolist()):
            assert target == solve(row, jrt)


@settings(deadline=None, max_examples=20)
@given(size_a=st.integers(1, 12), size_b=st.integers(1, 12), jrt=st.booleans(),
       grow=st.sampled_from(["sets", "padding"]), extra=st.integers(0, 90), seed=st.integers(0, 2**31))
def test_layout_and_answer_at_random_sizes_and_lengths(size_a, size_b, jrt, grow, extra, seed):
    task = get_task("set_disjointness", vocab_size=128, size_a=size_a, size_b=size_b, jrt=jrt, grow=grow)
    seq_len = task.min_seq_len() + extra
    batch = task.batch(5, seq_len, gen(seed))
    want_a, want_b = task.set_sizes(seq_len)
    for row, target in zip(batch.inputs.tolist(), batch.targets[:, -1].tolist()):
        a, b, pad = parse(row, jrt)
        assert (len(a), len(b)) == (want_a, want_b)
        assert target == solve(row, jrt)
        if grow == "padding":
            assert (len(a), len(b)) == (size_a, size_b)
        else:  # sets grow by the largest integer factor that fits
            k = len(a) // size_a
            assert len(a) == k * size_a and len(b) == k * size_b
            bigger = (k + 1) * (size_a + size_b)
            assert (2 * (bigger + 2) + 1 if jrt else bigger + 3) > seq_len or bigger > 124


def test_sets_grow_as_in_the_paper_sizes():
    task = get_task("set_disjointness", size_a=4, size_b=16)
    assert task.min_seq_len() == 23
    assert task.set_sizes(23) == (4, 16) and task.set_sizes(42) == (4, 16) and task.set_sizes(43) == (8, 32)
    assert get_task("set_disjointness", grow="padding").set_sizes(1000) == (4, 16)
    assert get_task("set_disjointness", jrt=True).min_seq_len() == 2 * 22 + 1


def test_split_follows_the_sets_not_the_layout():
    # the same generator stream gives the same sets with and without jrt; the split agrees
    plain = get_task("set_disjointness", vocab_size=32, size_a=2, size_b=2, grow="padding")
    twice = get_task("set_disjointness", vocab_size=32, size_a=2, size_b=2, grow="padding", jrt=True)
    a = plain.batch(50, 20, gen(7), "test")
    b = twice.batch(50, 20, gen(7), "test")
    for ra, rb in zip(a.inputs.tolist(), b.inputs.tolist()):
        assert parse(ra, False)[:2] == parse(rb, True)[:2]


@pytest.mark.parametrize("params", [{"vocab_size": 12, "size_a": 2, "size_b": 2},
                                    {"vocab_size": 12, "size_a": 2, "size_b": 2, "jrt": True}])
def test_train_and_test_are_disjoint(params):
    # 8 set tokens, |A| = |B| = 2: 8*7*6*3 = 1008 distinct (A, B) contents
    task = get_task("set_disjointness", **params)
    jrt = params.get("jrt", False)
    train = task.batch(8000, task.min_seq_len(), gen(8), "train")
    test = task.batch(300, task.min_seq_len(), gen(9), "test")

    def contents(batch):
        return [tuple(a + b) for a, b, _ in (parse(r, jrt) for r in batch.inputs.tolist())]

    train_c, test_c = contents(train), contents(test)
    assert not split_of(torch.tensor(train_c)).any() and split_of(torch.tensor(test_c)).all()
    assert not set(train_c) & set(test_c)
    assert len(set(train_c)) > 700  # the train sample covers most of the train split


def test_distinct_rows_are_distinct_and_uniform():
    for k, high in [(3, 40), (30, 40)]:  # redraw path and permutation path
        rows = distinct_rows(20000, k, high, gen(10))
        assert all(len(set(r)) == k for r in rows.tolist())
        counts = collections.Counter(rows[:, -1].tolist())
        assert len(counts) == high and max(counts.values()) < 1.25 * 20000 / high


@pytest.mark.parametrize("params,match", [
    ({"bogus": 1}, "bogus"),
    ({"size_a": 0}, "size_a"),
    ({"vocab_size": 4}, "vocab_size"),
    ({"vocab_size": 16, "size_a": 8, "size_b": 8}, "do not fit"),
    ({"grow": "stretch"}, "grow"),
])
def test_bad_params_are_clear_value_errors(params, match):
    with pytest.raises(ValueError, match=match):
        get_task("set_disjointness", **params)


def test_too_short_seq_len_is_a_value_error():
    task = get_task("set_disjointness", jrt=True)
    with pytest.raises(ValueError, match="needs seq_len >= 45"):
        task.batch(2, 44, gen(0))
