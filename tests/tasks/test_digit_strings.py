"""digit_strings: the noise-free frames parse back (digit by digit, through the templates) into the
labels, durations and gaps the parameters allow, with a gap between equal digits; the noise is as
asked; the splits are disjoint; the draws are seeded; the scores (edit distance, exact match) are
right; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task
from recur.tasks.base import Batch
from recur.tasks.digit_strings import edit_distance, templates

FRAME, PAD = 0, 1  # written out here, not imported


def parse(features: torch.Tensor, inputs: torch.Tensor, frame_dim: int) -> tuple[list[int], list[int], list[int]]:
    """One noise-free row -> (digits, durations, gaps): every frame is a point of a digit's segment
    A_k -> B_k (its start where s = 0) or a background zero frame."""
    a, b = templates(frame_dim)
    n = int((inputs == FRAME).sum())
    digits, durations, gaps = [], [], [0]
    for x in features[:n]:
        if x.abs().max() < 1e-6:
            gaps[-1] += 1
            continue
        # x = (1 - s) a_k + s b_k: solve s per digit by least squares, keep the digit that fits
        d = b - a
        s = ((x - a) * d).sum(-1) / (d * d).sum(-1)
        fit = ((a + s[:, None] * d) - x).norm(dim=-1)
        k = int(fit.argmin())
        assert fit[k] < 1e-5 and -1e-5 <= s[k] <= 1 + 1e-5
        if s[k] < 1e-5:  # a digit starts, and after it the next gap
            digits.append(k)
            durations.append(1)
            gaps.append(0)
        else:  # the digit goes on: no background frame since its start
            assert digits and digits[-1] == k and gaps[-1] == 0
            durations[-1] += 1
    return digits, durations, gaps


def test_noise_free_frames_parse_back_into_the_labels_durations_and_gaps():
    task = get_task("digit_strings", noise_std=0.0, max_digits=4, min_frames=2, max_frames=4, max_gap=2, frame_dim=8)
    seq_len = task.min_seq_len() + 3
    assert task.min_seq_len() == 4 * 4 + 5 * 2
    batch = task.batch(200, seq_len, torch.Generator().manual_seed(0))
    seen_lengths, seen_durations, seen_gaps = set(), set(), set()
    for b in range(200):
        digits, durations, gaps = parse(batch.features[b], batch.inputs[b], 8)
        assert digits == batch.label_lists()[b]
        assert 1 <= len(digits) <= 4 and all(2 <= d <= 4 for d in durations) and all(0 <= g <= 2 for g in gaps)
        for i in range(1, len(digits)):
            if digits[i] == digits[i - 1]:
                assert gaps[i] >= 1  # equal neighbours are always separated
        n = sum(durations) + sum(gaps)
        assert batch.mask[b].nonzero().flatten().tolist() == list(range(n))
        assert (batch.inputs[b, :n] == FRAME).all() and (batch.inputs[b, n:] == PAD).all()
        assert (batch.features[b, n:] == 0).all() and (batch.targets[b] == 0).all()
        assert batch.labels[b, len(digits):].tolist() == [-1] * (4 - len(digits))
        seen_lengths.add(len(digits))
        seen_durations |= set(durations)
        seen_gaps |= set(gaps)
    assert seen_lengths == {1, 2, 3, 4} and seen_durations == {2, 3, 4} and seen_gaps == {0, 1, 2}


def test_one_frame_digits_without_gaps_still_separate_equal_neighbours():
    task = get_task("digit_strings", noise_std=0.0, max_digits=6, min_frames=1, max_frames=1, max_gap=0, frame_dim=4)
    assert task.min_seq_len() == 6 + 5
    batch = task.batch(300, task.min_seq_len(), torch.Generator().manual_seed(1))
    repeats = 0
    for b in range(300):
        digits, durations, gaps = parse(batch.features[b], batch.inputs[b], 4)
        assert digits == batch.label_lists()[b] and durations == [1] * len(digits)
        for i in range(1, len(digits)):
            assert gaps[i] == (1 if digits[i] == digits[i - 1] else 0)
            repeats += digits[i] == digits[i - 1]
    assert repeats > 0


def test_the_noise_has_the_asked_std_on_the_utterance_only():
    clean = get_task("digit_strings", noise_std=0.0)
    noisy = get_task("digit_strings", noise_std=0.5)
    a = clean.batch(256, 32, torch.Generator().manual_seed(3))
    b = noisy.batch(256, 32, torch.Generator().manual_seed(3))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.mask, b.mask)  # the noise is drawn after the content
    diff = (b.features - a.features)[a.mask]
    assert diff.std().item() == pytest.approx(0.5, rel=0.05) and diff.mean().abs() < 0.02
    assert (b.features[~a.mask] == 0).all()


def test_train_and_test_are_disjoint_in_string_and_timing_and_the_draws_are_seeded():
    task = get_task("digit_strings", noise_std=0.0, max_digits=3, max_gap=1)

    def contents(split: str, seed: int) -> set:
        batch = task.batch(400, 32, torch.Generator().manual_seed(seed), split=split)
        return {tuple(map(tuple, parse(batch.features[b], batch.inputs[b], 16))) for b in range(400)}

    train, test = contents("train", 0), contents("test", 1)
    assert train and test and not train & test
    x, y = (task.batch(8, 32, torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(x.features, y.features) and torch.equal(x.labels, y.labels)


class Decoder:
    """A stand-in model whose decode returns fixed label sequences."""

    def __init__(self, rows):
        self.rows = rows

    def decode(self, out, batch):
        return self.rows


def test_label_error_rate_is_the_total_edit_distance_over_the_total_length():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([], [4, 4]) == 2
    assert edit_distance([1, 3], [1, 2, 3]) == 1
    assert edit_distance([3, 2, 1], [1, 2, 3]) == 2
    assert edit_distance([5, 1, 2], [1, 2, 7, 7]) == 3
    task = get_task("digit_strings")
    x = torch.zeros(3, 4, dtype=torch.int64)
    batch = Batch(x, x, torch.ones(3, 4, dtype=torch.bool), labels=torch.tensor([[1, 2, 3], [4, 4, -1], [0, -1, -1]]))
    scores = task.score_output(Decoder([[1, 3], [4, 4], [0, 9]]), None, batch)
    assert scores["label_error_rate"] == pytest.approx((1 + 0 + 1) / 6)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert task.score_output(Decoder([[], [], []]), None, batch) == {"label_error_rate": 1.0, "exact_match": 0.0}
    assert task.score_output(Decoder(batch.label_lists()), None, batch) == {"label_error_rate": 0.0,
                                                                             "exact_match": 1.0}
    with pytest.raises(ValueError, match="decode"):
        task.score_output(object(), None, batch)
    with pytest.raises(ValueError, match="rows"):
        task.score_labels([[1]], batch)


def test_the_task_describes_itself_for_models_and_metrics():
    task = get_task("digit_strings", frame_dim=12)
    assert task.vocab_size == 2 and task.feature_dim == 12
    assert task.model_io() == {"feature_dim": 12, "n_labels": 10}
    assert "label_error_rate" in task.lower_is_better and len(task.answer_tokens()) == 0
    with pytest.raises(ValueError, match="label error rate"):
        task.chance(32)


def test_bad_input_fails_clearly():
    with pytest.raises(ValueError, match="min_frames"):
        get_task("digit_strings", min_frames=5, max_frames=3)
    with pytest.raises(ValueError, match="max_digits"):
        get_task("digit_strings", max_digits=0)
    task = get_task("digit_strings")
    with pytest.raises(ValueError, match=f"needs seq_len >= {task.min_seq_len()}"):
        task.batch(2, task.min_seq_len() - 1, torch.Generator())
    with pytest.raises(ValueError, match="split"):
        task.batch(2, 32, torch.Generator(), split="dev")
