"""Hybrid presets and the ``hybrid`` helper: every named pattern builds a CausalLM that trains a
step, streams and generates with its state carried exactly."""

from __future__ import annotations

import pytest
import torch

import recur
from recur import CausalLM


@pytest.mark.parametrize("preset", sorted(recur.list_patterns()))
def test_preset_builds_a_causal_lm_that_trains_and_generates(preset):
    torch.manual_seed(0)
    lm = CausalLM(vocab_size=32, d_model=32, n_layers=len(recur.list_patterns()[preset]) + 1, pattern=preset)
    assert [m.name for m in lm.backbone.mixers][: len(recur.list_patterns()[preset])] == list(recur.list_patterns()[preset])
    tokens = torch.randint(0, 32, (2, 20))
    logits, _ = lm(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)
    out = lm.generate(tokens[:, :5], max_new_tokens=6)
    assert out.shape == (2, 11) and torch.equal(out[:, :5], tokens[:, :5])
    # Token-by-token stepping (what generation does) equals reading the sequence whole.
    with torch.no_grad():
        whole, _ = lm(out)
        state, stepped = None, []
        for t in range(out.shape[1]):
            lt, state = lm(out[:, t : t + 1], state)
            stepped.append(lt)
    torch.testing.assert_close(torch.cat(stepped, dim=1), whole, rtol=1e-4, atol=1e-4)


def test_hybrid_interleaves_linear_layers_with_full_attention():
    assert recur.hybrid("gla", 3) == ("gla", "gla", "gla", "attention")
    assert recur.hybrid("gated_deltanet", 1, attention="swa") == ("gated_deltanet", "swa")
    lm = CausalLM(vocab_size=16, d_model=16, n_layers=8, pattern="hybrid:gla:3")
    assert [m.name for m in lm.backbone.mixers] == ["gla"] * 3 + ["attention"] + ["gla"] * 3 + ["attention"]
    assert recur.registry.resolve_pattern("hybrid:deltanet:6:swa") == ("deltanet",) * 6 + ("swa",)
    assert recur.registry.resolve_pattern("hybrid:lru") == ("lru",) * 3 + ("attention",)


@pytest.mark.parametrize("bad,match", [
    ("hybrid:gla:0", "ratio"),
    ("hybrid:gla:x", "ratio must be an integer"),
    ("hybrid:glaa:3", "Did you mean 'gla'"),
    ("hybrid:gla:3:atention", "Did you mean 'attention'"),
    ("hybrid:", "unknown model"),
    ("hybrid:gla:3:swa:extra", "hybrid:LINEAR"),
])
def test_bad_hybrid_patterns_are_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        recur.registry.resolve_pattern(bad)
