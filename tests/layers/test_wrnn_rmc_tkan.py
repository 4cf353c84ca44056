"""wRNN, RMC and TKAN: properties from their papers that the conformance suite cannot know.

wRNN's untrained recurrence is a travelling wave (an impulse goes round the ring) and its fast
loop is the paper's circular Conv1d; RMC's update is equivariant under permutations of the slots
and starts from the identity memory, and its small-tensor ops equal the library kernels; TKAN's
KAN layers use true B-spline bases (Cox-de Boor), and its cell is the paper's equations.
All exactness checks run in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import recur
from recur import State
from recur.layers.rmc import _Ops
from recur.layers.tkan import b_spline_basis

D = 16
RTOL, ATOL = 1e-9, 1e-11


def make(name, seed=0, **options):
    torch.manual_seed(seed)
    return recur.build(name, d_model=D, **options).double()


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------- wRNN


def test_wrnn_untrained_impulse_travels_round_the_ring():
    """At initialisation u is a one-position shift and V writes position 0: an impulse at t = 0
    appears at position (-t) mod n_spatial of every channel at step t, and nowhere else."""
    m = make("wrnn", n_channels=3, n_spatial=7)
    x = torch.zeros(1, 20, D, dtype=torch.float64)
    x[0, 0] = 1.0  # injects sum_i x_i / sqrt(D) = sqrt(D) > 0, which the ReLU passes
    h = m.init_state(1, dtype=torch.float64)
    injected = D / math.sqrt(D)
    for t in range(20):
        _, h = m(x[:, t : t + 1], h)
        expected = torch.zeros(3, 7, dtype=torch.float64)
        expected[:, (-t) % 7] = injected
        close(h["h"][0], expected, f"ring state at step {t}")


def test_wrnn_loop_is_the_circular_conv1d_rnn():
    """With random (trained-like) weights the fast gather-and-matmul loop equals the paper's
    h_t = relu(Conv1d_circular(h_{t-1}) + V x_t) with torch's own Conv1d."""
    m = make("wrnn", n_channels=4, n_spatial=9, kernel_size=5)
    with torch.no_grad():
        for p in (m.in_weight, m.in_bias, m.conv_weight, m.conv_bias):
            p.copy_(0.3 * randn(*p.shape, seed=p.numel()))
    x, h0 = randn(2, 11, D, seed=4), State(h=randn(2, 4, 9, seed=5).abs())
    y, state = m(x, h0)

    h, ys = h0["h"], []
    for t in range(x.shape[1]):
        padded = F.pad(h, (2, 2), mode="circular")
        rec = F.conv1d(padded, m.conv_weight, m.conv_bias)
        h = torch.relu(rec + (x[:, t] @ m.in_weight.T + m.in_bias).view(2, 4, 9))
        ys.append(h.flatten(1) @ m.out_weight.T + m.out_bias)
    close(y, torch.stack(ys, 1), "output vs Conv1d(padding_mode='circular') RNN")
    close(state["h"], h, "final ring state")


def test_wrnn_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        recur.build("wrnn", d_model=D, kernel_size=4)


# ----------------------------------------------------------------------------------------- RMC


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


# ---------------------------------------------------------------------------------------- TKAN


def cox_de_boor(x: torch.Tensor, knots: torch.Tensor, order: int) -> torch.Tensor:
    """The textbook recursion with divisions: B_{m,0} = [t_m <= x < t_{m+1}],
    B_{m,p} = (x - t_m)/(t_{m+p} - t_m) B_{m,p-1} + (t_{m+p+1} - x)/(t_{m+p+1} - t_{m+1}) B_{m+1,p-1}."""
    x = x[..., None]
    bases = ((x >= knots[:-1]) & (x < knots[1:])).to(x.dtype)
    for p in range(1, order + 1):
        left = (x - knots[: -p - 1]) / (knots[p:-1] - knots[: -p - 1]) * bases[..., :-1]
        right = (knots[p + 1 :] - x) / (knots[p + 1 :] - knots[1:-p]) * bases[..., 1:]
        bases = left + right
    return bases


@pytest.mark.parametrize("grid_size,order,grid_range", [(3, 3, (-1.0, 1.0)), (5, 2, (-2.0, 3.0)), (4, 1, (0.0, 1.0))])
def test_tkan_bases_are_the_cox_de_boor_b_splines(grid_size, order, grid_range):
    lo, hi = grid_range
    h = (hi - lo) / grid_size
    knots = lo + h * torch.arange(-order, grid_size + order + 1, dtype=torch.float64)
    x = torch.linspace(lo - (order + 0.5) * h, hi + (order + 0.5) * h, 401, dtype=torch.float64)
    ours = b_spline_basis(x, grid_size, order, grid_range)
    assert ours.shape == (401, grid_size + order)
    close(ours, cox_de_boor(x, knots, order), "bases")
    inside = (x >= lo) & (x <= hi)
    close(ours[inside].sum(-1), torch.ones(int(inside.sum()), dtype=torch.float64), "partition of unity on the grid")


def test_tkan_cell_is_the_papers_equations():
    """Two sub-layers, written plainly: RKAN sub-layer memories, LSTM gates, KAN output gate."""
    m = make("tkan", n_sublayers=2, sub_input_dim=6, sub_output_dim=5)
    x = randn(3, 4, D, seed=20)
    start = State(h=randn(3, D, seed=21), c=randn(3, D, seed=22), sub=randn(3, 2, 5, seed=23))
    y, state = m(x, start)

    def kan(l, s):
        z = F.layer_norm(s, (6,), m.kan_norm[l, 0], m.kan_norm[l, 1], eps=1e-3)
        bases = b_spline_basis(z, m.grid_size, m.spline_order, m.grid_range)  # [batch, 6, n_bases]
        return F.silu(z) @ m.kan_base_weight[l] + m.kan_base_bias[l] + bases.flatten(1) @ m.kan_spline_weight[l]

    h, c, sub, ys = start["h"], start["c"], start["sub"].clone(), []
    for t in range(x.shape[1]):
        i, f, cand = torch.sigmoid(x[:, t] @ m.kernel + h @ m.recurrent_kernel + m.bias).chunk(3, -1)
        outs = []
        for l in range(2):
            o_l = kan(l, x[:, t] @ m.sub_input_weight[l] + sub[:, l] @ m.sub_state_weight[l])
            sub[:, l] = m.sub_memory_weight[l, 0] * o_l + m.sub_memory_weight[l, 1] * sub[:, l]
            outs.append(o_l)
        c = f * c + i * cand
        h = torch.sigmoid(torch.cat(outs, -1) @ m.out_gate_weight + m.out_gate_bias) * torch.tanh(c)
        ys.append(h)
    close(y, torch.stack(ys, 1), "output")
    close(state["sub"], sub, "sub-layer memories")
    close(state["c"], c, "cell state")


def test_tkan_forget_gate_bias_starts_at_one():
    m = make("tkan")
    close(m.bias.detach()[D : 2 * D], torch.ones(D, dtype=torch.float64), "forget bias")
