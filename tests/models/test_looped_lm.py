"""looped_lm: a weight-tied Backbone looped with input injection, a state per loop."""

from __future__ import annotations

import pytest
import torch

from recur.models import CausalLM, LoopedLM


def _pair(n_loops: int, inject: bool = True):
    torch.manual_seed(0)
    looped = LoopedLM(11, 16, 2, pattern="gla", n_loops=n_loops, inject=inject).double()
    return looped


def test_one_loop_is_the_causal_lm_with_the_same_weights():
    looped = _pair(1)
    torch.manual_seed(0)
    lm = CausalLM(11, 16, 2, pattern="gla").double()
    lm.load_state_dict(looped.state_dict())
    x = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(looped(x).logits, lm(x).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inject", [True, False])
def test_loops_apply_the_same_backbone_to_the_injected_input(inject):
    looped = _pair(3, inject)
    x = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(1))
    e = looped.embed(x)
    z = torch.zeros_like(e)
    for j in range(3):
        z, _ = looped.backbone(z + e if inject or j == 0 else z)
    torch.testing.assert_close(looped(x).logits, looped.head(looped.norm(z)), rtol=1e-12, atol=1e-12)


def test_the_state_is_keyed_per_loop_and_more_loops_run_at_inference():
    looped = _pair(2)
    x = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(1))
    out = looped(x)
    assert set(out.state) == {"loop0", "loop1"} and set(out.state["loop0"]) == {"layer0", "layer1"}
    assert looped.state_size(9) == 2 * looped.backbone.state_size(9)
    looped.n_loops = 4  # more loops than trained
    deeper = looped(x)
    assert set(deeper.state) == {f"loop{j}" for j in range(4)} and not torch.allclose(deeper.logits, out.logits)
    with pytest.raises(ValueError, match="loop0, loop1, loop2, loop3 .n_loops=4"):
        looped(x, out.state)  # a state of the 2-loop model
    with pytest.raises(ValueError, match="n_loops"):
        looped.n_loops = 0


def test_parameters_do_not_grow_with_loops():
    assert sum(p.numel() for p in _pair(1).parameters()) == sum(p.numel() for p in _pair(5).parameters())


def _batch(x: torch.Tensor):
    from recur.tasks.base import Batch

    targets = torch.roll(x, -1, dims=1)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, -1] = False
    return Batch(x, targets, mask)


@pytest.mark.parametrize("n_loops,loss_loops", [(4, 2), (3, 3), (2, 5), (3, 1)])
def test_the_loss_over_the_last_loops_is_their_mean_and_earlier_loops_take_no_gradient(n_loops, loss_loops):
    looped = _pair(n_loops)
    looped.loss_loops = loss_loops
    x = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = _batch(x)
    looped.train()
    loss = looped.loss(looped(x), batch)
    # by hand: the loops before the window under no_grad, then the mean of the window's cross-entropies
    e = looped.embed(x)
    z = torch.zeros_like(e)
    window = min(loss_loops, n_loops)
    losses = []
    for j in range(n_loops):
        with torch.set_grad_enabled(j >= n_loops - window):
            z, _ = looped.backbone(z + e)
        if j >= n_loops - window:
            logits = looped.head(looped.norm(z))
            losses.append(torch.nn.functional.cross_entropy(logits[batch.mask], batch.targets[batch.mask]))
    hand = sum(losses) / len(losses)
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, list(looped.parameters()), allow_unused=True)
    hand_grads = torch.autograd.grad(hand, list(looped.parameters()), allow_unused=True)
    for g, h in zip(grads, hand_grads):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    # in eval mode the output is the final loop's, the same with or without the loss window
    looped.eval()
    plain = looped(x).logits
    looped.loss_loops = None
    torch.testing.assert_close(looped(x).logits, plain, rtol=0, atol=0)


def test_the_loss_window_keeps_the_state_exact_and_rejects_a_bad_size():
    looped = _pair(3)
    looped.loss_loops = 2
    looped.train()
    x = torch.randint(11, (2, 9), generator=torch.Generator().manual_seed(1))
    whole = looped(x)
    first = looped(x[:, :4])
    second = looped(x[:, 4:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-12, atol=1e-12)
    assert len(whole.earlier) == 1 and whole.earlier[0].shape == whole.logits.shape
    with pytest.raises(ValueError, match="loss_loops"):
        LoopedLM(11, 16, 1, pattern="gla", loss_loops=0)


def test_real_valued_inputs_and_a_regression_head():
    torch.manual_seed(0)
    looped = LoopedLM(2, 16, 1, pattern="gla", n_loops=2, feature_dim=3, target_dim=1).double()
    x = torch.zeros(2, 5, dtype=torch.int64)
    f = torch.randn(2, 5, 3, dtype=torch.float64)
    out = looped(x, features=f)
    assert out.logits.shape == (2, 5, 1)
    e = looped.embed(x) + looped.features(f)
    z = torch.zeros_like(e)
    for _ in range(2):
        z, _ = looped.backbone(z + e)
    torch.testing.assert_close(out.logits, looped.head(looped.norm(z)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="feature_dim=3"):
        looped(x)
    with pytest.raises(ValueError, match="shape"):
        looped(x, features=f[..., :2])
    with pytest.raises(ValueError, match="regression head"):
        looped.generate(x, 2)
