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
