"""Passkey retrieval: a D-digit key at one of `depths` depths of repeating filler."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.tasks import get_task, split_of

CONFIGS = [{}, {"digits": 3, "depths": 4, "filler_period": 3}, {"depths": 1}, {"digits": 8, "filler_period": 50}]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def parse(row: list[int], digits: int, period: int) -> tuple[list[int], int]:
    """Independent reading of one row: (the key's digits, filler tokens before the key)."""
    start = row.index(1)
    query = len(row) - digits
    assert row[query] == 2 and row.count(1) == 1 and row.count(2) == 1
    key = [x - 3 for x in row[start + 1:start + 1 + digits]]
    assert all(0 <= k <= 9 for k in key)
    filler = row[:start] + row[start + 1 + digits:query]
    assert filler == [13 + i % period for i in range(len(filler))], "filler is one unbroken cycle"
    assert [x - 3 for x in row[query + 1:]] == key[:-1], "the answer so far is given after the query"
    return key, start


def solve(row: list[int], digits: int, period: int) -> dict[int, int]:
    key, _ = parse(row, digits, period)
    return {len(row) - digits + j: 3 + k for j, k in enumerate(key)}


@pytest.mark.parametrize("params", CONFIGS)
def test_same_seed_same_batch_other_seed_other_batch(params):
    task = get_task("passkey", **params)
    a, b, c = (task.batch(8, task.min_seq_len() + 20, gen(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("params", CONFIGS)
def test_shapes_range_mask_and_independent_solver(params):
    task = get_task("passkey", **params)
    digits, period = params.get("digits", 5), params.get("filler_period", 8)
    m = task.min_seq_len()
    for split in ("train", "test"):
        for seq_len in (m, m + 1, 4 * m + 3):
            inputs, targets, mask = task.batch(10, seq_len, gen(2), split)
            assert inputs.shape == targets.shape == mask.shape == (10, seq_len)
            assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
            for t in (inputs, targets):
                assert 0 <= int(t.min()) and int(t.max()) < task.vocab_size == 13 + period
            assert mask[:, -digits:].all() and not mask[:, :-digits].any()
            for row, target in zip(inputs.tolist(), targets.tolist()):
                assert all(target[t] == want for t, want in solve(row, digits, period).items())


@settings(deadline=None, max_examples=20)
@given(digits=st.integers(3, 9), depths=st.integers(1, 12), period=st.integers(1, 20),
       extra=st.integers(0, 200), seed=st.integers(0, 2**31))
def test_key_sits_at_an_evenly_spaced_depth(digits, depths, period, extra, seed):
    task = get_task("passkey", digits=digits, depths=depths, filler_period=period)
    seq_len = task.min_seq_len() + extra
    hay = seq_len - 2 * digits - 1
    allowed = {0} if depths == 1 else {int(b * hay / (depths - 1) + 0.5) for b in range(depths)}
    batch = task.batch(6, seq_len, gen(seed))
    for row, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        assert parse(row, digits, period)[1] in allowed
        assert all(target[t] == want for t, want in solve(row, digits, period).items())


def test_every_depth_bin_is_used_and_ends_are_included():
    task = get_task("passkey")
    seq_len = 200
    hay = seq_len - 11
    starts = collections.Counter(parse(r, 5, 8)[1] for r in task.batch(2000, seq_len, gen(3)).inputs.tolist())
    assert set(starts) == {round(b * hay / 9) for b in range(10)}
    assert 0 in starts and hay in starts  # the first and the deepest position
    assert min(starts.values()) > 140  # uniform: 200 each on average


def test_longer_sequences_add_filler_only():
    task = get_task("passkey")
    short, long = task.batch(5, 40, gen(4)).inputs, task.batch(5, 400, gen(4)).inputs
    for a, b in zip(short.tolist(), long.tolist()):  # same generator stream: same key, more filler
        assert parse(a, 5, 8)[0] == parse(b, 5, 8)[0]
        assert sum(x >= 13 for x in b) - sum(x >= 13 for x in a) == 360


def test_train_and_test_keys_are_disjoint():
    task = get_task("passkey", digits=3)  # 1000 keys
    train = task.batch(6000, 30, gen(5), "train")
    test = task.batch(300, 30, gen(6), "test")

    def keys(batch):
        return [tuple(parse(r, 3, 8)[0]) for r in batch.inputs.tolist()]

    train_k, test_k = keys(train), keys(test)
    assert not split_of(torch.tensor(train_k)).any() and split_of(torch.tensor(test_k)).all()
    assert not set(train_k) & set(test_k)
    assert len(set(train_k)) > 700


@pytest.mark.parametrize("params,match", [
    ({"bogus": 1}, "bogus"),
    ({"digits": 2}, "digits"),
    ({"depths": 0}, "depths"),
    ({"filler_period": 0}, "filler_period"),
])
def test_bad_params_are_clear_value_errors(params, match):
    with pytest.raises(ValueError, match=match):
        get_task("passkey", **params)


def test_too_short_seq_len_is_a_value_error():
    task = get_task("passkey")
    assert task.min_seq_len() == 2 * 5 + 1 + 9
    with pytest.raises(ValueError, match="needs seq_len >= 20"):
        task.batch(2, 19, gen(0))
    with pytest.raises(ValueError, match="split"):
        task.batch(2, 20, gen(0), split="val")
