"""Channel mixers (``recur/layers/channel.py``): RWKV-4's channel mix against the paper's equations,
its initialisation, and RWKV language models built from time- and channel-mixing blocks."""

from __future__ import annotations

import math

import torch

from recur.layers.channel import RWKVChannelMix
from recur.models import CausalLM

from .helpers import D, close, randn
from .test_rwkv4 import shifted


def test_rwkv4_channel_is_a_function_of_the_current_and_previous_input_only():
    torch.manual_seed(0)
    layer = RWKVChannelMix(D).double()
    with torch.no_grad():
        layer.receptance.weight.normal_(0, 1 / math.sqrt(D))
    x = randn(2, 9, D, seed=13)
    y, s = layer(x)
    xp = shifted(x)
    r = layer.receptance(x * layer.mix_r + xp * (1 - layer.mix_r))
    k = layer.key(x * layer.mix_k + xp * (1 - layer.mix_k))
    close(y, torch.sigmoid(r) * layer.value(torch.relu(k) ** 2), "sigmoid(r) * W_v(relu(k)^2)")
    close(s["shift"], x[:, -1], "the state is the last input")
    close(layer(x[:, :1])[0], y[:, :1], "t = 0 sees x_0 and zeros")
    for t in range(1, 9):
        close(layer(x[:, t - 1 : t + 1])[0][:, 1], y[:, t], f"y_{t} from (x_{t - 1}, x_{t}) alone")
    x2 = x.clone()
    x2[:, :4] = randn(2, 4, D, seed=14)
    close(layer(x2)[0][:, 5:], y[:, 5:], "inputs before t-1 do not matter")


def test_rwkv4_channel_init_follows_the_official_code():
    layer = RWKVChannelMix(D, layer_idx=1, n_layers=4)
    i = torch.arange(D, dtype=torch.float64)
    close(layer.mix_k.double(), (i / D) ** 0.75, "mu_k", rtol=1e-6, atol=1e-6)
    close(layer.mix_r.double(), (i / D) ** 0.75, "mu_r", rtol=1e-6, atol=1e-6)
    assert layer.key.out_features == 4 * D and layer.receptance.weight.abs().sum() == 0
    w = layer.key.weight.double()
    close(w.T @ w, 4.0 * torch.eye(D, dtype=torch.float64), "W_k orthogonal with gain 2", rtol=1e-5, atol=1e-5)
    assert RWKVChannelMix(D, zero_init_output=True).value.weight.abs().sum() == 0


def test_rwkv4_lm_alternates_time_and_channel_mixing_in_every_block():
    lm = CausalLM(vocab_size=11, d_model=D, n_layers=4, pattern="rwkv4", mlp="rwkv4")
    assert [type(m).__name__ for m in lm.backbone.mixers] == ["RWKV4"] * 4
    assert [type(b.channel).__name__ for b in lm.backbone.layers] == ["RWKVChannelMix"] * 4
    logits, _ = lm(torch.randint(0, 11, (2, 7)))
    assert logits.shape == (2, 7, 11) and torch.isfinite(logits).all()
