"""sort: the layout 'POINT.. SEP picks' with the argsort as targets and each step fed the previous
pick's index and value; n fixed or derived from seq_len; the chance level; splits and seeds; errors."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task


@pytest.mark.parametrize("seq_len", [2, 9, 10, 31])
def test_targets_are_the_argsort_and_each_step_reads_the_previous_pick(seq_len):
    task = get_task("sort", max_points=16)
    b = task.batch(32, seq_len, torch.Generator().manual_seed(0))
    n = seq_len // 2
    assert task.n_points(seq_len) == n and b.inputs.shape == (32, seq_len) and b.features.shape == (32, seq_len, 1)
    x = b.features[:, :n, 0]
    assert ((x >= 0) & (x < 1)).all()
    assert (b.inputs[:, :n] == task.point_token).all() and (b.inputs[:, n] == task.separator).all()
    assert (b.mask.sum(1) == n).all() and b.mask[:, n:2 * n].all()
    order = b.targets[:, n:2 * n]
    for r in range(32):  # each target is the index of the next smallest value, by a Python sort
        assert order[r].tolist() == sorted(range(n), key=lambda i: x[r, i].item())
    # step k's input is the index picked at step k - 1 and its value; the SEP starts with no point
    assert torch.equal(b.inputs[:, n + 1:2 * n], order[:, :-1])
    assert torch.equal(b.features[:, n + 1:2 * n, 0], x.gather(1, order[:, :-1]))
    assert (b.features[:, n] == 0).all()
    assert (b.inputs[:, 2 * n:] == (order[:, -1:] if seq_len > 2 * n else order[:, :0])).all()  # the last pick, if room


def test_a_fixed_n_pads_longer_rows_and_its_chance_is_one_over_n():
    task = get_task("sort", n=5)
    b = task.batch(8, 20, torch.Generator().manual_seed(1))
    assert (b.mask.sum(1) == 5).all() and (b.inputs[:, 11:] == task.pad).all() and (b.features[:, 11:] == 0).all()
    assert task.min_seq_len() == 10 and task.answer_tokens() == range(5) and task.chance(20) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="seq_len >= 10"):
        task.batch(2, 9, torch.Generator().manual_seed(0))
    derived = get_task("sort")  # n from seq_len: the answers are any of the max_points indices
    assert derived.answer_tokens() == range(64) and derived.vocab_size == 67 and derived.model_io() == {
        "feature_dim": 1, "sep": 65}


def test_larger_lengths_ask_for_more_points_up_to_max_points():
    task = get_task("sort", max_points=8)
    assert [task.n_points(t) for t in (10, 11, 16)] == [5, 5, 8]
    with pytest.raises(ValueError, match="max_points=8"):
        task.batch(2, 18, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="max_points"):
        get_task("sort", max_points=1)
    with pytest.raises(ValueError, match="n"):
        get_task("sort", n=0)


def test_train_and_test_points_are_disjoint_and_batches_are_seeded():
    task = get_task("sort", n=3)
    train = task.batch(2000, 6, torch.Generator().manual_seed(0), split="train")
    test = task.batch(2000, 6, torch.Generator().manual_seed(0), split="test")

    def keys(b):
        return {tuple(r) for r in torch.round(b.features[:, :3, 0] * 1e4).long().tolist()}

    assert not keys(train) & keys(test)
    again = task.batch(2000, 6, torch.Generator().manual_seed(0), split="train")
    assert torch.equal(train.features, again.features) and torch.equal(train.inputs, again.inputs)
