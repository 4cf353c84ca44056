"""Batch: its optional fields travel with it: per-position ones (features, values, valid, resets) are
cut by ``window`` and passed to the model by ``model_inputs``; a row's label sequence stays whole."""

from __future__ import annotations

import torch

from recur.tasks.base import Batch


def test_window_cuts_the_per_position_fields_and_keeps_the_label_sequences_whole():
    n, T = 2, 6
    b = Batch(torch.arange(n * T).view(n, T), torch.zeros(n, T, dtype=torch.int64), torch.ones(n, T, dtype=torch.bool),
              resets=torch.zeros(n, T, dtype=torch.bool), features=torch.randn(n, T, 3), values=torch.randn(n, T, 1),
              labels=torch.tensor([[4, 2, -1], [7, -1, -1]]))
    w = b.window(2, 5, supervised_from=3)
    assert torch.equal(w.inputs, b.inputs[:, 2:5]) and torch.equal(w.features, b.features[:, 2:5])
    assert torch.equal(w.values, b.values[:, 2:5]) and w.mask[:, 0].logical_not().all() and w.mask[:, 1:].all()
    assert torch.equal(w.labels, b.labels) and w.label_lists() == [[4, 2], [7]]
    kwargs = b.model_inputs(1, 4)
    assert set(kwargs) == {"resets", "features"} and torch.equal(kwargs["features"], b.features[:, 1:4])
    moved = b.to("cpu")
    assert torch.equal(moved.labels, b.labels) and torch.equal(moved.features, b.features)
