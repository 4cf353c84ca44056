"""Copying (delay then reproduce) and selective copying (data among noise, one marker per output)."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.tasks import get_task, split_of

CONFIGS = [
    ("copy", {}),
    ("copy", {"vocab_size": 6, "copy_len": 5}),
    ("selective_copy", {}),
    ("selective_copy", {"vocab_size": 40, "num_tokens": 3}),
]
IDS = [f"{name}-{kw}" for name, kw in CONFIGS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def span_len(name: str, params: dict) -> int:
    return params.get("copy_len" if name == "copy" else "num_tokens", 16)


# -- independent solvers: plain Python, from the inputs alone -----------------------------------

def solve_copy(row: list[int], n: int) -> dict[int, int]:
    """{position: target}: the span before the blanks comes back after the delimiter."""
    data = row[:n]
    assert all(x >= 2 for x in data)
    delim = len(row) - n - 1
    assert row[delim] == 1 and all(x == 0 for i, x in enumerate(row[n:]) if n + i != delim)
    return {delim + 1 + j: x for j, x in enumerate(data)}


def solve_selective(row: list[int], n: int) -> dict[int, int]:
    markers = [t for t, x in enumerate(row) if x == 1]
    assert markers == list(range(len(row) - n, len(row))), "n markers close the sequence"
    data = [x for x in row[:len(row) - n] if x != 0]
    assert len(data) == n and all(x >= 2 for x in data)
    return dict(zip(markers, data))


def solve(name: str, row: list[int], n: int) -> dict[int, int]:
    return solve_copy(row, n) if name == "copy" else solve_selective(row, n)


def lengths(task) -> list[int]:
    m = task.min_seq_len()
    return [m, m + 1, 3 * m + 5]


# -- the contract -------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_same_seed_same_batch_other_seed_other_batch(name, params):
    task = get_task(name, **params)
    seq_len = task.min_seq_len() + 10
    a, b, c = (task.batch(8, seq_len, gen(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_shapes_range_and_mask_on_the_last_n_positions(name, params):
    task = get_task(name, **params)
    n = span_len(name, params)
    for split in ("train", "test"):
        for seq_len in lengths(task):
            inputs, targets, mask = task.batch(6, seq_len, gen(2), split)
            assert inputs.shape == targets.shape == mask.shape == (6, seq_len)
            assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
            for t in (inputs, targets):
                assert 0 <= int(t.min()) and int(t.max()) < task.vocab_size
            assert mask[:, -n:].all() and not mask[:, :-n].any()


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_every_supervised_target_matches_an_independent_solver(name, params):
    task = get_task(name, **params)
    n = span_len(name, params)
    for split in ("train", "test"):
        for seq_len in lengths(task):
            batch = task.batch(10, seq_len, gen(3), split)
            for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
                answers = solve(name, row, n)
                assert sorted(answers) == [t for t in range(seq_len) if mask[t]]
                assert all(target[t] == want for t, want in answers.items())


@settings(deadline=None, max_examples=20)
@given(name=st.sampled_from(["copy", "selective_copy"]), n=st.integers(3, 20), extra=st.integers(0, 100),
       seed=st.integers(0, 2**31))
def test_random_sizes_and_lengths(name, n, extra, seed):
    key = "copy_len" if name == "copy" else "num_tokens"
    task = get_task(name, **{key: n})
    seq_len = task.min_seq_len() + extra
    batch = task.batch(4, seq_len, gen(seed))
    for row, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        assert all(target[t] == want for t, want in solve(name, row, n).items())
    if name == "copy":  # a longer sequence is a longer delay: extra blanks between span and delimiter
        assert (batch.inputs[:, n:n + extra] == 0).all()


@pytest.mark.parametrize("name,params", [("copy", {"vocab_size": 6, "copy_len": 5}),
                                         ("selective_copy", {"vocab_size": 6, "num_tokens": 5})])
def test_train_and_test_spans_are_disjoint(name, params):
    task = get_task(name, **params)  # 4^5 = 1024 spans
    seq_len = task.min_seq_len() + 3
    train = task.batch(6000, seq_len, gen(4), "train")
    test = task.batch(300, seq_len, gen(5), "test")

    def spans(batch):
        return [tuple(t[-5:]) for t in batch.targets.tolist()]

    train_s, test_s = spans(train), spans(test)
    assert not split_of(torch.tensor(train_s)).any() and split_of(torch.tensor(test_s)).all()
    assert not set(train_s) & set(test_s)
    assert len(set(train_s)) > 700  # the sample covers most of the train split


def test_selective_copy_positions_are_uniform():
    task = get_task("selective_copy", num_tokens=4)
    inputs = task.batch(3000, 24, gen(6)).inputs[:, :20]
    counts = collections.Counter((inputs != 0).nonzero()[:, 1].tolist())
    expected = 3000 * 4 / 20
    assert len(counts) == 20 and all(abs(c - expected) < 0.15 * expected for c in counts.values())


@pytest.mark.parametrize("name,params,match", [
    ("copy", {"bogus": 1}, "bogus"),
    ("copy", {"copy_len": 0}, "copy_len"),
    ("copy", {"vocab_size": 4, "copy_len": 7}, "too few"),
    ("selective_copy", {"vocab_size": 2}, "vocab_size"),
    ("selective_copy", {"num_tokens": 1}, "too few"),
])
def test_bad_params_are_clear_value_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_task(name, **params)


@pytest.mark.parametrize("name,shortest", [("copy", 33), ("selective_copy", 32)])
def test_too_short_seq_len_is_a_value_error(name, shortest):
    task = get_task(name)
    assert task.min_seq_len() == shortest
    with pytest.raises(ValueError, match=f"needs seq_len >= {shortest}"):
        task.batch(2, shortest - 1, gen(0))
    with pytest.raises(ValueError, match="split"):
        task.batch(2, shortest, gen(0), split="dev")
