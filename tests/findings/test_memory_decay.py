"""The key-information measurement behind rmt-segments: zero where rows share everything, positive
where their first segments differ, the retention of a geometric decay, and a clear error for a
memory that is not memory tokens."""

from __future__ import annotations

import math

import pytest
import torch

from recur.findings.memory_decay import key_information, retention
from recur.models.armt import ARMT
from recur.models.rmt import RMT


def _rmt():
    torch.manual_seed(0)
    return RMT(vocab_size=20, d_model=16, n_layers=1, segment_len=4, n_memory=2).double().eval()


def test_identical_rows_carry_no_key_information_and_different_keys_do():
    model = _rmt()
    filler = torch.randint(20, (1, 16), generator=torch.Generator().manual_seed(1)).repeat(6, 1)
    assert key_information(model, filler, 4) == pytest.approx([0.0] * 4, abs=1e-20)
    keyed = filler.clone()
    keyed[:, :3] = torch.randint(20, (6, 3), generator=torch.Generator().manual_seed(2))  # rows differ at the start only
    info = key_information(model, keyed, 4)
    assert all(x > 1e-6 for x in info) and info[0] <= 1.0


def test_retention_is_the_per_segment_ratio_of_a_geometric_decay():
    assert retention([0.5 * 0.8 ** k for k in range(10)]) == pytest.approx(0.8)
    assert retention([0.5 * 0.5 ** k for k in range(40)], floor=1e-4) == pytest.approx(0.5)  # stops at the floor
    assert math.isnan(retention([0.3, 1e-6]))


def test_a_memory_without_tokens_is_a_clear_error():
    model = ARMT(vocab_size=20, d_model=16, n_layers=1, segment_len=4, n_memory=2).eval()
    with pytest.raises(ValueError, match="memory tokens"):
        key_information(model, torch.zeros(2, 8, dtype=torch.int64), 2)
