"""tmaze: RATE's T-Maze expert trajectories. A policy that remembers the cue scores 1, one that
does not scores a half on the turn; the layout matches a hand-written trajectory; the greedy
rollout obeys the authors' time limit (one step of slack); the splits are disjoint; the draws are
seeded; bad input fails clearly."""

from __future__ import annotations

import pytest
import torch

from recur import ModelOutput, State
from recur.tasks import get_task
from recur.tasks.tmaze import PAD

# The token ids, written out here (not imported): actions 0-3, observations 4 + 3 kind + noise + 1.
RIGHT, UP, LEFT, DOWN = 0, 1, 2, 3
KIND = {"up": 0, "down": 1, "corridor": 2, "junction": 3}


def obs(kind: str, noise: int) -> int:
    return 4 + 3 * KIND[kind] + noise + 1


def kind(token: int) -> str | None:
    return next((k for k, v in KIND.items() if 4 + 3 * v <= token < 7 + 3 * v), None)


def solve(row: list[int], memory: bool = True) -> list[int]:
    """Plain Python: the action predicted at each position (0 where nothing is predicted). With
    ``memory`` the cue of the first observation decides the turn; without, the turn is always up."""
    pred, cue = [0] * len(row), None
    for t, token in enumerate(row):
        k = kind(token)
        if k in ("up", "down"):
            cue = k
        if k == "junction":
            pred[t] = (DOWN if cue == "down" else UP) if memory else UP
        elif k is not None:
            pred[t] = RIGHT
    return pred


@pytest.mark.parametrize("params", [{}, {"vary_corridor": True}])
@pytest.mark.parametrize("seq_len", [24, 31])
def test_a_policy_that_remembers_the_cue_scores_one(params, seq_len):
    task = get_task("tmaze", **params)
    batch = task.batch(64, seq_len, torch.Generator().manual_seed(0), split="test")
    pred = torch.tensor([solve(r) for r in batch.inputs.tolist()])
    assert torch.equal(pred[batch.mask], batch.targets[batch.mask])
    assert task.score_predictions(pred, batch) == {"accuracy": 1.0, "exact_match": 1.0, "turn_accuracy": 1.0}


def test_a_policy_without_memory_gets_the_corridor_and_half_the_turns():
    task = get_task("tmaze")
    L = 15
    batch = task.batch(4000, 2 * (L + 1), torch.Generator().manual_seed(1), split="test")
    pred = torch.tensor([solve(r, memory=False) for r in batch.inputs.tolist()])
    scores = task.score_predictions(pred, batch)
    assert scores["exact_match"] == pytest.approx(0.5, abs=0.03) and scores["exact_match"] == scores["turn_accuracy"]
    assert scores["accuracy"] == pytest.approx((L + scores["turn_accuracy"]) / (L + 1))
    assert task.chance(2 * (L + 1)) == 0.25 and list(task.answer_tokens()) == [RIGHT, UP, LEFT, DOWN]


def test_the_layout_is_the_hand_written_trajectory():
    """seq_len 9: L = 3, one PAD. The row is rebuilt by hand from its cue and its noise draws."""
    task = get_task("tmaze")
    assert task.corridor_length(9) == 3 and task.vocab_size == PAD + 1 == 17
    batch = task.batch(32, 9, torch.Generator().manual_seed(2))
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
        noise = [(row[2 * t] - 4) % 3 - 1 for t in range(4)]
        cue = kind(row[0])
        turn = UP if cue == "up" else DOWN
        assert row == [obs(cue, noise[0]), RIGHT, obs("corridor", noise[1]), RIGHT, obs("corridor", noise[2]), RIGHT,
                       obs("junction", noise[3]), turn, PAD]
        assert mask == [True, False] * 4 + [False]
        assert [target[t] for t in range(0, 8, 2)] == [RIGHT, RIGHT, RIGHT, turn]
    cues = [kind(r[0]) for r in batch.inputs.tolist()]
    assert {"up", "down"} == set(cues)
    noises = {(r - 4) % 3 - 1 for r in batch.inputs[:, 0:8:2].flatten().tolist()}
    assert noises == {-1, 0, 1}


def test_varied_corridors_are_padded_and_cover_the_range():
    task = get_task("tmaze", vary_corridor=True)
    batch = task.batch(400, 20, torch.Generator().manual_seed(3))  # L in 1..9
    lengths = []
    for row, mask in zip(batch.inputs.tolist(), batch.mask.tolist()):
        L = [kind(tok) for tok in row].index("junction") // 2
        lengths.append(L)
        assert row[2 * L + 2:] == [PAD] * (20 - 2 * L - 2) and sum(mask) == L + 1
        assert solve(row) == [t if m else 0 for t, m in zip(row[1:] + [0], mask)]
    assert set(lengths) == set(range(1, 10))


def test_batches_are_seeded():
    task = get_task("tmaze", vary_corridor=True)
    a, b, c = (task.batch(16, 30, torch.Generator().manual_seed(s)) for s in (4, 4, 5))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and not torch.equal(a.inputs, c.inputs)


def test_train_and_test_are_disjoint_by_trajectory():
    """L = 2: 2 * 3^3 = 54 trajectories, about an eighth of them test; and with varied corridors a
    trajectory keeps its split at every seq_len (the hash reads the trajectory, not its padding)."""
    task = get_task("tmaze")
    train = set(map(tuple, task.batch(2000, 6, torch.Generator().manual_seed(6), "train").inputs.tolist()))
    test = set(map(tuple, task.batch(500, 6, torch.Generator().manual_seed(7), "test").inputs.tolist()))
    assert not train & test and len(train) + len(test) == 54 and 3 <= len(test) <= 12
    varied = get_task("tmaze", vary_corridor=True)

    def trajectories(seq_len, split, seed):
        rows = varied.batch(3000, seq_len, torch.Generator().manual_seed(seed), split).inputs.tolist()
        return {tuple(tok for tok in r if tok != PAD) for r in rows}

    assert not trajectories(8, "train", 8) & (trajectories(12, "test", 9) | trajectories(7, "test", 10))


class Policy(torch.nn.Module):
    """A stand-in autoregressive model: right in the corridor, the turn at the junction from the cue
    it keeps in its state (``memory``) or always up; ``waste`` steps of "up" (into the wall) first,
    after the cue."""

    autoregressive = True

    def __init__(self, memory: bool = True, waste: int = 0):
        super().__init__()
        self.memory, self.waste = memory, waste

    def forward(self, tokens, state=None):
        n, T = tokens.shape
        cue = torch.full((n,), -1) if state is None else state["cue"]
        seen = torch.zeros(n, dtype=torch.int64) if state is None else state["seen"]
        logits = torch.zeros(n, T, PAD + 1)
        for t in range(T):
            for r in range(n):
                k = kind(int(tokens[r, t]))
                if k is None:
                    continue
                if k in ("up", "down"):
                    cue[r] = KIND[k]
                seen[r] += 1
                if k == "junction":
                    action = DOWN if self.memory and cue[r] == KIND["down"] else UP
                elif 2 <= seen[r] < 2 + self.waste:
                    action = UP
                else:
                    action = RIGHT
                logits[r, t, action] = 1.0
        return ModelOutput(logits, State(cue=cue.clone(), seen=seen.clone()))

    def predictions(self, out, batch):
        return out.logits.argmax(-1)


def scores(task, model, seq_len=22, n=256, seed=11):
    batch = task.batch(n, seq_len, torch.Generator().manual_seed(seed), split="test")
    return task.score_output(model, model(batch.inputs), batch)


def test_the_rollout_of_a_policy_with_memory_always_succeeds_and_one_without_half_the_time():
    task = get_task("tmaze")
    assert scores(task, Policy()) == {"accuracy": 1.0, "exact_match": 1.0, "turn_accuracy": 1.0, "success": 1.0}
    blind = scores(task, Policy(memory=False), n=1000)
    assert blind["success"] == blind["exact_match"] == blind["turn_accuracy"] == pytest.approx(0.5, abs=0.05)
    assert "success" not in get_task("tmaze", rollout=False).score_output(Policy(), *_out(task, Policy()))


def _out(task, model):
    batch = task.batch(4, 10, torch.Generator().manual_seed(0))
    return model(batch.inputs), batch


def test_the_time_limit_leaves_the_authors_one_step_of_slack():
    """One step wasted against the wall: no teacher-forced exact match, but the rollout still
    reaches the goal within L + 2 steps; not with slack 0, nor with two steps wasted. With varied
    corridors the limit is each row's own (a row of L = 1 has no corridor step to waste)."""
    task = get_task("tmaze")
    one = scores(task, Policy(waste=1))
    assert one["exact_match"] == 0.0 and one["success"] == 1.0
    assert scores(task, Policy(waste=2))["success"] == 0.0
    assert scores(get_task("tmaze", slack=0), Policy(waste=1))["success"] == 0.0
    assert scores(get_task("tmaze", slack=2), Policy(waste=2))["success"] == 1.0
    varied = scores(get_task("tmaze", vary_corridor=True), Policy(waste=1))
    assert varied["exact_match"] < 0.2 and varied["success"] == 1.0


def test_the_rollout_of_a_real_model_runs_and_bounds_exact_match():
    """An untrained rmt: every teacher-forced exact match is a rollout success."""
    from recur.models.rmt import RMT

    torch.manual_seed(0)
    task = get_task("tmaze")
    model = RMT(task.vocab_size, 16, 1, segment_len=6, n_memory=2).eval()
    batch = task.batch(32, 14, torch.Generator().manual_seed(12), split="test")
    with torch.no_grad():
        pred = model(batch.inputs).logits.argmax(-1)
    exact = ((pred == batch.targets) | ~batch.mask).all(1)
    success = task.rollout(model, batch)
    assert success.dtype == torch.bool and success.shape == (32,) and bool((success | ~exact).all())


def test_bad_input_is_a_clear_error():
    task = get_task("tmaze")
    with pytest.raises(ValueError, match="needs seq_len >= 4"):
        task.batch(2, 3, torch.Generator())
    with pytest.raises(ValueError, match="slack"):
        get_task("tmaze", slack=-1)
    with pytest.raises(ValueError, match="corridor"):
        get_task("tmaze", corridor=5)
    with pytest.raises(ValueError, match="split"):
        task.batch(2, 8, torch.Generator(), split="validation")
