"""associative_retrieval: ARMT's generator. An independent solver reads the answer from the inputs,
the layout is one pair per block, the splits are disjoint, the draws are seeded."""

from __future__ import annotations

import pytest
import torch

from recur.tasks import get_task
from recur.tasks.associative_retrieval import EOS, GEN, PAD, SEP

VARIANTS = [dict(key_size=1, value_size=1), dict(key_size=2, value_size=1), dict(key_size=1, value_size=2, rewrite=True),
            dict(key_size=2, value_size=3, rewrite=True)]


def solve(row: list[int]) -> tuple[list[int], int]:
    """Plain Python: parse the blocks, remember the latest value of each key, answer the query.
    Returns (the answer's digits, the position of GEN)."""
    memory, key, value, reading_value, query, gen_at = {}, [], [], False, None, None
    for t, token in enumerate(row):
        if token == PAD:
            break
        if token == SEP:
            reading_value = True
        elif token == GEN:
            reading_value, query, gen_at = True, tuple(key), t
        elif token == EOS:
            if query is None:
                memory[tuple(key)] = value
            key, value, reading_value = [], [], False
        else:
            (value if reading_value else key).append(token)
    return memory[query], gen_at


@pytest.mark.parametrize("params", VARIANTS)
@pytest.mark.parametrize("seq_len", [None, 37])
def test_an_independent_solver_reads_every_answer_from_the_inputs(params, seq_len):
    task = get_task("associative_retrieval", **params)
    seq_len = seq_len or 6 * task.block
    batch = task.batch(64, seq_len, torch.Generator().manual_seed(0), split="train")
    V = params["value_size"]
    for row, targets, mask in zip(batch.inputs.tolist(), batch.targets, batch.mask):
        answer, gen_at = solve(row)
        assert mask.nonzero().flatten().tolist() == list(range(gen_at, gen_at + V))
        assert targets[mask].tolist() == answer
        assert row[gen_at + 1:gen_at + 1 + V] == answer  # teacher forced: each digit predicts the next


@pytest.mark.parametrize("params", VARIANTS)
def test_one_pair_per_block_then_the_query_then_right_padding(params):
    task = get_task("associative_retrieval", **params)
    K, V, P = params["key_size"], params["value_size"], task.block
    seq_len = 5 * P + 2
    x = task.batch(32, seq_len, torch.Generator().manual_seed(1)).inputs
    n = task.num_pairs(seq_len)
    assert n == 4 and task.vocab_size == PAD + 1
    blocks = x[:, :(n + 1) * P].view(32, n + 1, P)
    assert (blocks[..., :K] < 16).all() and (blocks[..., K + 1:K + 1 + V] < 16).all() and (blocks[..., -1] == EOS).all()
    assert (blocks[:, :n, K] == SEP).all() and (blocks[:, n, K] == GEN).all()
    assert (x[:, (n + 1) * P:] == PAD).all()
    codes = (blocks[:, :n, :K] * 16 ** torch.arange(K)).sum(-1)
    distinct = torch.tensor([len(set(r)) == n for r in codes.tolist()])
    assert distinct.all() if not params.get("rewrite") else not distinct.all()


def test_without_rewrite_the_queried_pair_is_uniform():
    task = get_task("associative_retrieval", key_size=1)
    batch = task.batch(4000, 6 * task.block, torch.Generator().manual_seed(2))
    keys = batch.inputs[:, 0:5 * task.block:task.block]  # the five keys (one digit)
    query = batch.inputs[:, 5 * task.block]
    index = (keys == query[:, None]).float().argmax(1)
    counts = torch.bincount(index, minlength=5).float()
    assert (counts / 4000 - 0.2).abs().max() < 0.03


@pytest.mark.parametrize("rewrite", [False, True])
def test_train_and_test_are_disjoint_and_the_test_split_is_an_eighth(rewrite):
    task = get_task("associative_retrieval", key_size=1, value_size=1, rewrite=rewrite)  # 1 pair: 256 sequences
    seq_len = task.min_seq_len()
    train = task.batch(2000, seq_len, torch.Generator().manual_seed(3), split="train").inputs
    test = task.batch(500, seq_len, torch.Generator().manual_seed(4), split="test").inputs
    seen_train, seen_test = set(map(tuple, train.tolist())), set(map(tuple, test.tolist()))
    assert not seen_train & seen_test
    assert len(seen_train) + len(seen_test) == 256 and 20 <= len(seen_test) <= 44
    # at a longer length the test split is a large space too, not a handful of repeated rows
    batch = get_task("associative_retrieval", rewrite=rewrite).batch(64, 40, torch.Generator().manual_seed(5), "test")
    assert len(set(map(tuple, batch.inputs.tolist()))) == 64


def test_batches_are_seeded():
    task = get_task("associative_retrieval", rewrite=True)
    a = task.batch(8, 40, torch.Generator().manual_seed(6))
    b = task.batch(8, 40, torch.Generator().manual_seed(6))
    c = task.batch(8, 40, torch.Generator().manual_seed(7))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and not torch.equal(a.inputs, c.inputs)


def test_lengths_outside_the_key_space_are_clear_errors():
    task = get_task("associative_retrieval", key_size=1)
    with pytest.raises(ValueError, match="needs seq_len >= 8"):
        task.batch(2, 7, torch.Generator())
    task.check_seq_len(17 * 4 + 3)  # 16 pairs: every key once
    with pytest.raises(ValueError, match="at most 16 pairs"):
        task.batch(2, 18 * 4, torch.Generator())
    get_task("associative_retrieval", key_size=1, rewrite=True).check_seq_len(18 * 4)  # repeats allowed
    with pytest.raises(ValueError, match="key_size"):
        get_task("associative_retrieval", key_size=0)
