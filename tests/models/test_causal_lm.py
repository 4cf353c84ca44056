"""CausalLM, Backbone and generation: state carry through the whole stack, streaming
generation equal to full recomputation, sampling, patterns, errors."""

from __future__ import annotations

import re

import pytest
import torch

import recur
from recur import CausalLM, State
from recur.models import Backbone

V = 37


def lm_for(pattern, n_layers=2, dtype=torch.float64, **kw) -> CausalLM:
    torch.manual_seed(0)
    lm = CausalLM(V, 16, n_layers, pattern=pattern, **kw).to(dtype)
    for m in lm.backbone.mixers:
        if hasattr(m, "chunk_size"):
            m.chunk_size = 8
        if hasattr(m, "window"):
            m.window = 6
    return lm


def tokens(b, t, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# A causal LM takes every causal mixer; encoder layers (causal=False) are refused (see below).
CAUSAL_MODELS = [n for n in recur.list_models() if recur.model_info(n).cls.causal]


@pytest.mark.parametrize("name", CAUSAL_MODELS)
def test_lm_state_carry_is_exact(name):
    lm = lm_for(name)
    x = tokens(2, 23)
    full, s_full = lm(x)
    a, s = lm(x[:, :10])
    b, s = lm(x[:, 10:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-8, atol=1e-10)
    assert s.num_floats() == lm.state_size(23) == s_full.num_floats()


@pytest.mark.parametrize("name", CAUSAL_MODELS)
def test_greedy_generation_equals_full_recomputation(name):
    lm = lm_for(name)
    prompt = tokens(2, 5, seed=1)
    out = lm.generate(prompt, 8)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    seq = prompt
    for _ in range(8):  # recompute from scratch each step: no state carried
        logits, _ = lm(seq)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    lm = lm_for("elman", dtype=torch.float32)
    prompt = tokens(3, 4)
    s1 = lm.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    s2 = lm.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)
    assert torch.equal(lm.generate(prompt, 10, temperature=0.7, top_k=1), lm.generate(prompt, 10))


def test_stream_yields_one_token_per_step_with_constant_state():
    lm = lm_for(["elman", "gru"] if "gru" in recur.list_models() else "elman", dtype=torch.float32)
    got = list(lm.stream(tokens(2, 3), 6))
    assert len(got) == 6 and all(t.shape == (2,) for t in got)
    assert lm.state_size(10) == lm.state_size(10_000)


def test_tied_and_untied_heads():
    tied = lm_for("elman", tie_embeddings=True)
    assert tied.head.weight is tied.embed.weight
    untied = lm_for("elman")  # the default
    assert untied.head.weight is not untied.embed.weight
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in tied.parameters()) + V * 16


def test_pattern_repeats_to_depth_and_mixer_config_reaches_layers():
    lm = CausalLM(V, 16, 5, pattern=["elman", "elman", "elman"], mlp=None)
    assert lm.backbone.layer_names == ["elman"] * 5
    assert all(b.channel is None for b in lm.backbone.blocks)


def test_samba_pattern_builds_and_generates():
    assert recur.list_patterns()["samba"] == ("mamba", "swa")
    lm = CausalLM(V, 16, 4, pattern="samba", mixer_config={"swa": {"window": 8}})
    assert lm.backbone.layer_names == ["mamba", "swa", "mamba", "swa"]
    assert lm.backbone.mixers[1].window == 8
    out = lm.generate(tokens(1, 5), 20)
    assert out.shape == (1, 25)
    # constant memory: the window bounds the cache, mamba's state is fixed
    assert lm.state_size(100) == lm.state_size(100_000)


def test_lm_state_saves_and_loads(tmp_path):
    lm = lm_for("elman")
    x = tokens(2, 9)
    _, s = lm(x)
    s.save(tmp_path / "lm.safetensors")
    loaded = State.load(tmp_path / "lm.safetensors")
    y1, _ = lm(x, s)
    y2, _ = lm(x, loaded)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_bad_tokens_raise_clear_errors():
    lm = lm_for("elman")
    with pytest.raises(TypeError, match="integer"):
        lm(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        lm(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        lm(torch.full((1, 3), V))
    with pytest.raises(ValueError, match="unknown model or pattern 'sambaa'"):
        CausalLM(V, 16, 2, pattern="sambaa")


@pytest.mark.parametrize("pattern,config,message", [
    (["gla", "bidirectional"], {}, "layer 1 ('bidirectional') is not causal"),    # the encoder wrapper
    ("gru", {"gru": {"bidirectional": True}}, "layer 0 ('gru') is not causal"),   # a mixer configured as an encoder
])
def test_causal_lm_refuses_a_non_causal_layer(pattern, config, message):
    """A bidirectional layer would let position t read token t + 1, the very target it predicts."""
    with pytest.raises(ValueError, match=re.escape(message)):
        CausalLM(V, 16, 2, pattern=pattern, mixer_config=config)
    with pytest.raises(ValueError, match=re.escape(message)):
        Backbone(16, 2, pattern, config)


def test_readme_five_line_example():
    """The README's promise: build by name, run a batch, carry state, generate from a hybrid."""
    mixer = recur.build("gla", d_model=64)
    y, state = mixer(torch.randn(2, 100, 64))
    y, state = mixer(torch.randn(2, 50, 64), state)
    lm = recur.CausalLM(vocab_size=256, d_model=64, n_layers=4, pattern="samba")
    out = lm.generate(torch.randint(0, 256, (1, 8)), max_new_tokens=16)
    assert y.shape == (2, 50, 64) and out.shape == (1, 24)


def test_real_valued_inputs_are_added_to_the_embedding_and_the_regression_head_owns_a_squared_error():
    from recur.tasks.base import Batch

    torch.manual_seed(0)
    lm = CausalLM(2, 16, 1, pattern="gla", feature_dim=4, target_dim=2).double()
    x = torch.randint(2, (3, 6), generator=torch.Generator().manual_seed(1))
    f = torch.randn(3, 6, 4, dtype=torch.float64)
    out = lm(x, features=f)
    h, _ = lm.backbone(lm.embed(x) + lm.features(f))
    torch.testing.assert_close(out.logits, lm.head(lm.norm(h)), rtol=1e-12, atol=1e-12)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(2)) < 0.5
    mask[0, 0] = True
    values = torch.randn(3, 6, 2, dtype=torch.float64)
    batch = Batch(x, torch.zeros_like(x), mask, features=f, values=values)
    torch.testing.assert_close(lm.loss(out, batch), ((out.logits - values)[mask] ** 2).mean(), rtol=1e-12, atol=0)
    sparse = lm(x, features=f, positions=mask)  # the head at the supervised positions only: the same loss
    torch.testing.assert_close(lm.loss(sparse, batch), lm.loss(out, batch), rtol=1e-12, atol=0)
    first = lm(x[:, :4], features=f[:, :4])  # the state carries as for tokens
    second = lm(x[:, 4:], first.state, features=f[:, 4:])
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), out.logits, rtol=1e-12, atol=1e-12)


def test_real_valued_options_fail_clearly():
    with pytest.raises(ValueError, match="tied"):
        CausalLM(2, 16, 1, pattern="gla", target_dim=1, tie_embeddings=True)
    with pytest.raises(ValueError, match="feature_dim must be an int"):
        CausalLM(2, 16, 1, pattern="gla", feature_dim=-1)
    lm = CausalLM(2, 16, 1, pattern="gla")
    x = torch.zeros(1, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="without real-valued inputs"):
        lm(x, features=torch.zeros(1, 3, 2))
