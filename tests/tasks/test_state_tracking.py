"""State-tracking tasks: parity, modular_count, word_problem (prefix products of group elements)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.tasks import get_task, split_of
from recur.tasks.state_tracking import group_structure

CONFIGS = [
    ("parity", {}),
    ("modular_count", {"modulus": 7}),
    ("word_problem", {"group": "A5"}),
    ("word_problem", {"group": "S5"}),
    ("word_problem", {"group": "Z60"}),
    ("word_problem", {"group": "A4xZ5"}),
]
IDS = [f"{name}-{kw}" for name, kw in CONFIGS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- independent solver: plain Python, written apart from the vectorised generator -----------

def is_even(perm) -> bool:
    seen, transpositions = set(), 0
    for start in range(len(perm)):  # a cycle of length L is L - 1 transpositions
        length, i = 0, start
        while i not in seen:
            seen.add(i)
            i = perm[i]
            length += 1
        transpositions += max(length - 1, 0)
    return transpositions % 2 == 0


def factor(kind: str, k: int):
    """(elements, multiply) of one factor: Z_k by addition, S_k / A_k by composition a[b[i]]."""
    if kind == "Z":
        return list(range(k)), lambda a, b: (a + b) % k
    perms = [p for p in itertools.permutations(range(k)) if kind == "S" or is_even(p)]
    return perms, lambda a, b: tuple(a[b[i]] for i in range(k))


def reference_group(factors):
    parts = [factor(kind, k) for kind, k in factors]
    if len(parts) == 1:
        return parts[0]
    elements = list(itertools.product(*(els for els, _ in parts)))

    def mul(a, b):
        return tuple(m(x, y) for (_, m), x, y in zip(parts, a, b))

    return elements, mul


GROUPS = {"A5": [("A", 5)], "S5": [("S", 5)], "Z60": [("Z", 60)], "A4xZ5": [("A", 4), ("Z", 5)],
          "S3": [("S", 3)], "Z5": [("Z", 5)], "S3xZ2xA4": [("S", 3), ("Z", 2), ("A", 4)]}


def solve(name: str, params: dict, row: list[int]) -> list[int]:
    """The state after every prefix, from the input tokens alone."""
    out = []
    if name == "parity":
        acc = 0
        for x in row:
            acc ^= x
            out.append(acc)
    elif name == "modular_count":
        acc = 0
        for x in row:
            acc = (acc + x) % params.get("modulus", 5)
            out.append(acc)
    else:
        elements, mul = reference_group(GROUPS[params["group"]])
        index = {e: i for i, e in enumerate(elements)}
        acc = elements[row[0]]
        out.append(index[acc])
        for x in row[1:]:
            acc = mul(acc, elements[x])  # g_1 ... g_{t-1} times g_t on the right, as jopetty/word-problem
            out.append(index[acc])
    return out


# -- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_same_seed_same_batch_other_seed_other_batch(name, params):
    task = get_task(name, **params)
    a, b, c = (task.batch(16, 24, gen(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("final_only", [False, True])
@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_shapes_dtypes_range_and_mask(name, params, final_only):
    task = get_task(name, final_only=final_only, **params)
    for split in ("train", "test"):
        inputs, targets, mask = task.batch(9, 33, gen(2), split)
        assert inputs.shape == targets.shape == mask.shape == (9, 33)
        assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
        for t in (inputs, targets):
            assert 0 <= int(t.min()) and int(t.max()) < task.vocab_size
        expected = torch.zeros(9, 33, dtype=torch.bool)
        expected[:, -1] = True
        if not final_only:
            expected[:] = True
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_every_target_is_the_prefix_state_of_an_independent_solver(name, params):
    task = get_task(name, **params)
    for split in ("train", "test"):
        batch = task.batch(12, 40, gen(3), split)
        for row, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
            assert target == solve(name, params, row)


@settings(deadline=None, max_examples=15)
@given(group=st.sampled_from(sorted(GROUPS)), extra=st.integers(0, 70), seed=st.integers(0, 2**31),
       split=st.sampled_from(["train", "test"]))
def test_word_problem_matches_solver_at_random_lengths(group, extra, seed, split):
    task = get_task("word_problem", group=group)
    batch = task.batch(4, task.min_seq_len() + extra, gen(seed), split)
    for row, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        assert target == solve("word_problem", {"group": group}, row)


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_enumeration_is_the_documented_one(group):
    elements, _ = reference_group(GROUPS[group])
    assert list(group_structure(group)[0]) == elements
    assert get_task("word_problem", group=group).vocab_size == len(elements)


def test_group_orders_and_identity_first():
    assert {g: len(group_structure(g)[0]) for g in ("A5", "S5", "Z60", "A4xZ5")} == \
        {"A5": 60, "S5": 120, "Z60": 60, "A4xZ5": 60}
    for g in ("A5", "S5", "Z60", "A4xZ5"):
        table = group_structure(g)[1]
        order = table.shape[0]
        assert torch.equal(table[0], torch.arange(order)) and torch.equal(table[:, 0], torch.arange(order))
        # Latin square: every row and column is a permutation of the elements
        assert (table.sort(1).values == torch.arange(order)).all()
        assert (table.sort(0).values == torch.arange(order)[:, None]).all()


def test_multiplication_order_is_left_to_right_with_composition_a_of_b():
    task = get_task("word_problem", group="S3")
    els = list(task.elements)
    swap01, swap12 = els.index((1, 0, 2)), els.index((0, 2, 1))
    inputs = torch.tensor([[swap01, swap12]])
    target = task.prefix_states(inputs)[0, 1].item()
    # (swap01 * swap12)[i] = swap01[swap12[i]]: swap12 first, then swap01
    assert els[target] == (1, 2, 0)
    assert task.prefix_states(inputs.flip(1))[0, 1].item() == els.index((2, 0, 1))


def test_group_names_are_canonical():
    assert get_task("word_problem", group="a4_x_z5").params.group == "A4xZ5"
    assert get_task("word_problem", group="A4xZ5").config() == get_task("word_problem", group="A4_x_Z5").config()


@pytest.mark.parametrize("name,params,seq_len", [
    ("parity", {}, 8),  # 256 bit strings: a large train sample holds nearly all train rows
    ("modular_count", {"modulus": 5}, 4),
    ("word_problem", {"group": "Z5"}, 4),
    ("word_problem", {"group": "A5"}, 2),
])
def test_train_and_test_are_disjoint(name, params, seq_len):
    task = get_task(name, **params)
    train = task.batch(6000, seq_len, gen(4), "train").inputs
    test = task.batch(300, seq_len, gen(5), "test").inputs
    assert not split_of(train).any() and split_of(test).all()
    seen = {tuple(r) for r in train.tolist()}
    assert not seen & {tuple(r) for r in test.tolist()}


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_min_seq_len_holds_both_splits(name, params):
    task = get_task(name, **params)
    for split in ("train", "test"):
        assert task.batch(4, task.min_seq_len(), gen(6), split).inputs.shape == (4, task.min_seq_len())


@pytest.mark.parametrize("name,params,match", [
    ("parity", {"bogus": 1}, "bogus"),
    ("parity", {"final_only": "maybe"}, "final_only"),
    ("modular_count", {"modulus": 1}, "modulus"),
    ("word_problem", {"group": "Q8"}, "cannot read group"),
    ("word_problem", {"group": "S7"}, "2 to 6 points"),
    ("word_problem", {"group": "S6xZ2"}, "order 1440"),
    ("word_problem", {"group": "Z1"}, "at least 2"),
])
def test_bad_params_are_clear_value_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_task(name, **params)


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_too_short_seq_len_and_unknown_split_are_value_errors(name, params):
    task = get_task(name, **params)
    with pytest.raises(ValueError, match="needs seq_len >="):
        task.batch(2, task.min_seq_len() - 1, gen(0))
    with pytest.raises(ValueError, match="split"):
        task.batch(2, 16, gen(0), "val")
