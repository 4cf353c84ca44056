"""GateLoop (``recur/layers/gateloop.py``): the properties from the paper that the conformance suite
cannot know. The layer is compared with a direct transcription of the paper's equations in
float64, where modes differ only in summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import recur

from .helpers import D, close, randn


def make_gateloop(seed=0, **options):
    torch.manual_seed(seed)
    return recur.build("gateloop", d_model=D, **options).double()


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_gateloop_with_zero_phase_and_scalar_gates_is_gated_linear_attention(mode):
    """theta = 0 and one magnitude per head: S_t = a_t S_{t-1} + k_t v_t^T (real), y_t = S_t^T q_t."""
    layer = make_gateloop(head_dim=4, mode=mode)
    layer.chunk_size = 4
    H, K = layer.n_heads, layer.head_dim
    with torch.no_grad():
        weight = layer.a_proj.weight.view(2, H, K, D)  # (magnitude, phase) rows
        weight[0] = weight[0, :, :1].expand(H, K, D).clone()  # one magnitude per head
        weight[1] = 0.0
        bias = layer.a_proj.bias.view(2, H, K)
        bias[0] = bias[0, :, :1].expand(H, K).clone()
        bias[1] = 0.0
    x = randn(2, 19, D, seed=17)
    q, k, v = (layer_proj(x).view(2, 19, H, K) for layer_proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    a = torch.sigmoid(layer.a_proj(x)[..., :D].view(2, 19, H, K)[..., 0])  # [batch, time, heads]
    S = torch.zeros(2, H, K, K, dtype=torch.float64)
    ys = []
    for t in range(19):
        S = a[:, t, :, None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        ys.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S).reshape(2, D))
    want = layer.o_proj(F.silu(layer.g_proj(x)) * torch.stack(ys, 1))
    y, s = layer(x)
    close(y, want, f"{mode}: GateLoop vs gated linear attention")
    close(s["h"].real, S, "state")
    close(s["h"].imag, torch.zeros_like(S), "zero phase keeps the state real")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_gateloop_equals_its_surrogate_attention_form(mode):
    """y_t = Re(sum_{j<=t} q_t^T Diag(prod_{j<s<=t} a_s) k_j v_j^T): the paper's O(T^2) mode."""
    layer = make_gateloop(head_dim=2, mode=mode)
    layer.chunk_size = 4
    x = randn(1, 14, D, seed=18)
    p = layer.projections(x)
    q, k, v, log_a = p["q"], p["k"], p["v"], p["log_a"]  # [1, T, H, K]
    T = x.shape[1]
    cum = torch.cumsum(log_a, dim=1)  # log prod_{s<=t} a_s
    ys = []
    for t in range(T):
        y = 0
        for j in range(t + 1):
            decay = torch.exp(cum[:, t] - cum[:, j])  # prod_{j<s<=t} a_s, complex [1, H, K]
            y = y + torch.einsum("bhk,bhk,bhv->bhv", q[:, t].to(decay.dtype), decay * k[:, j], v[:, j].to(decay.dtype))
        ys.append(y.real.reshape(1, D))
    want = layer.o_proj(F.silu(p["g"]) * torch.stack(ys, 1))
    close(layer(x)[0], want, f"{mode}: recurrence vs surrogate attention")


def test_gateloop_state_magnitude_is_bounded_when_the_gates_are_inside_the_unit_disc():
    """|h_t| <= max |k v^T| / (1 - max |a|) elementwise at every step, for any phases; a constant
    input with zero phase attains the bound (h -> k v^T / (1 - a))."""
    layer = make_gateloop(head_dim=2)
    with torch.no_grad():
        layer.a_proj.bias[:D] += 3.0  # |a| ~ 0.95: long memory
        layer.a_proj.bias[D:] += 1.0  # non-zero phases
    x = randn(1, 2000, D, seed=19)
    p = layer.projections(x)
    a_max = p["log_a"].real.exp().amax(dim=(0, 1))  # [H, K]
    kv_max = (p["k"].unsqueeze(-1) * p["v"].unsqueeze(-2)).abs().amax(dim=(0, 1))  # [H, K, K]
    bound = kv_max / (1 - a_max[..., None])
    assert (a_max < 1).all()
    state = None
    for chunk in x.split(20, dim=1):
        _, state = layer(chunk, state)
        assert (state["h"].abs() <= bound * (1 + 1e-12)).all(), "state magnitude beyond the geometric bound"

    with torch.no_grad():
        layer.a_proj.weight[D:] = 0.0
        layer.a_proj.bias[D:] = 0.0
    x = randn(1, 1, D, seed=20).expand(1, 2000, D)
    p = layer.projections(x[:, :1])
    a = p["log_a"].real.exp()[0, 0]
    kv = (p["k"].unsqueeze(-1) * p["v"].unsqueeze(-2))[0, 0]
    _, state = layer(x)
    close(state["h"][0].real, kv / (1 - a[..., None]), "constant input: the fixed point k v^T / (1 - a)")
