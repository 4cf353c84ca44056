"""ilr: Intra-Layer Recurrence, layer i applied loops[i] times in a row with tied weights."""

from __future__ import annotations

import pytest
import torch

from recur.models import CausalLM, LoopedLM
from recur.models.ilr import IntraLayerRecurrentLM, equal_compute_looped_lm, equal_compute_loops

V, D = 11, 16


def _ilr(loops, n_layers=None, pattern="gla", **kw):
    torch.manual_seed(0)
    return IntraLayerRecurrentLM(V, D, n_layers or len(loops), pattern=pattern, loops=loops, **kw).double()


def _x(t=9):
    return torch.randint(V, (2, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("pattern", ["gla", ["attention", "lstm", "gla"]])
def test_one_iteration_per_layer_is_the_causal_lm_with_the_same_weights(pattern):
    ilr = _ilr([1, 1, 1], pattern=pattern)
    lm = CausalLM(V, D, 3, pattern=pattern).double()
    lm.load_state_dict(ilr.state_dict())
    x = _x()
    a, b = ilr(x), lm(x)
    assert torch.equal(a.logits, b.logits)  # the same block calls in the same order: bit-identical
    for i in range(3):
        for (_, s), (_, w) in zip(a.state[f"layer{i}_it0"].tensors(), b.state[f"layer{i}"].tensors()):
            assert torch.equal(s, w)


def test_two_iterations_of_layer_0_apply_block_0_twice_by_hand():
    ilr = _ilr([2, 1])
    x = _x()
    b0, b1 = ilr.backbone.layers
    h = ilr.embed(x)
    h, s00, _ = b0(h)
    h, s01, _ = b0(h)  # the same weights, a fresh memory
    h, s10, _ = b1(h)
    out = ilr(x)
    torch.testing.assert_close(out.logits, ilr.head(ilr.norm(h)), rtol=1e-12, atol=1e-12)
    assert list(out.state) == ["layer0_it0", "layer0_it1", "layer1_it0"]
    for got, want in zip(out.state.values(), (s00, s01, s10)):
        for (_, a), (_, b) in zip(got.tensors(), want.tensors()):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and it differs from the plain stack: the second iteration did something
    assert not torch.allclose(out.logits, _ilr([1, 1])(x).logits)


def test_state_carry_and_size_count_every_application_with_a_stateful_channel():
    ilr = _ilr([3, 1], pattern="gla", mlp="rwkv4")
    x = _x(10)
    whole = ilr(x)
    first = ilr(x[:, :4])
    second = ilr(x[:, 4:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-10, atol=1e-12)
    assert {"channel0_it2", "channel1_it0", "layer0_it2"} <= set(whole.state)
    assert ilr.state_size(10) == whole.state.num_floats() == ilr.init_state(2).num_floats()
    assert len(ilr.mixers) == 4 and ilr.mixers[0] is ilr.mixers[2]


def test_shared_blocks_loop_the_shared_weights():
    ilr = _ilr([2, 1], shared_blocks=1)
    x = _x()
    blk = ilr.backbone.blocks[0]
    h = ilr.embed(x)
    for _ in range(3):
        h, _, _ = blk(h)
    torch.testing.assert_close(ilr(x).logits, ilr.head(ilr.norm(h)), rtol=1e-12, atol=1e-12)


def test_the_equal_compute_looped_lm_has_the_same_parameters_and_block_applications():
    assert equal_compute_loops([3, 2, 1, 2]) == 2
    torch.manual_seed(0)
    looped = equal_compute_looped_lm(V, D, [3, 1], pattern="gla")
    ilr = _ilr([3, 1])
    assert isinstance(looped, LoopedLM) and looped.n_loops == 2 and looped.backbone.n_layers == 2
    assert sum(p.numel() for p in looped.parameters()) == sum(p.numel() for p in ilr.parameters())
    assert len(looped.mixers) == len(ilr.mixers) == 4
    with pytest.raises(ValueError, match="multiple of its 2 layers"):
        equal_compute_loops([2, 1])


def test_the_default_loops_the_first_layer_twice():
    torch.manual_seed(0)
    assert IntraLayerRecurrentLM(V, D, 3, pattern="gla").loops == [2, 1, 1]


@pytest.mark.parametrize("loops, match", [([1, 2, 3], "one entry per layer: n_layers=2, got 3"),
                                          ([1], "one entry per layer"), ([0, 1], "ints >= 1"),
                                          ([1.0, 1], "ints >= 1"), ([True, 1], "ints >= 1"),
                                          (2, "list of ints"), ("21", "list of ints")])
def test_bad_loops_are_clear_errors(loops, match):
    with pytest.raises(ValueError, match=match):
        IntraLayerRecurrentLM(V, D, 2, pattern="gla", loops=loops)


def test_a_state_of_other_loops_is_a_clear_error():
    x = _x()
    state = _ilr([2, 1])(x).state
    with pytest.raises(ValueError, match=r"layer0_it0, layer0_it1, layer0_it2, layer1_it0 .loops=\[3, 1\]"):
        _ilr([3, 1])(x, state)


def test_loops_may_change_after_training_and_are_checked():
    ilr = _ilr([1, 1])
    x = _x()
    before = ilr(x).logits
    ilr.loops = [2, 2]
    assert set(ilr(x).state) == {"layer0_it0", "layer0_it1", "layer1_it0", "layer1_it1"}
    assert not torch.allclose(ilr(x).logits, before)
    with pytest.raises(ValueError, match="one entry per layer"):
        ilr.loops = [2]
