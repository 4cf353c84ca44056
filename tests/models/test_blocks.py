"""Blocks from parts and the Backbone: named parts, options, shared blocks, stateful channel mixers."""

from __future__ import annotations

import pytest
import torch

import recur
from recur.layers.channel import GeluMLP, RWKVChannelMix, SwiGLU
from recur.models import Backbone, Block, CausalLM


def test_a_block_is_assembled_from_named_parts():
    torch.manual_seed(0)
    block = Block(recur.build("gla", d_model=16), channel="gelu", mlp_ratio=2.0, norm="layernorm")
    assert isinstance(block.channel, GeluMLP) and block.channel.up.out_features == 32
    assert isinstance(block.norm1, torch.nn.LayerNorm) and isinstance(block.norm2, torch.nn.LayerNorm)
    assert Block(recur.build("gla", d_model=16), channel=None).norm2 is None
    x = torch.randn(2, 5, 16)
    y, state, ch = block(x)
    mixed, _ = block.mixer(block.norm1(x))
    h = x + mixed
    torch.testing.assert_close(y, h + block.channel(block.norm2(h))[0])
    assert ch is None  # a stateless channel mixer carries nothing


@pytest.mark.parametrize("bad,match", [({"channel": "glu"}, "unknown channel mixer 'glu'"),
                                       ({"norm": "batchnorm"}, "unknown norm 'batchnorm'")])
def test_unknown_parts_name_the_close_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        Block(recur.build("gla", d_model=16), **bad)


def test_shared_blocks_tie_weights_across_depth_with_a_state_per_layer():
    torch.manual_seed(0)
    bb = Backbone(16, n_layers=6, pattern=["gla", "lstm"], shared_blocks=2, mlp="swiglu")
    assert len(bb.blocks) == 2 and bb.layers[0] is bb.layers[2] is bb.layers[4]
    assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for b in bb.blocks for p in b.parameters())
    state = bb.init_state(3)
    assert set(state) == {f"layer{i}" for i in range(6)}
    x = torch.randn(3, 9, 16)
    h, s = bb(x)
    # the same computation, unrolled by hand
    ref, want = x, {}
    for i in range(6):
        ref, want[f"layer{i}"], _ = bb.blocks[i % 2](ref)
    torch.testing.assert_close(h, ref)
    with pytest.raises(ValueError, match="must repeat every 2 layers"):
        Backbone(16, n_layers=3, pattern=["gla", "lstm", "elman"], shared_blocks=2)
    with pytest.raises(ValueError, match="shared_blocks"):
        Backbone(16, n_layers=3, pattern="gla", shared_blocks=4)


def test_swiglu_has_the_parameters_of_a_ratio_x_mlp():
    s, g = SwiGLU(48, ratio=4.0), GeluMLP(48, ratio=4.0)
    assert abs(sum(p.numel() for p in s.parameters()) - sum(p.numel() for p in g.parameters())) <= 3 * 8 * 48


def test_rwkv_channel_mix_is_a_stateful_channel_mixer_with_exact_carry():
    torch.manual_seed(0)
    lm = CausalLM(vocab_size=11, d_model=16, n_layers=2, pattern="rwkv4", mlp="rwkv4").double()
    assert all(isinstance(b.channel, RWKVChannelMix) for b in lm.backbone.blocks)
    state = lm.init_state(2)
    assert set(state) == {"layer0", "channel0", "layer1", "channel1"} and state["channel0"]["shift"].shape == (2, 16)
    x = torch.randint(11, (2, 13), generator=torch.Generator().manual_seed(1))
    whole, s = lm(x)
    a, sa = lm(x[:, :5])
    b, sb = lm(x[:, 5:], sa)
    torch.testing.assert_close(torch.cat([a, b], 1), whole, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sb["channel1"]["shift"], s["channel1"]["shift"])
    assert lm.state_size(13) == s.num_floats()


def test_rwkv_channel_mix_reads_only_the_current_and_previous_input():
    torch.manual_seed(0)
    ch = RWKVChannelMix(8, layer_idx=1, n_layers=2).double()
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    y, _ = ch(x)
    for t in range(6):
        z = x.clone()
        z[:, :max(0, t - 1)] += 1.0  # inputs two or more steps back do not matter
        torch.testing.assert_close(ch(z)[0][:, t], y[:, t])
    with pytest.raises(TypeError, match="carries a state"):
        ch.mix(x)
