"""The plain PyTorch reference models of ``recur speed``'s lab_step case (recur.baselines)."""

from __future__ import annotations

import pytest
import torch

from recur.baselines import SDPAGPT, TorchLSTMLM, n_params


@pytest.mark.parametrize("make", [lambda: SDPAGPT(32, 16, 2, n_heads=2, max_len=10), lambda: TorchLSTMLM(32, 16, 2)],
                         ids=["gpt", "lstm"])
def test_logits_have_shape_batch_time_vocab_and_the_head_is_tied(make):
    torch.manual_seed(0)
    model = make()
    logits = model(torch.randint(0, 32, (3, 10)))
    assert logits.shape == (3, 10, 32) and torch.isfinite(logits).all()
    assert model.head.weight is (model.tok.weight if isinstance(model, SDPAGPT) else model.embed.weight)
    assert n_params(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("make", [lambda: SDPAGPT(32, 16, 2, n_heads=2, max_len=12), lambda: TorchLSTMLM(32, 16, 2)],
                         ids=["gpt", "lstm"])
def test_changing_a_future_token_leaves_earlier_logits_unchanged(make):
    torch.manual_seed(1)
    model = make().double()
    tokens = torch.randint(0, 32, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 32
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_gpt_refuses_sequences_longer_than_its_positions():
    with pytest.raises(ValueError, match="max_len=4"):
        SDPAGPT(8, 8, 1, n_heads=1, max_len=4)(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="n_heads=3 must divide d_model=8"):
        SDPAGPT(8, 8, 1, n_heads=3, max_len=4)
