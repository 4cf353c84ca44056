"""Shortest paths in small grid mazes, the generated stand-in for HRM's and TRM's maze data (Wang et
al., "Hierarchical Reasoning Model", 2025, sapientinc/HRM, whose Maze-30x30-Hard pairs a grid of
walls, free cells, start and goal with the same grid with the optimal path marked; the CPU
experiment of docs REFERENCES-wave2 B5 asks for 8x8 to 12x12 mazes with BFS labels).

    m_1 .. m_{n^2} SEP o_1 .. o_{n^2} [PAD ..]
                   ^ SEP and o_1 .. o_{n^2 - 1} predict o_1 .. o_{n^2} (teacher forced)

Tokens: WALL 0, FREE 1, START 2, GOAL 3, PATH 4, SEP 5, PAD 6; both grids row-major. The output
grid is the maze with every cell of the shortest path strictly between start and goal turned to
PATH (start and goal keep their tokens, as in HRM's layout). The layout takes 2 n^2 + 1 tokens
(129 at n = 8, 289 at n = 12); a longer seq_len is padded on the right with PAD (never
supervised), a shorter one is an error.

Generation: the free cells are a random tree of the grid graph, grown from a random cell by
carving random frontier cells that touch exactly one free cell (randomised Prim on cells, until no
wall cell can be carved): the free cells' 4-neighbour graph is then a spanning tree of them, so
any two free cells are joined by exactly one path, and the shortest path is unique (no
``Batch.valid`` needed; the tests count shortest paths by BFS). Start: a uniform free cell; goal:
a uniform free cell at BFS distance >= ``min_distance`` steps (default n, at most 2 n) from it,
the maze redrawn when there is none (a random start of a 8x8 to 12x12 maze has a cell n steps away
almost always, 2 n steps away about half the time). The path is read off the BFS parents. The randomness is Python's
``random.Random`` seeded per row from the torch generator.

Supervised: every cell of the output grid (HRM's labels are the whole grid). Metrics: accuracy,
exact match (the whole grid: the path found), ``path_accuracy`` (the cells whose target is PATH;
most other cells are copies of the input). Chance: 1/5 (the five grid tokens). Split: by a hash
of the maze (the input grid with start and goal).
"""

from __future__ import annotations

import random
from collections import deque

import torch
from pydantic import Field, model_validator

from recur.tasks.base import (Batch, Task, TaskParams, accuracy_where, grid_batch, register_task, row_rngs,
                              sample_rows_of_split)

WALL, FREE, START, GOAL, PATH, SEP, PAD = range(7)


class MazeParams(TaskParams):
    size: int = Field(8, ge=8, le=12, description="n: the maze is an n x n grid")
    min_distance: int | None = Field(None, ge=1, le=24, description="fewest steps from start to goal (default n, "
                                                                    "at most 2 n)")

    @model_validator(mode="after")
    def _reachable(self):
        # a random start has a cell 2 n steps away in about half the mazes, 3 n in 2-4 %: cap the redraws
        if self.min_distance is not None and self.min_distance > 2 * self.size:
            raise ValueError(f"min_distance must be <= 2 * size = {2 * self.size}, got {self.min_distance}")
        return self


def neighbours(i: int, n: int) -> list[int]:
    r, c = divmod(i, n)
    return [(r + dr) * n + c + dc for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)) if 0 <= r + dr < n and 0 <= c + dc < n]


def tree_maze(n: int, rng: random.Random) -> list[bool]:
    """Free cells of an n x n grid that form a random tree (each carved cell touches one free cell)."""
    free = [False] * (n * n)
    first = rng.randrange(n * n)
    free[first] = True
    frontier = neighbours(first, n)
    while frontier:
        i = frontier.pop(rng.randrange(len(frontier)))  # a cell with >= 2 free neighbours never has 1 again
        if not free[i] and sum(free[j] for j in neighbours(i, n)) == 1:
            free[i] = True
            frontier.extend(j for j in neighbours(i, n) if not free[j])
    return free


def bfs(free: list[bool], start: int, n: int) -> tuple[list[int], list[int]]:
    """Distances (-1 unreachable) and parents from ``start`` over the free cells."""
    dist, parent = [-1] * (n * n), [-1] * (n * n)
    dist[start] = 0
    queue = deque([start])
    while queue:
        i = queue.popleft()
        for j in neighbours(i, n):
            if free[j] and dist[j] < 0:
                dist[j], parent[j] = dist[i] + 1, i
                queue.append(j)
    return dist, parent


def draw_maze(n: int, min_distance: int, rng: random.Random) -> list[int]:
    """One maze and its solution: the input grid's n^2 tokens, then the output grid's."""
    while True:
        free = tree_maze(n, rng)
        cells = [i for i, f in enumerate(free) if f]
        start = rng.choice(cells)
        dist, parent = bfs(free, start, n)
        far = [i for i in cells if dist[i] >= min_distance]
        if far:
            break
    goal = rng.choice(far)
    maze = [FREE if f else WALL for f in free]
    maze[start], maze[goal] = START, GOAL
    out = list(maze)
    i = parent[goal]
    while i != start:
        out[i] = PATH
        i = parent[i]
    return maze + out


@register_task
class Maze(Task):
    """Shortest path in an n x n tree maze: the maze, SEP, then the maze with the path marked."""

    separator = SEP

    name = "maze"
    Params = MazeParams
    description = ("n x n maze (size 8-12), free cells a random tree (unique shortest path): 'maze SEP solved [PAD..]', "
                   "grids row-major, WALL 0, FREE 1, START 2, GOAL 3, PATH 4 (the BFS path between start and goal), "
                   "SEP 5, PAD 6; 2 n^2 + 1 tokens (129 at n = 8); goal >= min_distance (default n) steps away. "
                   "Supervised: the output grid. Metric: accuracy, exact match, path_accuracy; chance 1/5.")

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    @property
    def cells(self) -> int:
        return self.params.size ** 2

    def min_seq_len(self) -> int:
        return 2 * self.cells + 1

    def answer_tokens(self) -> range:
        return range(WALL, PATH + 1)

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        size, N = self.params.size, self.cells
        min_distance = self.params.min_distance or size

        def draw(m: int) -> torch.Tensor:
            return torch.tensor([draw_maze(size, min_distance, rng) for rng in row_rngs(m, generator)],
                                dtype=torch.int64)

        rows = sample_rows_of_split(draw, n, split, content=lambda rows: rows[:, :N])  # by a hash of the maze
        return grid_batch(rows[:, :N], rows[:, N:], seq_len, SEP, PAD)

    def score_predictions(self, pred: torch.Tensor, batch: Batch) -> dict[str, float]:
        scores = super().score_predictions(pred, batch)
        scores["path_accuracy"] = accuracy_where(pred, batch, batch.targets == PATH)
        return scores
