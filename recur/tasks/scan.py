"""SCAN (Lake & Baroni, "Generalization without Systematicity: On the Compositional Skills of
Sequence-to-Sequence Recurrent Networks", 2018): commands in a small grammar to action sequences.

Every command of the grammar is generated here (20,910, as the official ``tasks.txt``), with its
action sequence from the grammar's semantics:

    C -> S and S | S after S | S          [[a and b]] = [[a]] [[b]];   [[a after b]] = [[b]] [[a]]
    S -> V twice | V thrice | V           [[V twice]] = [[V]] [[V]]
    V -> D | U | x opposite dir | x around dir     x in U + {turn}, dir in {left, right}
    D -> U dir | turn dir                 [[u left]] = LTURN [[u]];  [[turn left]] = LTURN
    U -> walk | look | run | jump         [[walk]] = WALK ...
    [[x opposite left]] = LTURN LTURN [[x]];   [[x around left]] = (LTURN [[x]]) x 4;  [[turn]] = nothing

Layout, one stream (a transduction task): ``command SEP actions EOS [PAD ..]``, the actions teacher
forced: SEP predicts the first action, each action the next, the last action EOS. Exact match over
those positions is the exact match of greedy decoding.

Splits (the paper's, rebuilt from their definitions):
- ``simple``: a random 80/20 split of the commands (by a sha256 of the command text, so fixed);
- ``length``: train on commands whose action sequence has <= 22 actions, test on >= 24 (none has 23);
- ``addprim_jump``: train on every command without "jump" plus the primitive "jump" alone, repeated
  so that it is 10% of the training set (as the official file repeats it); test on every other
  command containing "jump";
- ``addprim_turn_left``: the same with the primitive "turn left" (commands containing "turn left").
A batch draws commands uniformly from its split's list (with the primitive's repeats).
"""

from __future__ import annotations

import hashlib
import itertools
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field

from recur.tasks.base import Batch, Task, TaskParams, register_task

WORDS = ("walk", "look", "run", "jump", "turn", "left", "right", "opposite", "around", "twice", "thrice", "and",
         "after")
ACTIONS = ("I_WALK", "I_LOOK", "I_RUN", "I_JUMP", "I_TURN_LEFT", "I_TURN_RIGHT")
A0 = len(WORDS)  # the first action id
SEP, EOS, PAD = A0 + len(ACTIONS), A0 + len(ACTIONS) + 1, A0 + len(ACTIONS) + 2
SPLITS = ("simple", "length", "addprim_jump", "addprim_turn_left")
MAX_COMMAND, MAX_ACTIONS = 9, 48  # the longest command (words) and action sequence of the grammar
PRIMITIVE_SHARE = 0.1

_PRIM = {"walk": ["I_WALK"], "look": ["I_LOOK"], "run": ["I_RUN"], "jump": ["I_JUMP"], "turn": []}
_TURN = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}


def _verbs() -> list[tuple[str, list[str]]]:
    """Every V with its meaning (34)."""
    out = [(u, _PRIM[u]) for u in ("walk", "look", "run", "jump")]
    for x in ("walk", "look", "run", "jump", "turn"):
        for d in ("left", "right"):
            out.append((f"{x} {d}", [_TURN[d], *_PRIM[x]]))
    for x in ("walk", "look", "run", "jump", "turn"):
        for d in ("left", "right"):
            out.append((f"{x} opposite {d}", [_TURN[d], _TURN[d], *_PRIM[x]]))
            out.append((f"{x} around {d}", [_TURN[d], *_PRIM[x]] * 4))
    return out


@lru_cache(maxsize=1)
def commands() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Every command of the grammar with its action sequence (20,910), in a fixed order."""
    phrases = []
    for v, m in _verbs():
        phrases += [(v, m), (f"{v} twice", m * 2), (f"{v} thrice", m * 3)]
    out = [(s, tuple(m)) for s, m in phrases]
    for (a, ma), (b, mb) in itertools.product(phrases, repeat=2):
        out.append((f"{a} and {b}", tuple(ma + mb)))
        out.append((f"{a} after {b}", tuple(mb + ma)))
    return tuple(out)


def _in_simple_test(command: str) -> bool:
    return int.from_bytes(hashlib.sha256(command.encode()).digest()[:4], "big") % 5 == 0  # 20%


@lru_cache(maxsize=None)
def split_commands(split: str, part: str) -> tuple[int, ...]:
    """Indices into ``commands()`` of ``split``'s ``part`` ("train" or "test"), repeats included."""
    cmds = commands()
    if split == "simple":
        return tuple(i for i, (c, _) in enumerate(cmds) if _in_simple_test(c) == (part == "test"))
    if split == "length":
        keep = (lambda n: n >= 24) if part == "test" else (lambda n: n <= 22)
        return tuple(i for i, (_, a) in enumerate(cmds) if keep(len(a)))
    primitive = {"addprim_jump": "jump", "addprim_turn_left": "turn left"}[split]
    has = [(f" {c} ".find(f" {primitive} ") >= 0) for c, _ in cmds]
    alone = next(i for i, (c, _) in enumerate(cmds) if c == primitive)
    if part == "test":
        return tuple(i for i, h in enumerate(has) if h and i != alone)
    rest = [i for i, h in enumerate(has) if not h]
    repeats = round(PRIMITIVE_SHARE * len(rest) / (1 - PRIMITIVE_SHARE))  # the primitive is 10% of the train set
    return tuple(rest + [alone] * repeats)


class ScanParams(TaskParams):
    split: Literal["simple", "length", "addprim_jump", "addprim_turn_left"] = Field(
        "simple", description=f"one of {', '.join(SPLITS)} (the paper's splits)")


@register_task
class Scan(Task):
    """SCAN commands to action sequences, one of the paper's four splits."""

    name = "scan"
    Params = ScanParams
    separator = SEP
    description = ("SCAN (Lake & Baroni 2018): 'command SEP actions EOS [PAD..]', 13 command words, 6 actions, "
                   f"SEP {SEP}, EOS {EOS}, PAD {PAD}; split simple / length / addprim_jump / addprim_turn_left (the "
                   "paper's); supervised: the actions and EOS, teacher forced. Metric: exact match (= greedy decoding's).")

    @property
    def vocab_size(self) -> int:
        return PAD + 1

    def min_seq_len(self) -> int:
        return MAX_COMMAND + 1 + MAX_ACTIONS + 1  # the longest command, SEP, the longest actions, EOS

    def answer_tokens(self) -> range:
        return range(A0, EOS + 1)  # the actions and EOS

    def encode(self, index: int) -> tuple[list[int], list[int]]:
        """The token ids of command ``index``: (command words, actions)."""
        command, actions = commands()[index]
        return [WORDS.index(w) for w in command.split()], [A0 + ACTIONS.index(a) for a in actions]

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        self.check_split(split)
        self.check_seq_len(seq_len)
        pool = split_commands(self.params.split, split)
        picks = torch.randint(len(pool), (n,), generator=generator).tolist()
        inputs = torch.full((n, seq_len), PAD, dtype=torch.int64)
        targets = torch.zeros(n, seq_len, dtype=torch.int64)
        mask = torch.zeros(n, seq_len, dtype=torch.bool)
        for r, p in enumerate(picks):
            words, actions = self.encode(pool[p])
            row = words + [SEP] + actions + [EOS]
            inputs[r, :len(row)] = torch.tensor(row)
            s = len(words)  # SEP predicts the first action, ..., the last action predicts EOS
            targets[r, s:s + len(actions) + 1] = torch.tensor(actions + [EOS])
            mask[r, s:s + len(actions) + 1] = True
        return Batch(inputs, targets, mask)
