"""Lattice (``recur/layers/lattice.py``): the properties of the paper's update that the conformance
suite cannot know. Exactness checks in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from recur.layers.lattice import lattice_recurrence, lattice_step, orthogonal_write

from .helpers import D, close, make, randn


def test_lattice_update_is_orthogonal_to_the_slot_state():
    S = F.normalize(randn(3, 2, 16, 8), dim=-1)
    z, v = torch.sigmoid(randn(3, 2, 16, seed=2)), F.normalize(randn(3, 2, 8, seed=3), dim=-1)
    u = orthogonal_write(S, z, v)
    inner = (u * S).sum(-1)
    assert inner.abs().max() < 1e-14, inner.abs().max()
    assert u.norm(dim=-1).min() > 0  # not trivially zero


def test_lattice_slots_stay_unit_norm_and_step_is_the_gated_recurrence():
    """normalize(s + z (I - s s^T) v) = normalize((1 - z <s, v>) s + z v): linear attention with a state- and input-dependent forget gate."""
    S = F.normalize(randn(2, 2, 16, 8), dim=-1)
    z, v = torch.sigmoid(randn(2, 2, 16, seed=2)), F.normalize(randn(2, 2, 8, seed=3), dim=-1)
    gate = 1 - z * (S * v[..., None, :]).sum(-1)
    close(lattice_step(S, z, v), F.normalize(gate[..., None] * S + z[..., None] * v[..., None, :], dim=-1), "gated form")
    m = make("lattice")
    _, s = m(5 * randn(2, 50, D))
    close(s["S"].norm(dim=-1), torch.ones(s["S"].shape[:-1], dtype=torch.float64), "unit slots")


def test_lattice_repeated_value_saturates_the_slot():
    """Writing the same value again and again turns every written slot towards it, and the write then vanishes (novelty only)."""
    S = F.normalize(randn(1, 1, 4, 8), dim=-1)
    v = F.normalize(randn(1, 1, 200, 8, seed=5), dim=-1)[:, :, :1].expand(1, 1, 200, 8)
    z = torch.full((1, 1, 200, 4), 0.5, dtype=torch.float64)
    r = torch.full((1, 1, 200, 4), 0.25, dtype=torch.float64)
    o, S = lattice_recurrence(S, z, r, v)
    close((S * v[:, :, 0, None, :]).sum(-1), torch.ones(1, 1, 4, dtype=torch.float64), "slots aligned with v")
    assert orthogonal_write(S, z[:, :, 0], v[:, :, 0]).abs().max() < 1e-8
