"""convex_hull: the monotone chain agrees with a brute-force hull (an edge is a hull edge when every
other point lies strictly on its left); the answer starts at the lowest-index vertex, runs counter-
clockwise and closes; the layout; area coverage; n from seq_len; errors."""

from __future__ import annotations

import random

import pytest
import torch

from recur.tasks import get_task
from recur.tasks.base import Batch
from recur.tasks.convex_hull import cross, hull, is_simple_ccw, polygon_area


def brute_force_successors(points) -> dict[int, int]:
    """i -> j for every directed hull edge: all other points strictly left of i -> j (counter-clockwise)."""
    n = len(points)
    return {i: j for i in range(n) for j in range(n) if i != j
            and all(cross(points[i], points[j], points[k]) > 0 for k in range(n) if k not in (i, j))}


@pytest.mark.parametrize("n", [3, 4, 5, 10, 30])
def test_monotone_chain_equals_the_brute_force_hull(n):
    rng = random.Random(n)
    for _ in range(40):
        pts = [(rng.random(), rng.random()) for _ in range(n)]
        ring = hull(pts)
        succ = brute_force_successors(pts)
        assert ring[0] == min(succ) == min(ring)  # the lowest-index vertex starts
        assert len(ring) == len(succ) and len(set(ring)) == len(ring)
        for a, b in zip(ring, ring[1:] + ring[:1]):  # every consecutive pair a hull edge, counter-clockwise
            assert succ[a] == b
        assert polygon_area(pts, ring) > 0 and is_simple_ccw(pts, ring)


def test_known_hulls():
    square = [(0.5, 0.5), (1, 1), (0, 0), (1, 0), (0, 1)]  # the centre is inside
    assert hull(square) == [1, 4, 2, 3]
    assert hull([(0, 0), (0.5, 0), (1, 0), (0, 1)]) == [0, 2, 3]  # a collinear point is no vertex
    assert polygon_area(square, [2, 3, 1, 4]) == 1.0 and polygon_area(square, [2, 4, 1, 3]) == -1.0


def test_the_batch_is_points_sep_closed_hull_teacher_forced():
    task = get_task("convex_hull", max_points=16)
    b = task.batch(16, 21, torch.Generator().manual_seed(0))
    n = 10
    assert task.n_points(21) == n and b.features.shape == (16, 21, 2) and task.model_io() == {"feature_dim": 2,
                                                                                            "sep": 17}
    assert (b.inputs[:, :n] == task.point_token).all() and (b.inputs[:, n] == task.separator).all()
    for r in range(16):
        pts = [tuple(p) for p in b.features[r, :n].tolist()]
        steps = int(b.mask[r].sum())
        answer = b.targets[r, n:n + steps].tolist()
        assert b.mask[r, n:n + steps].all() and answer == hull(pts) + hull(pts)[:1] and steps >= 4
        assert b.inputs[r, n + 1:n + 1 + steps].tolist() == answer  # step k reads pick k - 1
        torch.testing.assert_close(b.features[r, n + 1:n + 1 + steps], b.features[r, torch.tensor(answer)])
        assert (b.inputs[r, n + 1 + steps:] == task.pad).all()
    assert task.min_seq_len() == 7 and task.n_points(7) == 3


def test_area_coverage_is_one_for_the_hull_a_fraction_for_a_missing_vertex_and_zero_for_a_crossing():
    task = get_task("convex_hull", n=5, max_points=8)
    pts = torch.tensor([[[0.5, 0.5], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    b = task.layout(pts, [[1, 4, 2, 3, 1]], 12)
    assert task.score_predictions(b.targets, b) == {"accuracy": 1.0, "exact_match": 1.0, "area_coverage": 1.0}
    pred = b.targets.clone()
    pred[0, 5:10] = torch.tensor([1, 4, 2, 1, 1])  # the triangle without vertex 3: half the square
    s = task.score_predictions(pred, b)
    assert s["area_coverage"] == pytest.approx(0.5) and s["exact_match"] == 0.0 and s["accuracy"] == pytest.approx(0.8)
    pred[0, 5:10] = torch.tensor([1, 2, 4, 3, 1])  # a crossing polygon
    assert task.score_predictions(pred, b)["area_coverage"] == 0.0
    pred[0, 5:10] = torch.tensor([1, 0, 2, 3, 1])  # through the centre: not convex
    assert task.score_predictions(pred, b)["area_coverage"] == 0.0
    empty = Batch(b.inputs, b.targets, torch.zeros_like(b.mask), features=b.features)
    assert task.score_predictions(b.targets, empty)["area_coverage"] == 0.0


def test_bad_sizes_fail_clearly_and_splits_are_disjoint():
    with pytest.raises(ValueError, match="n >= 3"):
        get_task("convex_hull", n=2).batch(2, 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="seq_len >= 11"):
        get_task("convex_hull", n=5).batch(2, 10, torch.Generator().manual_seed(0))
    task = get_task("convex_hull", n=4)
    train = task.batch(1000, 9, torch.Generator().manual_seed(0), split="train")
    test = task.batch(1000, 9, torch.Generator().manual_seed(0), split="test")

    def keys(b):
        return {tuple(r) for r in torch.round(b.features[:, :4].flatten(1) * 1e4).long().tolist()}

    assert not keys(train) & keys(test)
