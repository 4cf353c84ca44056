"""HRM (``recur.models.hrm``) and the deep-supervision machinery it runs on: the one-step gradient,
the detached carry between segments, the Q-learning target and loss, the number of segments at
eval, halting in training, and its options. Numerical checks in float64 against hand-written
segments that follow the reference's loop structure (skip the last pair under no_grad, then one
step with grad)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from recur import ARCHITECTURES, State
from recur.models.base import ModelOutput
from recur.models.deep_supervision import DeepSupervisedLM, DeepSupervisionOutput
from recur.models.hrm import HRM
from recur.tasks.base import Batch

V, D, B, T = 11, 16, 3, 7


def make(seed: int = 0, **options) -> HRM:
    torch.manual_seed(seed)
    args = dict(vocab_size=V, d_model=D, n_layers=1, pattern="gla", H_cycles=2, L_cycles=3, n_supervision=2)
    return HRM(**{**args, **options}).double()


def tokens(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randint(V, (B, t), generator=torch.Generator().manual_seed(seed))


def by_hand(m: HRM, x_tokens: torch.Tensor, segments: int, one_step: bool = True, detach: bool = True):
    """Every segment's (logits, z_H) as the reference writes its loop (``detach=False``: a carry
    that keeps its graph, what the model must not do)."""
    x = m.embed(x_tokens) * math.sqrt(D)
    shape = (*x_tokens.shape, D)
    z_H, z_L = m.H_init.expand(shape), m.L_init.expand(shape)

    def L(z, inj):
        return m.L_norm(m.L_level(z + inj)[0])

    def H(z, inj):
        return m.H_norm(m.H_level(z + inj)[0])

    outs = []
    for _ in range(segments):
        if detach:
            z_H, z_L = z_H.detach(), z_L.detach()
        with torch.no_grad() if one_step else contextlib.nullcontext():
            for h in range(m.H_cycles):
                for l in range(m.L_cycles):
                    if not (h == m.H_cycles - 1 and l == m.L_cycles - 1):
                        z_L = L(z_L, z_H + x)
                if h != m.H_cycles - 1:
                    z_H = H(z_H, z_L)
        z_L = L(z_L, z_H + x)
        z_H = H(z_H, z_L)
        outs.append((m.head(m.norm(z_H)), z_H))
    return outs


def grads(model, scalar) -> dict[str, torch.Tensor]:
    model.zero_grad()
    scalar.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def weights(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_same_grads(a: dict, b: dict):
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-12, msg=lambda s: f"{n}: {s}")


@pytest.mark.parametrize("one_step", [True, False])
def test_one_segment_and_its_gradient_equal_the_hand_written_loop(one_step):
    m = make(act=False, n_supervision=1, one_step_grad=one_step)
    x = tokens()
    g = weights(3, (B, T, V))
    out = m(x)
    mine = grads(m, (out.logits * g).sum())
    (logits, _), = by_hand(m, x, 1, one_step=one_step)
    torch.testing.assert_close(out.logits, logits, rtol=1e-10, atol=1e-12)
    assert_same_grads(mine, grads(m, (logits * g).sum()))


def test_the_one_step_gradient_stops_before_the_last_updates():
    """Same forward; the one-step gradient differs from full backprop in both modules' weights and
    the embedding, and equals full backprop through the last (L, H) pair from a detached start."""
    a, b = make(act=False, n_supervision=1), make(act=False, n_supervision=1, one_step_grad=False)
    x, g = tokens(), weights(3, (B, T, V))
    oa, ob = a(x), b(x)
    torch.testing.assert_close(oa.logits, ob.logits, rtol=1e-10, atol=1e-12)
    ga, gb = grads(a, (oa.logits * g).sum()), grads(b, (ob.logits * g).sum())
    for name in ("L_level.blocks.0.mixer", "backbone.blocks.0.mixer", "embed.weight"):
        differ = [n for n in ga if n.startswith(name) and not torch.allclose(ga[n], gb[n], rtol=1e-6, atol=1e-9)]
        assert differ, f"one_step_grad changed no gradient of {name}"
    # the head and the final norm see the same z_H either way
    torch.testing.assert_close(ga["head.weight"], gb["head.weight"], rtol=1e-10, atol=1e-12)


def test_the_carry_between_segments_is_detached():
    """Segment 1's loss reaches segment 1's computation only: its gradient equals that of one
    segment run by hand from segment 0's carry taken as a constant."""
    for one_step, cycles in ((True, 1), (True, 2), (False, 2)):
        m = make(act=False, n_supervision=2, one_step_grad=one_step, H_cycles=cycles, L_cycles=cycles)
        x, g = tokens(), weights(4, (B, T, V))
        out = m(x)
        mine = grads(m, (out.segment_logits[1] * g).sum())
        hand = by_hand(m, x, 2, one_step=one_step)
        torch.testing.assert_close(out.segment_logits[0], hand[0][0], rtol=1e-10, atol=1e-12)
        assert_same_grads(mine, grads(m, (hand[1][0] * g).sum()))
        if one_step and cycles > 1:
            continue  # the no-grad updates at the segment's start cut the graph anyway
        # a carry that kept its graph would give other gradients (the check can tell them apart)
        attached = grads(m, (by_hand(m, x, 2, one_step=one_step, detach=False)[1][0] * g).sum())
        assert any(not torch.allclose(mine[n], attached[n], rtol=1e-6, atol=1e-9) for n in mine if n in attached)


def test_eval_segments_change_the_output_and_equal_running_them_by_hand():
    m = make(act=True).eval()
    x = tokens()
    with torch.no_grad():
        outs = {}
        for k in (1, 3, 5):
            m.n_supervision = k
            outs[k] = m(x)
            hand = by_hand(m, x, k)
            assert len(outs[k].segment_logits) == k
            for mine, (theirs, _) in zip(outs[k].segment_logits, hand):
                torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(outs[k].logits, hand[-1][0], rtol=1e-10, atol=1e-12)
            assert torch.equal(outs[k].used, torch.full((B,), k))  # eval runs every segment
        assert not torch.allclose(outs[1].logits, outs[3].logits)
        assert not torch.allclose(outs[3].logits, outs[5].logits)


def random_q_head(m: HRM, seed: int = 7):
    with torch.no_grad():
        m.q_head.weight.copy_(weights(seed, m.q_head.weight.shape) * 0.5)
        m.q_head.bias.copy_(weights(seed + 1, (2,)))


def test_q_values_read_z_H_at_the_first_position_and_the_bootstrap_is_the_next_segment():
    m = make(act=True, n_supervision=2, halt_exploration_prob=0.0)
    random_q_head(m)
    x = tokens()
    out = m(x)
    hand = by_hand(m, x, 3)
    for k in range(2):
        q = m.q_head(hand[k][1][:, 0])
        torch.testing.assert_close(out.q_halt[k], q[:, 0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.q_continue[k], q[:, 1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.q_bootstrap, m.q_head(hand[2][1][:, 0])[:, 0], rtol=1e-10, atol=1e-12)
    assert set(out.state) == {f"seg{k}_{a}" for k in range(3) for a, _ in m.applications()}  # the bootstrap's
    m.eval()
    assert m(x).q_bootstrap is None and set(m(x).state) == {f"seg{k}_{a}" for k in range(2) for a, _ in m.applications()}


def test_q_target_formula():
    qh, qc = torch.tensor([0.3, -2.0, 1.0]), torch.tensor([1.5, -3.0, 1.0])
    torch.testing.assert_close(DeepSupervisedLM.q_target(qh, qc, last=False),
                               torch.tensor([1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(2.0)), 1 / (1 + math.exp(-1.0))]))
    torch.testing.assert_close(DeepSupervisedLM.q_target(qh, None, last=True), torch.sigmoid(qh))


def batch_for(x: torch.Tensor, seed: int = 5) -> Batch:
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, 3:] = True
    targets = torch.randint(V, (B, T), generator=torch.Generator().manual_seed(seed))
    return Batch(x, targets, mask)


def test_loss_equals_the_hand_computation_with_halting():
    """Rows halt where q_halt > q_continue (no exploration); the loss is the (row, segment) mean of
    CE + 0.5 (BCE(q_halt, correct) + BCE(q_continue, target)) over the segments each row ran."""
    m = make(act=True, n_supervision=3, halt_exploration_prob=0.0)
    random_q_head(m, seed=11)
    x = tokens()
    batch = batch_for(x)
    # make row 0 right at every segment so its q_halt target is 1: its targets are the model's predictions
    out = m(x)
    batch.targets[0, 3:] = out.segment_logits[0][0, 3:].argmax(-1)
    out = m(x)
    used = torch.full((B,), 3)
    for b in range(B):
        for k in range(2):
            if out.q_halt[k][b] > out.q_continue[k][b]:
                used[b] = k + 1
                break
    assert torch.equal(out.used, used) and 0 < int((used < 3).sum()) < B  # some rows halt early, some not
    total, n = 0.0, 0
    for k in range(3):
        rows = [b for b in range(B) if used[b] > k]
        if not rows:
            continue
        logits = out.segment_logits[k][rows][:, 3:]
        ce = F.cross_entropy(logits.reshape(-1, V), batch.targets[rows][:, 3:].reshape(-1))
        correct = (logits.argmax(-1) == batch.targets[rows][:, 3:]).all(-1).double()
        if k < 2:
            target = torch.sigmoid(torch.maximum(out.q_halt[k + 1], out.q_continue[k + 1]))[rows]
        else:
            target = torch.sigmoid(out.q_bootstrap)[rows]
        bce = (F.binary_cross_entropy_with_logits(out.q_halt[k][rows], correct)
               + F.binary_cross_entropy_with_logits(out.q_continue[k][rows], target))
        total, n = total + len(rows) * (ce + 0.5 * bce), n + len(rows)
    torch.testing.assert_close(m.loss(out, batch), total / n, rtol=1e-10, atol=1e-12)
    assert float(out.aux["segments_used"]) == pytest.approx(used.double().mean().item())


def test_halting_rows_stop_contributing_and_exploration_vetoes_early_halts():
    m = make(act=True, n_supervision=3, halt_exploration_prob=0.0)
    with torch.no_grad():
        m.q_head.bias.copy_(torch.tensor([5.0, -5.0]))  # q_halt > q_continue everywhere: halt after segment 1
    x = tokens()
    batch = batch_for(x)
    out = m(x)
    assert torch.equal(out.used, torch.ones(B, dtype=torch.int64)) and float(out.aux["segments_used"]) == 1.0
    ce = F.cross_entropy(out.segment_logits[0][batch.mask], batch.targets[batch.mask])
    assert m.loss(out, batch).item() > ce.item()  # plus the halting terms
    m.halt_exploration_prob = 1.0  # every row draws a minimum of U{2..3} segments
    m.generator = torch.Generator().manual_seed(0)
    assert bool((m(x).used >= 2).all())
    m.eval()
    assert torch.equal(m(x).used, torch.full((B,), 3))  # no halting at eval


def test_the_halting_loss_reaches_the_q_head():
    m = make(act=True, n_supervision=2)
    x = tokens()
    loss = m.loss(m(x), batch_for(x))
    loss.backward()
    assert m.q_head.weight.grad is not None and m.q_head.weight.grad.abs().sum() > 0
    assert m.q_head.bias.grad.abs().sum() > 0
    assert all(p.grad is not None for p in m.parameters())


def test_state_carry_with_the_bootstrap_segment_in_training():
    m = make(act=True, n_supervision=2)
    x = tokens()
    whole = m(x)
    first = m(x[:, :4])
    second = m(x[:, 4:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-9, atol=1e-11)
    assert m.state_size(T) == whole.state.num_floats()


def test_registered_and_bad_options_raise_clear_errors():
    assert ARCHITECTURES.get("hrm").cls is HRM and ARCHITECTURES.describe("hrm")["family"] == "depth-recurrent"
    for options, word in [(dict(H_cycles=0), "H_cycles"), (dict(L_cycles=1.5), "L_cycles"),
                          (dict(n_supervision=0), "n_supervision"), (dict(one_step_grad="yes"), "one_step_grad"),
                          (dict(act=1), "act"), (dict(halt_exploration_prob=1.5), "halt_exploration_prob"),
                          (dict(halt_position="middle"), "halt_position")]:
        with pytest.raises(ValueError, match=word):
            make(**options)
    m = make()
    with pytest.raises(ValueError, match="n_supervision"):
        m.n_supervision = -1
    with pytest.raises(ValueError, match="state"):
        m(tokens(), State(nope=torch.zeros(B, 1, dtype=torch.float64)))
    x = tokens()
    with pytest.raises(ValueError, match="DeepSupervisionOutput"):
        m.loss(ModelOutput(m(x).logits, None), batch_for(x))
    assert isinstance(m(x), DeepSupervisionOutput)
