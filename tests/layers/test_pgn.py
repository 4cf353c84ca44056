"""PGN (``recur/layers/pgn.py``): the properties from the paper that the conformance suite cannot
know. The layer is compared with a direct transcription of the paper's equations in float64,
where modes differ only in summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import pytest
import torch

import recur

from .helpers import D, close, randn


def direct_pgn(layer, x):
    """The paper's PGN: H = HIE(Padding(X)), G = sigmoid(W_g[X, H]), H^ = tanh(W_c[X, H]), G H + (1-G) H^."""
    W, d, g = layer.history, layer.d_model, layer.groups
    weight, bias = layer.hie.weight, layer.hie.bias  # [d, d/g, W], kernel index j <-> lag W - j
    B, T, _ = x.shape
    H = []
    for t in range(T):
        h = bias.expand(B, d).clone()
        for lag in range(1, W + 1):
            if t - lag < 0:
                continue  # zero padding
            M = torch.block_diag(*weight[:, :, W - lag].view(g, d // g, d // g))  # [d_out, d_in]
            h = h + x[:, t - lag] @ M.T
        H.append(h)
    H = torch.stack(H, dim=1)
    Wg = layer.gates.weight
    gate = torch.sigmoid(torch.cat([x, H], -1) @ Wg[:d].T + layer.gates.bias[:d])
    cand = torch.tanh(torch.cat([x, H], -1) @ Wg[d:].T + layer.gates.bias[d:])
    return gate * H + (1 - gate) * cand


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
@pytest.mark.parametrize("groups", [1, 4])
def test_pgn_output_is_the_gated_fusion_of_the_history_extraction(mode, groups):
    torch.manual_seed(0)
    layer = recur.build("pgn", d_model=D, history=5, groups=groups, mode=mode).double()
    x = randn(2, 12, D, seed=15)
    want = direct_pgn(layer, x)
    y, s = layer(x)
    close(y, want, f"{mode}: y = G H + (1 - G) tanh(.)")
    close(s["window"], x[:, -5:], "the state is the last W inputs")
    y1, s1 = layer(x[:, :7])  # carrying the window continues the padded sequence exactly
    y2, _ = layer(x[:, 7:], s1)
    close(torch.cat([y1, y2], 1), want, "split at t=7")


def test_pgn_reaches_each_of_the_last_history_inputs_in_one_step():
    """y_t depends on x_{t-W} .. x_t (each through one linear map, the O(1) path) and on nothing older."""
    torch.manual_seed(0)
    W = 4
    layer = recur.build("pgn", d_model=D, history=W).double()
    x = randn(1, 12, D, seed=16).requires_grad_(True)
    y, _ = layer(x)
    t = 10
    (grad,) = torch.autograd.grad(y[0, t].sum(), x)
    norms = grad[0].abs().sum(-1)
    assert (norms[t - W : t + 1] > 0).all(), "every input in the window reaches y_t"
    assert (norms[: t - W] == 0).all() and (norms[t + 1 :] == 0).all(), "nothing outside the window does"
