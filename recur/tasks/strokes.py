"""Pen strokes of rendered characters, the generated stand-in for the IAM-OnDB handwriting of Graves
(2013), "Generating Sequences With Recurrent Neural Networks" (and the stroke format of Sketch-RNN,
Ha & Eck 2017): a real-valued sequence task for mixture-density heads (``recur.models.mdn``).

IAM-OnDB needs registration and cannot be shipped, so the strokes come from the public-domain
single-stroke Hershey vector fonts, as the PyPI package ``hershey-fonts`` ships them (an optional
extra: ``pip install 'recur[strokes]'``; nothing is downloaded at run time). Each sequence is one
character of ``charset`` drawn in ``font``:

* every stroke (polyline) of the glyph is resampled at equal arc length, about ``step`` font units
  apart (the cap height is 21 units), so the point count depends on the character only;
* the points are distorted as a hand varies its writing: a smooth random displacement field (two
  sinusoids per axis, wavelengths of 12-30 units, amplitude ``jitter`` units), a slant (a shear
  x += a y, |a| <= ``slant``) and a scale per axis (1 +- ``scale_jitter``);
* the pen trajectory becomes offsets x_i = (dx_i, dy_i, pen_i) (y upwards), dx and dy divided by
  the fixed scale ``step`` (so a pen-down move is about 1), pen_i = 1 where the pen lifts after
  point i (the last point of a stroke; Graves's end-of-stroke bit). The first offset is from the
  glyph's centre, so a model also learns where a character starts.

Layout (one character per row, L its points):

    tokens:    START  POINT  POINT ...  POINT    PAD ...      START = 0, POINT = 1, PAD = 2
    features:  s      x_1    x_2   ...  x_{L-1}  0 ...        s = (0, 0, 1): the pen up before the first stroke
    values:    x_1    x_2    x_3   ...  x_L      0 ...        the target at step t is the next point
    mask:      True   ...                True    False ...    L supervised positions

so ``feature_dim = 3`` and ``target_dim = 3``; a density head (``mdn``) reads the values. A row
needs seq_len >= L (``min_seq_len``: the longest character of the charset, 40 points for the
digits of ``futural`` at step 2); a longer seq_len pads on the right.

Metrics (lower is better): ``nll``, the negative log-likelihood per point in nats, of the offsets in
the normalised units (a density, so it can be negative) plus the pen bit; ``nll_offset`` and
``nll_pen``, its two parts. ``single_gaussian_nll`` scores the reference method on the same
batch: one bivariate Gaussian for (dx, dy) and one Bernoulli for the pen, fitted to training
points without reading the context (what a model must beat to have learnt anything about shape).

Split: by a hash of (character, jitter seed): a test sequence is never a training sequence; the
characters themselves are shared (an unconditional model learns the font's shapes, as Graves's
learns handwriting; the test asks for new distortions of them).
"""

from __future__ import annotations

import math
import random
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

START, POINT, PAD = 0, 1, 2
START_POINT = (0.0, 0.0, 1.0)  # the input before the first point: the pen is up
CHARSETS = {"digits": "0123456789", "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            "lower": "abcdefghijklmnopqrstuvwxyz"}
CHARSETS["alnum"] = CHARSETS["digits"] + CHARSETS["upper"] + CHARSETS["lower"]
FONTS = ("futural", "rowmans", "scripts", "cursive")  # the single-stroke (simplex) Hershey fonts
EXTRA = "pip install 'recur[strokes]'"


class StrokesParams(TaskParams):
    charset: Literal["digits", "upper", "lower", "alnum"] = Field("digits", description="the characters drawn")
    font: Literal["futural", "rowmans", "scripts", "cursive"] = Field("futural",
                                                                       description="the single-stroke Hershey font")
    step: float = Field(2.0, gt=0.25, le=8.0, description="resampling distance in font units (cap height 21), "
                                                         "also the scale dividing the offsets")
    jitter: float = Field(1.0, ge=0.0, le=4.0, description="amplitude of the smooth displacement field, font units")
    slant: float = Field(0.3, ge=0.0, le=1.0, description="largest shear |a| of x += a y")
    scale_jitter: float = Field(0.15, ge=0.0, lt=0.5, description="largest relative change of each axis's scale")


def hershey_fonts():
    """The ``HersheyFonts`` class of the optional ``hershey-fonts`` package, or a clear error."""
    try:
        from HersheyFonts import HersheyFonts
    except ImportError:
        raise ImportError("the strokes task renders the Hershey fonts shipped by the hershey-fonts package, which "
                          f"is not installed: {EXTRA}") from None
    return HersheyFonts


@lru_cache(maxsize=None)
def glyph_strokes(font: str, char: str, step: float) -> tuple[torch.Tensor, ...]:
    """The strokes of ``char`` in ``font``, each resampled at equal arc length (``ceil(length / step)``
    pieces, both ends kept), float64 [k, 2] in font units with y upwards."""
    fonts = hershey_fonts()()
    fonts.load_default_font(font)
    glyph = fonts.all_glyphs.get(char)
    if glyph is None or not glyph.strokes:
        raise ValueError(f"font {font!r} has no strokes for {char!r}")
    out = []
    for stroke in glyph.strokes:
        p = torch.tensor(stroke, dtype=torch.float64) * torch.tensor([1.0, -1.0])  # Hershey's y points down
        seg = (p[1:] - p[:-1]).norm(dim=1)
        arc = torch.cat([torch.zeros(1, dtype=torch.float64), seg.cumsum(0)])
        pieces = max(1, math.ceil(float(arc[-1]) / step))
        s = torch.linspace(0.0, float(arc[-1]), pieces + 1, dtype=torch.float64)
        # the segment each arc length falls in, then linear interpolation inside it
        i = torch.searchsorted(arc, s, right=True).clamp(1, len(arc) - 1) - 1
        w = ((s - arc[i]) / (arc[i + 1] - arc[i]).clamp(min=1e-12)).clamp(0, 1)[:, None]
        out.append(p[i] + w * (p[i + 1] - p[i]))
    return tuple(out)


def distort(strokes: tuple[torch.Tensor, ...], rng: random.Random, jitter: float, slant: float,
            scale_jitter: float) -> list[torch.Tensor]:
    """The strokes as one hand might write them: the smooth displacement field, then slant and scale."""
    def field(p: torch.Tensor) -> torch.Tensor:
        d = torch.zeros_like(p)
        for axis in range(2):
            for _ in range(2):
                wavelength = rng.uniform(12.0, 30.0)
                angle = rng.uniform(0.0, 2 * math.pi)
                k = torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64) * (2 * math.pi / wavelength)
                d[:, axis] += jitter / 2 * torch.sin(p @ k + rng.uniform(0.0, 2 * math.pi))
        return d

    shear = rng.uniform(-slant, slant)
    sx, sy = 1 + rng.uniform(-scale_jitter, scale_jitter), 1 + rng.uniform(-scale_jitter, scale_jitter)
    allp = torch.cat(strokes)
    moved = allp + field(allp)  # one field for the whole glyph: strokes that meet still meet
    x, y = moved[:, 0], moved[:, 1]
    moved = torch.stack([sx * (x + shear * y), sy * y], dim=1)
    return list(moved.split([len(s) for s in strokes]))


def to_offsets(strokes: list[torch.Tensor], scale: float) -> torch.Tensor:
    """(dx, dy, pen) per point, float64 [L, 3]: offsets from the previous point (the first from the
    origin) over ``scale``, pen = 1 at the last point of each stroke."""
    points = torch.cat(strokes)
    pen = torch.zeros(len(points), dtype=torch.float64)
    pen[torch.tensor([len(s) for s in strokes]).cumsum(0) - 1] = 1.0
    d = torch.diff(points, dim=0, prepend=torch.zeros(1, 2, dtype=torch.float64)) / scale
    return torch.cat([d, pen[:, None]], dim=1)


@register_task
class Strokes(Task):
    """One jittered, slanted Hershey character per row as pen offsets; predict each next point."""

    name = "strokes"
    Params = StrokesParams
    description = ("pen strokes (Graves 2013) of Hershey-font characters with smooth random jitter, slant and scale: "
                   "features [T, 3] = (dx, dy, pen up) offsets (START (0,0,1) first), values = the next point; tokens "
                   "START=0 POINT=1 PAD=2. Needs the strokes extra (hershey-fonts). Metric: nll per point (nats; "
                   "lower is better), nll_offset, nll_pen; reference: single_gaussian_nll.")
    lower_is_better = ("nll", "nll_offset", "nll_pen")
    feature_dim = 3
    target_dim = 3

    @property
    def vocab_size(self) -> int:
        return 3

    @property
    def characters(self) -> str:
        return CHARSETS[self.params.charset]

    def min_seq_len(self) -> int:
        """The most points any character of the charset has (a row holds one character)."""
        p = self.params
        return max(sum(len(s) for s in glyph_strokes(p.font, c, p.step)) for c in self.characters)

    def answer_tokens(self) -> range:
        return range(0)  # the targets are real-valued points, never tokens

    def chance(self, seq_len: int | None = None) -> float:
        raise ValueError("strokes is a density-estimation task: it has no chance accuracy (its reference is "
                         "single_gaussian_nll)")

    def sequence(self, char: str, seed: int) -> torch.Tensor:
        """The points (dx, dy, pen) of ``char`` distorted by the jitter drawn from ``seed``, float64 [L, 3]."""
        p = self.params
        rng = random.Random(seed)
        return to_offsets(distort(glyph_strokes(p.font, char, p.step), rng, p.jitter, p.slant, p.scale_jitter),
                          p.step)

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        chars = self.characters

        def draw(m: int) -> torch.Tensor:  # (character index, jitter seed): what defines a sequence
            return torch.stack([torch.randint(len(chars), (m,), generator=generator),
                                torch.randint(2 ** 31 - 1, (m,), generator=generator)], dim=1)

        rows = sample_rows_of_split(draw, n, split)
        T = seq_len
        inputs = torch.full((n, T), PAD, dtype=torch.int64)
        features = torch.zeros(n, T, 3)
        values = torch.zeros(n, T, 3)
        mask = torch.zeros(n, T, dtype=torch.bool)
        for r, (c, seed) in enumerate(rows.tolist()):
            x = self.sequence(chars[c], seed).float()
            L = len(x)
            inputs[r, 0], inputs[r, 1:L] = START, POINT
            features[r, 0] = torch.tensor(START_POINT)
            features[r, 1:L] = x[:-1]
            values[r, :L] = x
            mask[r, :L] = True
        return Batch(inputs, torch.zeros(n, T, dtype=torch.int64), mask, features=features, values=values)

    # -- scores -------------------------------------------------------------------------
    def score_output(self, model, out, batch: Batch) -> dict[str, float]:
        if not hasattr(model, "point_nll"):
            raise ValueError(f"strokes is scored by the likelihood of each point: it needs a density head "
                             f"(--arch mdn), not {getattr(model, 'name', type(model).__name__)!r}")
        offset, pen = model.point_nll(out, batch)
        return self.score_nll(offset.detach().double().cpu(), pen.detach().double().cpu())

    @staticmethod
    def score_nll(offset: torch.Tensor, pen: torch.Tensor) -> dict[str, float]:
        """The metrics of per-point NLLs (nats) of the offsets and of the pen bit, [N] each."""
        return {"nll": float((offset + pen).mean()), "nll_offset": float(offset.mean()), "nll_pen": float(pen.mean())}

    def single_gaussian_fit(self, rows: int = 1024) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The reference method's parameters, fitted by maximum likelihood to the points of ``rows``
        training sequences (a fixed seed): the mean [2] and covariance [2, 2] of (dx, dy), and the
        probability that the pen lifts."""
        cache = self.__dict__.setdefault("_fits", {})
        if rows not in cache:
            b = self.batch(rows, self.min_seq_len(), torch.Generator().manual_seed(12345), split="train")
            v = b.values[b.mask].double()
            d = v[:, :2] - v[:, :2].mean(0)
            cache[rows] = (v[:, :2].mean(0), d.T @ d / len(d), float(v[:, 2].mean()))
        return cache[rows]

    def single_gaussian_nll(self, batch: Batch, rows: int = 1024) -> dict[str, float]:
        """The scores of the context-free reference on ``batch``: every point drawn from one bivariate
        Gaussian and one Bernoulli pen bit (``single_gaussian_fit``)."""
        mean, cov, p = self.single_gaussian_fit(rows)
        v = batch.values[batch.mask].double().cpu()
        offset = -torch.distributions.MultivariateNormal(mean, cov).log_prob(v[:, :2])
        pen = -torch.distributions.Bernoulli(probs=torch.tensor(p, dtype=torch.float64)).log_prob(v[:, 2])
        return self.score_nll(offset, pen)
