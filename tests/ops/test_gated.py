"""The gated matrix-state primitive: every fast mode equals the reference loop.

Exactness checks run in float64, where modes differ only in summation order (~1e-14
relative), so rtol 1e-8 / atol 1e-10 leave ample headroom and still catch any real
mismatch. Decays are drawn in four regimes: typical (logsigmoid of a normal), close
to 0 (log alpha = -30 per step, which underflows exp(cumsum) within a few steps),
close to 1 (log alpha ~ -1e-4) and typical with resets (a fifth of the entries -inf,
-1e30 or -1e4: decay exactly 0), for all three alpha forms (per key dimension, per
head, none), and for every combination of the two read options (output before the
update, the current-token bonus u). The stabilised form (exponential input gate with a
running maximum, mLSTM) is checked the same way, its final stabiliser included. Resets
are also placed at chosen steps (first, last, a chunk edge, several in one chunk,
consecutive, all), in both precisions, and must not leak: after a reset nothing before it
changes any output, bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_paths import kernels
from recur.ops.gated import gated_matrix, gated_matrix_stabilized
from resets import RESET_PATTERNS, place_resets, reset_steps, with_resets

RTOL, ATOL = 1e-8, 1e-10
FORMS = ("vector", "scalar", "none")
REGIMES = ("typical", "strong", "weak", "reset")
# (output_before_update, with a bonus): every combination of the read options
OPTIONS = [(False, False), (True, False), (False, True), (True, True)]
OPTION_IDS = ["after", "before", "after+bonus", "before+bonus"]


def make_inputs(B, H, T, K, V, form, regime, with_state, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, K, generator=g, dtype=dtype)
    k = torch.randn(B, H, T, K, generator=g, dtype=dtype)
    v = torch.randn(B, H, T, V, generator=g, dtype=dtype)
    shape = (B, H, T, K) if form == "vector" else (B, H, T)
    if form == "none":
        log_alpha = None
    elif regime == "typical":
        log_alpha = F.logsigmoid(torch.randn(*shape, generator=g, dtype=dtype) + 2)
    elif regime == "strong":
        log_alpha = -30 + 0.1 * torch.rand(*shape, generator=g, dtype=dtype)
    elif regime == "reset":
        log_alpha = with_resets(F.logsigmoid(torch.randn(*shape, generator=g, dtype=dtype) + 2), g)
    else:
        log_alpha = -1e-4 * torch.rand(*shape, generator=g, dtype=dtype)
    S0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if with_state else None
    return q, k, v, log_alpha, S0


def make_bonus(H, K, dtype=torch.float64, seed=0):
    return torch.randn(H, K, generator=torch.Generator().manual_seed(seed + 12345), dtype=dtype)


def run(inputs, mode, chunk_size=64, before=False, bonus=None):
    """Outputs, final state and gradients (w.r.t. every input, the bonus included) of a fixed random loss."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (*inputs, bonus)]
    o, S = gated_matrix(*leaves[:-1], mode=mode, chunk_size=chunk_size, output_before_update=before, bonus=leaves[-1])
    g = torch.Generator().manual_seed(99)  # the same weights in both precisions
    w_o, w_S = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (o, S))
    loss = (o * w_o).sum() + (S * w_S).sum()
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, present)
    return o.detach(), S.detach(), grads


def assert_runs_close(got, want, what):
    o, S, grads = got
    o_ref, S_ref, grads_ref = want
    torch.testing.assert_close(o, o_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, output: {m}")
    torch.testing.assert_close(S, S_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, final state: {m}")
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}, gradient of input {i}: {m}")


@pytest.mark.parametrize("before,with_bonus", OPTIONS, ids=OPTION_IDS)
@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 70),
    K=st.integers(1, 6),
    V=st.integers(1, 5),
    form=st.sampled_from(FORMS),
    regime=st.sampled_from(REGIMES),
    with_state=st.booleans(),
    chunk_size=st.sampled_from([1, 3, 8, 16, 32, 64]),
    seed=st.integers(0, 2**16),
)
def test_fast_modes_equal_reference_forward_and_backward(before, with_bonus, B, H, T, K, V, form, regime, with_state, chunk_size, seed):
    inputs = make_inputs(B, H, T, K, V, form, regime, with_state, seed=seed)
    options = dict(before=before, bonus=make_bonus(H, K, seed=seed) if with_bonus else None)
    want = run(inputs, "reference", **options)
    assert_runs_close(run(inputs, "chunk", chunk_size, **options), want, f"chunk (chunk_size={chunk_size})")
    assert_runs_close(run(inputs, "parallel", **options), want, "parallel")


@pytest.mark.parametrize("before,with_bonus", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("T", [47, 130])
@pytest.mark.parametrize("regime", ["typical", "reset"])
def test_chunk_equals_reference_on_each_kernel_path(form, T, regime, before, with_bonus, kernel_path):
    """Several chunks (and a partial last one): the state passed between chunks runs through the
    compiled scan on CPU and the PyTorch two-level scan elsewhere; both equal the reference."""
    inputs = make_inputs(2, 2, T, 4, 3, form, regime, True, seed=T)
    options = dict(before=before, bonus=make_bonus(2, 4) if with_bonus else None)
    assert_runs_close(run(inputs, "chunk", chunk_size=16, **options), run(inputs, "reference", **options), kernel_path)


@pytest.mark.parametrize("before,with_bonus", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("with_state", [False, True])
def test_single_step_equals_reference(form, with_state, before, with_bonus):
    inputs = make_inputs(2, 2, 1, 4, 3, form, "typical", with_state)
    options = dict(before=before, bonus=make_bonus(2, 4) if with_bonus else None)
    want = run(inputs, "reference", **options)
    for mode in ("chunk", "parallel"):
        assert_runs_close(run(inputs, mode, **options), want, mode)


@pytest.mark.parametrize("before,with_bonus", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("form", ["vector", "scalar"])
@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_strong_decay_stays_finite_in_float32(form, mode, before, with_bonus):
    """log alpha = -30 per step: the cumulative decay underflows within one chunk, yet
    nothing overflows; forward and gradients stay finite and match float64."""
    inputs = make_inputs(2, 2, 100, 8, 4, form, "strong", True, dtype=torch.float32)
    inputs = (*inputs[:3], torch.full_like(inputs[3], -30.0), inputs[4])
    bonus = make_bonus(2, 8, dtype=torch.float32) if with_bonus else None
    o, S, grads = run(inputs, mode, chunk_size=64, before=before, bonus=bonus)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert all(torch.isfinite(g).all() for g in grads)
    o64, S64, _ = run([t.double() for t in inputs], "reference", before=before, bonus=None if bonus is None else bonus.double())
    torch.testing.assert_close(o, o64.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S, S64.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("total", [15.9, 16.1])
@pytest.mark.parametrize("before", [False, True])
def test_per_dimension_decays_at_the_factoring_limit_are_accurate_in_float32(total, before):
    """Just inside the limit (a chunk decays by e^-15.9: the scores factor through the chunk
    start, with factors up to e^15.9) and just outside it (the all-exponents-<=0 path), float32
    chunk outputs and gradients match the float64 reference as closely as the reference loop's
    own float32 run does, within a factor of ten."""
    from recur.ops.gated import FACTOR_LIMIT

    assert FACTOR_LIMIT[torch.float32] == 16.0
    inputs = make_inputs(2, 2, 64, 16, 8, "vector", "typical", True, dtype=torch.float32, seed=5)
    log_alpha = torch.full_like(inputs[3], -total / 64)  # every dimension decays by e^-total over a chunk
    inputs = (*inputs[:3], log_alpha, inputs[4])

    def outputs_and_grads(dtype, mode):
        leaves = [t.to(dtype).requires_grad_(True) for t in inputs]
        o, S = gated_matrix(*leaves, mode=mode, chunk_size=64, output_before_update=before)
        g = torch.Generator().manual_seed(99)  # the same loss weights in both precisions
        wo, wS = torch.randn(o.shape, generator=g, dtype=torch.float64), torch.randn(S.shape, generator=g, dtype=torch.float64)
        loss = (o * wo.to(dtype)).sum() + (S * wS.to(dtype)).sum()
        return [o, S, *torch.autograd.grad(loss, leaves)]

    exact = outputs_and_grads(torch.float64, "reference")
    errors = {}
    for mode in ("reference", "chunk"):
        got = outputs_and_grads(torch.float32, mode)
        errors[mode] = max(((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, exact))
    err, ref_err = errors["chunk"], errors["reference"]
    assert err <= 10 * max(ref_err, 1e-7), f"chunk float32 error {err:.2e} vs reference loop's {ref_err:.2e}"


@pytest.mark.parametrize("before,with_bonus", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_state_carry_is_exact(form, mode, before, with_bonus):
    """Running [0, t) then [t, T) from the returned state equals one run over [0, T)."""
    q, k, v, log_alpha, S0 = make_inputs(2, 2, 45, 4, 3, form, "typical", True)
    options = dict(mode=mode, chunk_size=8, output_before_update=before, bonus=make_bonus(2, 4) if with_bonus else None)
    o, S = gated_matrix(q, k, v, log_alpha, S0, **options)
    for t in (1, 8, 21, 44):
        head = [x[:, :, :t] if x is not None else None for x in (q, k, v, log_alpha)]
        tail = [x[:, :, t:] if x is not None else None for x in (q, k, v, log_alpha)]
        o1, S1 = gated_matrix(*head, S0, **options)
        o2, S2 = gated_matrix(*tail, S1, **options)
        torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S2, S, rtol=RTOL, atol=ATOL)


def test_alpha_forms_agree():
    """A per-head decay equals the same decay repeated over d_k; no decay equals log alpha = 0."""
    q, k, v, log_alpha, S0 = make_inputs(2, 3, 30, 4, 5, "scalar", "typical", True)
    for mode in ("reference", "chunk", "parallel"):
        scalar = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=8)
        vector = gated_matrix(q, k, v, log_alpha.unsqueeze(-1).expand(*q.shape), S0, mode=mode, chunk_size=8)
        none = gated_matrix(q, k, v, None, S0, mode=mode, chunk_size=8)
        zeros = gated_matrix(q, k, v, torch.zeros_like(log_alpha), S0, mode=mode, chunk_size=8)
        for a, b in ((scalar, vector), (none, zeros)):
            torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(a[1], b[1], rtol=RTOL, atol=ATOL)


def test_reference_matches_explicit_sum():
    """o_t = sum_{j<=t} (q_t * prod_{j<m<=t} alpha_m) . k_j v_j + (q_t * prod_{m<=t} alpha_m)^T S0."""
    q, k, v, log_alpha, S0 = make_inputs(1, 1, 6, 3, 2, "vector", "typical", True)
    o, _ = gated_matrix(q, k, v, log_alpha, S0, mode="reference")
    c = log_alpha[0, 0].cumsum(0)  # [T, K]
    for t in range(6):
        want = (q[0, 0, t] * c[t].exp()) @ S0[0, 0]
        for j in range(t + 1):
            want = want + ((q[0, 0, t] * (c[t] - c[j]).exp()) @ k[0, 0, j]) * v[0, 0, j]
        torch.testing.assert_close(o[0, 0, t], want, rtol=RTOL, atol=ATOL)


def test_output_before_update_matches_explicit_sum():
    """o_t = sum_{j<t} (q_t * prod_{j<m<t} alpha_m) . k_j v_j + (q_t * u . k_t) v_t
    + (q_t * prod_{m<t} alpha_m)^T S0: RWKV-6's wkv with the state before the update."""
    q, k, v, log_alpha, S0 = make_inputs(1, 1, 6, 3, 2, "vector", "typical", True)
    u = make_bonus(1, 3)
    c = F.pad(log_alpha[0, 0].cumsum(0), (0, 0, 1, 0))  # c[t] = sum of log alpha over steps < t
    for mode in ("reference", "chunk", "parallel"):
        o, _ = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=4, output_before_update=True, bonus=u)
        for t in range(6):
            want = (q[0, 0, t] * c[t].exp()) @ S0[0, 0] + ((q[0, 0, t] * u[0]) @ k[0, 0, t]) * v[0, 0, t]
            for j in range(t):
                want = want + ((q[0, 0, t] * (c[t] - c[j + 1]).exp()) @ k[0, 0, j]) * v[0, 0, j]
            torch.testing.assert_close(o[0, 0, t], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_unit_bonus_before_update_equals_default_output_without_decay(mode):
    """With alpha = 1, S_t = S_{t-1} + k_t v_t^T, so S_{t-1}^T q_t + (q_t . k_t) v_t = S_t^T q_t:
    u = 1 with output before the update gives the default read, state included."""
    q, k, v, log_alpha, S0 = make_inputs(2, 2, 29, 4, 3, "none", "typical", True)
    default = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=8)
    ones = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=8, output_before_update=True, bonus=torch.ones(2, 4, dtype=q.dtype))
    for a, b in zip(default, ones):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_output_before_update_ignores_the_current_token_without_bonus():
    """Without a bonus, o_t reads S_{t-1} only: changing k_t, v_t leaves o_t unchanged."""
    q, k, v, log_alpha, S0 = make_inputs(1, 2, 12, 4, 3, "vector", "typical", True)
    for mode in ("reference", "chunk", "parallel"):
        o, _ = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=4, output_before_update=True)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 5], v2[:, :, 5] = 7.0, -3.0
        o2, _ = gated_matrix(q, k2, v2, log_alpha, S0, mode=mode, chunk_size=4, output_before_update=True)
        torch.testing.assert_close(o2[:, :, :6], o[:, :, :6], rtol=RTOL, atol=ATOL)
        assert not torch.allclose(o2[:, :, 6], o[:, :, 6])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_return_their_dtype(dtype):
    q, k, v, log_alpha, S0 = make_inputs(1, 2, 20, 4, 3, "vector", "typical", True, dtype=torch.float32)
    o32, S32 = gated_matrix(q, k, v, log_alpha, S0)
    o, S = gated_matrix(q.to(dtype), k.to(dtype), v.to(dtype), log_alpha, S0.to(dtype))
    assert o.dtype == dtype and S.dtype == dtype
    torch.testing.assert_close(o.float(), o32, rtol=0.05, atol=0.1)


def test_bad_inputs_raise_clear_errors():
    q, k, v, log_alpha, S0 = make_inputs(2, 2, 5, 4, 3, "vector", "typical", True)
    with pytest.raises(ValueError, match=r"\[batch, heads, time, d_k\]"):
        gated_matrix(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k must have"):
        gated_matrix(q, k[..., :3], v)
    with pytest.raises(ValueError, match="v must have"):
        gated_matrix(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match="log_alpha must have"):
        gated_matrix(q, k, v, log_alpha[..., :2])
    with pytest.raises(ValueError, match="S0 must have"):
        gated_matrix(q, k, v, log_alpha, S0[..., :2])
    with pytest.raises(TypeError, match="floating"):
        gated_matrix(q.long(), k, v)
    with pytest.raises(TypeError, match="dtype"):
        gated_matrix(q, k.float(), v)
    with pytest.raises(ValueError, match="mode"):
        gated_matrix(q, k, v, mode="scan")
    with pytest.raises(ValueError, match="chunk_size"):
        gated_matrix(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match=r"bonus must have shape \[heads, d_k\]"):
        gated_matrix(q, k, v, bonus=torch.ones(2, 3, dtype=q.dtype))
    with pytest.raises(TypeError, match="bonus must be a floating"):
        gated_matrix(q, k, v, bonus=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="output_before_update"):
        gated_matrix(q, k, v, output_before_update="yes")
    assert math.isfinite(gated_matrix(q, k, v, log_alpha, S0)[0].sum().item())


# ------------------------------------------------------------ resets (log alpha = -inf)
@pytest.mark.parametrize("form", ["scalar", "vector"])
def test_minimal_reset_gives_the_reference_in_every_mode(form, kernel_path):
    """q = k = v = 1, log alpha = [0, -inf, 0]: S = 1, then 0 * 1 + 1 = 1, then 1 + 1 = 2, so
    o = [1, 1, 2] in every mode (the chunk forms gave [1, nan, nan]: -inf - (-inf) in the
    cumulative sums); gradients finite and equal to the reference's."""
    ones = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    log_alpha = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64).view(1, 1, 3)
    if form == "vector":
        log_alpha = log_alpha.unsqueeze(-1)
    inputs = (ones, ones, ones, log_alpha, None)
    want = run(inputs, "reference")
    torch.testing.assert_close(want[0].flatten(), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    for mode, size in (("chunk", 64), ("chunk", 1), ("chunk", 2), ("parallel", 64)):
        got = run(inputs, mode, size)
        assert all(torch.isfinite(t).all() for t in (got[0], got[1], *got[2])), f"{mode} {size}: not finite"
        assert_runs_close(got, want, f"{mode} (chunk_size={size})")


def run_both(inputs, before, bonus, chunk_size):
    """Every fast mode's run beside the reference's (the same fixed loss)."""
    want = run(inputs, "reference", before=before, bonus=bonus)
    return want, [(f"chunk (chunk_size={chunk_size})", run(inputs, "chunk", chunk_size, before=before, bonus=bonus)),
                  ("parallel", run(inputs, "parallel", before=before, bonus=bonus))]


@pytest.mark.parametrize("before,with_bonus", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("form", ["scalar", "vector"])
@pytest.mark.parametrize("pattern", RESET_PATTERNS)
def test_resets_at_chosen_steps_equal_reference(pattern, form, before, with_bonus, kernel_path):
    """Resets on the first step, the last, both sides of a chunk edge, several in one chunk,
    consecutive steps, every step and every other one, with very strong finite decays (-1e4,
    -1e30) beside them: outputs, final state and gradients equal the reference (float64)."""
    C, T = 16, 37
    q, k, v, log_alpha, S0 = make_inputs(2, 2, T, 4, 3, form, "typical", True, seed=3)
    log_alpha = place_resets(log_alpha, reset_steps(pattern, T, C), time_dim=2)
    if pattern not in ("all", "every_other"):
        log_alpha = place_resets(log_alpha, [C + 5], time_dim=2, value=-1e4)
        log_alpha = place_resets(log_alpha, [2 * C + 2], time_dim=2, value=-1e30)
    bonus = make_bonus(2, 4) if with_bonus else None
    want, gots = run_both((q, k, v, log_alpha, S0), before, bonus, C)
    for what, got in gots:
        assert_runs_close(got, want, f"{pattern}, {what}")


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("form", ["scalar", "vector"])
@pytest.mark.parametrize("pattern", ["chunk_edge", "consecutive", "all", "every_other"])
def test_resets_in_float32_match_float64(pattern, form, before, kernel_path):
    """float32 with resets: every mode finite, forward and gradients, and within float32
    rounding of the float64 reference."""
    C, T = 16, 37
    inputs = make_inputs(2, 2, T, 4, 3, form, "reset", True, dtype=torch.float32, seed=4)
    inputs = (*inputs[:3], place_resets(inputs[3], reset_steps(pattern, T, C), time_dim=2), inputs[4])
    o64, S64, g64 = run([t.double() for t in inputs], "reference", before=before)
    scale = max(float(g.abs().max()) for g in g64)
    for mode in ("reference", "chunk", "parallel"):
        o, S, grads = run(inputs, mode, C, before=before)
        assert torch.isfinite(o).all() and torch.isfinite(S).all() and all(torch.isfinite(g).all() for g in grads)
        torch.testing.assert_close(o.double(), o64, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(S.double(), S64, rtol=1e-4, atol=1e-5)
        for a, b in zip(grads, g64):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("form", ["scalar", "vector"])
@pytest.mark.parametrize("reset_at", [0, 15, 16, 21])
def test_nothing_leaks_across_a_reset(reset_at, form, before, dtype, kernel_path):
    """After a reset the state is exactly the write of that step: changing every input before it
    (initial state included) leaves every later output and the final state identical, bit for
    bit, in every mode."""
    C, T = 16, 40
    q, k, v, log_alpha, S0 = make_inputs(2, 2, T, 4, 3, form, "typical", True, dtype=dtype, seed=5)
    log_alpha = place_resets(log_alpha, [reset_at], time_dim=2)
    g = torch.Generator().manual_seed(6)
    changed = [t.clone() for t in (q, k, v, log_alpha)]
    for t in changed:  # other values before the reset (log decays kept <= 0)
        t[:, :, :reset_at] = 10 * torch.randn(t[:, :, :reset_at].shape, generator=g, dtype=dtype)
    changed[3][:, :, :reset_at] = -changed[3][:, :, :reset_at].abs()
    # o_t reads the state before step t's update when ``before``: the reset step's own output still sees the past
    first = reset_at + 1 if before else reset_at
    for mode in ("reference", "chunk", "parallel"):
        o, S = gated_matrix(q, k, v, log_alpha, S0, mode=mode, chunk_size=C, output_before_update=before)
        o2, S2 = gated_matrix(*changed, 3 * S0, mode=mode, chunk_size=C, output_before_update=before)
        assert torch.equal(o[:, :, first:], o2[:, :, first:]), mode
        assert torch.equal(S, S2), mode


# ------------------------------------------------------------ stabilised (exponential input gate)
I_REGIMES = ("typical", "large", "spiky")


def make_stabilized_inputs(B, H, T, K, V, regime, i_regime, with_state, dtype=torch.float64, seed=0):
    """q, k, v, log f (per head), log i, S0 (scaled state) and m0. Input-gate preactivations are
    typical (N(0, 3)), large (60 + N(0, 3), where exp(i) overflows float32 sums) or spiky
    (mostly N(0, 1), a few at +-40)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, log_f, _ = make_inputs(B, H, T, K, V, "scalar", regime, False, dtype=dtype, seed=seed)
    if i_regime == "typical":
        log_i = 3 * torch.randn(B, H, T, generator=g, dtype=dtype)
    elif i_regime == "large":
        log_i = 60 + 3 * torch.randn(B, H, T, generator=g, dtype=dtype)
    else:
        log_i = torch.randn(B, H, T, generator=g, dtype=dtype)
        spikes = torch.rand(B, H, T, generator=g, dtype=dtype) < 0.1
        log_i = torch.where(spikes, 40 * torch.sign(torch.randn(B, H, T, generator=g, dtype=dtype)), log_i)
    S0 = torch.randn(B, H, K, V, generator=g, dtype=dtype) if with_state else None
    m0 = 2 * torch.randn(B, H, generator=g, dtype=dtype) if with_state else None
    return q, k, v, log_f, log_i, S0, m0


def run_stabilized(inputs, mode, chunk_size=64):
    """Outputs, final state, stabilisers and gradients of a fixed random loss over all three."""
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    o, S, m = gated_matrix_stabilized(*leaves, mode=mode, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(98)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (o, S, m))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return o.detach(), S.detach(), m.detach(), grads


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    T=st.integers(1, 50),
    K=st.integers(1, 5),
    V=st.integers(1, 4),
    regime=st.sampled_from(REGIMES),
    i_regime=st.sampled_from(I_REGIMES),
    with_state=st.booleans(),
    chunk_size=st.sampled_from([1, 3, 8, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_stabilized_fast_modes_equal_reference_forward_and_backward(B, H, T, K, V, regime, i_regime, with_state, chunk_size, seed):
    """Chunked and parallel stabilised runs equal the step-by-step one: outputs, final scaled
    state, every stabiliser m_t, and the gradients of all inputs (initial m included)."""
    inputs = make_stabilized_inputs(B, H, T, K, V, regime, i_regime, with_state, seed=seed)
    want = run_stabilized(inputs, "reference")
    for mode, size in (("chunk", chunk_size), ("parallel", 64)):
        got = run_stabilized(inputs, mode, size)
        for name, a, b in zip(("output", "final state", "stabiliser m"), got[:3], want[:3]):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda msg: f"{mode}, {name}: {msg}")
        for i, (a, b) in enumerate(zip(got[3], want[3])):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda msg: f"{mode}, gradient of input {i}: {msg}")


@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_stabilized_equals_unstabilized_recurrence(mode):
    """exp(m_t) o~_t and exp(m_T) S~_T are the plain gated recurrence with k_t scaled by exp(i_t)
    (float64, moderate gates so that the unscaled form is itself exact); m follows its definition."""
    q, k, v, log_f, log_i, S0, m0 = make_stabilized_inputs(2, 2, 23, 3, 4, "typical", "typical", True, seed=5)
    o, S, m = gated_matrix_stabilized(q, k, v, log_f, log_i, S0, m0, mode=mode, chunk_size=8)
    o_plain, S_plain = gated_matrix(q, k * log_i.exp().unsqueeze(-1), v, log_f, S0 * m0.exp()[..., None, None], mode="reference")
    torch.testing.assert_close(o * m.exp().unsqueeze(-1), o_plain, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(S * m[..., -1].exp()[..., None, None], S_plain, rtol=RTOL, atol=ATOL)
    m_prev = m0
    for t in range(23):  # m_t = max(log f_t + m_{t-1}, i_t)
        m_prev = torch.maximum(log_f[..., t] + m_prev, log_i[..., t])
        torch.testing.assert_close(m[..., t], m_prev, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_stabilized_large_input_gates_stay_finite_in_float32(mode):
    """Input-gate preactivations around 60 (exp(60) ~ 1e26, sums of which overflow float32):
    forward and gradients stay finite and match float64; the scaled state stays O(1)."""
    inputs = make_stabilized_inputs(2, 2, 100, 8, 4, "typical", "large", True, dtype=torch.float32, seed=3)
    o, S, m, grads = run_stabilized(inputs, mode, chunk_size=16)
    assert all(torch.isfinite(t).all() for t in (o, S, m, *grads))
    assert S.abs().max() < 1e3
    o64, S64, m64, _ = run_stabilized([t.double() if t is not None else None for t in inputs], "reference")
    torch.testing.assert_close(o, o64.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S, S64.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m, m64.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["reference", "chunk", "parallel"])
def test_stabilized_state_carry_is_exact(mode):
    q, k, v, log_f, log_i, S0, m0 = make_stabilized_inputs(2, 2, 37, 4, 3, "typical", "spiky", True, seed=8)
    o, S, m = gated_matrix_stabilized(q, k, v, log_f, log_i, S0, m0, mode=mode, chunk_size=8)
    for t in (1, 8, 20, 36):
        o1, S1, m1 = gated_matrix_stabilized(*(x[:, :, :t] for x in (q, k, v, log_f, log_i)), S0, m0, mode=mode, chunk_size=8)
        o2, S2, m2 = gated_matrix_stabilized(*(x[:, :, t:] for x in (q, k, v, log_f, log_i)), S1, m1[..., -1], mode=mode, chunk_size=8)
        torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(torch.cat([m1, m2], dim=2), m, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S2, S, rtol=RTOL, atol=ATOL)


def test_stabilized_bad_inputs_raise_clear_errors():
    q, k, v, log_f, log_i, S0, m0 = make_stabilized_inputs(2, 2, 5, 4, 3, "typical", "typical", True)
    with pytest.raises(ValueError, match="log_f must have shape"):
        gated_matrix_stabilized(q, k, v, log_f.unsqueeze(-1).expand(2, 2, 5, 4), log_i)
    with pytest.raises(ValueError, match="log_i must have shape"):
        gated_matrix_stabilized(q, k, v, log_f, log_i[..., :3])
    with pytest.raises(ValueError, match="m0 must have shape"):
        gated_matrix_stabilized(q, k, v, log_f, log_i, S0, m0[:, :1])
    with pytest.raises(TypeError, match="log_i must be a floating"):
        gated_matrix_stabilized(q, k, v, log_f, log_i.long())
    with pytest.raises(ValueError, match="mode"):
        gated_matrix_stabilized(q, k, v, log_f, log_i, mode="scan")


def test_stabilized_minimal_reset_gives_the_reference_in_every_mode(kernel_path):
    """q = k = v = 1, log f = [0, -inf, 0], log i = 0: m = [0, 0, 0] and o~ = [1, 1, 2] in every
    mode (the chunked running maximum gave NaN: -inf - (-inf)); gradients equal the reference's."""
    ones = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    log_f = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64).view(1, 1, 3)
    inputs = (ones, ones, ones, log_f, torch.zeros(1, 1, 3, dtype=torch.float64), None, None)
    want = run_stabilized(inputs, "reference")
    torch.testing.assert_close(want[0].flatten(), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    for mode, size in (("chunk", 64), ("chunk", 1), ("chunk", 2), ("parallel", 64)):
        got = run_stabilized(inputs, mode, size)
        assert all(torch.isfinite(t).all() for t in (*got[:3], *got[3])), f"{mode} {size}: not finite"
        for a, b in zip((*got[:3], *got[3]), (*want[:3], *want[3])):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("i_regime", I_REGIMES)
@pytest.mark.parametrize("pattern", RESET_PATTERNS)
def test_stabilized_resets_at_chosen_steps_equal_reference(pattern, i_regime, kernel_path):
    """Resets of the forget gate (log f = -inf, -1e4, -1e30) at chosen steps: outputs, final
    state, stabilisers and gradients equal the reference, in both modes, and nothing before the
    last reset changes anything after it, bit for bit."""
    C, T = 8, 29
    q, k, v, log_f, log_i, S0, m0 = make_stabilized_inputs(2, 2, T, 4, 3, "typical", i_regime, True, seed=9)
    steps = reset_steps(pattern, T, C)
    log_f = place_resets(log_f, steps, time_dim=2)
    if pattern not in ("all", "every_other"):
        log_f = place_resets(place_resets(log_f, [C + 5], time_dim=2, value=-1e4), [2 * C + 2], time_dim=2, value=-1e30)
    inputs = (q, k, v, log_f, log_i, S0, m0)
    want = run_stabilized(inputs, "reference")
    for mode in ("chunk", "parallel"):
        got = run_stabilized(inputs, mode, C)
        for a, b in zip((*got[:3], *got[3]), (*want[:3], *want[3])):
            torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{mode}: {m}")
    last = max(steps)
    changed = [t.clone() for t in (q, k, v, log_f, log_i)]
    g = torch.Generator().manual_seed(10)
    for t in changed:
        t[:, :, :last] = 5 * torch.randn(t[:, :, :last].shape, generator=g, dtype=t.dtype)
    changed[3][:, :, :last] = -changed[3][:, :, :last].abs()
    for mode in ("reference", "chunk", "parallel"):
        o, S, m = gated_matrix_stabilized(*inputs, mode=mode, chunk_size=C)
        o2, S2, m2 = gated_matrix_stabilized(*changed, 2 * S0, m0 + 1, mode=mode, chunk_size=C)
        assert torch.equal(o[:, :, last:], o2[:, :, last:]) and torch.equal(m[:, :, last:], m2[:, :, last:]), mode
        assert torch.equal(S, S2), mode
