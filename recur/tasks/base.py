"""The task contract (docs/design.md section 6) and the task registry.

    task = recur.tasks.get_task("mqar", num_kv_pairs=8)
    inputs, targets, mask = task.batch(n, seq_len, generator, split="train")
    scores = task.score(logits, batch)      # {"accuracy": ..., "exact_match": ...}
    scores = task.score_predictions(pred, batch)   # the same from argmax predictions [n, seq_len]
    task.chance(seq_len)                    # the accuracy of guessing uniformly among the answer tokens

* ``inputs``, ``targets``: int64 [n, seq_len]; ``mask``: bool [n, seq_len], True where the
  position is supervised (the loss and the metrics use only those positions).
* Real-valued data (in-context regression, points, strokes): a task with ``feature_dim = F > 0``
  gives ``batch.features`` float [n, seq_len, F], read by the model next to the tokens (added to
  their embedding); one with ``target_dim = k > 0`` supervises ``batch.values`` float [n, seq_len, k]
  (the model's head then outputs k reals per position and its loss is the squared error; ``targets``
  is unused and zero). ``task.model_io()`` is what the model is built with.
* Label sequences (CTC, the transducer): ``batch.labels`` int64 [n, L], each row's label sequence
  padded with -1, its own length independent of the input's (a loss over alignments reads it, not
  ``targets``); per row, so ``window`` keeps it whole.
* Transduction tasks lay out ``source SEP target`` in one stream, the target teacher forced and
  supervised (as ``grid_batch``): an encoder-decoder reads the source up to SEP, then decodes.
  Exact match under teacher forcing is the exact match of greedy decoding (every step right given
  the right prefix is the greedy output).
* Generators are deterministic given the ``torch.Generator``; train and test data are
  disjoint by construction (``split``): every sequence belongs to exactly one split, decided
  by a hash of its defining content (see ``split_of``).
* Parameters are a pydantic model (``Params``) so a bad value gets a clear message.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from recur.config import StrictNumbers, config_problems
from recur.registry import TASKS

SPLITS = ("train", "test")
TEST_FRACTION = 0.125  # share of all sequences that belong to the test split


@dataclass
class Batch:
    """One batch of a task. Unpacks as ``inputs, targets, mask``."""

    inputs: torch.Tensor  # int64 [n, seq_len]
    targets: torch.Tensor  # int64 [n, seq_len]
    mask: torch.Tensor  # bool [n, seq_len]
    valid: torch.Tensor | None = None  # bool [n, seq_len, vocab]: every acceptable target (dfa_icll)
    resets: torch.Tensor | None = None  # bool [n, seq_len]: packed documents, True where one starts
    features: torch.Tensor | None = None  # float [n, seq_len, F]: real-valued inputs (Task.feature_dim)
    values: torch.Tensor | None = None  # float [n, seq_len, k]: real-valued targets (Task.target_dim)
    labels: torch.Tensor | None = None  # int64 [n, L]: a label sequence per row, padded with -1 (CTC)

    def model_inputs(self, start: int = 0, end: int | None = None) -> dict:
        """Keyword arguments of a model call on positions [start, end): ``resets`` when packed,
        ``features`` when the task has real-valued inputs."""
        kwargs = {}
        if self.resets is not None:
            kwargs["resets"] = self.resets[:, start:end]
        if self.features is not None:
            kwargs["features"] = self.features[:, start:end]
        return kwargs

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.inputs, self.targets, self.mask))

    def window(self, start: int, end: int, supervised_from: int | None = None) -> Batch:
        """Positions [start, end) of every row; with ``supervised_from``, positions before it are
        not supervised (truncated BPTT's windows, whose leading tokens only build the state)."""
        mask = self.mask[:, start:end]
        if supervised_from is not None and supervised_from > start:
            mask = mask.clone()
            mask[:, :supervised_from - start] = False
        return Batch(self.inputs[:, start:end], self.targets[:, start:end], mask,
                     **{k: None if v is None else v[:, start:end] for k, v in self._optional().items()},
                     labels=self.labels)

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.inputs, self.targets, self.mask)),
                     **{k: None if v is None else v.to(device) for k, v in self._optional().items()},
                     labels=None if self.labels is None else self.labels.to(device))

    def label_lists(self) -> list[list[int]]:
        """Each row's label sequence without its -1 padding."""
        if self.labels is None:
            raise ValueError("this batch has no label sequences (Batch.labels)")
        return [[v for v in row if v >= 0] for row in self.labels.tolist()]

    def _optional(self) -> dict[str, torch.Tensor | None]:
        """The per-position fields beyond inputs, targets and mask (each [n, seq_len, ...] or None)."""
        return {"valid": self.valid, "resets": self.resets, "features": self.features, "values": self.values}


class TaskParams(StrictNumbers, BaseModel):
    """Base of every task's parameters: unknown keys are errors, values are validated (a boolean is
    not a number, floats are finite)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Task(ABC):
    """Base class of the synthetic probe tasks."""

    name: ClassVar[str]
    Params: ClassVar[type[TaskParams]] = TaskParams
    description: ClassVar[str] = ""  # token layout and metric, shown by `recur tasks`
    # The data's splits: the first is trained on, the last is the final evaluation's; a middle one
    # (validation) is what a run's periodic evaluations read (``eval.every``).
    splits: ClassVar[tuple[str, ...]] = SPLITS
    lower_is_better: ClassVar[tuple[str, ...]] = ()  # metrics where less is better (bits_per_byte)
    feature_dim: ClassVar[int] = 0  # > 0: batches carry real-valued inputs ``features`` [n, seq_len, F]
    target_dim: ClassVar[int] = 0  # > 0: a regression task, supervising ``values`` [n, seq_len, k]
    separator: ClassVar[int | None] = None  # a transduction task's SEP id (``source SEP target``)

    def __init__(self, **params: Any):
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            problems = config_problems(e)
            raise ValueError(f"bad parameters for task {self.name!r}: {problems}. "
                             f"Parameters: {describe_params(self.Params)}") from None

    # -- to implement ---------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the task uses (inputs and targets lie in [0, vocab_size))."""

    @abstractmethod
    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        """``n`` sequences of ``seq_len`` tokens of ``split``, drawn with ``generator`` only."""

    def min_seq_len(self) -> int:
        """The shortest sequence this configuration can be laid out in."""
        return 1

    def answer_tokens(self) -> range:
        """Every token that can be the target of a supervised position (default: the whole vocabulary)."""
        return range(self.vocab_size)

    def chance(self, seq_len: int | None = None) -> float:
        """Chance-level token accuracy: the expected accuracy of a guess drawn uniformly from
        ``answer_tokens()`` without reading the input. With one right answer per supervised position
        it is 1 / len(answer_tokens()) at every length; a task with several acceptable answers
        (``Batch.valid``) overrides it."""
        return 1.0 / len(self.answer_tokens())

    # -- shared -----------------------------------------------------------------
    def score(self, logits: torch.Tensor, batch: Batch) -> dict[str, float]:
        """Token accuracy over supervised positions and exact match per sequence.

        With ``batch.valid`` (several acceptable answers), a prediction is right when it is
        any acceptable token.
        """
        return self.score_predictions(logits.argmax(-1), batch)

    def score_predictions(self, pred: torch.Tensor, batch: Batch) -> dict[str, float]:
        """``score`` from the predicted class per position (int64 [n, seq_len]; only the supervised
        positions are read)."""
        if batch.valid is not None:
            right = batch.valid.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
        else:
            right = pred == batch.targets
        mask = batch.mask
        n_sup = mask.sum().clamp(min=1)
        accuracy = (right & mask).sum().float() / n_sup
        has_sup = mask.any(dim=1)
        seq_ok = ((right | ~mask).all(dim=1) & has_sup).float().sum() / has_sup.sum().clamp(min=1)
        return {"accuracy": float(accuracy), "exact_match": float(seq_ok)}

    def score_output(self, model, out, batch: Batch) -> dict[str, float]:
        """The metrics of a model's output on ``batch`` (what evaluation calls): by default
        ``score_predictions`` of its argmax predictions; a task scored from the logits themselves
        (bits per byte) overrides it."""
        return self.score_predictions(model.predictions(out, batch), batch)

    def model_io(self) -> dict[str, int]:
        """The model's input and output beyond the vocabulary: ``feature_dim`` (real-valued inputs per
        position) and ``target_dim`` (a regression head of that many reals), where non-zero; what
        ``Architecture.from_config`` builds the model with; and ``sep``, a transduction task's
        separator, for the encoder-decoders that split the stream there (other models ignore it)."""
        io = {k: v for k, v in (("feature_dim", self.feature_dim), ("target_dim", self.target_dim)) if v}
        return io if self.separator is None else {**io, "sep": self.separator}

    def training_accuracy(self, model, out, batch: Batch) -> float:
        """The accuracy the Trainer logs each step and its early-stop rule reads: the token accuracy
        of the model's predictions. A regression task has none: NaN (the rule then never fires)."""
        if self.target_dim:
            return float("nan")
        return self.score_predictions(model.predictions(out, batch), batch)["accuracy"]

    def info(self) -> dict[str, Any]:
        """Facts about this task's data that its parameters do not fix (a corpus's sha256), stored with
        each run; empty for generated tasks."""
        return {}

    @property
    def validation_split(self) -> str:
        """The split periodic evaluations read: ``validation`` where the task has one, else ``test``."""
        return "validation" if "validation" in self.splits else self.splits[-1]

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"split must be one of {self.splits}, got {split!r}")

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len < self.min_seq_len():
            raise ValueError(f"task {self.name!r} with {self.params.model_dump()} needs seq_len >= "
                             f"{self.min_seq_len()}, got {seq_len}")

    def config(self) -> dict[str, Any]:
        return {"task": self.name, **self.params.model_dump()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump().items())
        return f"{type(self).__name__}({args})"


_HASH_MOD = (1 << 31) - 1  # Mersenne prime: every product below stays inside int64
_HASH_MULTS = (48271, 1_103_515_245 % _HASH_MOD)


def split_of(content: torch.Tensor) -> torch.Tensor:
    """Which split each row of ``content`` (int64 [n, L]) belongs to: True for test.

    Two polynomial hashes of the row modulo 2^31-1 (exact in int64), mixed into one
    bucket. The same content always lands in the same split, so train and test are
    disjoint by construction, whatever the seed.
    """
    c = content.to(torch.int64) % _HASH_MOD
    hashes = []
    for mult in _HASH_MULTS:
        h = torch.full((c.shape[0],), 12345, dtype=torch.int64, device=c.device)
        for j in range(c.shape[1]):
            h = (h * mult + c[:, j] + 1) % _HASH_MOD
        hashes.append(h)
    bucket = (hashes[0] * 31 + hashes[1]) % 1000
    return bucket < int(TEST_FRACTION * 1000)


MAX_ROUNDS = 64  # rejection-sampling rounds before a split is declared too small


def sample_rows_of_split(draw, n: int, split: str, content=None) -> torch.Tensor:
    """Rejection sampling: draw candidate rows until ``n`` of them belong to ``split``.

    ``draw(m)`` returns m candidate rows; ``content(rows)`` (default: the rows) is what
    ``split_of`` hashes. Returns the first ``n`` kept rows, in drawing order.
    """
    want_test = split == "test"
    keep_rate = TEST_FRACTION if want_test else 1.0 - TEST_FRACTION
    kept, have = [], 0
    for _ in range(MAX_ROUNDS):
        rows = draw(math.ceil((n - have) / keep_rate * 1.2) + 8)
        keep = split_of(rows if content is None else content(rows)) == want_test
        kept.append(rows[keep])
        have += int(keep.sum())
        if have >= n:
            return torch.cat(kept)[:n]
    raise ValueError(f"could not draw {n} rows of the {split!r} split in {MAX_ROUNDS} rounds: the space of "
                     f"sequences at this length is too small; use a longer seq_len")


def row_rngs(m: int, generator: torch.Generator) -> list[random.Random]:
    """``m`` Python random streams, one per row, seeded from ``generator``: for generators written
    in Python (backtracking, tree growing), deterministic given the torch generator."""
    return [random.Random(s) for s in torch.randint(1 << 62, (m,), generator=generator).tolist()]


def grid_batch(source: torch.Tensor, target: torch.Tensor, seq_len: int, sep: int, pad: int,
               supervised: torch.Tensor | bool = True) -> Batch:
    """The grid-to-grid layout ``source SEP target [PAD ..]`` (both [n, N], row-major), the target
    teacher forced: SEP predicts target cell 1 and target cell k predicts cell k + 1.
    ``supervised``: bool [n, N], the target cells that are scored (True: all)."""
    n, N = source.shape
    inputs = torch.full((n, seq_len), pad, dtype=torch.int64)
    inputs[:, :N] = source
    inputs[:, N] = sep
    inputs[:, N + 1:2 * N + 1] = target
    targets = torch.zeros(n, seq_len, dtype=torch.int64)
    targets[:, N:2 * N] = target
    mask = torch.zeros(n, seq_len, dtype=torch.bool)
    mask[:, N:2 * N] = supervised
    return Batch(inputs, targets, mask)


def accuracy_where(pred: torch.Tensor, batch: Batch, where: torch.Tensor) -> float:
    """Token accuracy over the supervised positions where ``where`` (bool [n, seq_len]) holds; 0.0
    when there are none (a task's extra metric on the positions that matter, e.g. the blanks)."""
    picked = batch.mask & where
    return float(((pred == batch.targets) & picked).sum()) / max(1, int(picked.sum()))


def distinct_rows(m: int, k: int, high: int, generator: torch.Generator) -> torch.Tensor:
    """``m`` rows of ``k`` distinct integers in [0, high), uniform over ordered k-tuples.

    Few draws relative to ``high``: draw with replacement and redraw every repeat of an
    earlier value until none is left. That procedure commutes with relabelling the values,
    and the distinct tuples are one orbit under relabelling, so the result is uniform.
    Otherwise: the first k entries of random permutations.
    """
    if 4 * k > high:
        return torch.rand(m, high, generator=generator).argsort(dim=1)[:, :k]
    x = torch.randint(high, (m, k), generator=generator)
    while True:
        values, order = x.sort(dim=1, stable=True)  # equal values keep their positions' order
        repeat_sorted = torch.zeros_like(x, dtype=torch.bool)
        repeat_sorted[:, 1:] = values[:, 1:] == values[:, :-1]
        repeat = torch.zeros_like(repeat_sorted).scatter_(1, order, repeat_sorted)
        if not repeat.any():
            return x
        x[repeat] = torch.randint(high, (int(repeat.sum()),), generator=generator)


def describe_params(params: type[TaskParams]) -> str:
    """``name: type = default`` for every parameter, for error messages and `recur tasks`."""
    parts = []
    for name, field in params.model_fields.items():
        typ = getattr(field.annotation, "__name__", str(field.annotation))
        parts.append(f"{name}: {typ} = {field.default!r}")
    return ", ".join(parts) or "(none)"


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register a task under ``cls.name``."""
    TASKS.add(cls.name, cls, description=cls.description)
    return cls


def list_tasks() -> list[str]:
    return TASKS.names()


def task_class(name: str) -> type[Task]:
    return TASKS.get(name).cls


def get_task(name: str, **params: Any) -> Task:
    """Build the task registered as ``name`` with ``params`` (validated)."""
    return task_class(name)(**params)
