"""twin: the backward network reads each document from its end, the forward states are matched with
the states of what follows them, the twin term trains the forward model only, and a run trains,
checkpoints and resumes with the backward network."""

from __future__ import annotations

import pytest
import torch

from recur.config import RunConfig
from recur.models import CausalLM
from recur.training.methods.twin import BackwardLM, reversed_resets, twin_losses
from recur.training.trainer import ConfigError, Trainer


def _nets():
    torch.manual_seed(0)
    return CausalLM(7, 8, 1, pattern="gla").double(), BackwardLM(7, 8, 1, "gla").double()


def test_each_forward_state_is_matched_with_the_state_of_its_future_and_the_backward_lm_reads_the_reversal():
    lm, back = _nets()
    x = torch.randint(7, (2, 6), generator=torch.Generator().manual_seed(1))
    h, _ = lm.backbone(lm.embed(x))
    ce, twin = twin_losses(lm, back, h, x, None)
    dists, ces = [], []
    for t in range(5):  # by hand: the backward net over x_{T-1} .. x_{t+1} alone
        future = x[:, t + 1:].flip(1)
        r, _ = back.backbone(back.embed(future))
        dists.append((back.g(h[:, t]) - r[:, -1]).pow(2).sum(-1))
    for s in range(5):
        rev = x.flip(1)[:, :s + 1]
        r, _ = back.backbone(back.embed(rev))
        ces.append(torch.nn.functional.cross_entropy(back.head(back.norm(r[:, -1])), x.flip(1)[:, s + 1],
                                                     reduction="none"))
    torch.testing.assert_close(twin, torch.stack(dists, 1).mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ce, torch.stack(ces, 1).mean().float(), rtol=1e-6, atol=1e-7)


def test_the_twin_term_trains_the_forward_model_only():
    lm, back = _nets()
    x = torch.randint(7, (2, 6), generator=torch.Generator().manual_seed(1))
    h, _ = lm.backbone(lm.embed(x))
    _, twin = twin_losses(lm, back, h, x, None)
    twin.backward()
    assert lm.embed.weight.grad is not None and lm.embed.weight.grad.abs().sum() > 0
    assert back.g.weight.grad is not None  # g maps the forward states: it learns from the twin term
    assert back.embed.weight.grad is None and all(p.grad is None for p in back.backbone.parameters())


def test_packed_documents_are_reversed_one_by_one():
    lm, back = _nets()
    a = torch.randint(7, (1, 4), generator=torch.Generator().manual_seed(2))
    b = torch.randint(7, (1, 3), generator=torch.Generator().manual_seed(3))
    x = torch.cat([a, b], 1)
    resets = torch.zeros_like(x, dtype=torch.bool)
    resets[0, 0] = resets[0, 4] = True
    assert reversed_resets(resets, 7)[0].tolist() == [True, False, False, True, False, False, False]
    h, _ = lm.backbone(lm.embed(x), resets=resets)
    ce, twin = twin_losses(lm, back, h, x, resets)
    ha, _ = lm.backbone(lm.embed(a))
    hb, _ = lm.backbone(lm.embed(b))
    ce_a, tw_a = twin_losses(lm, back, ha, a, None)
    ce_b, tw_b = twin_losses(lm, back, hb, b, None)
    torch.testing.assert_close(twin, (3 * tw_a + 2 * tw_b) / 5, rtol=1e-10, atol=1e-12)  # 3 + 2 matched states
    torch.testing.assert_close(ce, (3 * ce_a + 2 * ce_b) / 5, rtol=1e-5, atol=1e-6)


def _cfg(steps=6):
    return RunConfig.model_validate({"task": {"name": "parity", "seq_len": 8},
                                     "model": {"mixer": "gla", "d_model": 16, "n_layers": 1},
                                     "optim": {"steps": steps, "batch_size": 8}, "eval": {"batches": 1},
                                     "training": [{"name": "twin", "args": {"weight": 0.5}}]})


def test_a_run_trains_the_backward_network_and_resumes_it_exactly(tmp_path):
    trainer = Trainer(_cfg(), progress=False)
    before = {k: v.clone() for k, v in trainer.methods[0].backward.state_dict().items()}
    whole = trainer.fit()
    after = trainer.methods[0].backward.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    first = Trainer(_cfg(), progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    for _ in range(3):
        first.train_step()
    from recur.training import checkpoint

    checkpoint.save(first, tmp_path)
    resumed = Trainer(_cfg(), progress=False, checkpoint_dir=tmp_path, resume=True).fit()
    assert resumed.metrics == whole.metrics and resumed.train_loss == whole.train_loss


def test_twin_needs_a_plain_causal_lm():
    cfg = _cfg().model_copy(update={"model": _cfg().model.model_copy(update={"arch": "looped_lm"})})
    with pytest.raises(ConfigError, match="plain causal_lm"):
        Trainer(cfg, progress=False)
