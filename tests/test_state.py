"""The State container: detach, move, select rows, concatenate, save/load, count floats."""

from __future__ import annotations

import pytest
import torch

from recur import State


def sample() -> State:
    g = torch.Generator().manual_seed(0)
    return State(
        h=torch.randn(3, 4, generator=g, requires_grad=True),
        z=torch.randn(3, 2, dtype=torch.complex128, generator=g),
        pos=torch.tensor([5, 5, 5]),
        inner=State(S=torch.randn(3, 2, 2, 2, generator=g)),
    )


def test_num_floats_counts_complex_twice_and_skips_counters():
    s = sample()
    assert s.num_floats() == 4 + 2 * 2 + 8
    assert s.num_floats(per_sequence=False) == 3 * (4 + 4 + 8)


def test_detach_cuts_the_graph():
    s = sample()
    assert s["h"].requires_grad and not s.detach()["h"].requires_grad


def test_to_changes_floating_dtypes_and_follows_with_complex():
    s = sample().to(torch.float32)
    assert s["h"].dtype == torch.float32 and s["z"].dtype == torch.complex64 and s["pos"].dtype == torch.int64
    assert s["inner"]["S"].dtype == torch.float32


def test_select_and_cat_rebuild_the_batch():
    s = sample()
    rows = [s.select(i) for i in range(3)]
    assert all(r.batch_size == 1 for r in rows)
    back = State.cat(rows)
    for (k, a), (_, b) in zip(back.tensors(), s.tensors()):
        assert torch.equal(a, b), k
    assert s.select(torch.tensor([2, 0])).batch_size == 2


def test_save_and_load_roundtrip_with_nesting_and_complex(tmp_path):
    s = sample()
    s.save(tmp_path / "s.safetensors")
    t = State.load(tmp_path / "s.safetensors")
    assert set(t) == set(s) and isinstance(t["inner"], State)
    for (k, a), (_, b) in zip(sorted(t.tensors()), sorted(s.tensors())):
        assert torch.equal(a, b.detach()), k


def test_bad_entries_are_rejected():
    with pytest.raises(TypeError, match="tensor or State"):
        State(h=[1, 2])
    with pytest.raises(ValueError, match="keys"):
        State({"a.b": torch.zeros(1)})
    with pytest.raises(AttributeError, match="no entry"):
        sample().missing


def test_replace_and_attribute_access():
    s = sample()
    t = s.replace(h=torch.zeros(3, 4))
    assert torch.equal(t.h, torch.zeros(3, 4)) and torch.equal(t.pos, s.pos)
    assert "h=Tensor(3, 4)" in repr(t)
