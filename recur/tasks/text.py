"""Next-byte prediction on real text: the language-modelling task, offline (see ``recur.corpus``)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from recur.corpus import BOS, VOCAB_SIZE, decode, encode, load_corpus
from recur.tasks.base import Batch, Task, TaskParams, register_task


class TextParams(TaskParams):
    corpus: str = Field("code", min_length=1, description="'code' (the stdlib's .py files), 'prose' (pydoc's "
                                                         "help topics), or a path to a text file or folder")
    sha256: str | None = Field(None, description="expected sha256 of the corpus: a run pinned to one text fails "
                                                 "clearly where the text differs (another Python version)")


@register_task
class Text(Task):
    """Byte-level language modelling on a real corpus, packed documents with resets.

    A row is ``seq_len`` consecutive tokens of the split's stream (BOS doc BOS doc ..., bytes 0-255,
    BOS = 256) from a uniformly drawn offset; the target at every position is the next token (the
    byte after it, or the next document's BOS at a document's end) and every position is supervised.
    ``resets`` is True at each BOS, so a model's state starts afresh with every document (packed
    documents, as pretraining packs them). Documents are split 80/10/10 into train, validation and
    test by a hash of their names; a run's periodic evaluations read validation, its final one test.
    Metrics: bits per byte (the mean next-token cross-entropy in bits) and next-byte accuracy.
    """

    name = "text"
    Params = TextParams
    splits = ("train", "validation", "test")
    lower_is_better = ("bits_per_byte",)
    description = ("next-byte prediction on real text (corpus=code: the Python stdlib's source; prose: pydoc's help "
                   "topics; or a path), documents packed with BOS=256 and state resets; every position supervised. "
                   "Metrics: bits_per_byte, accuracy.")

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.corpus = load_corpus(self.params.corpus)
        if self.params.sha256 is not None and self.params.sha256 != self.corpus.sha256:
            raise ValueError(f"text corpus {self.params.corpus!r}: expected sha256 {self.params.sha256}, got "
                             f"{self.corpus.sha256} (the text differs: another Python version or other files)")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        stream = self.corpus.split(split).stream
        room = stream.numel() - seq_len  # offsets whose window and its next token fit
        if room < 1:
            raise ValueError(f"text corpus {self.params.corpus!r}: the {split} split has {stream.numel()} tokens, "
                             f"fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.randint(room, (n,), generator=generator)
        rows = stream[starts[:, None] + torch.arange(seq_len + 1)].to(torch.int64)
        inputs, targets = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        return Batch(inputs, targets, torch.ones_like(inputs, dtype=torch.bool), resets=inputs == BOS)

    def score_output(self, model, out, batch: Batch) -> dict[str, float]:
        """Bits per byte from the logits (the loss in bits) and the next-byte accuracy."""
        logits = model.supervised_logits(out, batch).float()
        targets = batch.targets[batch.mask]
        nats = F.cross_entropy(logits, targets)
        return {"bits_per_byte": float(nats) / math.log(2),
                "accuracy": float((logits.argmax(-1) == targets).float().mean())}

    def info(self) -> dict[str, Any]:
        return {"corpus": self.params.corpus, "corpus_sha256": self.corpus.sha256,
                "corpus_bytes": {s: split.n_bytes for s, split in self.corpus.splits.items()}}

    def encode(self, text: str) -> list[int]:
        return encode(text)

    def decode(self, tokens) -> str:
        return decode(tokens)
