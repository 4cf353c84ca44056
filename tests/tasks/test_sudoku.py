"""sudoku: an independent brute-force solver finds exactly one solution of every puzzle, the
target; every target is a valid Sudoku and agrees with the givens; the layout and the blank
counts are as documented; the splits are disjoint by solution grid; the draws are seeded; bad
input fails clearly."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task

BLANK, SEP, PAD = 6, 7, 8  # written out here, not imported
BOX = {4: (2, 2), 6: (2, 3)}


def units(n: int) -> list[list[int]]:
    """The cells of every row, column and box."""
    R, C = BOX[n]
    rows = [[r * n + c for c in range(n)] for r in range(n)]
    cols = [[r * n + c for r in range(n)] for c in range(n)]
    boxes = [[(br + r) * n + bc + c for r in range(R) for c in range(C)] for br in range(0, n, R) for bc in range(0, n, C)]
    return rows + cols + boxes


def is_valid(grid: list[int], n: int) -> bool:
    return all(sorted(grid[i] for i in unit) == list(range(n)) for unit in units(n))


def all_solutions(puzzle: list[int], n: int) -> list[list[int]]:
    """Plain brute force: fill the first blank with every digit that repeats nothing, recurse; all
    solutions, not stopping early."""
    peers = [set(j for unit in units(n) if i in unit for j in unit) - {i} for i in range(n * n)]
    grid, out = list(puzzle), []

    def search():
        try:
            i = grid.index(BLANK)
        except ValueError:
            out.append(list(grid))
            return
        for d in range(n):
            if all(grid[j] != d for j in peers[i]):
                grid[i] = d
                search()
                grid[i] = BLANK

    search()
    return out


@pytest.mark.parametrize("params", [dict(size=4), dict(size=4, holes=12), dict(size=6), dict(size=6, holes=18)])
def test_brute_force_finds_exactly_one_solution_the_target_a_valid_grid_that_agrees_with_the_givens(params):
    task = get_task("sudoku", **params)
    n = params["size"]
    N = n * n
    batch = task.batch(24, task.min_seq_len(), torch.Generator().manual_seed(0), split="train")
    for row, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        puzzle, solution = row[:N], row[N + 1:2 * N + 1]
        assert target[N:2 * N] == solution and row[N] == SEP
        assert is_valid(solution, n)
        assert all(p in (BLANK, s) for p, s in zip(puzzle, solution))  # the givens agree with the solution
        assert all_solutions(puzzle, n) == [solution]  # unique
        if params.get("holes"):
            assert puzzle.count(BLANK) == params["holes"]


def test_default_puzzles_are_locally_minimal():
    """Without ``holes`` no given can be removed: blanking any one leaves several solutions."""
    task = get_task("sudoku", size=4)
    for row in task.batch(8, 33, torch.Generator().manual_seed(1)).inputs.tolist():
        puzzle = row[:16]
        for i in (i for i, v in enumerate(puzzle) if v != BLANK):
            assert len(all_solutions(puzzle[:i] + [BLANK] + puzzle[i + 1:], 4)) > 1


@pytest.mark.parametrize("blanks_only", [False, True])
def test_the_layout_the_mask_and_the_blank_accuracy(blanks_only):
    task = get_task("sudoku", size=4, blanks_only=blanks_only)
    assert task.min_seq_len() == 33 and task.vocab_size == 9 and list(task.answer_tokens()) == [0, 1, 2, 3]
    batch = task.batch(16, 40, torch.Generator().manual_seed(2))
    assert (batch.inputs[:, 16] == SEP).all() and (batch.inputs[:, 33:] == PAD).all()
    blank = batch.inputs[:, :16] == BLANK
    expected = blank if blanks_only else torch.ones_like(blank)
    assert torch.equal(batch.mask[:, 16:32], expected) and batch.mask.sum() == expected.sum()
    assert task.score_predictions(batch.targets, batch) == {"accuracy": 1.0, "exact_match": 1.0, "blank_accuracy": 1.0}
    # right on the givens (a copy of the puzzle), wrong on every blank
    pred = batch.targets.clone()
    pred[:, 16:32] = torch.where(blank, (batch.targets[:, 16:32] + 1) % 4, batch.targets[:, 16:32])
    scores = task.score_predictions(pred, batch)
    assert scores["blank_accuracy"] == 0.0 and scores["exact_match"] == 0.0
    assert scores["accuracy"] == (0.0 if blanks_only else pytest.approx(1 - float(blank.float().mean())))


def test_train_and_test_are_disjoint_by_solution_grid():
    task = get_task("sudoku", size=4)
    train = task.batch(600, 33, torch.Generator().manual_seed(3), split="train").inputs
    test = task.batch(200, 33, torch.Generator().manual_seed(4), split="test").inputs
    grids = lambda x: set(map(tuple, x[:, 17:33].tolist()))  # noqa: E731
    puzzles = lambda x: set(map(tuple, x[:, :16].tolist()))  # noqa: E731
    assert not grids(train) & grids(test) and not puzzles(train) & puzzles(test)
    assert 15 <= len(grids(test)) <= 60 and len(grids(train)) > 150  # of 288 grids, about an eighth test


def test_batches_are_seeded():
    task = get_task("sudoku", size=6)
    a = task.batch(4, 73, torch.Generator().manual_seed(5))
    b = task.batch(4, 73, torch.Generator().manual_seed(5))
    c = task.batch(4, 73, torch.Generator().manual_seed(6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and not torch.equal(a.inputs, c.inputs)


def test_bad_parameters_and_lengths_fail_clearly():
    with pytest.raises(ValueError, match="size must be 4 or 6"):
        get_task("sudoku", size=5)
    with pytest.raises(ValueError, match="holes must be <= 12 at size 4"):
        get_task("sudoku", size=4, holes=13)
    with pytest.raises(ValueError, match="holes"):
        get_task("sudoku", size=6, holes=25)
    with pytest.raises(ValueError, match="needs seq_len >= 73"):
        get_task("sudoku", size=6).batch(2, 72, torch.Generator())
    assert get_task("sudoku", size=6).chance(73) == pytest.approx(1 / 6)
