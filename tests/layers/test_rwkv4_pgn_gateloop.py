"""RWKV-4 (time and channel mixing), PGN and GateLoop: the properties from the papers that the
conformance suite cannot know. Each model is compared with a direct transcription of its
paper's equations in float64, where modes differ only in summation order (rtol 1e-8, atol 1e-10).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import recur
from recur.layers.rwkv4 import wkv
from recur.models.lm import CausalLM

D = 16
RTOL, ATOL = 1e-8, 1e-10


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def shifted(x, last=None):
    """x_{t-1} for every t (zeros, or ``last``, before the first token)."""
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None]
    return torch.cat([first, x[:, :-1]], dim=1)


# ------------------------------------------------------------------------------------ RWKV-4
def make_rwkv4(seed=0, key_scale=1.0, **options):
    """An RWKV-4 layer in float64 with non-zero keys and receptance (the official init zeroes them)."""
    torch.manual_seed(seed)
    layer = recur.build("rwkv4", d_model=D, **options).double()
    with torch.no_grad():
        layer.key.weight.normal_(0, key_scale / math.sqrt(D))
        layer.receptance.weight.normal_(0, 1 / math.sqrt(D))
    return layer


def direct_wkv(w, u, k, v):
    """The paper's WKV, unstabilised: a double sum over i < t plus the bonus term for t."""
    T = k.shape[1]
    out = []
    for t in range(T):
        num = torch.exp(u + k[:, t]) * v[:, t]
        den = torch.exp(u + k[:, t])
        for i in range(t):
            e = torch.exp(-(t - 1 - i) * w + k[:, i])
            num, den = num + e * v[:, i], den + e
        out.append(num / den)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv4_output_is_the_papers_wkv_formula(mode):
    layer = make_rwkv4(key_scale=3.0)
    layer.mode, layer.chunk_size = mode, 4
    x = randn(2, 13, D, seed=2)
    xp = shifted(x)
    mix = lambda mu: x * mu + xp * (1 - mu)  # noqa: E731
    r, k, v = layer.receptance(mix(layer.mix_r)), layer.key(mix(layer.mix_k)), layer.value(mix(layer.mix_v))
    want = layer.output(torch.sigmoid(r) * direct_wkv(layer.time_decay.exp(), layer.time_first, k, v))
    y, state = layer(x)
    close(y, want, f"{mode}: output vs W_o(sigmoid(r) * WKV)")
    close(state["shift"], x[:, -1], "the shift state is the last input")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv4_state_is_the_scaled_numerator_denominator_and_largest_exponent(mode):
    """(aa, bb, pp) = (num e^-pp, den e^-pp, max_i (k_i - (T-1-i) w)): the same in every mode."""
    layer = make_rwkv4(key_scale=3.0)
    layer.mode, layer.chunk_size = mode, 4
    x = randn(2, 11, D, seed=3)
    xp = shifted(x)
    k = layer.key(x * layer.mix_k + xp * (1 - layer.mix_k))
    v = layer.value(x * layer.mix_v + xp * (1 - layer.mix_v))
    w, T = layer.time_decay.exp(), x.shape[1]
    expo = torch.stack([k[:, i] - (T - 1 - i) * w for i in range(T)])  # [T, batch, d]
    _, s = layer(x)
    close(s["pp"], expo.max(0).values, "pp is the largest exponent")
    close(s["aa"] * s["pp"].exp(), (expo.exp() * v.transpose(0, 1)).sum(0), "aa e^pp is the numerator")
    close(s["bb"] * s["pp"].exp(), expo.exp().sum(0), "bb e^pp is the denominator")


def test_rwkv4_chunk_equals_recurrent_with_data_dependent_keys():
    """The conformance suite runs the official init (zero keys); large random keys make the running
    maximum switch between the decayed history and the new key, across chunk boundaries."""
    layer = make_rwkv4(key_scale=8.0)
    layer.chunk_size = 5
    x0, x = randn(2, 7, D, seed=4), randn(2, 31, D, seed=5)
    _, init = layer(x0)
    init = init.detach()
    params = list(layer.parameters())

    def run(mode):
        layer.mode = mode
        xx = x.clone().requires_grad_(True)
        y, s = layer(xx, init)
        loss = (y * randn(*y.shape, seed=6)).sum() + sum((t * randn(*t.shape, seed=7 + i)).sum() for i, (_, t) in enumerate(s.tensors()))
        return y.detach(), s.detach(), torch.autograd.grad(loss, [xx, *params])

    y_ref, s_ref, g_ref = run("recurrent")
    y, s, g = run("chunk")
    close(y, y_ref, "chunk output")
    for key in s_ref:
        close(s[key], s_ref[key], f"chunk final state {key!r}")
    for a, b in zip(g, g_ref):
        close(a, b, "chunk gradient")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("k0", [80.0, 100.0])
def test_rwkv4_wkv_survives_huge_keys_in_float32(mode, k0):
    """k ~ 80-100: e^k is at or beyond float32's range (e^88.7), so the unstabilised float32 sums
    overflow; the stable form stays finite and equals the float64 result. WKV is invariant to a
    common shift of all keys, so the float64 reference is the direct formula with k - k0."""
    B, T = 2, 40
    w = randn(D, seed=8).exp()
    u = randn(D, seed=9)
    k = k0 + 3 * randn(B, T, D, seed=10)
    v = randn(B, T, D, seed=11)
    out, (aa, bb, pp) = wkv(w.log().float(), u.float(), k.float(), v.float(), mode="reference" if mode == "recurrent" else "chunk", chunk_size=8)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(aa).all() and torch.isfinite(bb).all() and torch.isfinite(pp).all()
    close(out.double(), direct_wkv(w, u, k - k0, v), "stable float32 WKV vs float64", rtol=1e-4, atol=1e-5)
    if k0 == 100.0:
        naive = direct_wkv(w.float(), u.float(), k.float(), v.float())
        assert not torch.isfinite(naive).all(), "the unstabilised float32 formula should overflow here"


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_rwkv4_layer_with_huge_key_weights_is_finite_in_float32(mode):
    layer = make_rwkv4(key_scale=400.0).float()  # |k| in the hundreds
    layer.mode = mode
    y, s = layer(randn(2, 50, D, seed=12, dtype=torch.float32))
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(t).all() for _, t in s.tensors())


def test_rwkv4_init_follows_the_official_code():
    layer = recur.build("rwkv4", d_model=D, layer_idx=1, n_layers=4)
    r0, r1 = 1 / 3, 1 - 1 / 4
    i = torch.arange(D, dtype=torch.float64)
    close(layer.time_decay.double(), -5 + 8 * (i / (D - 1)) ** (0.7 + 1.3 * r0), "time_decay", rtol=1e-6, atol=1e-6)
    close(layer.time_first.double(), math.log(0.3) + 0.5 * ((i + 1) % 3 - 1), "time_first", rtol=1e-6, atol=1e-6)
    close(layer.mix_k.double(), (i / D) ** r1, "mu_k", rtol=1e-6, atol=1e-6)
    close(layer.mix_v.double(), (i / D) ** r1 + 0.3 * r0, "mu_v", rtol=1e-6, atol=1e-6)
    close(layer.mix_r.double(), (i / D) ** (0.5 * r1), "mu_r", rtol=1e-6, atol=1e-6)
    assert layer.key.weight.abs().sum() == 0 and layer.receptance.weight.abs().sum() == 0
    assert recur.build("rwkv4", d_model=D, zero_init_output=True).output.weight.abs().sum() == 0


def test_rwkv4_channel_is_a_function_of_the_current_and_previous_input_only():
    torch.manual_seed(0)
    layer = recur.build("rwkv4_channel", d_model=D).double()
    with torch.no_grad():
        layer.receptance.weight.normal_(0, 1 / math.sqrt(D))
    x = randn(2, 9, D, seed=13)
    y, s = layer(x)
    xp = shifted(x)
    r = layer.receptance(x * layer.mix_r + xp * (1 - layer.mix_r))
    k = layer.key(x * layer.mix_k + xp * (1 - layer.mix_k))
    close(y, torch.sigmoid(r) * layer.value(torch.relu(k) ** 2), "sigmoid(r) * W_v(relu(k)^2)")
    close(s["shift"], x[:, -1], "the state is the last input")
    close(layer(x[:, :1])[0], y[:, :1], "t = 0 sees x_0 and zeros")
    for t in range(1, 9):
        close(layer(x[:, t - 1 : t + 1])[0][:, 1], y[:, t], f"y_{t} from (x_{t - 1}, x_{t}) alone")
    x2 = x.clone()
    x2[:, :4] = randn(2, 4, D, seed=14)
    close(layer(x2)[0][:, 5:], y[:, 5:], "inputs before t-1 do not matter")


def test_rwkv4_lm_alternates_time_and_channel_mixing():
    lm = CausalLM(vocab_size=11, d_model=D, n_layers=4, pattern=["rwkv4", "rwkv4_channel"], mlp=None)
    assert [type(m).__name__ for m in lm.backbone.mixers] == ["RWKV4", "RWKV4Channel"] * 2
    logits, _ = lm(torch.randint(0, 11, (2, 7)))
    assert logits.shape == (2, 7, 11) and torch.isfinite(logits).all()


# --------------------------------------------------------------------------------------- PGN
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


# ---------------------------------------------------------------------------------- GateLoop
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
