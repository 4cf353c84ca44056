"""The pure-PyTorch transducer loss: the sum over every alignment (brute-force enumeration on tiny
lattices), its gradients (gradcheck in float64), per-row lengths, and clear errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from recur.models.transducer_loss import transducer_loss


def brute_force_nll(logits: torch.Tensor, labels: list[int], blank: int = 0) -> float:
    """-log of the sum over every path through the (T, U) lattice: T blanks and U labels in any
    order, the last step a blank (it leaves the last frame)."""
    logp = logits.double().log_softmax(-1)
    T, U = logp.shape[0], len(labels)
    total = 0.0
    for where in itertools.combinations(range(T + U - 1), U):  # which steps emit a label
        t = u = 0
        lp = 0.0
        for step in range(T + U):
            if step in where:
                lp += float(logp[t, u, labels[u]])
                u += 1
            else:
                lp += float(logp[t, u, blank])
                t += 1
        total += math.exp(lp)
    return -math.log(total)


@pytest.mark.parametrize("T,U", [(1, 0), (1, 1), (1, 3), (2, 2), (3, 1), (4, 3), (5, 2)])
def test_the_loss_is_minus_the_log_of_the_sum_over_every_alignment(T, U):
    gen = torch.Generator().manual_seed(T * 10 + U)
    V = 4
    logits = torch.randn(1, T, U + 1, V, generator=gen, dtype=torch.float64) * 2
    labels = torch.randint(1, V, (1, U), generator=gen)
    got = transducer_loss(logits, labels, torch.tensor([T]), torch.tensor([U]), reduction="none")
    assert got.item() == pytest.approx(brute_force_nll(logits[0], labels[0].tolist()), rel=1e-10)


def test_rows_of_different_lengths_are_each_their_own_lattice_and_the_blank_may_be_any_id():
    gen = torch.Generator().manual_seed(0)
    B, T, U, V = 3, 5, 3, 5
    logits = torch.randn(B, T, U + 1, V, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2], [3, -1, -1], [-1, -1, -1]])  # blank = 4 here; -1 is padding
    frames, lengths = torch.tensor([5, 2, 3]), torch.tensor([3, 1, 0])
    got = transducer_loss(logits, labels, frames, lengths, blank=4, reduction="none")
    for b in range(B):
        T_b, U_b = int(frames[b]), int(lengths[b])
        want = brute_force_nll(logits[b, :T_b, :U_b + 1], labels[b, :U_b].tolist(), blank=4)
        assert got[b].item() == pytest.approx(want, rel=1e-10)
    assert transducer_loss(logits, labels, frames, lengths, blank=4, reduction="sum").item() == \
        pytest.approx(got.sum().item())
    mean = transducer_loss(logits, labels, frames, lengths, blank=4).item()
    assert mean == pytest.approx((got / torch.tensor([3.0, 1.0, 1.0])).mean().item())


def test_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(1)
    B, T, U, V = 2, 3, 2, 3
    logits = torch.randn(B, T, U + 1, V, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2], [2, -1]])
    frames, lengths = torch.tensor([3, 2]), torch.tensor([2, 1])
    assert torch.autograd.gradcheck(lambda x: transducer_loss(x, labels, frames, lengths, reduction="sum"),
                                    (logits,), eps=1e-6, atol=1e-8)


def test_the_gradient_is_finite_and_zero_outside_each_rows_lattice():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, 2, 1], [2, -1, -1]])
    transducer_loss(logits, labels, torch.tensor([6, 2]), torch.tensor([3, 1])).backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    assert g[1, 2:].abs().max() == 0 and g[1, :, 2:].abs().max() == 0  # row 1: T=2, U=1
    assert g[0].abs().sum() > 0


def test_a_certain_alignment_has_zero_loss():
    # every node puts all its mass on the move of one path: blank, y1, blank, y2, blank
    T, U, V = 3, 2, 3
    logits = torch.full((1, T, U + 1, V), -50.0, dtype=torch.float64)
    labels = torch.tensor([[1, 2]])
    logits[0, 0, 0, 0] = 50  # (0,0): blank
    logits[0, 1, 0, 1] = 50  # (1,0): y1
    logits[0, 1, 1, 0] = 50  # (1,1): blank
    logits[0, 2, 1, 2] = 50  # (2,1): y2
    logits[0, 2, 2, 0] = 50  # (2,2): the final blank
    loss = transducer_loss(logits, labels, torch.tensor([T]), torch.tensor([U]), reduction="sum")
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs_are_clear_errors():
    logits = torch.zeros(1, 2, 3, 4)
    ok = dict(labels=torch.tensor([[1, 2]]), frame_lengths=torch.tensor([2]), label_lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match="reduction"):
        transducer_loss(logits, **ok, reduction="avg")
    with pytest.raises(ValueError, match="logits"):
        transducer_loss(logits[0], **ok)
    with pytest.raises(ValueError, match="labels"):
        transducer_loss(logits, **{**ok, "labels": torch.tensor([[1, 2, 3]])})
    with pytest.raises(ValueError, match="blank"):
        transducer_loss(logits, **ok, blank=4)
    with pytest.raises(ValueError, match="frame_lengths"):
        transducer_loss(logits, **{**ok, "frame_lengths": torch.tensor([3])})
    with pytest.raises(ValueError, match="label_lengths"):
        transducer_loss(logits, **{**ok, "label_lengths": torch.tensor([3])})
    with pytest.raises(ValueError, match="other than the blank"):
        transducer_loss(logits, **{**ok, "labels": torch.tensor([[0, 2]])})
