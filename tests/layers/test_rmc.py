"""RMC (``recur/layers/rmc.py``): properties from the paper that the conformance suite cannot know.
The update is equivariant under permutations of the slots and starts from the identity memory,
and the small-tensor ops equal the library kernels. All exactness checks run in float64.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from recur import State
from recur.layers.rmc import _Ops

from . import helpers
from .helpers import D, make, randn

RTOL, ATOL = 1e-9, 1e-11
close = partial(helpers.close, rtol=RTOL, atol=ATOL)


def test_rmc_starts_from_the_identity_memory():
    m = make("rmc", n_slots=3, slot_size=8)
    state = m.init_state(2, dtype=torch.float64)
    close(state["memory"], torch.eye(3, 8, dtype=torch.float64).expand(2, 3, 8), "M_0")


def test_rmc_update_is_equivariant_under_slot_permutations():
    """Every slot attends to all rows with shared weights and per-slot gates: permuting the
    slots of the memory permutes the next memory the same way."""
    m = make("rmc", n_slots=5)
    memory = randn(2, 5, D, seed=6)
    x = randn(2, 7, D, seed=7)
    perm = torch.tensor([3, 0, 4, 1, 2])
    _, a = m(x, State(memory=memory))
    _, b = m(x, State(memory=memory[:, perm]))
    close(b["memory"], a["memory"][:, perm], "permuted memory after 7 steps")


@pytest.mark.parametrize("n_blocks", [1, 2])
@pytest.mark.parametrize("gate_style", ["unit", "memory"])
def test_rmc_step_is_the_papers_update(n_blocks, gate_style):
    """One step written plainly from the paper (A = [M; x~], LN(A + MHDPA(A)), LN(A + MLP(A)),
    gated update) equals the layer, including the input row's precomputed q, k, v."""
    m = make("rmc", n_slots=3, n_blocks=n_blocks, gate_style=gate_style)
    with torch.no_grad():  # non-trivial LayerNorm parameters and gate biases
        for p in (m.qkv_norm, m.block_norm, m.gate_bias, m.in_bias):
            p.add_(0.2 * randn(*p.shape, seed=p.numel() + 1))
    memory, x = randn(2, 3, D, seed=8), randn(2, 1, D, seed=9)
    y, state = m(x, State(memory=memory))

    H, dk, dv = m.n_heads, m.key_size, m.head_size
    x_in = x[:, 0] @ m.in_weight.T + m.in_bias
    rows = torch.cat([memory, x_in[:, None]], 1)
    for i in range(n_blocks):
        qkv = rows @ m.qkv_weight[i].T + m.qkv_bias[i]
        qkv = F.layer_norm(qkv, qkv.shape[-1:], m.qkv_norm[i, 0], m.qkv_norm[i, 1])
        qkv = qkv.view(2, 4, H, 2 * dk + dv).transpose(1, 2)
        q, k, v = qkv.split([dk, dk, dv], -1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dk), -1) @ v
        rows = F.layer_norm(rows + att.transpose(1, 2).reshape(2, 4, -1), (D,), *m.block_norm[i, 0])
        hidden = rows
        for j in range(m.n_mlp_layers):
            hidden = (torch.relu(hidden) if j else hidden) @ m.mlp_weight[i, j].T + m.mlp_bias[i, j]
        rows = F.layer_norm(rows + hidden, (D,), *m.block_norm[i, 1])
    g = x_in @ m.gate_input_weight.T + m.gate_bias
    g = g[:, None] + torch.tanh(memory) @ m.gate_memory_weight.T
    i_gate, f_gate = g.chunk(2, -1)
    new = torch.sigmoid(i_gate) * torch.tanh(rows[:, :3]) + torch.sigmoid(f_gate + 1.0) * memory
    close(state["memory"], new, "memory after one step")
    close(y[:, 0], new.flatten(1) @ m.out_weight.T + m.out_bias, "output")


def test_rmc_small_ops_equal_library_kernels():
    small, library = _Ops(True), _Ops(False)
    a, w, b = randn(3, 5, 8, seed=10), randn(8, 6, seed=11), randn(6, seed=12)
    close(small.linear(a, w, b), library.linear(a, w, b), "linear")
    q, k = randn(2, 4, 3, 8, seed=13), randn(2, 4, 5, 8, seed=14)
    close(small.scores(q, k), library.scores(q, k), "scores")
    p, v = randn(2, 4, 3, 5, seed=15), randn(2, 4, 5, 7, seed=16)
    close(small.mix(p, v), library.mix(p, v), "mix")
    s, o = randn(8, seed=17), randn(8, seed=18)
    close(small.layer_norm(a, s, o), library.layer_norm(a, s, o), "layer_norm")
    close(small.softmax(a), library.softmax(a), "softmax")
