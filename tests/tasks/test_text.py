"""The text task: windows of a split's stream, next-byte targets, resets at each document's BOS,
every position supervised, bits per byte = cross-entropy in bits, splits disjoint, a pinned sha256."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recur.corpus import BOS, VOCAB_SIZE, load_corpus
from recur.tasks import get_task
from recur.tasks.base import Batch


@pytest.fixture(scope="module")
def task():
    return get_task("text", corpus="prose")


def _find(stream: torch.Tensor, row: torch.Tensor) -> int:
    """The offset of ``row`` in ``stream`` (first occurrence)."""
    windows = stream.to(torch.int64).unfold(0, row.numel(), 1)
    hits = (windows == row).all(1).nonzero()
    assert hits.numel(), "the row is not a window of the split's stream"
    return int(hits[0])


def test_rows_are_windows_of_the_split_and_targets_the_next_token(task):
    batch = task.batch(8, 128, torch.Generator().manual_seed(1), split="validation")
    stream = task.corpus.split("validation").stream
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (8, 128)
    assert batch.inputs.dtype == torch.int64 and batch.mask.all()
    assert int(batch.inputs.max()) < VOCAB_SIZE and task.vocab_size == VOCAB_SIZE
    for x, y in zip(batch.inputs, batch.targets):
        start = _find(stream, x)
        assert torch.equal(y, stream[start + 1:start + 129].to(torch.int64))


def test_resets_mark_every_document_start(task):
    g = torch.Generator().manual_seed(0)
    batch = task.batch(64, 256, g)
    assert torch.equal(batch.resets, batch.inputs == BOS)
    assert batch.resets.any()  # documents begin inside windows: the model's state restarts there


def test_the_splits_are_disjoint_documents_and_the_same_seed_gives_the_same_batch(task):
    splits = task.corpus.splits
    names = [set(s.documents) for s in splits.values()]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    a = task.batch(4, 64, torch.Generator().manual_seed(5), split="test")
    b = task.batch(4, 64, torch.Generator().manual_seed(5), split="test")
    assert torch.equal(a.inputs, b.inputs)
    with pytest.raises(ValueError, match="split"):
        task.batch(4, 64, torch.Generator(), split="dev")
    assert task.splits == ("train", "validation", "test") and task.validation_split == "validation"


def test_bits_per_byte_is_the_cross_entropy_in_bits(task):
    class Uniform(torch.nn.Module):  # a model whose logits are given: only the scoring is under test
        def supervised_logits(self, out, batch: Batch):
            return out[batch.mask]

    batch = task.batch(4, 32, torch.Generator().manual_seed(2))
    uniform = torch.zeros(4, 32, VOCAB_SIZE)
    m = task.score_output(Uniform(), uniform, batch)
    assert m["bits_per_byte"] == pytest.approx(math.log2(VOCAB_SIZE), rel=1e-6)
    logits = torch.randn(4, 32, VOCAB_SIZE, generator=torch.Generator().manual_seed(3))
    m = task.score_output(Uniform(), logits, batch)
    nats = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch.targets.reshape(-1))
    assert m["bits_per_byte"] == pytest.approx(float(nats) / math.log(2), rel=1e-6)
    assert m["accuracy"] == pytest.approx(float((logits.argmax(-1) == batch.targets).float().mean()))
    perfect = F.one_hot(batch.targets, VOCAB_SIZE).float() * 50
    assert task.score_output(Uniform(), perfect, batch) == {"bits_per_byte": pytest.approx(0, abs=1e-6),
                                                             "accuracy": 1.0}
    assert task.lower_is_better == ("bits_per_byte",)


def test_info_records_the_corpus_hash_and_a_pinned_hash_must_match(task):
    info = task.info()
    assert info["corpus_sha256"] == load_corpus("prose").sha256 and info["corpus"] == "prose"
    assert set(info["corpus_bytes"]) == {"train", "validation", "test"}
    assert get_task("text", corpus="prose", sha256=info["corpus_sha256"]).corpus is task.corpus
    with pytest.raises(ValueError, match="expected sha256 0+, got"):
        get_task("text", corpus="prose", sha256="0" * 64)


def test_a_window_longer_than_a_split_is_refused(tmp_path):
    for i in range(40):
        (tmp_path / f"d{i}.txt").write_text("ab\n")
    small = get_task("text", corpus=str(tmp_path))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        small.batch(2, 4096, torch.Generator())


def test_encode_decode_round_trip(task):
    assert task.decode(task.encode("x = 1  # ü")) == "x = 1  # ü"
