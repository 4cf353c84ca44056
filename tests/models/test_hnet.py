"""H-Net dynamic chunking (recur/models/hnet.py): the router, chunking and the smoothing dechunk
against their formulas and loops, the ratio loss, the straight-through gradient, causality across
chunk boundaries, and exact carry / stepping with an attention main network (ragged chunk counts)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import recur.models.hnet as hnet
from recur.models.hnet import (HNet, pack_chunks, plot_boundaries, ratio_loss, routing_probabilities, smooth_chunks,
                               straight_through, upsample)

V, D = 13, 16


@pytest.fixture(autouse=True)
def float64():
    """Every tensor here in float64 (exact comparisons), restored after each test."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def model(seed: int = 0, **options) -> HNet:
    torch.manual_seed(seed)
    args = dict(vocab_size=V, d_model=D, n_layers=1, pattern="gla", main_pattern="attention", encoder_layers=1,
                decoder_layers=1, d_main=D + 8)
    return HNet(**{**args, **options}).double()


def tokens(b=3, t=29, seed=1):
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_routing_probabilities_follow_the_cosine_formula():
    g = torch.Generator().manual_seed(0)
    B, T, d = 2, 7, 5
    h, prev = torch.randn(B, T, d, generator=g), torch.randn(B, d, generator=g)
    w_q, w_k = nn.Linear(d, d, bias=False).requires_grad_(False), nn.Linear(d, d, bias=False).requires_grad_(False)
    first = torch.zeros(B, T, dtype=torch.bool)
    first[0, 0] = first[1, 4] = True
    with torch.no_grad():
        p = routing_probabilities(h, prev, first, w_q, w_k)
    for b in range(B):
        for t in range(T):
            before = prev[b] if t == 0 else h[b, t - 1]
            q, k = w_q.weight @ before, w_k.weight @ h[b, t]
            want = 1.0 if first[b, t] else (1 - q.dot(k) / (q.norm() * k.norm())) / 2
            assert math.isclose(float(p[b, t]), float(want), rel_tol=1e-12, abs_tol=1e-14)
    # identity init: the router compares the encoder states themselves, and b = p > 0.5
    m = model()
    assert torch.equal(m.w_q.weight, torch.eye(D)) and torch.equal(m.w_k.weight, torch.eye(D))
    x = tokens()
    h, _ = m.encoder(m.embed(x))
    p, b, _ = m.route(h, m.init_state(3), None)
    assert torch.equal(b, p > 0.5) and bool((p[:, 0] == 1).all()) and bool(b[:, 0].all())


def test_chunk_then_upsample_round_trip_on_a_hand_example():
    b = torch.tensor([[1, 0, 0, 1, 0, 1, 1, 0], [0, 0, 1, 0, 0, 0, 0, 1]], dtype=torch.bool)
    x = torch.arange(16.0).reshape(2, 8, 1) + 1
    packed, counts = pack_chunks(x, b)
    assert counts.tolist() == [4, 2]
    assert packed[..., 0].tolist() == [[1, 4, 6, 7], [11, 16, 0, 0]]
    carried = torch.tensor([[-1.0], [-2.0]])
    up = upsample(packed, b, carried)[..., 0]
    assert up.tolist() == [[1, 1, 1, 4, 4, 6, 7, 7], [-2, -2, 11, 11, 11, 11, 11, 16]]


def ema_loop(z, p, counts, starts, z0):
    out = torch.zeros_like(z)
    for b in range(z.shape[0]):
        prev = z0[b]
        for c in range(int(counts[b])):
            if starts[b, c]:
                prev = torch.zeros_like(prev)
            P = p[b, c].clamp(1e-4, 1 - 1e-4)
            prev = P * z[b, c] + (1 - P) * prev
            out[b, c] = prev
    return out


def test_smoothing_dechunk_equals_the_ema_loop():
    g = torch.Generator().manual_seed(2)
    B, C, d = 3, 9, 4
    z, z0 = torch.randn(B, C, d, generator=g), torch.randn(B, d, generator=g)
    p = torch.rand(B, C, generator=g)
    p[0, 0], p[1, 2] = 1.0, 0.0  # the clamp's edges
    counts = torch.tensor([9, 5, 0])
    starts = torch.zeros(B, C, dtype=torch.bool)
    starts[0, 4] = starts[1, 0] = True
    got = smooth_chunks(z, p, counts, starts, z0)
    want = ema_loop(z, p, counts, starts, z0)
    valid = torch.arange(C)[None] < counts[:, None]
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-12, atol=1e-13)
    # gradients too (the router learns through P)
    p.requires_grad_(True)
    z.requires_grad_(True)
    w = torch.randn(B, C, d, generator=g) * valid[..., None]
    ga = torch.autograd.grad((smooth_chunks(z, p, counts, starts, z0) * w).sum(), (z, p))
    gb = torch.autograd.grad((ema_loop(z, p, counts, starts, z0) * w).sum(), (z, p))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ratio_loss_is_its_formula_and_is_one_at_the_target():
    b = torch.tensor([[1, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)  # F = 1/4
    p = torch.tensor([[1.0, 0.1, 0.2, 0.3, 0.9, 0.0, 0.4, 0.1]], requires_grad=True)
    N = 6.0
    F_, G = 0.25, float(p.detach().mean())
    want = N / (N - 1) * ((1 - F_) * (1 - G) + (N - 1) * F_ * G)
    loss = ratio_loss(b, p, N)
    assert math.isclose(float(loss.detach()), want, rel_tol=1e-12)
    (grad,) = torch.autograd.grad(loss, p)  # only G carries a gradient: d/dG = N/(N-1)(-(1-F) + (N-1)F)
    torch.testing.assert_close(grad, torch.full_like(p, N / (N - 1) * (-(1 - F_) + (N - 1) * F_) / 8))
    at = torch.zeros(1, 12, dtype=torch.bool)
    at[0, ::6] = True
    assert math.isclose(float(ratio_loss(at, torch.full((1, 12), 1 / 6), N)), 1.0, rel_tol=1e-12)
    # the model reports it weighted, with the selection ratio
    m = model(ratio_weight=0.5, target_ratio=4)
    out = m(tokens())
    h, _ = m.encoder(m.embed(tokens()))
    p, b, _ = m.route(h, m.init_state(3), None)
    torch.testing.assert_close(out.aux["ratio_loss"], 0.5 * ratio_loss(b, p, 4.0))
    assert float(out.aux["selection_ratio"]) == float(b.double().mean())


def test_gradient_reaches_the_router_through_the_straight_through_path(monkeypatch):
    x = torch.tensor([[1.5, -0.5]], requires_grad=True)
    y = straight_through(x)
    assert torch.equal(y, torch.ones_like(x))
    (g,) = torch.autograd.grad((y * torch.tensor([[2.0, 3.0]])).sum(), x)
    assert g.tolist() == [[2.0, 3.0]]

    def router_grad():
        m = model(ratio_weight=0.0)
        m.residual.weight.data.normal_(std=0.1)
        out = m(tokens())
        (out.logits.sum(-1) ** 2).mean().backward()
        return m.w_q.weight.grad.clone()

    with_ste = router_grad()
    monkeypatch.setattr(hnet, "straight_through", lambda s: torch.ones_like(s))  # the EMA's P path only
    without = router_grad()
    assert with_ste.abs().max() > 0 and (with_ste - without).abs().max() > 1e-6 * with_ste.abs().max()


@pytest.mark.parametrize("main", ["attention", "gla"])
def test_changing_a_later_byte_never_changes_earlier_logits(main):
    m = model(main_pattern=main)
    x = tokens(b=2, t=31)
    base = m(x)
    bounds = m.boundaries(x)
    for k in (1, 8, 15, 30):  # a boundary byte and the bytes around it, across several chunks
        y = x.clone()
        y[:, k:] = (y[:, k:] + 5) % V
        other = m(y)
        torch.testing.assert_close(other.logits[:, :k], base.logits[:, :k], rtol=1e-12, atol=1e-12)
        assert torch.equal(m.boundaries(y)[:, :k], bounds[:, :k])
        assert not torch.allclose(other.logits[:, k:], base.logits[:, k:])
    assert bool(bounds[:, 1:].any()) and not bool(bounds[:, 1:].all())  # chunks of several sizes


@pytest.mark.parametrize("split", [1, 6, 13, 28])
def test_attention_main_network_carries_exactly_with_ragged_chunk_counts(split):
    m = model()
    x = tokens()
    whole = m(x)
    first = m(x[:, :split])
    second = m(x[:, split:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-10, atol=1e-12)
    assert len(set(m.boundaries(x).sum(1).tolist())) > 1  # the rows' chunk counts differ
    stepped, state = [], None
    for t in range(x.shape[1]):
        out = m(x[:, t:t + 1], state)
        stepped.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(stepped, 1), whole.logits, rtol=1e-10, atol=1e-12)
    # the padded KV cache is trimmed to the longest row's chunks
    assert state["main"]["layer0"]["k"].shape[2] == int(m.boundaries(x).sum(1).max())


def test_packed_documents_with_an_attention_main_network_equal_the_documents_alone():
    m = model()
    x = tokens(b=2, t=21)
    resets = torch.zeros_like(x, dtype=torch.bool)
    resets[0, [0, 5, 6, 13]] = True
    resets[1, [9]] = True
    whole = m(x, resets=resets)
    for row in range(2):
        cuts = sorted({0, *resets[row].nonzero()[:, 0].tolist(), x.shape[1]})
        alone = torch.cat([m(x[row:row + 1, a:b]).logits for a, b in zip(cuts[:-1], cuts[1:])], 1)
        torch.testing.assert_close(whole.logits[row:row + 1], alone, rtol=1e-10, atol=1e-12)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="d_main"):
        model(d_main=D - 1)
    with pytest.raises(ValueError, match="target_ratio"):
        model(target_ratio=1)
    with pytest.raises(ValueError, match="ratio_weight"):
        model(ratio_weight=-1.0)
    with pytest.raises(ValueError, match="encoder_layers"):
        model(encoder_layers=0)
    with pytest.raises(ValueError, match="state entry 'hidden'"):
        m = model()
        s = m.init_state(3)
        m(tokens(), s.replace(hidden=torch.zeros(3, D + 1)))


def test_plot_boundaries_writes_the_chunks(tmp_path):
    m = HNet(vocab_size=257, d_model=D, n_layers=1, pattern="gla", encoder_layers=1, decoder_layers=1).double()
    text = "the cat sat on the mat"
    shown = plot_boundaries(m, text, tmp_path / "b.html")
    assert shown.replace("|", "") == text
    page = (tmp_path / "b.html").read_text()
    assert page.count("<span") == shown.count("|") + 1 and "selection ratio" in page
