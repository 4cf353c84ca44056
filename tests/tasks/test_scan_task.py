"""scan: the grammar gives the official 20,910 commands with their meanings, the four splits have the
paper's sizes and definitions, and a batch lays out 'command SEP actions EOS' teacher forced."""

from __future__ import annotations

import collections

import pytest
import torch

from recur.tasks import get_task
from recur.tasks.scan import A0, ACTIONS, EOS, PAD, SEP, WORDS, commands, split_commands


def test_the_grammar_has_the_official_commands_and_their_meanings():
    cmds = dict(commands())
    assert len(cmds) == len(commands()) == 20910
    L, R = "I_TURN_LEFT", "I_TURN_RIGHT"
    assert cmds["jump"] == ("I_JUMP",) and cmds["turn left"] == (L,)
    assert cmds["walk opposite right"] == (R, R, "I_WALK")
    assert cmds["turn around left"] == (L,) * 4
    assert cmds["look around right twice"] == (R, "I_LOOK") * 8
    assert cmds["run and jump left"] == ("I_RUN", L, "I_JUMP")
    assert cmds["run after jump left thrice"] == (L, "I_JUMP") * 3 + ("I_RUN",)
    lengths = collections.Counter(len(a) for a in cmds.values())
    assert max(lengths) == 48 and lengths[23] == 0 and max(len(c.split()) for c in cmds) == 9


def test_the_splits_have_the_papers_sizes_and_are_disjoint():
    sizes = {s: (len(split_commands(s, "train")), len(split_commands(s, "test"))) for s in
             ("length", "addprim_jump", "addprim_turn_left")}
    assert sizes == {"length": (16990, 3920), "addprim_jump": (14670, 7706), "addprim_turn_left": (21890, 1208)}
    cmds = commands()
    for split in ("simple", "length", "addprim_jump", "addprim_turn_left"):
        train, test = set(split_commands(split, "train")), set(split_commands(split, "test"))
        assert not train & test and len(train | test) == 20910
    jump = split_commands("addprim_jump", "train")
    alone = [i for i in jump if cmds[i][0] == "jump"]
    assert all("jump" not in cmds[i][0].split() for i in jump if cmds[i][0] != "jump")
    assert len(alone) == 1467 and len(alone) / len(jump) == pytest.approx(0.1, abs=1e-3)
    assert all(len(cmds[i][1]) >= 24 for i in split_commands("length", "test"))
    simple_test = len(split_commands("simple", "test")) / 20910
    assert simple_test == pytest.approx(0.2, abs=0.01)


def test_a_batch_is_command_sep_actions_eos_teacher_forced():
    task = get_task("scan", split="length")
    b = task.batch(32, 60, torch.Generator().manual_seed(0), split="test")
    meaning = dict(commands())
    for row, target, mask in zip(b.inputs.tolist(), b.targets, b.mask):
        s = row.index(SEP)
        command = " ".join(WORDS[w] for w in row[:s])
        actions = [A0 + ACTIONS.index(a) for a in meaning[command]]
        assert len(actions) >= 24  # the length split's test set
        assert row[s + 1:s + 1 + len(actions)] == actions and row[s + 1 + len(actions)] == EOS
        assert set(row[s + 2 + len(actions):]) <= {PAD}
        assert mask.nonzero().flatten().tolist() == list(range(s, s + len(actions) + 1))
        assert target[mask].tolist() == actions + [EOS]
    again = task.batch(32, 60, torch.Generator().manual_seed(0), split="test")
    assert torch.equal(b.inputs, again.inputs)


def test_bad_split_and_short_length_fail_clearly():
    with pytest.raises(ValueError, match="split"):
        get_task("scan", split="mcd1")
    with pytest.raises(ValueError, match="seq_len >= 59"):
        get_task("scan").batch(2, 40, torch.Generator())
