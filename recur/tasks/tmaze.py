"""T-Maze as RATE uses it (Cherepanov et al., "Recurrent Action Transformer with Memory", 2023;
CognitiveAISystems/RATE: the environment ``src/envs/tmaze/tmaze.py``, its expert data
``src/envs_datasets/tmaze_dataset.py``, its rollouts ``src/validation/val_tmaze.py``): offline
expert trajectories through a corridor of length L whose end is a T-junction; the cue shown at the
first step only says which arm (up or down) holds the goal.

    o_0 a_0 o_1 a_1 .. o_{L-1} a_{L-1} o_L a_L [PAD]
    ^ cue   ^ corridor             ^ junction: a_L = the cued turn; a_0 .. a_{L-1} = right

Each step is an observation token then the action the expert took; the action is supervised at
its observation (target of o_t = a_t, the next token): a causal model predicts a_t from the tokens
up to o_t, as RATE's head reads the observation's position. Tokens: actions 0-3 are the authors'
action ids (0 right, 1 up, 2 left, 3 down); an observation is 4 + 3 kind + (noise + 1), kind 0 cue
"up", 1 cue "down", 2 corridor, 3 junction, noise in {-1, 0, 1}; PAD is 16.

The environment (``TMazeClassicPassive`` with the authors' data settings): the agent starts at
x = 0 of a corridor x = 0..L; the goal is up or down (uniform) at x = L. The observation is
(y, cue, junction flag, noise), x itself hidden: the cue (+1 up, -1 down) only at the first step
(``hint_steps=1``), the flag 1 only at x = L, the noise uniform in {-1, 0, 1} at every step. A move
into a wall leaves the agent in place. The episode ends on reaching an arm (reward 1 at the goal,
else 0) or after L + 2 steps (``episode_timeout = corridor_length + 2``). The expert goes right L
times, then turns to the cued arm: L + 1 actions. The observation is one token here (the
authors' 4-vector has 12 reachable values before the episode ends). The return-to-go is left
out: the authors' data keeps only winning episodes (``win_only=True``), so it is 1 at every action
step and carries nothing (it changes to 0 after the last action, which is not predicted).

Corridor length: L = seq_len // 2 - 1 (2 (L + 1) tokens; an odd seq_len ends with one PAD, never
supervised); evaluation at a longer seq_len is a longer corridor. ``vary_corridor=true`` draws L
per sequence uniformly in [1, seq_len // 2 - 1], padded on the right with PAD, as the authors'
training set does (``L = random.randint(1, segment_length * segments - 2)``); the default keeps
L fixed, as their evaluations at each corridor length are.

Split: by a hash of the trajectory's tokens (cue, L and the noise of every step), so a test
trajectory never appears in training, at any seq_len. The noise is the only variation the
authors' data has besides the cue and L (``seed_noise``), so train and test share the two
(cue, L) pairs and differ in noise only: what a memory has to carry is the same in both, and
the split shows only that the model does not memorise noise patterns. 2 * 3^(L + 1)
trajectories exist at each L, about an eighth of them test: at L = 1, 3 of the 18; at L = 2, 8
of 54; so short corridors repeat trajectories within a split.

Metrics: ``accuracy`` (of the L + 1 actions), ``exact_match`` (every action right, teacher
forced), ``turn_accuracy`` (the action at the junction, the one that needs the cue) and, for an
autoregressive model, ``success``: the authors' success rate, a greedy closed-loop rollout in the
environment (argmax over the four action tokens, as their four-way head; the row's noise draws
replayed by time step) that counts the episodes ending at the goal. With a time limit of L + 1 +
``slack`` steps (authors: slack 1), a rollout that repeats the expert succeeds, and every
teacher-forced exact match is a rollout that repeats the expert, so exact_match <= success;
with slack 0 they are equal. With slack 1 a policy may waste one step (a move into a wall) and
still succeed. Chance (``chance``, the framework's: uniform guessing among the four action
tokens) is 1/4. A model that knows the corridor but not the cue reaches token accuracy
(L + 1/2) / (L + 1), turn accuracy, exact match and success 1/2: read T-Maze by
``turn_accuracy`` or ``success``, never by accuracy, and train with early stopping off (the
default accuracy rule, 0.99, holds without memory from L = 49).
"""

from __future__ import annotations

import torch
from pydantic import Field

from recur.tasks.base import Batch, Task, TaskParams, register_task, sample_rows_of_split

RIGHT, UP, LEFT, DOWN = 0, 1, 2, 3  # the authors' action ids: action_mapping [[1,0], [0,1], [-1,0], [0,-1]]
MOVES = ((1, 0), (0, 1), (-1, 0), (0, -1))  # (dx, dy) of each action
CUE_UP, CUE_DOWN, CORRIDOR, JUNCTION = 0, 1, 2, 3  # observation kinds
FIRST_OBS = 4
PAD = FIRST_OBS + 12


def obs_token(kind: torch.Tensor | int, noise: torch.Tensor | int) -> torch.Tensor | int:
    """The token of an observation of ``kind`` with ``noise`` in {-1, 0, 1}."""
    return FIRST_OBS + 3 * kind + noise + 1


class TMazeParams(TaskParams):
    vary_corridor: bool = Field(False, description="corridor length uniform in [1, seq_len // 2 - 1] per sequence "
                                                   "(the authors' training data), padded with PAD; else fixed")
    slack: int = Field(1, ge=0, le=64, description="steps the time limit allows beyond the expert's L + 1 "
                                                   "(authors: episode_timeout = L + 2, so 1)")
    rollout: bool = Field(True, description="score `success` by a greedy closed-loop rollout of the model")


@register_task
class TMaze(Task):
    """RATE's T-Maze: expert trajectories of a corridor with a cue at the first step, as tokens."""

    name = "tmaze"
    Params = TMazeParams
    description = ("RATE's T-Maze expert trajectories: 'o_0 a_0 .. o_L a_L', L = seq_len // 2 - 1; observation "
                   "tokens 4-15 (cue up/down at step 0, corridor, junction, each with noise -1/0/1), actions 0-3 "
                   "(right, up, left, down): L rights, then the cued turn; PAD 16. Supervised: each action at its "
                   "observation. Metrics: accuracy, exact match, turn_accuracy (the junction), success (greedy "
                   "rollout, time limit L + 1 + slack). Without memory: turn accuracy and success 1/2.")

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    def min_seq_len(self) -> int:
        return 4  # L = 1: the cue, one step right, the junction

    def answer_tokens(self) -> range:
        return range(RIGHT, DOWN + 1)  # the four actions

    def corridor_length(self, seq_len: int) -> int:
        """L at ``seq_len`` (the longest with ``vary_corridor``)."""
        return seq_len // 2 - 1

    # -- data -----------------------------------------------------------------------------
    def trajectories(self, m: int, L: int, generator: torch.Generator) -> torch.Tensor:
        """``m`` expert trajectories of corridor length ``L`` as tokens: int64 [m, 2 (L + 1)]."""
        down = torch.randint(2, (m,), generator=generator)  # the goal arm (authors: goal_y uniform in {-1, 1})
        noise = torch.randint(3, (m, L + 1), generator=generator) - 1
        kind = torch.full((m, L + 1), CORRIDOR, dtype=torch.int64)
        kind[:, 0] = CUE_UP + down
        kind[:, L] = JUNCTION
        action = torch.full((m, L + 1), RIGHT, dtype=torch.int64)
        action[:, L] = torch.where(down.bool(), DOWN, UP)
        return torch.stack([obs_token(kind, noise), action], dim=2).view(m, 2 * (L + 1))

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        L_max = self.corridor_length(seq_len)
        if self.params.vary_corridor:
            lengths = torch.randint(1, L_max + 1, (n,), generator=generator)
        else:
            lengths = torch.full((n,), L_max, dtype=torch.int64)
        inputs = torch.full((n, seq_len), PAD, dtype=torch.int64)
        for L in lengths.unique().tolist():  # ascending: the draws depend on the generator only
            rows = (lengths == L).nonzero().flatten()
            inputs[rows, :2 * (L + 1)] = sample_rows_of_split(
                lambda m, L=L: self.trajectories(m, L, generator), len(rows), split)
        targets = torch.zeros_like(inputs)
        targets[:, :-1] = inputs[:, 1:]
        mask = (inputs >= FIRST_OBS) & (inputs < PAD)  # the observations: each predicts its action
        targets[~mask] = 0
        return Batch(inputs, targets, mask)

    # -- scores ---------------------------------------------------------------------------
    def score_predictions(self, pred: torch.Tensor, batch: Batch) -> dict[str, float]:
        scores = super().score_predictions(pred, batch)
        junction = kind_of(batch.inputs) == JUNCTION  # one per row
        right = (pred == batch.targets)[junction]
        scores["turn_accuracy"] = float(right.float().mean()) if right.numel() else 0.0
        return scores

    def score_output(self, model, out, batch: Batch) -> dict[str, float]:
        scores = super().score_output(model, out, batch)
        if self.params.rollout and getattr(model, "autoregressive", False):
            scores["success"] = float(self.rollout(model, batch).float().mean())
        return scores

    @torch.no_grad()
    def rollout(self, model, batch: Batch) -> torch.Tensor:
        """Greedy closed-loop episodes of ``model`` in the environment of each row of ``batch``
        (its cue, corridor length and noise draws): bool [n], True where the episode ends at the goal.

        Each step feeds the observation token, takes the argmax over the four action tokens of the
        logits there, feeds that action and moves the agent (a move into a wall stays in place);
        the episode ends at an arm or after L + 1 + slack steps. The observation at step t carries
        the row's noise of step min(t, L) (the expert's draws, replayed by time)."""
        inputs = batch.inputs
        n, device = inputs.shape[0], inputs.device
        obs = inputs[:, 0::2]
        kinds = kind_of(obs)
        L = (kinds == JUNCTION).int().argmax(1)
        noise = (obs - FIRST_OBS) % 3 - 1
        cue = kinds[:, 0]
        goal = torch.where(cue == CUE_UP, 1, -1)
        limit = L + 1 + self.params.slack
        rows = torch.arange(n, device=device)
        dx = torch.tensor([m[0] for m in MOVES], device=device)
        dy = torch.tensor([m[1] for m in MOVES], device=device)
        x, y = torch.zeros_like(L), torch.zeros_like(L)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        success = torch.zeros_like(done)
        state = None
        for t in range(int(limit.max())):
            kind = cue if t == 0 else torch.where(x == L, JUNCTION, CORRIDOR)  # the cue on the first step only
            token = obs_token(kind, noise[rows, torch.minimum(L, torch.tensor(t, device=device))])
            out = model(token[:, None], state)
            action = out.logits[:, -1, RIGHT:DOWN + 1].argmax(-1)
            nx, ny = x + dx[action], y + dy[action]
            free = ((ny == 0) & (nx >= 0) & (nx <= L)) | ((nx == L) & (ny.abs() == 1))
            move = free & ~done
            x, y = torch.where(move, nx, x), torch.where(move, ny, y)
            ended = ~done & ((y != 0) | (t + 1 >= limit))
            success |= ended & (y == goal)
            done |= ended
            if bool(done.all()):
                break
            state = model(action[:, None], out.state).state
        return success


def kind_of(tokens: torch.Tensor) -> torch.Tensor:
    """The observation kind of each token (-1 for an action or PAD)."""
    is_obs = (tokens >= FIRST_OBS) & (tokens < PAD)
    return torch.where(is_obs, (tokens - FIRST_OBS) // 3, -1)
