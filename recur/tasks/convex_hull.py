"""Planar convex hull by pointing (Vinyals, Fortunato & Jaitly, "Pointer Networks", 2015): n points
uniform in the unit square, the answer the indices of the hull's vertices in counter-clockwise
order from a canonical start, closed back to it (the paper's outputs: h + 1 indices for h vertices).

The canonical start is the hull vertex of lowest index (as the replication ``gchaperon/pointer-networks``
and ../shared/REFERENCES-wave2.md D1 fix it); the targets come from Andrew's monotone chain (``hull``),
which drops collinear points (probability 0 for uniform points). The layout is ``PointerTask``'s
(``recur/tasks/sort.py``): n POINT slots with (x, y) features, SEP, the hull's indices teacher
forced, padded after the closing index. n is fixed, or derived from seq_len as the largest n whose
longest answer (n + 1 steps, every point on the hull) fits: n = (seq_len - 1) // 2.

Metrics: token accuracy and exact match (the whole closed hull right), and ``area_coverage`` of the
predicted polygon, the paper's measure when a prediction is not exact: the area of the polygon of the
predicted indices (closed at the first repeat of its start) over the true hull's area, 0 for a
prediction that is not a simple counter-clockwise polygon (a crossing or repeated vertex); here it
is read off the teacher-forced predictions (each step's pick given the true prefix), so it measures
the steps, not a free-running decode.
"""

from __future__ import annotations

import torch

from recur.tasks.base import Batch, register_task
from recur.tasks.sort import PointerTask


def cross(o, a, b) -> float:
    """The z of (a - o) x (b - o): > 0 when o, a, b turn counter-clockwise."""
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def hull(points: list[tuple[float, float]]) -> list[int]:
    """The indices of the convex hull's vertices, counter-clockwise from the one of lowest index
    (Andrew's monotone chain: the lower then the upper chain over the points sorted by x, then y;
    collinear points are not vertices). Fewer than 3 distinct points: their indices in that order."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    if len(order) < 3:
        return order

    def chain(idx):
        out: list[int] = []
        for i in idx:
            while len(out) >= 2 and cross(points[out[-2]], points[out[-1]], points[i]) <= 0:
                out.pop()
            out.append(i)
        return out

    lower, upper = chain(order), chain(reversed(order))
    ring = lower[:-1] + upper[:-1]  # counter-clockwise, from the leftmost point
    s = ring.index(min(ring))
    return ring[s:] + ring[:s]


def polygon_area(points, ring: list[int]) -> float:
    """The signed (shoelace) area of the polygon visiting ``ring`` in order: > 0 counter-clockwise."""
    total = 0.0
    for a, b in zip(ring, ring[1:] + ring[:1]):
        total += points[a][0] * points[b][1] - points[b][0] * points[a][1]
    return total / 2


def is_simple_ccw(points, ring: list[int]) -> bool:
    """``ring`` visits distinct points as a convex counter-clockwise polygon (every turn left)."""
    if len(ring) < 3 or len(set(ring)) != len(ring):
        return False
    m = len(ring)
    return all(cross(points[ring[i]], points[ring[(i + 1) % m]], points[ring[(i + 2) % m]]) > 0 for i in range(m))


@register_task
class ConvexHull(PointerTask):
    """n points in the unit square; output the hull's vertices counter-clockwise from the lowest
    index, closed back to it."""

    name = "convex_hull"
    description = ("planar convex hull by pointing (Vinyals et al. 2015): n points uniform in [0,1]^2 as (x,y) "
                   "features at POINT slots, SEP, then the hull's vertex indices counter-clockwise from the "
                   "lowest-index vertex and back to it (h+1 steps), teacher forced; n fixed or (seq_len - 1) // 2. "
                   "Metrics: accuracy, exact_match, area_coverage.")
    point_dim = 2
    min_points = 3

    def answer(self, points: torch.Tensor) -> list[list[int]]:
        out = []
        for row in points.tolist():
            ring = hull([tuple(p) for p in row])
            out.append(ring + ring[:1])
        return out

    def max_answer(self, n: int) -> int:
        return n + 1

    def score_predictions(self, pred: torch.Tensor, batch: Batch) -> dict[str, float]:
        scores = super().score_predictions(pred, batch)
        scores["area_coverage"] = self.area_coverage(pred, batch)
        return scores

    def area_coverage(self, pred: torch.Tensor, batch: Batch) -> float:
        """The mean over rows of area(predicted polygon) / area(true hull), 0 where the prediction is
        not a convex counter-clockwise polygon of distinct points (see the module docstring)."""
        total, rows = 0.0, 0
        k = int((batch.inputs[0] == self.point_token).sum())
        for r in range(pred.shape[0]):
            steps = batch.mask[r].nonzero().squeeze(-1)
            if steps.numel() == 0:
                continue
            rows += 1
            pts = batch.features[r, :k].tolist()
            truth = batch.targets[r, steps].tolist()[:-1]
            guess = pred[r, steps].tolist()
            ring = guess[:guess.index(guess[0], 1)] if guess[0] in guess[1:] else guess
            if not all(0 <= i < k for i in ring) or not is_simple_ccw(pts, ring):
                continue
            total += polygon_area(pts, ring) / polygon_area(pts, truth)
        return total / max(1, rows)


__all__ = ["ConvexHull", "cross", "hull", "is_simple_ccw", "polygon_area"]
