"""In-context linear regression (Garg et al., "What Can Transformers Learn In-Context? A Case Study
of Simple Function Classes", 2022; the looped variant of Yang et al., "Looped Transformers are Better
at Learning Learning Algorithms", 2024): a regression task with real-valued inputs and targets.

Each sequence is one random linear function and k examples of it, interleaved as in the reference
(``dtsip/in-context-learning``, ``src/tasks.py`` and ``src/models.py::_combine``):

    w ~ N(0, I_d),  x_i ~ N(0, I_d),  y_i = w . x_i (+ N(0, noise_std^2))
    positions:  x_1  y~_1  x_2  y~_2  ...  x_k  y~_k          y~_i = (y_i, 0, ..., 0) in R^d
    tokens:     X    Y     X    Y     ...                     (X = 0, Y = 1: which slot a position is)
    features:   x_1  y~_1  x_2  ...                           float [n, seq_len, d]
    supervised: every X position, target y_i (``values`` [n, seq_len, 1]): y_i is predicted from
                x_1, y_1, ..., x_{i-1}, y_{i-1}, x_i

k = ceil(seq_len / 2) (an odd length ends on an x). ``active_dims`` (default d) zeroes the coordinates
of every x_i above it (the reference's dimension curriculum, ``n_dims_truncated``), so a curriculum
can grow the problem (``curriculum`` with ``key: task.active_dims``).

Metrics (the reference's): ``mse``, the squared error divided by d (the active dimension), averaged
over the examples: predicting 0 scores E[y^2] / d = 1, least squares scores 0 once i > d in the
noiseless case; ``mse_last`` at the last example, and ``mse@i`` at each example i = 1..k (the curve of
error against the number of in-context examples). ``least_squares_error`` gives the optimal
estimator's curve on the same batch (the baseline the papers plot). Lower is better throughout.

Split: by a hash of w rounded to 1e-4: a test sequence's function is never a training function.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, model_validator

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

X, Y = 0, 1  # the slot tokens


class ICLRegressionParams(TaskParams):
    n_dims: int = Field(5, ge=1, le=256, description="d, the input dimension")
    active_dims: int | None = Field(None, ge=1, description="coordinates of x kept (the rest zero); default n_dims")
    noise_std: float = Field(0.0, ge=0.0, description="std of the noise added to y (0: noiseless, as Garg et al.)")

    @model_validator(mode="after")
    def _active(self):
        if self.active_dims is None:
            object.__setattr__(self, "active_dims", self.n_dims)  # frozen: fill the default once
        if self.active_dims > self.n_dims:
            raise ValueError(f"active_dims must be <= n_dims ({self.n_dims}), got {self.active_dims}")
        return self


@register_task
class ICLRegression(Task):
    """Interleaved (x_i, y_i) pairs of one random linear function; predict y_i at each x_i."""

    name = "icl_regression"
    Params = ICLRegressionParams
    description = ("in-context linear regression (Garg et al. 2022): 'x_1 y_1 x_2 y_2 ...' as real-valued features "
                   "[d] (y as (y, 0..0)), slot tokens X=0 Y=1; w, x ~ N(0, I_d), y = w.x; supervised: y_i at each "
                   "x_i (regression). Metrics: mse (squared error / d; 0 is exact, 1 is predicting 0), mse_last, "
                   "mse@i per example.")
    lower_is_better = ("mse", "mse_last")

    @property
    def vocab_size(self) -> int:
        return 2

    @property
    def feature_dim(self) -> int:  # type: ignore[override]
        return self.params.n_dims

    target_dim = 1

    def min_seq_len(self) -> int:
        return 1

    def answer_tokens(self) -> range:
        return range(0)  # no token is ever a target: the answers are real values

    def chance(self, seq_len: int | None = None) -> float:
        raise ValueError("icl_regression is a regression task: it has no chance accuracy (predicting 0 scores mse 1)")

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        p = self.params
        d, k = p.n_dims, math.ceil(seq_len / 2)
        # one row per sequence: w, then x_1 .. x_k, then the noise of each y (drawn together so a row is
        # its own defining content and the split follows w alone)
        width = d + k * d + k

        def draw(m: int) -> torch.Tensor:
            return torch.randn(m, width, generator=generator)

        rows = sample_rows_of_split(draw, n, split, content=lambda r: torch.round(r[:, :d] * 1e4).to(torch.int64))
        w = rows[:, :d]
        x = rows[:, d:d + k * d].reshape(n, k, d).clone()
        x[..., p.active_dims:] = 0.0
        y = torch.einsum("nd,nkd->nk", w, x) + p.noise_std * rows[:, d + k * d:]
        features = torch.zeros(n, 2 * k, d)
        features[:, 0::2] = x
        features[:, 1::2, 0] = y
        inputs = torch.full((n, 2 * k), Y, dtype=torch.int64)
        inputs[:, 0::2] = X
        mask = torch.zeros(n, 2 * k, dtype=torch.bool)
        mask[:, 0::2] = True
        values = torch.zeros(n, 2 * k, 1)
        values[:, 0::2, 0] = y
        T = seq_len
        return Batch(inputs[:, :T], torch.zeros(n, T, dtype=torch.int64), mask[:, :T],
                     features=features[:, :T], values=values[:, :T])

    # -- scores -------------------------------------------------------------------------
    def score_output(self, model, out, batch: Batch) -> dict[str, float]:
        pred = torch.zeros(batch.values.shape, dtype=torch.float64)
        pred[batch.mask] = model.supervised_logits(out, batch).detach().double().cpu()
        return self.score_values(pred[..., 0], batch)

    def score_values(self, pred: torch.Tensor, batch: Batch) -> dict[str, float]:
        """The metrics of predicted y [n, seq_len] (read at the supervised x positions)."""
        err = (pred.double() - batch.values[..., 0].double().cpu()) ** 2 / self.params.active_dims
        per_example = err[:, 0::2].mean(dim=0)  # [k]: the curve over the number of examples
        scores = {"mse": float(per_example.mean()), "mse_last": float(per_example[-1])}
        scores |= {f"mse@{i + 1}": float(v) for i, v in enumerate(per_example)}
        return scores

    def least_squares_error(self, batch: Batch) -> dict[str, float]:
        """The scores of the least-squares estimator on ``batch``: y_i predicted by the minimum-norm
        solution w_hat = pinv(X_{<i}) y_{<i} (0 before the first example), the optimal baseline."""
        x = batch.features[:, 0::2].double()
        y = batch.values[:, 0::2, 0].double()
        n, k, _ = x.shape
        pred = torch.zeros(n, batch.inputs.shape[1], dtype=torch.float64)
        for i in range(1, k):
            w_hat = torch.linalg.pinv(x[:, :i]) @ y[:, :i, None]  # [n, d, 1]
            pred[:, 2 * i] = (x[:, i:i + 1] @ w_hat)[:, 0, 0]
        return self.score_values(pred, batch)
