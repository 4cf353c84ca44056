"""ReCAT (recur/models/recat.py): the composition and the pruned inside pass against hand
computations, the best tree against brute force over every binary tree, gradients into the span
scorer and the composition functions, and the options' errors. The registry suite covers the
time contract (state carry, stepping, packing) with no code here."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recur.models.recat import CIOLayer, Compose, ReCAT, SpanScorer, best_tree, inside, internal_post_order
from recur.tasks.base import Batch

D = 4


def hand_compose(c: Compose, q, q_role: int, ctx: list[torch.Tensor], roles: list[int]) -> torch.Tensor:
    """Compose written out for one query and one head: attention by explicit dot products."""
    r = c.roles.weight
    qq = q + r[q_role]
    cc = [v + r[k] for v, k in zip(ctx, roles)]
    logits = torch.stack([c.q.weight @ qq @ (c.k.weight @ v) for v in cc]) / math.sqrt(qq.numel())
    p = torch.exp(logits - logits.max())
    p = p / p.sum()
    att = sum(pi * (c.v.weight @ v) for pi, v in zip(p, cc))
    z = F.layer_norm(qq + c.o.weight @ att, (qq.numel(),), c.norm1.weight, c.norm1.bias)
    lin1, lin2 = c.mlp[0], c.mlp[2]
    m = lin2.weight @ F.gelu(lin1.weight @ z + lin1.bias) + lin2.bias
    return F.layer_norm(z + m, (z.numel(),), c.norm2.weight, c.norm2.bias)


def layer(topk=None, seed=0) -> CIOLayer:
    torch.manual_seed(seed)
    cio = CIOLayer(D, topk=topk, score_dim=3, heads=1, ratio=2.0).double()
    for p in cio.parameters():  # away from the init's near-zero roles and query: every term matters
        nn.init.normal_(p, std=0.7)
    return cio


def score(s: SpanScorer, left, right) -> torch.Tensor:
    return (s.left(left) * s.right(right)).sum() / math.sqrt(s.score_dim)


def test_compose_equals_its_hand_computation():
    c = layer().inside
    g = torch.Generator().manual_seed(1)
    q, a, b = (torch.randn(D, generator=g, dtype=torch.float64) for _ in range(3))
    got = c(q, torch.tensor(2), torch.stack([q, a, b]), torch.tensor([0, 1, 2]))
    torch.testing.assert_close(got, hand_compose(c, q, 2, [q, a, b], [0, 1, 2]), rtol=1e-12, atol=1e-12)


def test_inside_on_three_tokens_equals_the_hand_computation():
    cio = layer()
    x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    e, best = inside(x, cio.inside, cio.scorer, cio.query, topk=None)
    c, s, q = cio.inside, cio.scorer, cio.query
    x0, x1, x2 = x[0]
    e01 = hand_compose(c, q, 0, [q, x0, x1], [0, 1, 2])
    e12 = hand_compose(c, q, 0, [q, x1, x2], [0, 1, 2])
    a01, a12 = score(s, x0, x1), score(s, x1, x2)  # one split: its weight is 1
    t1 = score(s, x0, e12) + a12  # split after token 0: x0 | (x1 x2)
    t2 = score(s, e01, x2) + a01  # split after token 1: (x0 x1) | x2
    w1, w2 = torch.softmax(torch.stack([t1, t2]), 0)
    e02 = w1 * hand_compose(c, q, 0, [q, x0, e12], [0, 1, 2]) + w2 * hand_compose(c, q, 0, [q, e01, x2], [0, 1, 2])
    close = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e[2][0], torch.stack([e01, e12]), **close)
    torch.testing.assert_close(e[3][0, 0], e02, **close)
    # the best tree: the split with the larger pair score plus its child's (Viterbi, no soft a)
    v1, v2 = score(s, x0, e12) + a12, score(s, e01, x2) + a01
    assert int(best[3][0, 0]) == (1 if v1 > v2 else 2)


def test_pruning_keeps_the_topk_splits_by_score():
    """topk=1: each span composes its single best split (by s + a), so e is that composition."""
    cio = layer(topk=1)
    x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    e, _ = inside(x, cio.inside, cio.scorer, cio.query, topk=1)
    c, s, q = cio.inside, cio.scorer, cio.query
    x0, x1, x2 = x[0]
    e01, e12 = e[2][0]
    t1, t2 = score(s, x0, e12) + score(s, x1, x2), score(s, e01, x2) + score(s, x0, x1)
    kept = [q, x0, e12] if t1 > t2 else [q, e01, x2]
    torch.testing.assert_close(e[3][0, 0], hand_compose(c, q, 0, kept, [0, 1, 2]), rtol=1e-12, atol=1e-12)


class SumCompose(nn.Module):
    """A contrived composition: a span is the sum of its two children (so of its leaves, whatever
    the split weights), which makes every tree's score computable by hand."""

    def forward(self, query, query_role, context, roles):
        return context[..., 1, :] + context[..., 2, :]


def trees(i: int, n: int):
    """Every binary tree over tokens i .. i + n - 1, as a nested tuple of leaf indices."""
    if n == 1:
        yield i
        return
    for m in range(1, n):
        for left in trees(i, m):
            for right in trees(i + m, n - m):
                yield (left, right)


def tree_score(t, x, scorer):
    """Sum over the internal nodes of the pair score of (sum of left leaves, sum of right leaves)."""
    if isinstance(t, int):
        return x[t], 0.0
    (lv, ls), (rv, rs) = tree_score(t[0], x, scorer), tree_score(t[1], x, scorer)
    return lv + rv, ls + rs + float(score(scorer, lv, rv).detach())


def as_nested(nodes):
    """A pre-order node list of ``best_tree`` as the nested tuple ``trees`` yields."""
    it = iter(nodes)

    def build():
        i, L, _, _ = next(it)
        if L == 1:
            return i
        return (build(), build())
    return build()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_tree_is_the_brute_force_argmax_under_a_contrived_scorer(seed):
    n = 6  # 42 binary trees
    torch.manual_seed(seed)
    scorer = SpanScorer(D, D).double()
    x = torch.randn(2, n, D, generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    _, best = inside(x, SumCompose(), scorer, torch.zeros(D, dtype=torch.float64), topk=2)
    for row, nodes in enumerate(best_tree(best, n)):
        assert len(nodes) == 2 * n - 1
        scored = {t: tree_score(t, x[row], scorer)[1] for t in trees(0, n)}
        assert as_nested(nodes) == max(scored, key=scored.get)


def test_internal_post_order_puts_children_before_parents_and_the_root_last():
    scorer = SpanScorer(D, D).double()
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, best = inside(x, SumCompose(), scorer, torch.zeros(D, dtype=torch.float64), topk=None)
    node = torch.tensor(best_tree(best, 7))
    order = internal_post_order(node)
    for row in range(3):
        seen = set()
        for slot in order[row].tolist():
            i, L, _, _ = node[row, slot].tolist()
            children = [s for s in range(node.shape[1]) if node[row, s, 2] == slot]
            assert all(node[row, ch, 1] == 1 or ch in seen for ch in children)
            seen.add(slot)
        assert node[row, order[row, -1], 1] == 7  # the root


def test_gradients_reach_the_scorer_and_both_compositions_and_match_finite_differences():
    cio = layer(topk=2)
    x = torch.randn(1, 5, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out, _ = cio(x)
    out.pow(2).sum().backward()
    for part in (cio.scorer, cio.inside, cio.outside):
        for name, p in part.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # the scorer's gradient is the derivative of the output (the pruned set and the tree are fixed
    # near this point, so the function is smooth there)
    w = cio.scorer.left[2].weight

    def f(weight):
        saved = w.data.clone()
        w.data.copy_(weight)
        try:
            return cio(x)[0].pow(2).sum()
        finally:
            w.data.copy_(saved)

    cio.zero_grad()
    f(w.detach()).backward()
    analytic = w.grad.clone()
    eps = 1e-6
    for idx in [(0, 0), (1, 2), (2, 3)]:
        bump = torch.zeros_like(w)
        bump[idx] = eps
        with torch.no_grad():
            numeric = (f(w + bump) - f(w - bump)) / (2 * eps)
        assert float(numeric) == pytest.approx(float(analytic[idx]), rel=1e-5, abs=1e-8)


def test_the_model_is_a_sequence_classifier_with_one_label_per_row():
    torch.manual_seed(0)
    model = ReCAT(vocab_size=17, d_model=8, n_layers=1, cio_layers=2, n_classes=10).double()
    x = torch.randint(17, (3, 9))
    out = model(x)
    assert out.logits.shape == (3, 10)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[:, -1] = True
    loss = model.loss(out, Batch(x, torch.randint(10, (3, 9)), mask))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    mask[0, 0] = True
    with pytest.raises(ValueError, match="one label per sequence"):
        model.loss(out, Batch(x, torch.zeros(3, 9, dtype=torch.int64), mask))


@pytest.mark.parametrize("option,value", [("topk", 0), ("cio_layers", 0), ("pool", "max"), ("compose_heads", 3),
                                          ("score_dim", 0), ("compose_ratio", -1.0), ("n_classes", 1)])
def test_bad_options_are_clear_errors(option, value):
    with pytest.raises(ValueError, match=option):
        ReCAT(vocab_size=11, d_model=8, n_layers=1, **{option: value})
