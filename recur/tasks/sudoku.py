"""Small Sudoku, the generated stand-in for HRM's and TRM's Sudoku data (Wang et al.,
"Hierarchical Reasoning Model", 2025, sapientinc/HRM; Jolicoeur-Martineau, "Less is More:
Recursive Reasoning with Tiny Networks", 2025; the CPU experiment of docs REFERENCES-wave2 B5):
an n x n grid (n = 4 with 2 x 2 boxes, n = 6 with boxes of 2 rows x 3 columns), each row, column
and box holding every digit once; a puzzle keeps some cells of a solution, which it determines
uniquely.

    p_1 .. p_{n^2} SEP s_1 .. s_{n^2} [PAD ..]
                   ^ SEP and s_1 .. s_{n^2 - 1} predict s_1 .. s_{n^2} (teacher forced)

Tokens: digit d (1..n) is d - 1, BLANK 6, SEP 7, PAD 8 (the same ids for both sizes); the puzzle
and the solution row-major. HRM's data is the same pair (puzzle with blanks, the full solution,
both 81 cells) for a non-causal model; here a causal model reads the puzzle, then writes the
solution after SEP. The layout takes 2 n^2 + 1 tokens (33 at n = 4, 73 at n = 6); a longer
seq_len is padded on the right with PAD (never supervised), a shorter one is an error.

Generation: a solution grid by randomised backtracking (cells in row-major order, digits tried in
a random order), then the cells in a random order, each blanked when the puzzle still has one
solution (a solver that counts solutions, stopping at 2). ``holes=None`` goes through every cell,
which leaves a locally minimal puzzle (no given can be removed: 10-12 blanks at n = 4, 24-28 at
n = 6); ``holes=k`` stops at k blanks (at most 12 at n = 4, where every one of the 288 grids has
12-blank puzzles, and 24 at n = 6; another removal order of the same grid is tried when one gets
stuck first). The randomness is
Python's ``random.Random`` seeded per row from the torch generator, so batches are deterministic.

Supervised: every solution cell, as HRM's labels are the whole solution grid (so exact match is
"the grid is solved"); ``blank_accuracy`` reports the accuracy on the blanks alone, the honest
token metric, since a given is a copy of the puzzle. ``blanks_only=true`` supervises (and scores)
only the blanks. Metrics: accuracy, exact match (the whole grid), blank_accuracy. Chance: 1/n.

Split: by a hash of the solution grid, not of the puzzle: every puzzle has one solution, so the
puzzles of the two splits are disjoint too, a test solution is never a training target, and the
split is decided before the costly removal (a hash of the puzzle would need every test candidate
carved first, 8 of them per test puzzle kept). There are 288 grids at n = 4 (about 36 of them
test) and 28,200,960 at n = 6.
"""

from __future__ import annotations

import random

import torch
from pydantic import Field, model_validator

from recur.tasks.base import (Batch, Task, TaskParams, accuracy_where, grid_batch, register_task, row_rngs,
                              sample_rows_of_split)

BLANK, SEP, PAD = 6, 7, 8
BOXES = {4: (2, 2), 6: (2, 3)}  # size -> (rows, columns) of a box
MAX_HOLES = {4: 12, 6: 24}  # the fewest blanks a locally minimal puzzle had in 200 draws: reached quickly


class SudokuParams(TaskParams):
    size: int = Field(4, ge=4, le=6, description="n: 4 (2x2 boxes) or 6 (2x3 boxes)")
    holes: int | None = Field(None, ge=1, le=24, description="blank cells (at most 12 at n = 4, 24 at n = 6); "
                                                             "default: as many as uniqueness allows in a random order")
    blanks_only: bool = Field(False, description="supervise only the blank cells (default: the whole solution, as HRM)")

    @model_validator(mode="after")
    def _size_and_holes(self):
        if self.size not in BOXES:
            raise ValueError(f"size must be 4 or 6, got {self.size}")
        if self.holes is not None and self.holes > MAX_HOLES[self.size]:
            raise ValueError(f"holes must be <= {MAX_HOLES[self.size]} at size {self.size}, got {self.holes}")
        return self


class Solver:
    """Backtracking over bitmasks of the digits still free in each row, column and box; a grid is a
    list of n^2 ints, 0 blank, 1..n digits."""

    def __init__(self, size: int):
        self.n = size
        R, C = BOXES[size]
        self.box = [(r // R) * (size // C) + c // C for r in range(size) for c in range(size)]
        self.full = (1 << size) - 1

    def masks(self, grid: list[int]) -> tuple[list[int], list[int], list[int]] | None:
        n = self.n
        rows, cols, boxes = [0] * n, [0] * n, [0] * n
        for i, v in enumerate(grid):
            if v:
                bit, r, c, b = 1 << (v - 1), i // n, i % n, self.box[i]
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    return None  # a repeated digit: no solution
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
        return rows, cols, boxes

    def count(self, grid: list[int], limit: int = 2) -> int:
        """Solutions of ``grid``, counted up to ``limit``."""
        state = self.masks(grid)
        if state is None:
            return 0
        rows, cols, boxes = state
        n, box, full = self.n, self.box, self.full
        blanks = [i for i, v in enumerate(grid) if not v]

        def search(k: int) -> int:
            if k == len(blanks):
                return 1
            # the blank with the fewest candidates first
            best, best_free, best_count = k, 0, n + 1
            for j in range(k, len(blanks)):
                i = blanks[j]
                free = full & ~(rows[i // n] | cols[i % n] | boxes[box[i]])
                c = bin(free).count("1")
                if c < best_count:
                    best, best_free, best_count = j, free, c
                    if c <= 1:
                        break
            if best_count == 0:
                return 0
            blanks[k], blanks[best] = blanks[best], blanks[k]
            i = blanks[k]
            r, c, b = i // n, i % n, box[i]
            found = 0
            while best_free and found < limit:
                bit = best_free & -best_free
                best_free ^= bit
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                found += search(k + 1)
                rows[r] ^= bit
                cols[c] ^= bit
                boxes[b] ^= bit
            blanks[k], blanks[best] = blanks[best], blanks[k]
            return found

        return search(0)

    def random_grid(self, rng: random.Random) -> list[int]:
        """A solution grid by randomised backtracking."""
        n, box = self.n, self.box
        grid = [0] * (n * n)
        rows, cols, boxes = [0] * n, [0] * n, [0] * n

        def fill(i: int) -> bool:
            if i == n * n:
                return True
            r, c, b = i // n, i % n, box[i]
            digits = list(range(1, n + 1))
            rng.shuffle(digits)
            for v in digits:
                bit = 1 << (v - 1)
                if (rows[r] | cols[c] | boxes[b]) & bit:
                    continue
                grid[i] = v
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                if fill(i + 1):
                    return True
                rows[r] ^= bit
                cols[c] ^= bit
                boxes[b] ^= bit
            grid[i] = 0
            return False

        fill(0)
        return grid

    def carve(self, solution: list[int], rng: random.Random, holes: int | None) -> list[int]:
        """A puzzle of ``solution`` with a unique solution: cells blanked in a random order while the
        solution stays unique, until ``holes`` blanks (None: through every cell)."""
        for _ in range(1000):
            puzzle = list(solution)
            order = list(range(len(puzzle)))
            rng.shuffle(order)
            made = 0
            for i in order:
                if made == holes:
                    break
                puzzle[i] = 0
                if self.count(puzzle) == 1:
                    made += 1
                else:
                    puzzle[i] = solution[i]
            if holes is None or made == holes:
                return puzzle
        raise RuntimeError(f"could not blank {holes} cells of a {self.n}x{self.n} grid with a unique solution")


@register_task
class Sudoku(Task):
    """n x n Sudoku (n = 4 or 6) with a unique solution: the puzzle, SEP, then the solution."""

    separator = SEP

    name = "sudoku"
    Params = SudokuParams
    description = ("n x n Sudoku (size 4: 2x2 boxes, 6: 2x3), unique solution: 'puzzle SEP solution [PAD..]', both "
                   "row-major, digit d is token d-1, BLANK 6, SEP 7, PAD 8; 2 n^2 + 1 tokens (33 / 73). Puzzles carved "
                   "from a random grid while the solution stays unique (holes=k blanks, default locally minimal). "
                   "Supervised: the solution (blanks_only=true: its blanks). Metric: accuracy, exact match (grid), "
                   "blank_accuracy; chance 1/n.")

    def __init__(self, **params):
        super().__init__(**params)
        self.solver = Solver(self.params.size)

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    @property
    def cells(self) -> int:
        return self.params.size ** 2

    def min_seq_len(self) -> int:
        return 2 * self.cells + 1

    def answer_tokens(self) -> range:
        return range(self.params.size)

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        N = self.cells

        def draw(m: int) -> torch.Tensor:
            return torch.tensor([self.solver.random_grid(rng) for rng in row_rngs(m, generator)], dtype=torch.int64)

        solutions = sample_rows_of_split(draw, n, split)  # 1..n, by a hash of the solution grid
        puzzles = torch.tensor([self.solver.carve(row, rng, self.params.holes)
                                for row, rng in zip(solutions.tolist(), row_rngs(n, generator))],
                               dtype=torch.int64).view(n, N)
        puzzle_tokens = torch.where(puzzles == 0, BLANK, puzzles - 1)
        return grid_batch(puzzle_tokens, solutions - 1, seq_len, SEP, PAD,
                          supervised=(puzzle_tokens == BLANK) if self.params.blanks_only else True)

    def score_predictions(self, pred: torch.Tensor, batch: Batch) -> dict[str, float]:
        scores = super().score_predictions(pred, batch)
        N = self.cells
        blank = torch.zeros_like(batch.mask)
        blank[:, N:2 * N] = batch.inputs[:, :N] == BLANK
        scores["blank_accuracy"] = accuracy_where(pred, batch, blank)
        return scores
