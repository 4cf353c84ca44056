"""Associative recall: mqar (Zoology), induction, noisy_recall and fuzzy_recall (MAD)."""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.tasks import get_task, split_of
from recur.tasks.recall import first_index, motif_ids

CONFIGS = [
    ("mqar", {}),
    ("mqar", {"vocab_size": 64, "num_kv_pairs": 4, "placement": "uniform"}),
    ("mqar", {"vocab_size": 32, "num_kv_pairs": 3, "random_non_queries": False}),
    ("induction", {}),
    ("induction", {"vocab_size": 64}),
    ("noisy_recall", {}),
    ("noisy_recall", {"noise_frac": 0.8, "vocab_size": 20, "noise_vocab_size": 4}),
    ("fuzzy_recall", {}),
    ("fuzzy_recall", {"vocab_size": 40, "k_motif_size": 2, "v_motif_size": 4}),
    ("fuzzy_recall", {"vocab_size": 7, "k_motif_size": 1, "v_motif_size": 1}),
]
IDS = [f"{name}-{kw}" for name, kw in CONFIGS]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- independent solvers: plain Python, from the inputs alone ---------------------------------
# Each returns {position: target} for every position that must be supervised.

def solve_mqar(row: list[int], vocab: int, kv: int) -> dict[int, int]:
    half = vocab // 2
    keys, values = row[0:2 * kv:2], row[1:2 * kv:2]
    assert all(1 <= k < half for k in keys) and all(half <= v < vocab for v in values)
    assert len(set(keys)) == kv and len(set(values)) == kv
    value_of = dict(zip(keys, values))
    answers = {t: value_of[x] for t, x in enumerate(row) if t >= 2 * kv and x in value_of}
    assert sorted(row[t] for t in answers) == sorted(keys), "every key is queried exactly once"
    assert all((t - 2 * kv) % 2 == 0 for t in answers), "queries sit at even offsets of the query region"
    return answers


def solve_induction(row: list[int], vocab: int) -> dict[int, int]:
    num_keys = (vocab - 2) // 2
    is_key = lambda x: 1 <= x <= num_keys  # noqa: E731
    body = row[1:] if row[0] == 0 else row
    assert len(body) % 2 == 0 and body[-2] == vocab - 1
    value_of = {}
    for k, v in zip(body[0:-2:2], body[1:-2:2]):
        assert is_key(k) and num_keys < v < vocab - 1
        assert value_of.setdefault(k, v) == v, "a key changed its value"
    return {len(row) - 1: value_of[row[-1]]}


def solve_noisy(row: list[int], vocab: int, noise: int) -> dict[int, int]:
    num_keys = (vocab - 1 - noise) // 2
    value_of, answers, t = {}, {}, 0
    if row[0] == 0:
        t = 1
    while t < len(row):
        x = row[t]
        if x >= vocab - noise:  # a noise token
            t += 1
            continue
        assert 1 <= x <= num_keys, f"expected a key at {t}, got {x}"
        if x in value_of:
            answers[t] = value_of[x]
        if t + 1 < len(row):
            v = row[t + 1]
            assert num_keys < v < vocab - noise
            assert value_of.setdefault(x, v) == v, "a key changed its value"
        t += 2
    assert len(row) - 1 in answers, "the last token must query a key shown before"
    return answers


def solve_fuzzy(row: list[int], vocab: int) -> dict[int, int]:
    num_keys = (vocab - 1) // 2
    t = 0
    while row[t] == 0:
        t += 1
    assert 0 not in row[t:]
    runs = []  # (is_key, start, tokens)
    while t < len(row):
        kind, start = row[t] <= num_keys, t
        while t < len(row) and (row[t] <= num_keys) == kind:
            t += 1
        runs.append((kind, start, tuple(row[start:t])))
    if runs[-1][0]:  # the final value is cut to nothing: only its first token is a target
        runs.append((False, len(row), ()))
    assert all(kind == (i % 2 == 0) for i, (kind, _, _) in enumerate(runs)), "keys and values must alternate"
    value_of, answers = {}, {}
    for i in range(0, len(runs), 2):
        (_, kstart, key), (_, vstart, value) = runs[i], runs[i + 1]
        assert len(set(key)) == len(key) and len(set(value)) == len(value)
        last = i + 2 == len(runs)
        if key in value_of:
            want = value_of[key]
            assert want[:len(value)] == value and (last or value == want)
            for j, tok in enumerate(want):  # position before each value token predicts it
                answers[vstart - 1 + j] = tok
        else:
            assert not last, "the final key must have appeared before"
            value_of[key] = value
    return answers


def solve(name: str, params: dict, row: list[int], task) -> dict[int, int]:
    if name == "mqar":
        return solve_mqar(row, task.vocab_size, params.get("num_kv_pairs", 8))
    if name == "induction":
        return solve_induction(row, task.vocab_size)
    if name == "noisy_recall":
        return solve_noisy(row, task.vocab_size, params.get("noise_vocab_size", 16))
    return solve_fuzzy(row, task.vocab_size)


def lengths(task) -> list[int]:
    m = task.min_seq_len()
    return [m, m + 1, 2 * m + 7]


# -- the contract -------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_same_seed_same_batch_other_seed_other_batch(name, params):
    task = get_task(name, **params)
    seq_len = task.min_seq_len() + 9
    a, b, c = (task.batch(6, seq_len, gen(s)) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_shapes_dtypes_and_token_range(name, params):
    task = get_task(name, **params)
    for split in ("train", "test"):
        for seq_len in lengths(task):
            inputs, targets, mask = task.batch(5, seq_len, gen(2), split)
            assert inputs.shape == targets.shape == mask.shape == (5, seq_len)
            assert inputs.dtype == targets.dtype == torch.int64 and mask.dtype == torch.bool
            for t in (inputs, targets):
                assert 0 <= int(t.min()) and int(t.max()) < task.vocab_size
            assert mask.any(dim=1).all()


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_every_supervised_target_matches_an_independent_solver(name, params):
    task = get_task(name, **params)
    for split in ("train", "test"):
        for seq_len in lengths(task):
            batch = task.batch(12, seq_len, gen(3), split)
            for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
                answers = solve(name, params, row, task)
                assert sorted(answers) == [t for t in range(seq_len) if mask[t]], "mask at the wrong positions"
                assert all(target[t] == want for t, want in answers.items())


@pytest.mark.parametrize("name,params", CONFIGS, ids=IDS)
def test_split_of_agrees_with_the_split_asked_for(name, params):
    task = get_task(name, **params)
    seq_len = task.min_seq_len() + 4
    for split in ("train", "test"):
        batch = task.batch(40, seq_len, gen(4), split)
        if name == "mqar":
            kv = params.get("num_kv_pairs", 8)
            pairs = [sorted(zip(r[0:2 * kv:2], r[1:2 * kv:2])) for r in batch.inputs.tolist()]
            content = torch.tensor([[k for k, _ in p] + [v for _, v in p] for p in pairs])
        else:
            content = batch.inputs
        assert (split_of(content) == (split == "test")).all()


@pytest.mark.parametrize("name,params,seq_len", [
    ("mqar", {"vocab_size": 12, "num_kv_pairs": 2}, 8),  # C(5,2) key sets x 6*5 values = 300 assignments
    ("induction", {"vocab_size": 6}, 18),
    ("noisy_recall", {"vocab_size": 6, "noise_vocab_size": 1, "noise_frac": 0.3}, 17),
    ("fuzzy_recall", {"vocab_size": 5, "k_motif_size": 1, "v_motif_size": 1}, 17),
])
def test_train_and_test_are_disjoint(name, params, seq_len):
    task = get_task(name, **params)
    assert task.min_seq_len() == seq_len
    train = task.batch(6000, seq_len, gen(5), "train").inputs
    test = task.batch(400, seq_len, gen(6), "test").inputs
    if name == "mqar":
        def content(inputs):
            return {tuple(sorted(zip(r[0:4:2], r[1:4:2]))) for r in inputs.tolist()}
        train_c, test_c = content(train), content(test)
        assert len(train_c) > 200  # the sample covers most of the train split
    else:
        train_c, test_c = set(map(tuple, train.tolist())), set(map(tuple, test.tolist()))
        if name != "noisy_recall":  # a small space: the sample revisits its rows, so overlap would show
            assert len(train_c) < 3000
    assert not train_c & test_c


# -- MQAR specifics ---------------------------------------------------------------------------

def query_gaps(task, seq_len: int, n: int, seed: int) -> list[int]:
    kv = task.params.num_kv_pairs
    mask = task.batch(n, seq_len, gen(seed)).mask
    return [(t - 2 * kv) // 2 for row in mask.tolist() for t, m in enumerate(row) if m]


def test_mqar_layout_matches_zoology():
    task = get_task("mqar", vocab_size=8192, num_kv_pairs=16)
    assert task.min_seq_len() == 64
    inputs, targets, mask = task.batch(30, 256, gen(7))
    assert (mask.sum(1) == 16).all() and not mask[:, :32].any() and not mask[:, 33::2].any()
    assert (inputs[:, 0:32:2] < 4096).all() and (inputs[:, 1:32:2] >= 4096).all()
    fill = inputs[:, 32:][~mask[:, 32:]]
    assert (fill < 4096).float().mean() > 0.4 and (fill >= 4096).float().mean() > 0.4  # uniform, both halves
    quiet = get_task("mqar", vocab_size=64, num_kv_pairs=4, random_non_queries=False)
    inputs, _, mask = quiet.batch(10, 40, gen(8))
    assert ((inputs[:, 8:] != 0) == mask[:, 8:]).all()  # Zoology's example: zeros between queries


def test_mqar_power_law_puts_queries_near_the_context():
    power = get_task("mqar", vocab_size=512, num_kv_pairs=4)
    uniform = get_task("mqar", vocab_size=512, num_kv_pairs=4, placement="uniform")
    space = (200 - 8) // 2
    p_gaps, u_gaps = query_gaps(power, 200, 500, 9), query_gaps(uniform, 200, 500, 9)
    assert max(p_gaps + u_gaps) < space and min(p_gaps + u_gaps) >= 0
    # p(g) ~ (g+1)^-0.99: about half the mass in the first ~10 of 96 slots
    assert sum(g < 10 for g in p_gaps) / len(p_gaps) > 0.3
    assert abs(sum(u_gaps) / len(u_gaps) - (space - 1) / 2) < 3
    first_slot = collections.Counter(p_gaps)[0] / 500  # P(slot 0 among 4 draws)
    assert 0.4 < first_slot < 0.75


def test_mqar_split_follows_the_assignment_not_the_order():
    task = get_task("mqar", vocab_size=64, num_kv_pairs=4)
    inputs = task.batch(200, 32, gen(10), "test").inputs
    for row in inputs[:20].tolist():  # the same pairs in another order are in the same split
        pairs = list(zip(row[0:8:2], row[1:8:2]))
        shuffled = pairs[::-1]
        content = torch.tensor([[k for k, _ in sorted(shuffled)] + [v for _, v in sorted(shuffled)]])
        assert split_of(content).all()


# -- MAD family specifics ---------------------------------------------------------------------

def test_noisy_recall_noise_fraction():
    task = get_task("noisy_recall", noise_frac=0.6)
    inputs = task.batch(200, 257, gen(11)).inputs
    noise_share = (inputs >= 16).float().mean().item()  # noise tokens are [16, 32)
    assert 0.55 < noise_share < 0.65


@settings(deadline=None, max_examples=15)
@given(k=st.integers(1, 3), v=st.integers(1, 3), extra=st.integers(0, 60), seed=st.integers(0, 2**31))
def test_fuzzy_recall_at_random_motif_sizes_and_lengths(k, v, extra, seed):
    task = get_task("fuzzy_recall", vocab_size=16, k_motif_size=k, v_motif_size=v)
    seq_len = task.min_seq_len() + extra
    batch = task.batch(4, seq_len, gen(seed))
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(), batch.mask.tolist()):
        answers = solve_fuzzy(row, 16)
        assert sorted(answers) == [t for t in range(seq_len) if mask[t]]
        assert all(target[t] == want for t, want in answers.items())
        assert row.count(0) < k + v + 2 * (k + v)  # padding only fills the tail that no pair fits


def test_fuzzy_recall_uses_every_motif_size():
    task = get_task("fuzzy_recall")
    inputs = task.batch(50, 128, gen(12)).inputs
    sizes = collections.Counter()
    for row in inputs.tolist():
        t, row = 0, [x for x in row if x]
        while t < len(row):
            start = t
            while t < len(row) and (row[t] <= 7) == (row[start] <= 7):
                t += 1
            sizes[(row[start] <= 7, t - start)] += 1
    assert all(sizes[(is_key, s)] > 50 for is_key in (True, False) for s in (1, 2, 3))


def test_first_index_and_motif_ids():
    ids = torch.tensor([[3, 1, 3, 2, 1, 3], [0, 0, 0, 5, 4, 5]])
    assert first_index(ids).tolist() == [[0, 1, 0, 3, 1, 0], [0, 0, 0, 3, 4, 3]]
    motifs = torch.tensor([[[1, -1], [1, 2], [2, 1], [1, 2], [1, -1]]])
    got = motif_ids(motifs, 3)[0].tolist()
    assert got[0] == got[4] and got[1] == got[3] and len({got[0], got[1], got[2]}) == 3


# -- errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,match", [
    ("mqar", {"bogus": 1}, "bogus"),
    ("mqar", {"num_kv_pairs": 0}, "num_kv_pairs"),
    ("mqar", {"vocab_size": 16, "num_kv_pairs": 8}, "do not fit"),
    ("mqar", {"power_a": 0}, "power_a"),
    ("mqar", {"placement": "zipf"}, "placement"),
    ("induction", {"vocab_size": 5}, "vocab_size"),
    ("noisy_recall", {"noise_frac": 0.95}, "noise_frac"),
    ("noisy_recall", {"vocab_size": 20, "noise_vocab_size": 16}, "at least 4"),
    ("fuzzy_recall", {"vocab_size": 8, "k_motif_size": 4}, "k_motif_size"),
    ("fuzzy_recall", {"v_motif_size": 0}, "v_motif_size"),
])
def test_bad_params_are_clear_value_errors(name, params, match):
    with pytest.raises(ValueError, match=match):
        get_task(name, **params)


@pytest.mark.parametrize("name,params,shortest", [
    ("mqar", {"num_kv_pairs": 16}, 64), ("induction", {}, 8), ("noisy_recall", {}, 7), ("fuzzy_recall", {}, 11),
])
def test_too_short_seq_len_is_a_value_error(name, params, shortest):
    task = get_task(name, **params)
    assert task.min_seq_len() == shortest
    task.batch(2, shortest, gen(0))
    with pytest.raises(ValueError, match=f"needs seq_len >= {shortest}"):
        task.batch(2, shortest - 1, gen(0))
    with pytest.raises(ValueError, match="split"):
        task.batch(2, shortest, gen(0), split="valid")
