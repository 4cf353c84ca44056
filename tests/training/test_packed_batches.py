"""Packed batches through training: a Batch with ``resets`` reaches the model in every pass."""

from __future__ import annotations

import torch
from harness_tasks import tiny

from recur.tasks.base import Batch
from recur.training import Trainer
from recur.training.methods.tbptt import TBPTT


def packed_batch(trainer: Trainer) -> Batch:
    gen = torch.Generator().manual_seed(0)
    batch = trainer.task.batch(4, trainer.cfg.task.seq_len, gen)
    resets = torch.zeros_like(batch.mask)
    resets[:, [0, 5, 9]] = True
    return Batch(batch.inputs, batch.targets, batch.mask, resets=resets)


def test_batch_slices_and_moves_its_resets():
    inputs = torch.zeros(2, 6, dtype=torch.long)
    resets = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 1, 0, 0, 0, 1]], dtype=torch.bool)
    batch = Batch(inputs, inputs, torch.ones(2, 6, dtype=torch.bool), resets=resets)
    assert torch.equal(batch.window(2, 5).resets, resets[:, 2:5])
    assert torch.equal(batch.to("cpu").resets, resets)
    assert torch.equal(batch.model_inputs(1, 4)["resets"], resets[:, 1:4])
    assert Batch(inputs, inputs, batch.mask).model_inputs() == {}


def test_the_trainer_runs_the_model_on_the_packed_documents():
    trainer = Trainer(tiny(steps=2, seq_len=16), progress=False)
    batch = packed_batch(trainer)
    _, out = trainer.forward_backward(batch, None)
    with torch.no_grad():
        packed = trainer.model(batch.inputs, resets=batch.resets).logits
        plain = trainer.model(batch.inputs).logits
    torch.testing.assert_close(out.logits.detach(), packed[batch.mask])  # the head at the supervised positions
    assert not torch.allclose(packed[:, 5:], plain[:, 5:])  # the resets changed what the model read


def test_truncated_bptt_windows_carry_the_resets():
    trainer = Trainer(tiny(steps=2, seq_len=16, training=[{"name": "tbptt", "args": {"k1": 4, "k2": 4}}]),
                      progress=False)
    owner = next(m for m in trainer.methods if isinstance(m, TBPTT))
    batch = packed_batch(trainer)
    _, out = owner.forward_backward(trainer, batch, None)
    with torch.no_grad():
        packed = trainer.model(batch.inputs, resets=batch.resets).logits
    torch.testing.assert_close(out.logits.detach(), packed, rtol=1e-5, atol=1e-6)
