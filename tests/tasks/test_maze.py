"""maze: a BFS written here confirms that the labelled path is the one shortest path from start to
goal and that its cells connect them; the layout is as documented; the splits are disjoint; the
draws are seeded; bad input fails clearly."""

from __future__ import annotations

from collections import deque

import pytest
import torch

from recur.tasks import get_task

WALL, FREE, START, GOAL, PATH, SEP, PAD = 0, 1, 2, 3, 4, 5, 6  # written out here, not imported


def steps(i: int, n: int):
    r, c = divmod(i, n)
    for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
        if 0 <= rr < n and 0 <= cc < n:
            yield rr * n + cc


def shortest_paths(maze: list[int], n: int) -> tuple[int, int]:
    """Plain BFS from START over the non-wall cells: (distance to GOAL, number of shortest paths)."""
    start, goal = maze.index(START), maze.index(GOAL)
    dist, count = {start: 0}, {start: 1}
    queue = deque([start])
    while queue:
        i = queue.popleft()
        for j in steps(i, n):
            if maze[j] == WALL:
                continue
            if j not in dist:
                dist[j], count[j] = dist[i] + 1, count[i]
                queue.append(j)
            elif dist[j] == dist[i] + 1:
                count[j] += count[i]
    return dist[goal], count[goal]


@pytest.mark.parametrize("params", [dict(size=8), dict(size=10, min_distance=20), dict(size=12)])
def test_the_labelled_path_is_the_unique_shortest_path_and_connects_start_to_goal(params):
    task = get_task("maze", **params)
    n = params["size"]
    N = n * n
    batch = task.batch(32, task.min_seq_len(), torch.Generator().manual_seed(0), split="train")
    for row, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        maze, out = row[:N], row[N + 1:2 * N + 1]
        assert target[N:2 * N] == out and row[N] == SEP
        assert maze.count(START) == maze.count(GOAL) == 1 and set(maze) <= {WALL, FREE, START, GOAL}
        # the output is the maze with some free cells turned to PATH
        assert all(o == m or (m == FREE and o == PATH) for m, o in zip(maze, out))
        distance, count = shortest_paths(maze, n)
        assert count == 1 and distance >= params.get("min_distance", n)
        path = {i for i, o in enumerate(out) if o == PATH}
        assert len(path) == distance - 1  # the cells strictly between start and goal
        # walking from start through path cells reaches the goal, one step at a time
        at, left = maze.index(START), set(path)
        while left:
            (at,) = [j for j in steps(at, n) if j in left]
            left.remove(at)
        assert maze.index(GOAL) in set(steps(at, n))


def test_the_layout_pads_and_supervises_the_output_grid():
    task = get_task("maze")
    assert task.min_seq_len() == 129 and task.vocab_size == 7 and list(task.answer_tokens()) == [0, 1, 2, 3, 4]
    batch = task.batch(8, 140, torch.Generator().manual_seed(1))
    assert (batch.inputs[:, 64] == SEP).all() and (batch.inputs[:, 129:] == PAD).all()
    assert batch.mask.nonzero()[:, 1].unique().tolist() == list(range(64, 128))
    assert task.score_predictions(batch.targets, batch) == {"accuracy": 1.0, "exact_match": 1.0, "path_accuracy": 1.0}
    copy = batch.targets.clone()  # copying the maze, no path
    copy[:, 64:128] = batch.inputs[:, :64]
    scores = task.score_predictions(copy, batch)
    assert scores["path_accuracy"] == 0.0 and scores["exact_match"] == 0.0 and scores["accuracy"] > 0.7


def test_train_and_test_are_disjoint():
    task = get_task("maze")
    train = task.batch(400, 129, torch.Generator().manual_seed(2), split="train").inputs[:, :64]
    test = task.batch(100, 129, torch.Generator().manual_seed(3), split="test").inputs[:, :64]
    seen_train, seen_test = set(map(tuple, train.tolist())), set(map(tuple, test.tolist()))
    assert not seen_train & seen_test and len(seen_test) == 100


def test_batches_are_seeded():
    task = get_task("maze", size=9)
    a = task.batch(4, 163, torch.Generator().manual_seed(4))
    b = task.batch(4, 163, torch.Generator().manual_seed(4))
    c = task.batch(4, 163, torch.Generator().manual_seed(5))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and not torch.equal(a.inputs, c.inputs)


def test_bad_parameters_and_lengths_fail_clearly():
    with pytest.raises(ValueError, match="size"):
        get_task("maze", size=7)
    with pytest.raises(ValueError, match="size"):
        get_task("maze", size=13)
    with pytest.raises(ValueError, match="min_distance must be <= 2 \\* size = 16"):
        get_task("maze", size=8, min_distance=17)
    with pytest.raises(ValueError, match="needs seq_len >= 129"):
        get_task("maze").batch(2, 128, torch.Generator())
    assert get_task("maze").chance(129) == pytest.approx(1 / 5)
