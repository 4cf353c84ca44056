"""encoder: bidirectional or causal mixers with a token or pooled head."""

from __future__ import annotations

import pytest
import torch

from recur.models import Encoder
from recur.tasks.base import Batch


def _x(t=10, seed=1):
    return torch.randint(7, (3, t), generator=torch.Generator().manual_seed(seed))


def test_a_bidirectional_encoder_reads_the_future():
    torch.manual_seed(0)
    enc = Encoder(7, 16, 1, pattern="bidirectional", mixer_config={"mixer": "lstm"}).double()
    assert not enc.causal
    x = _x()
    y = x.clone()
    y[:, -1] = (y[:, -1] + 1) % 7
    assert not torch.allclose(enc(x).logits[:, 0], enc(y).logits[:, 0])


@pytest.mark.parametrize("pool", ["mean", "last"])
def test_the_pooled_head_classifies_the_pooled_hidden_state(pool):
    torch.manual_seed(0)
    enc = Encoder(7, 16, 2, pattern="gla", head="pooled", pool=pool, n_classes=3).double()
    x = _x()
    h, _ = enc.backbone(enc.embed(x))
    pooled = h.mean(1) if pool == "mean" else h[:, -1]
    out = enc(x)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.logits, enc.head(enc.norm(pooled)), rtol=1e-12, atol=1e-12)


def test_the_pooled_loss_takes_the_one_label_of_each_row_and_refuses_several():
    torch.manual_seed(0)
    enc = Encoder(7, 16, 1, pattern="gla", head="pooled", n_classes=2)
    x = _x()
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, -1] = True
    targets = torch.zeros(3, 10, dtype=torch.long)
    targets[:, -1] = torch.tensor([0, 1, 1])
    out = enc(x)
    loss = enc.loss(out, Batch(x, targets, mask))
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 1])))
    mask[:, 0] = True
    with pytest.raises(ValueError, match="one label per sequence"):
        enc.loss(out, Batch(x, targets, mask))


def test_bad_options_are_clear_errors():
    for bad, match in (({"head": "cls"}, "head must be one of"), ({"pool": "max"}, "pool must be one of"),
                       ({"n_classes": 1}, "n_classes")):
        with pytest.raises(ValueError, match=match):
            Encoder(7, 16, 1, pattern="gla", **bad)
