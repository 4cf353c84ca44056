"""TKAN (``recur/layers/tkan.py``): properties from the paper that the conformance suite cannot
know. The KAN layers use true B-spline bases (Cox-de Boor), and the cell is the paper's
equations. All exactness checks run in float64.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from recur import State
from recur.layers.tkan import b_spline_basis

from . import helpers
from .helpers import D, make, randn

RTOL, ATOL = 1e-9, 1e-11
close = partial(helpers.close, rtol=RTOL, atol=ATOL)


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
