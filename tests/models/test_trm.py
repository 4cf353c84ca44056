"""TRM (``recur.models.trm``): one network for both updates, gradients through the last H-cycle
only, the detached carry, the single halting logit and its BCE loss, segments at eval, options.
Float64 against hand-written segments in the reference's loop structure."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from recur import ARCHITECTURES
from recur.models.trm import TRM
from recur.tasks.base import Batch

V, D, B, T = 11, 16, 3, 7


def make(seed: int = 0, **options) -> TRM:
    torch.manual_seed(seed)
    args = dict(vocab_size=V, d_model=D, n_layers=1, pattern="gla", H_cycles=3, L_cycles=2, n_supervision=2)
    return TRM(**{**args, **options}).double()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))


def weights(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def by_hand(m: TRM, x_tokens, segments: int, one_step: bool = True, detach: bool = True):
    """Every segment's (logits, z_H): H_cycles - 1 cycles under no_grad, then one with grad."""
    x = m.embed(x_tokens) * math.sqrt(D)
    shape = (*x_tokens.shape, D)
    z_H, z_L = m.H_init.expand(shape), m.L_init.expand(shape)

    def net(z, inj):
        return m.net_norm(m.net(z + inj)[0])

    def cycle(z_H, z_L):
        for _ in range(m.L_cycles):
            z_L = net(z_L, z_H + x)
        return net(z_H, z_L), z_L

    outs = []
    for _ in range(segments):
        if detach:
            z_H, z_L = z_H.detach(), z_L.detach()
        with torch.no_grad() if one_step else contextlib.nullcontext():
            for _ in range(m.H_cycles - 1):
                z_H, z_L = cycle(z_H, z_L)
        z_H, z_L = cycle(z_H, z_L)
        outs.append((m.head(m.norm(z_H)), z_H))
    return outs


def grads(model, scalar) -> dict[str, torch.Tensor]:
    model.zero_grad()
    scalar.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("one_step", [True, False])
def test_segments_and_gradients_equal_the_hand_written_loop(one_step):
    m = make(act=False, one_step_grad=one_step)
    x, g = tokens(), weights(3, (B, T, V))
    out = m(x)
    hand = by_hand(m, x, 2, one_step=one_step)
    for mine, (theirs, _) in zip(out.segment_logits, hand):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    # both segments' losses: segment 1's gradient stays in segment 1 (the carry is detached)
    loss = lambda ls: sum(((l * g) ** 2).sum() for l in ls)  # noqa: E731
    assert_same_grads(grads(m, loss(out.segment_logits)), grads(m, loss([h for h, _ in hand])))


def test_gradients_flow_through_the_last_cycle_only():
    a, b = make(act=False, n_supervision=1), make(act=False, n_supervision=1, one_step_grad=False)
    x, g = tokens(), weights(4, (B, T, V))
    oa, ob = a(x), b(x)
    torch.testing.assert_close(oa.logits, ob.logits, rtol=1e-10, atol=1e-12)
    ga, gb = grads(a, (oa.logits * g).sum()), grads(b, (ob.logits * g).sum())
    assert any(not torch.allclose(ga[n], gb[n], rtol=1e-6, atol=1e-9) for n in ga if n.startswith("backbone."))
    # one cycle: nothing runs without grad, so the two agree
    c, d = make(act=False, n_supervision=1, H_cycles=1), make(act=False, n_supervision=1, H_cycles=1,
                                                              one_step_grad=False)
    assert_same_grads(grads(c, (c(x).logits * g).sum()), grads(d, (d(x).logits * g).sum()))


def test_a_carry_with_its_graph_would_differ():
    """With full backprop the check of the detached carry can fail: a carry that kept its graph
    gives segment 1 other gradients than the model's."""
    m = make(act=False, one_step_grad=False)
    x, g = tokens(), weights(5, (B, T, V))
    mine = grads(m, (m(x).segment_logits[1] * g).sum())
    assert_same_grads(mine, grads(m, (by_hand(m, x, 2, one_step=False)[1][0] * g).sum()))
    attached = grads(m, (by_hand(m, x, 2, one_step=False, detach=False)[1][0] * g).sum())
    assert any(not torch.allclose(mine[n], attached[n], rtol=1e-6, atol=1e-9) for n in mine)


def test_eval_segments_change_the_output_and_equal_running_them_by_hand():
    m = make().eval()
    x = tokens()
    with torch.no_grad():
        m.n_supervision = 1
        one = m(x).logits
        m.n_supervision = 4
        four = m(x)
        torch.testing.assert_close(four.logits, by_hand(m, x, 4)[-1][0], rtol=1e-10, atol=1e-12)
        assert not torch.allclose(one, four.logits)
        assert torch.equal(four.used, torch.full((B,), 4))


def test_halting_logit_loss_by_hand_and_its_gradient():
    m = make(n_supervision=3, halt_exploration_prob=0.0)
    with torch.no_grad():
        m.q_head.weight.copy_(weights(7, m.q_head.weight.shape))
        m.q_head.bias.fill_(0.0)
    x = tokens()
    with torch.no_grad():  # centre the first segment's q_halt: one row halts there, another does not
        m.q_head.bias.fill_(-float(m(x).q_halt[0].median()))
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 4:] = True
    batch = Batch(x, torch.randint(V, (B, T), generator=torch.Generator().manual_seed(2)), mask)
    out = m(x)
    assert out.q_continue is None and out.q_bootstrap is None  # no Q-continue, no extra forward
    assert set(out.state) == {f"seg{k}_{a}" for k in range(3) for a, _ in m.applications()}
    hand = by_hand(m, x, 3)
    used = torch.full((B,), 3)
    for b in range(B):
        for k in range(2):
            q = m.q_head(hand[k][1][b, 0])[0]
            torch.testing.assert_close(out.q_halt[k][b], q, rtol=1e-10, atol=1e-12)
            if q > 0:
                used[b] = k + 1
                break
    assert torch.equal(out.used, used) and len(set(used.tolist())) > 1  # rows halt at different segments
    total, n = 0.0, 0
    for k in range(3):
        rows = [b for b in range(B) if used[b] > k]
        if not rows:
            continue
        logits = out.segment_logits[k][rows][:, 4:]
        ce = F.cross_entropy(logits.reshape(-1, V), batch.targets[rows][:, 4:].reshape(-1))
        correct = (logits.argmax(-1) == batch.targets[rows][:, 4:]).all(-1).double()
        bce = F.binary_cross_entropy_with_logits(out.q_halt[k][rows], correct)
        total, n = total + len(rows) * (ce + 0.5 * bce), n + len(rows)
    loss = m.loss(out, batch)
    torch.testing.assert_close(loss, total / n, rtol=1e-10, atol=1e-12)
    loss.backward()
    assert m.q_head.weight.grad.abs().sum() > 0 and m.q_head.bias.grad.abs().sum() > 0


def test_registered_and_bad_options_raise_clear_errors():
    assert ARCHITECTURES.get("trm").cls is TRM and ARCHITECTURES.describe("trm")["family"] == "depth-recurrent"
    for options, word in [(dict(H_cycles=0), "H_cycles"), (dict(L_cycles=None), "L_cycles"),
                          (dict(n_supervision=True), "n_supervision"), (dict(one_step_grad=0), "one_step_grad"),
                          (dict(halt_exploration_prob=-0.1), "halt_exploration_prob"),
                          (dict(halt_position=0), "halt_position")]:
        with pytest.raises(ValueError, match=word):
            make(**options)
    m = make(halt_position="last")
    x = tokens()
    out = m(x)
    z_H = by_hand(m, x, 2)[-1][1]
    torch.testing.assert_close(out.q_halt[-1], m.q_head(z_H[:, -1])[:, 0], rtol=1e-10, atol=1e-12)
