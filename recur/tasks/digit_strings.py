"""Digit strings as noisy frame sequences: the generated stand-in for the handwritten digit strings
of the CTC literature (Graves et al. 2006, "Connectionist Temporal Classification"; "Handwritten
digit string recognition by combination of residual network and RNN-CTC"), where a string of
digits is read as a sequence of frames and no frame is labelled: a model learns the alignment.

Each row is one string of 1..``max_digits`` digits. Digit k spans a random number of frames in
[``min_frames``, ``max_frames``]; a digit is a stroke, not a constant: frame j of a d-frame digit is
the interpolation (1 - s) A_k + s B_k, s = j / (d - 1), between two fixed random unit templates of
the digit (``frame_dim`` reals each, the same for every seed), plus N(0, ``noise_std``^2) noise per
coordinate. Gaps of 0..``max_gap`` background frames (noise around 0) lie before, between and after
the digits, and at least one between two equal digits, so repeated digits stay separable (as pen
lifts separate them in handwriting).

Layout (F = ``frame_dim``):

    tokens:    FRAME FRAME ... FRAME  PAD ...     FRAME = 0, PAD = 1 (slots only: the data are the features)
    features:  x_1   x_2   ... x_L    0 ...       float [n, seq_len, F]
    mask:      True  ...       True   False ...   the utterance's frames (what CTC and the transducer read)
    labels:    the digit string, int64 [n, max_digits] padded with -1 (``batch.labels``)

``targets`` are zero and unused: nothing is labelled per frame. A row needs seq_len >=
``min_seq_len()`` = max_digits * max_frames + (max_digits + 1) * max_gap frames (plus one per
forced gap, at most max_digits - 1, when max_gap is 0); a longer seq_len pads on the right.

Metrics, from ``model.decode(out, batch)`` (each row's decoded label sequence): ``label_error_rate``,
the total edit distance to the true strings over their total length (Graves et al.'s LER; lower is
better; decoding nothing scores 1) and ``exact_match``, the share of strings decoded exactly.

Split: by a hash of the string, its durations and its gaps: a test row's (string, timing) never
occurs in training; the noise is drawn afterwards.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from pydantic import Field, model_validator

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

FRAME, PAD = 0, 1
N_DIGITS = 10
TEMPLATE_SEED = 18  # the digits' templates are part of the task, not of a run's seed


class DigitStringsParams(TaskParams):
    max_digits: int = Field(5, ge=1, le=32, description="longest string (strings have 1..max_digits digits)")
    min_frames: int = Field(2, ge=1, le=64, description="fewest frames a digit spans")
    max_frames: int = Field(4, ge=1, le=64, description="most frames a digit spans")
    max_gap: int = Field(2, ge=0, le=16, description="most background frames in a gap (before, between, after digits)")
    frame_dim: int = Field(16, ge=2, le=256, description="F, the reals per frame")
    noise_std: float = Field(0.3, ge=0.0, description="std of the Gaussian noise on every frame coordinate")

    @model_validator(mode="after")
    def _frames(self):
        if self.min_frames > self.max_frames:
            raise ValueError(f"min_frames ({self.min_frames}) must be <= max_frames ({self.max_frames})")
        return self


@lru_cache(maxsize=16)
def templates(frame_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The start and end templates of each digit, float [10, F] each, unit vectors from a fixed seed."""
    gen = torch.Generator().manual_seed(TEMPLATE_SEED)
    a, b = torch.randn(2, N_DIGITS, frame_dim, generator=gen)
    return a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)


def edit_distance(a: list[int], b: list[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


@register_task
class DigitStrings(Task):
    """A digit string rendered as noisy frames of random durations; decode the string (CTC, transducer)."""

    name = "digit_strings"
    Params = DigitStringsParams
    description = ("digit strings (1..max_digits digits) as noisy real-valued frames (features [F]), each digit a "
                   "stroke of min_frames..max_frames frames, gaps of 0..max_gap background frames (>= 1 between "
                   "equal digits); tokens FRAME=0 PAD=1, mask: the utterance's frames, labels: the string (padded "
                   "-1). Metrics from model.decode: label_error_rate (edit distance / length), exact_match.")
    lower_is_better = ("label_error_rate",)

    @property
    def vocab_size(self) -> int:
        return 2

    @property
    def feature_dim(self) -> int:  # type: ignore[override]
        return self.params.frame_dim

    n_labels = N_DIGITS

    def model_io(self) -> dict[str, int]:
        # the size of the label alphabet: the output layer of a CTC or transducer model
        return {**super().model_io(), "n_labels": self.n_labels}

    def min_seq_len(self) -> int:
        p = self.params
        forced = (p.max_digits - 1) if p.max_gap == 0 else 0  # the gaps between equal digits
        return p.max_digits * p.max_frames + (p.max_digits + 1) * p.max_gap + forced

    def answer_tokens(self) -> range:
        return range(0)  # no frame has a target token: the answer is a label sequence (batch.labels)

    def chance(self, seq_len: int | None = None) -> float:
        raise ValueError("digit_strings is scored by label error rate over decoded label sequences: it has no "
                         "per-position chance accuracy (decoding nothing scores a label error rate of 1)")

    def training_accuracy(self, model, out, batch: Batch) -> float:
        # no per-frame answers; decoding each training step would cost more than the step (the
        # transducer decodes frame by frame), so the Trainer's accuracy is NaN, as for regression
        return float("nan")

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        p = self.params
        D = p.max_digits

        def draw(m: int) -> torch.Tensor:
            # one row per string: its length, digits, durations and gaps, zeroed past the length so the
            # row is exactly the defining content the split hashes
            length = torch.randint(1, D + 1, (m, 1), generator=generator)
            digits = torch.randint(N_DIGITS, (m, D), generator=generator)
            frames = torch.randint(p.min_frames, p.max_frames + 1, (m, D), generator=generator)
            gaps = torch.randint(0, p.max_gap + 1, (m, D + 1), generator=generator)
            k = torch.arange(D)[None]
            digits = torch.where(k < length, digits, -1)
            frames = torch.where(k < length, frames, 0)
            same = torch.zeros(m, D + 1, dtype=torch.bool)
            same[:, 1:D] = (digits[:, 1:] == digits[:, :-1]) & (k[:, 1:] < length)
            gaps = torch.where(same, gaps.clamp(min=1), gaps)
            gaps = torch.where(torch.arange(D + 1)[None] <= length, gaps, 0)
            return torch.cat([length, digits, frames, gaps], dim=1)

        rows = sample_rows_of_split(draw, n, split)
        lengths, digits = rows[:, 0], rows[:, 1:1 + D]
        frames, gaps = rows[:, 1 + D:1 + 2 * D], rows[:, 1 + 2 * D:]
        a, b = templates(p.frame_dim)
        features = torch.zeros(n, seq_len, p.frame_dim)
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        for r in range(n):  # rows are short (<= ~40 frames): laid out in Python, the noise added at once
            t = int(gaps[r, 0])
            for k in range(int(lengths[r])):
                d, digit = int(frames[r, k]), int(digits[r, k])
                s = torch.linspace(0, 1, d)[:, None] if d > 1 else torch.zeros(1, 1)
                features[r, t:t + d] = (1 - s) * a[digit] + s * b[digit]
                t += d + int(gaps[r, k + 1])
            mask[r, :t] = True
        noise = torch.randn(n, seq_len, p.frame_dim, generator=generator) * p.noise_std
        features = torch.where(mask[..., None], features + noise, 0.0)
        inputs = torch.where(mask, FRAME, PAD)
        return Batch(inputs, torch.zeros(n, seq_len, dtype=torch.int64), mask, features=features,
                     labels=digits.clone())

    # -- scores -------------------------------------------------------------------------
    def score_output(self, model, out, batch: Batch) -> dict[str, float]:
        if not hasattr(model, "decode"):
            raise ValueError(f"digit_strings is scored from decoded label sequences: model {type(model).__name__} "
                             "has no decode(out, batch) (use the ctc or transducer architecture)")
        return self.score_labels(model.decode(out, batch), batch)

    def score_labels(self, decoded: list[list[int]], batch: Batch) -> dict[str, float]:
        """The metrics of decoded label sequences, one list per row."""
        truth = batch.label_lists()
        if len(decoded) != len(truth):
            raise ValueError(f"decoded {len(decoded)} rows for a batch of {len(truth)}")
        edits = sum(edit_distance(list(h), z) for h, z in zip(decoded, truth))
        total = sum(len(z) for z in truth)
        exact = sum(list(h) == z for h, z in zip(decoded, truth))
        return {"label_error_rate": edits / max(1, total), "exact_match": exact / len(truth)}
