"""In-context language learning (dfa_icll): strings of a per-sequence random DFA."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.tasks import get_task, split_of
from recur.tasks.dfa import DFA, canonical_dfa

PAD, SEP = 0, 1
CONFIGS = [
    {},
    {"fill": True},
    {"supervise_separator": True},
    {"num_symbols": 6, "min_states": 3, "max_states": 5, "min_alphabet": 2, "max_alphabet": 6, "max_edges": 2,
     "min_strings": 2, "max_strings": 4, "min_string_len": 2, "max_string_len": 6, "fill": True,
     "supervise_separator": True},
]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_row(task, dfa: DFA, inputs, targets, mask, valid):
    """Re-simulate ``dfa`` on the row and check every target, mask bit and valid set."""
    p = task.params
    sup_sep = p.supervise_separator
    vocab = task.vocab_size
    state, length, strings, lengths = 0, 0, 1, []
    content = [t for t in inputs if t != PAD]
    assert inputs[:len(content)] == content, "padding only at the end"
    for t, (x, y) in enumerate(zip(inputs, targets)):
        if x == PAD:
            assert y == PAD and not mask[t] and not any(valid[t])
            continue
        if x == SEP:
            lengths.append(length)
            state, length, strings = 0, 0, strings + 1
        else:
            assert x in dfa.transitions[state], "the shown string leaves the DFA's language"
            state, length = dfa.transitions[state][x], length + 1
        allowed = set(dfa.transitions[state])
        if sup_sep and length > 0:
            allowed.add(SEP)
        assert {v for v in range(vocab) if valid[t][v]} == allowed
        if y >= 2:
            assert mask[t] and y in dfa.transitions[state]
        elif y == SEP:
            assert mask[t] == (sup_sep and length > 0) and length >= p.min_string_len
        else:  # padding follows the last string
            assert not mask[t]
    assert all(p.min_string_len <= n <= p.max_string_len for n in lengths)
    return strings, lengths


@pytest.mark.parametrize("params", CONFIGS)
def test_same_seed_same_batch_other_seed_other_batch(params):
    task = get_task("dfa_icll", **params)
    a, b, c = (task.batch(6, 80, gen(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and torch.equal(a.valid, b.valid)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("params", CONFIGS)
def test_shapes_dtypes_and_ranges(params):
    task = get_task("dfa_icll", **params)
    for split in ("train", "test"):
        batch = task.batch(5, 300, gen(2), split)
        assert batch.inputs.shape == batch.targets.shape == batch.mask.shape == (5, 300)
        assert batch.valid.shape == (5, 300, task.vocab_size) and batch.valid.dtype == torch.bool
        assert batch.inputs.dtype == batch.targets.dtype == torch.int64 and batch.mask.dtype == torch.bool
        assert 0 <= int(batch.inputs.min()) and int(batch.inputs.max()) < task.vocab_size
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # next-token targets
        assert batch.mask.any(dim=1).all()
    assert get_task("dfa_icll").vocab_size == 20


@pytest.mark.parametrize("params", CONFIGS)
def test_targets_mask_and_valid_sets_match_a_resimulated_dfa(params):
    task = get_task("dfa_icll", **params)
    for split in ("train", "test"):
        batch, dfas = task.sample(8, 700, gen(3), split)
        for i, dfa in enumerate(dfas):
            check_row(task, dfa, batch.inputs[i].tolist(), batch.targets[i].tolist(),
                      batch.mask[i].tolist(), batch.valid[i].tolist())


@settings(deadline=None, max_examples=15)
@given(seq_len=st.integers(2, 400), seed=st.integers(0, 2**31), fill=st.booleans(), sup=st.booleans(),
       split=st.sampled_from(["train", "test"]))
def test_resimulation_at_random_lengths(seq_len, seed, fill, sup, split):
    task = get_task("dfa_icll", fill=fill, supervise_separator=sup)
    batch, dfas = task.sample(3, seq_len, gen(seed), split)
    for i, dfa in enumerate(dfas):
        check_row(task, dfa, batch.inputs[i].tolist(), batch.targets[i].tolist(),
                  batch.mask[i].tolist(), batch.valid[i].tolist())


def test_reference_numbers_of_strings_and_padding():
    task = get_task("dfa_icll")
    batch, dfas = task.sample(16, 1100, gen(4))  # 19 strings of <= 49 symbols fit in 1100 tokens
    for i, dfa in enumerate(dfas):
        strings, _ = check_row(task, dfa, batch.inputs[i].tolist(), batch.targets[i].tolist(),
                               batch.mask[i].tolist(), batch.valid[i].tolist())
        assert 10 <= strings <= 19
        assert batch.inputs[i, -1] == PAD  # no separator after the last string, then padding
    filled = get_task("dfa_icll", fill=True).batch(16, 1100, gen(4))
    assert (filled.inputs != PAD).all()


def test_random_dfas_have_the_reference_shape():
    task = get_task("dfa_icll")
    _, dfas = task.sample(200, 2, gen(5))
    for dfa in dfas:
        assert 1 <= len(dfa.transitions) <= 12
        assert all(1 <= len(edges) <= 3 for edges in dfa.transitions)
        assert len({s for edges in dfa.transitions for s in edges}) <= 18
        assert all(2 <= s < 20 and 0 <= t < len(dfa.transitions) for e in dfa.transitions for s, t in e.items())
    assert max(len(d.transitions) for d in dfas) >= 8


def distinguishable(dfa: DFA, p: int, q: int) -> bool:
    """Brute force over pairs reachable by common strings: do the continuations ever differ?"""
    seen, todo = {(p, q)}, [(p, q)]
    while todo:
        a, b = todo.pop()
        if set(dfa.transitions[a]) != set(dfa.transitions[b]):
            return True
        for c in dfa.transitions[a]:
            nxt = (dfa.transitions[a][c], dfa.transitions[b][c])
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_canonical_dfas_are_minimal_reachable_and_breadth_first():
    _, dfas = get_task("dfa_icll").sample(60, 2, gen(6))
    for dfa in dfas:
        n = len(dfa.transitions)
        assert all(distinguishable(dfa, p, q) for p in range(n) for q in range(p + 1, n))
        order, queue = [0], [0]
        while queue:
            s = queue.pop(0)
            for c in sorted(dfa.transitions[s]):
                t = dfa.transitions[s][c]
                if t not in order:
                    order.append(t)
                    queue.append(t)
        assert order == list(range(n))


def test_same_language_gives_the_same_canonical_form():
    rng = random.Random(0)
    _, dfas = get_task("dfa_icll").sample(40, 2, gen(7))
    for dfa in dfas:
        n = len(dfa.transitions)
        # a bloated copy: every state duplicated, edges into either copy at random, an
        # unreachable extra state, and the numbering shuffled (start kept at 0)
        big = [{c: t + n * rng.randrange(2) for c, t in e.items()} for e in dfa.transitions] * 2
        big.append({c: 0 for c in dfa.transitions[0]})
        perm = [0] + rng.sample(range(1, len(big)), len(big) - 1)
        shuffled = [None] * len(big)
        for old, edges in enumerate(big):
            shuffled[perm[old]] = {c: perm[t] for c, t in edges.items()}
        assert canonical_dfa(shuffled) == dfa


def test_train_and_test_dfas_are_disjoint_languages():
    # a small space of languages (a few hundred) so a train sample covers most of its split
    task = get_task("dfa_icll", num_symbols=3, min_states=3, max_states=3, min_alphabet=2, max_alphabet=3,
                    max_edges=2)
    _, train = task.sample(3000, 2, gen(8), "train")
    _, test = task.sample(200, 2, gen(9), "test")
    train_codes = torch.tensor([d.encoding() for d in train])
    test_codes = torch.tensor([d.encoding() for d in test])
    assert not split_of(train_codes).any() and split_of(test_codes).all()
    assert not {tuple(c) for c in train_codes.tolist()} & {tuple(c) for c in test_codes.tolist()}
    assert len({tuple(c) for c in test_codes.tolist()}) > 20


def test_score_accepts_any_valid_symbol():
    task = get_task("dfa_icll")
    batch = task.batch(4, 200, gen(10))
    logits = batch.valid.float() + torch.rand(batch.valid.shape, generator=gen(11)) * 0.5
    assert task.score(logits, batch) == {"accuracy": 1.0, "exact_match": 1.0}
    sep = torch.zeros_like(logits)
    sep[..., SEP] = 1.0
    assert task.score(sep, batch)["accuracy"] == 0.0


@pytest.mark.parametrize("params,match", [
    ({"bogus": 1}, "bogus"),
    ({"min_states": 9, "max_states": 5}, "min_states=9 is larger than max_states=5"),
    ({"max_alphabet": 19}, "exceeds num_symbols"),
    ({"max_edges": 5}, "min_alphabet"),
    ({"min_states": 3}, "min_states >= 4"),
    ({"max_states": 40}, "max_states"),
    ({"min_string_len": 0}, "min_string_len"),
])
def test_bad_params_are_clear_value_errors(params, match):
    with pytest.raises(ValueError, match=match):
        get_task("dfa_icll", **params)


def test_too_short_seq_len_and_bad_split_are_value_errors():
    task = get_task("dfa_icll")
    with pytest.raises(ValueError, match="needs seq_len >= 2"):
        task.batch(2, 1, gen(0))
    with pytest.raises(ValueError, match="split"):
        task.batch(2, 10, gen(0), "dev")
