"""The (gated) delta rule and the DPLR (generalised) delta rule: the chunkwise WY forms equal
the sequential references.

Exactness checks run in float64, where modes differ only in summation order (~1e-14),
so RTOL/ATOL leave orders of magnitude of headroom while catching any real mismatch.
Keys are L2-normalised as the layers feed them (the rule is only contractive for |k| <= 1).
Decays include resets (log decay -inf, -1e30 or -1e4: decay exactly 0), drawn at random and
placed at chosen steps, on both kernel paths.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.delta import delta_rule, dplr_delta
from recur.ops.gated import gated_matrix
from resets import RESET_PATTERNS, place_resets, reset_steps, with_resets

RTOL, ATOL = 1e-8, 1e-10

# beta regimes: typical, near 0, near 1, and up to 2 (negative eigenvalues of I - beta k k^T)
BETAS = {"uniform": (0.0, 1.0), "near0": (0.0, 1e-6), "near1": (1 - 1e-6, 1.0), "upto2": (0.0, 2.0)}
# log alpha per step: none (DeltaNet), typical, decay ~0 (underflows within a chunk), ~1, and
# typical with a fifth of the steps resets (-inf, -1e30, -1e4)
DECAYS = {"none": None, "typical": (-1.0, 0.0), "near0": (-31.0, -29.0), "near1": (-2e-4, 0.0), "reset": (-1.0, 0.0)}


def inputs(B, H, T, Dk, Dv, beta="uniform", decay="typical", init=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)

    q = torch.randn(B, H, T, Dk, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, H, T, Dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, H, T, Dv, generator=g, dtype=dtype)
    b = uniform(*BETAS[beta], B, H, T)
    la = None if DECAYS[decay] is None else uniform(*DECAYS[decay], B, H, T)
    if decay == "reset":
        la = with_resets(la, g)
    S0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=dtype) if init else None
    return q, k, v, b, la, S0


def run(args, mode, chunk_size=64, seed=1):
    """Output, final state and gradients of a loss touching both, w.r.t. every input."""
    args = [None if a is None else a.clone().requires_grad_(True) for a in args]
    o, S = delta_rule(*args, mode=mode, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(seed)
    w_o, w_S = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (o, S))
    loss = (o * w_o).sum() + (S * w_S).sum()
    wrt = [a for a in args if a is not None]
    return o.detach(), S.detach(), torch.autograd.grad(loss, wrt)


def assert_modes_agree(args, chunk_size, rtol=RTOL, atol=ATOL):
    o_ref, S_ref, g_ref = run(args, "reference")
    o, S, g = run(args, "chunk", chunk_size)
    torch.testing.assert_close(o, o_ref, rtol=rtol, atol=atol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(S, S_ref, rtol=rtol, atol=atol, msg=lambda m: f"final state: {m}")
    for i, (a, b) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"gradient of input {i}: {m}")


@settings(max_examples=100, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 40), Dk=st.integers(1, 6), Dv=st.integers(1, 6),
    chunk_size=st.sampled_from([1, 3, 4, 8, 16, 64]),
    beta=st.sampled_from(sorted(BETAS)), decay=st.sampled_from(sorted(DECAYS)),
    init=st.booleans(), seed=st.integers(0, 2**16),
)
def test_chunk_equals_reference_forward_and_gradients(B, H, T, Dk, Dv, chunk_size, beta, decay, init, seed):
    assert_modes_agree(inputs(B, H, T, Dk, Dv, beta, decay, init, seed=seed), chunk_size)


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("init", [False, True])
def test_single_step_chunk_equals_reference(decay, init):
    assert_modes_agree(inputs(2, 3, 1, 4, 5, decay=decay, init=init), chunk_size=8)


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("T", [63, 64, 65, 130])
def test_partial_last_chunk_equals_reference(decay, T, kernel_path):
    assert_modes_agree(inputs(1, 2, T, 8, 8, decay=decay, seed=T), chunk_size=64)


def test_reference_is_the_literal_recurrence():
    """The lean loop equals S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T written out."""
    q, k, v, b, la, S = inputs(2, 2, 9, 3, 4, beta="upto2")
    o_ref, S_ref = delta_rule(q, k, v, b, la, S, mode="reference")
    eye = torch.eye(3, dtype=q.dtype)
    outs = []
    for t in range(q.shape[2]):
        kt, bt, at = k[:, :, t, :, None], b[:, :, t, None, None], la[:, :, t, None, None].exp()
        S = at * (eye - bt * kt @ kt.transpose(-1, -2)) @ S + bt * kt @ v[:, :, t, None, :]
        outs.append((S.transpose(-1, -2) @ q[:, :, t, :, None]).squeeze(-1))
    torch.testing.assert_close(o_ref, torch.stack(outs, dim=2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_ref, S, rtol=1e-12, atol=1e-12)


def test_beta_one_overwrites_the_value_stored_at_a_unit_key():
    """With alpha = 1, beta = 1 and |k| = 1, reading key k right after writing (k, v) returns v exactly."""
    q, k, v, _, _, S0 = inputs(2, 3, 1, 6, 4)
    o, S = delta_rule(k, k, v, torch.ones(2, 3, 1, dtype=k.dtype), None, S0, mode="reference")
    torch.testing.assert_close(o, v, rtol=1e-12, atol=1e-12)
    o, _ = delta_rule(k, k, v, torch.ones(2, 3, 1, dtype=k.dtype), None, S0, mode="chunk")
    torch.testing.assert_close(o, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_state_carry_is_exact(mode):
    q, k, v, b, la, S0 = inputs(2, 2, 29, 4, 3)
    o, S = delta_rule(q, k, v, b, la, S0, mode=mode, chunk_size=8)
    for t in (1, 8, 13, 28):
        o1, S1 = delta_rule(q[:, :, :t], k[:, :, :t], v[:, :, :t], b[:, :, :t], la[:, :, :t], S0, mode=mode, chunk_size=8)
        o2, S2 = delta_rule(q[:, :, t:], k[:, :, t:], v[:, :, t:], b[:, :, t:], la[:, :, t:], S1, mode=mode, chunk_size=8)
        torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S2, S, rtol=RTOL, atol=ATOL)


def test_chunk_size_does_not_change_the_result():
    args = inputs(1, 2, 50, 5, 3)
    o, S = delta_rule(*args, mode="chunk", chunk_size=64)
    for C in (1, 7, 16, 50):
        o2, S2 = delta_rule(*args, mode="chunk", chunk_size=C)
        torch.testing.assert_close(o2, o, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S2, S, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("decay", ["near0", "near1"])
def test_extreme_decays_stay_finite_and_accurate_in_float32(decay):
    """log alpha = -30 per step underflows e^{g} within a chunk; -1e-4 keeps the whole history.

    Both float32 modes stay finite and within float32 rounding of the float64 reference:
    errors up to 1e-5 of the tensor's own scale (float32 eps is 1.2e-7; 150 steps of sums add
    a few ulps each). Gradients use the largest gradient entry as scale: the gradient of
    log alpha under decay ~0 is ~1e-12, a sum of O(1) terms that cancel, so float32 leaves
    ~1e-7 of absolute noise there.
    """
    args = inputs(2, 2, 150, 8, 8, decay=decay, dtype=torch.float32)
    o64, S64, g64 = run([None if a is None else a.double() for a in args], "reference")
    scale = max(float(g.abs().max()) for g in g64)
    for mode in ("reference", "chunk"):
        o, S, grads = run(args, mode)
        assert torch.isfinite(o).all() and torch.isfinite(S).all(), f"{mode}: non-finite forward"
        assert all(torch.isfinite(g).all() for g in grads), f"{mode}: non-finite gradient"
        torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5 * float(o64.abs().max()))
        torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-5 * float(S64.abs().max()))
        for i, (a, b) in enumerate(zip(grads, g64)):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{mode}, gradient {i}: {m}")


def test_half_precision_is_computed_in_float32():
    args = inputs(1, 2, 20, 4, 4, dtype=torch.float32)
    o32, S32 = delta_rule(*args, mode="chunk", chunk_size=8)
    o16, S16 = delta_rule(*(None if a is None else a.bfloat16() for a in args), mode="chunk", chunk_size=8)
    assert o16.dtype == S16.dtype == torch.bfloat16
    torch.testing.assert_close(o16.float(), o32, rtol=0.05, atol=0.05)  # bfloat16 inputs carry ~3 digits


# ------------------------------------------------------------------ resets (log alpha = -inf)
def assert_all_finite(run_result, what):
    o, S, grads = run_result
    assert torch.isfinite(o).all() and torch.isfinite(S).all(), f"{what}: non-finite forward"
    assert all(torch.isfinite(g).all() for g in grads), f"{what}: non-finite gradient"


def test_minimal_reset_gives_the_reference(kernel_path):
    """q = k = v = 1, beta = 1/2, log alpha = [0, -inf, 0]: o = [1/2, 1/2, 3/4] (the chunk form
    gave NaN everywhere: -inf - (-inf) in its decays); gradients equal the reference's."""
    ones = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    beta = torch.full((1, 1, 3), 0.5, dtype=torch.float64)
    log_alpha = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64).view(1, 1, 3)
    args = (ones, ones, ones, beta, log_alpha, None)
    o_ref, _, _ = run(args, "reference")
    torch.testing.assert_close(o_ref.flatten(), torch.tensor([0.5, 0.5, 0.75], dtype=torch.float64))
    for C in (1, 2, 64):
        assert_all_finite(run(args, "chunk", C), f"chunk_size={C}")
        assert_modes_agree(args, C)


def reset_inputs(pattern, T, C, dtype=torch.float64, seed=0):
    """Gated delta-rule inputs with resets at ``pattern``'s steps and, beside them, two very strong
    finite decays (-1e4, -1e30)."""
    q, k, v, b, la, S0 = inputs(2, 2, T, 4, 3, decay="typical", dtype=dtype, seed=seed)
    la = place_resets(la, reset_steps(pattern, T, C), time_dim=2)
    if pattern not in ("all", "every_other"):
        la = place_resets(place_resets(la, [C + 5], time_dim=2, value=-1e4), [2 * C + 2], time_dim=2, value=-1e30)
    return q, k, v, b, la, S0


@pytest.mark.parametrize("pattern", RESET_PATTERNS)
def test_resets_at_chosen_steps_equal_reference(pattern, kernel_path):
    """Resets on the first step, the last, both sides of a chunk edge, several in one chunk,
    consecutive steps, every step, every other step: the chunk form equals the reference, forward
    and gradients (float64)."""
    args = reset_inputs(pattern, 37, 16)
    assert_all_finite(run(args, "chunk", 16), pattern)
    assert_modes_agree(args, 16)


@pytest.mark.parametrize("pattern", ["chunk_edge", "consecutive", "all", "every_other"])
def test_resets_in_float32_match_float64(pattern, kernel_path):
    args = reset_inputs(pattern, 37, 16, dtype=torch.float32, seed=1)
    o64, S64, g64 = run([None if a is None else a.double() for a in args], "reference")
    scale = max(float(g.abs().max()) for g in g64)
    for mode in ("reference", "chunk"):
        o, S, grads = run(args, mode, 16)
        assert_all_finite((o, S, grads), mode)
        torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5 * float(o64.abs().max()))
        torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-5 * float(S64.abs().max()))
        for a, b in zip(grads, g64):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reset_at", [0, 15, 16, 21])
def test_nothing_leaks_across_a_reset(reset_at, dtype, kernel_path):
    """After a reset the state is exactly the write of that step: other inputs before it (initial
    state included) leave every later output and the final state identical, bit for bit."""
    q, k, v, b, la, S0 = inputs(2, 2, 40, 4, 3, decay="typical", dtype=dtype, seed=2)
    la = place_resets(la, [reset_at], time_dim=2)
    g = torch.Generator().manual_seed(3)
    changed = [t.clone() for t in (q, k, v, b, la)]
    for t in changed:
        t[:, :, :reset_at] = torch.rand(t[:, :, :reset_at].shape, generator=g, dtype=dtype)
    changed[4][:, :, :reset_at] *= -3
    for mode in ("reference", "chunk"):
        o, S = delta_rule(q, k, v, b, la, S0, mode=mode, chunk_size=16)
        o2, S2 = delta_rule(*changed, 2 * S0, mode=mode, chunk_size=16)
        assert torch.equal(o[:, :, reset_at:], o2[:, :, reset_at:]) and torch.equal(S, S2), mode


def test_bad_shapes_raise_naming_the_expected_shape():
    q, k, v, b, la, S0 = inputs(2, 2, 5, 4, 3)
    with pytest.raises(ValueError, match="d_k"):
        delta_rule(q, k[..., :3], v, b)
    with pytest.raises(ValueError, match=r"v must be \[batch=2"):
        delta_rule(q, k, v[:, :, :4], b)
    with pytest.raises(ValueError, match="beta"):
        delta_rule(q, k, v, b[..., :4])
    with pytest.raises(ValueError, match="log_alpha"):
        delta_rule(q, k, v, b, la[:1])
    with pytest.raises(ValueError, match=r"d_v=3"):
        delta_rule(q, k, v, b, la, S0[..., :2])
    with pytest.raises(ValueError, match="mode"):
        delta_rule(q, k, v, b, mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule(q, k, v, b, chunk_size=0)


# ------------------------------------------------------------------------------------------
# dplr_delta: S_t = (Diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t
# ------------------------------------------------------------------------------------------
# Low-rank terms: RWKV-7's (a = -kappa, b = kappa * lr, |kappa| = 1, lr in (0, 1)), the delta rule's
# (a = k, b = -alpha beta k with beta up to 2), and unstructured small vectors (|b^T a| < 1).
LOW_RANK = ("rwkv7", "delta", "random")
# log w: per key dimension or per head, typical / underflowing within a chunk / ~1 / with resets, or none
W_DECAYS = {"none": None, "typical": (-1.0, 0.0), "near0": (-31.0, -29.0), "near1": (-2e-4, 0.0), "reset": (-1.0, 0.0)}


def dplr_inputs(B, H, T, Dk, Dv, low_rank="rwkv7", decay="typical", per_dim=True, init=True,
                dtype=torch.float64, seed=0):
    """(q, k, v, log_w, a, b, S0) for dplr_delta."""
    g = torch.Generator().manual_seed(seed)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)

    q = torch.randn(B, H, T, Dk, generator=g, dtype=dtype)
    k = torch.randn(B, H, T, Dk, generator=g, dtype=dtype) / Dk**0.5
    v = torch.randn(B, H, T, Dv, generator=g, dtype=dtype)
    shape = (B, H, T, Dk) if per_dim else (B, H, T)
    log_w = None if W_DECAYS[decay] is None else uniform(*W_DECAYS[decay], *shape)
    if decay == "reset":
        log_w = with_resets(log_w, g)
    unit = F.normalize(torch.randn(B, H, T, Dk, generator=g, dtype=dtype), dim=-1)
    if low_rank == "rwkv7":
        a, b = -unit, unit * uniform(0.0, 1.0, B, H, T, Dk)
    elif low_rank == "delta":
        alpha = torch.ones(B, H, T, 1, dtype=dtype) if log_w is None else log_w.exp().reshape(B, H, T, -1)
        a, b = unit, -alpha * uniform(0.0, 2.0, B, H, T, 1) * unit
    else:
        a, b = unit, 0.9 * F.normalize(torch.randn(B, H, T, Dk, generator=g, dtype=dtype), dim=-1)
    S0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=dtype) if init else None
    return q, k, v, log_w, a, b, S0


def run_dplr(args, mode, chunk_size=64, seed=1):
    """Output, final state and gradients of a loss touching both, w.r.t. every input."""
    args = [None if t is None else t.clone().requires_grad_(True) for t in args]
    o, S = dplr_delta(*args, mode=mode, chunk_size=chunk_size)
    g = torch.Generator().manual_seed(seed)
    w_o, w_S = (torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (o, S))
    loss = (o * w_o).sum() + (S * w_S).sum()
    return o.detach(), S.detach(), torch.autograd.grad(loss, [t for t in args if t is not None])


def assert_dplr_modes_agree(args, chunk_size):
    o_ref, S_ref, g_ref = run_dplr(args, "reference")
    o, S, g = run_dplr(args, "chunk", chunk_size)
    torch.testing.assert_close(o, o_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(S, S_ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"final state: {m}")
    for i, (x, y) in enumerate(zip(g, g_ref)):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, msg=lambda m: f"gradient of input {i}: {m}")


@settings(max_examples=100, deadline=None)
@given(
    B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 40), Dk=st.integers(1, 6), Dv=st.integers(1, 6),
    chunk_size=st.sampled_from([1, 3, 4, 8, 16, 64]), low_rank=st.sampled_from(LOW_RANK),
    decay=st.sampled_from(sorted(W_DECAYS)), per_dim=st.booleans(), init=st.booleans(), seed=st.integers(0, 2**16),
)
def test_dplr_chunk_equals_reference_forward_and_gradients(B, H, T, Dk, Dv, chunk_size, low_rank, decay, per_dim, init, seed):
    args = dplr_inputs(B, H, T, Dk, Dv, low_rank, decay, per_dim, init, seed=seed)
    assert_dplr_modes_agree(args, chunk_size)


@pytest.mark.parametrize("decay", sorted(W_DECAYS))
@pytest.mark.parametrize("T", [1, 47, 64, 65, 130])
def test_dplr_odd_lengths_and_partial_chunks_equal_reference(decay, T, kernel_path):
    """One step, a length padded to a multiple of 16 (47 -> 48), and lengths around the chunk size."""
    assert_dplr_modes_agree(dplr_inputs(1, 2, T, 8, 8, decay=decay, seed=T), chunk_size=64)


def test_dplr_reference_is_the_paper_layout_recurrence_transposed():
    """The loop equals RWKV-7's state update written in its own layout, S' = S^T: [d_v, d_k],
    S'_t = S'_{t-1} (Diag(w_t) + a_t b_t^T) + v_t k_t^T, o_t = S'_t q_t (the official kernel's
    sa = S' a; S' = S' diag(w) + sa b^T + v k^T)."""
    q, k, v, log_w, a, b, S0 = dplr_inputs(2, 2, 9, 3, 4)
    o_ref, S_ref = dplr_delta(q, k, v, log_w, a, b, S0, mode="reference")
    S = S0.transpose(-1, -2)  # [b, h, d_v, d_k]
    outs = []
    for t in range(q.shape[2]):
        col = lambda x: x[:, :, t, :, None]  # noqa: E731
        transition = torch.diag_embed(log_w[:, :, t].exp()) + col(a) @ col(b).transpose(-1, -2)
        S = S @ transition + col(v) @ col(k).transpose(-1, -2)
        outs.append((S @ col(q)).squeeze(-1))
    torch.testing.assert_close(o_ref, torch.stack(outs, dim=2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S_ref, S.transpose(-1, -2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
@pytest.mark.parametrize("decay", ["none", "typical", "near0"])
def test_dplr_with_delta_rule_terms_is_the_delta_rule(mode, decay):
    """log w = log alpha, a = k, b = -alpha beta k and the written key beta k give
    alpha (I - beta k k^T) S + beta k v^T: dplr_delta equals delta_rule, forward and state."""
    q, k, v, beta, log_alpha, S0 = inputs(2, 2, 29, 5, 3, beta="upto2", decay=decay)
    alpha = 1.0 if log_alpha is None else log_alpha.exp()[..., None]
    o_ref, S_ref = delta_rule(q, k, v, beta, log_alpha, S0, mode="reference")
    bk = beta[..., None] * k
    o, S = dplr_delta(q, bk, v, log_alpha, k, -alpha * bk, S0, mode=mode, chunk_size=8)
    torch.testing.assert_close(o, o_ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(S, S_ref, rtol=RTOL, atol=ATOL)


def test_dplr_without_low_rank_term_is_gated_linear_attention():
    """b = 0 removes the rank-one term: S_t = Diag(w_t) S_{t-1} + k_t v_t^T (gated_matrix)."""
    q, k, v, log_w, a, b, S0 = dplr_inputs(2, 2, 29, 5, 3)
    o_ref, S_ref = gated_matrix(q, k, v, log_w, S0, mode="reference")
    for mode in ("reference", "chunk"):
        o, S = dplr_delta(q, k, v, log_w, a, torch.zeros_like(b), S0, mode=mode, chunk_size=8)
        torch.testing.assert_close(o, o_ref, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S, S_ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_dplr_state_carry_is_exact(mode):
    args = dplr_inputs(2, 2, 29, 4, 3)
    o, S = dplr_delta(*args, mode=mode, chunk_size=8)
    q, k, v, log_w, a, b, S0 = args
    for t in (1, 8, 13, 28):
        first = [x[:, :, :t] for x in (q, k, v, log_w, a, b)]
        rest = [x[:, :, t:] for x in (q, k, v, log_w, a, b)]
        o1, S1 = dplr_delta(*first, S0, mode=mode, chunk_size=8)
        o2, S2 = dplr_delta(*rest, S1, mode=mode, chunk_size=8)
        torch.testing.assert_close(torch.cat([o1, o2], dim=2), o, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S2, S, rtol=RTOL, atol=ATOL)


def test_dplr_chunk_size_does_not_change_the_result():
    args = dplr_inputs(1, 2, 50, 5, 3)
    o, S = dplr_delta(*args, mode="chunk", chunk_size=64)
    for C in (1, 7, 16, 50):
        o2, S2 = dplr_delta(*args, mode="chunk", chunk_size=C)
        torch.testing.assert_close(o2, o, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(S2, S, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("decay", ["near0", "near1", "typical"])
def test_dplr_extreme_decays_stay_finite_and_accurate_in_float32(decay):
    """Per-dimension log w = -30 per step underflows e^{c} within a chunk; -1e-4 keeps the whole
    history. Both float32 modes stay finite and within 1e-5 of the float64 reference, relative to
    each tensor's scale (float32 eps is 1.2e-7; 150 steps of sums add a few ulps each); gradients
    use the largest gradient entry as scale, as in the delta-rule test above."""
    args = dplr_inputs(2, 2, 150, 8, 8, decay=decay, dtype=torch.float32)
    o64, S64, g64 = run_dplr([None if t is None else t.double() for t in args], "reference")
    scale = max(float(g.abs().max()) for g in g64)
    for mode in ("reference", "chunk"):
        o, S, grads = run_dplr(args, mode)
        assert torch.isfinite(o).all() and torch.isfinite(S).all(), f"{mode}: non-finite forward"
        assert all(torch.isfinite(g).all() for g in grads), f"{mode}: non-finite gradient"
        torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5 * float(o64.abs().max()))
        torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-5 * float(S64.abs().max()))
        for i, (x, y) in enumerate(zip(grads, g64)):
            torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{mode}, gradient {i}: {m}")


@pytest.mark.parametrize("per_dim", [False, True])
def test_dplr_minimal_reset_gives_the_reference(per_dim, kernel_path):
    """q = k = v = 1, a = b = 0 (gated linear attention), log w = [0, -inf, 0]: o = [1, 1, 2],
    per head and per key dimension (the chunk form gave NaN); gradients equal the reference's."""
    ones = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    log_w = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64).view(1, 1, 3)
    log_w = log_w.unsqueeze(-1) if per_dim else log_w
    args = (ones, ones, ones, log_w, 0 * ones, 0 * ones, None)
    o_ref, _, _ = run_dplr(args, "reference")
    torch.testing.assert_close(o_ref.flatten(), torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64))
    for C in (1, 2, 64):
        assert_all_finite(run_dplr(args, "chunk", C), f"chunk_size={C}")
        assert_dplr_modes_agree(args, C)


def dplr_reset_inputs(pattern, T, C, low_rank, per_dim, dtype=torch.float64, seed=0):
    q, k, v, log_w, a, b, S0 = dplr_inputs(2, 2, T, 4, 3, low_rank, "typical", per_dim, dtype=dtype, seed=seed)
    log_w = place_resets(log_w, reset_steps(pattern, T, C), time_dim=2)
    if pattern not in ("all", "every_other"):
        log_w = place_resets(place_resets(log_w, [C + 5], time_dim=2, value=-1e4), [2 * C + 2], time_dim=2, value=-1e30)
    return q, k, v, log_w, a, b, S0


@pytest.mark.parametrize("per_dim", [False, True])
@pytest.mark.parametrize("low_rank", LOW_RANK)
@pytest.mark.parametrize("pattern", RESET_PATTERNS)
def test_dplr_resets_at_chosen_steps_equal_reference(pattern, low_rank, per_dim, kernel_path):
    args = dplr_reset_inputs(pattern, 37, 16, low_rank, per_dim)
    assert_all_finite(run_dplr(args, "chunk", 16), pattern)
    assert_dplr_modes_agree(args, 16)


@pytest.mark.parametrize("per_dim", [False, True])
@pytest.mark.parametrize("pattern", ["chunk_edge", "consecutive", "all", "every_other"])
def test_dplr_resets_in_float32_match_float64(pattern, per_dim, kernel_path):
    args = dplr_reset_inputs(pattern, 37, 16, "rwkv7", per_dim, dtype=torch.float32, seed=1)
    o64, S64, g64 = run_dplr([None if t is None else t.double() for t in args], "reference")
    scale = max(float(g.abs().max()) for g in g64)
    for mode in ("reference", "chunk"):
        o, S, grads = run_dplr(args, mode, 16)
        assert_all_finite((o, S, grads), mode)
        torch.testing.assert_close(o.double(), o64, rtol=1e-5, atol=1e-5 * float(o64.abs().max()))
        torch.testing.assert_close(S.double(), S64, rtol=1e-5, atol=1e-5 * float(S64.abs().max()))
        for x, y in zip(grads, g64):
            torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_dim", [False, True])
@pytest.mark.parametrize("reset_at", [0, 15, 16, 21])
def test_dplr_nothing_leaks_across_a_reset(reset_at, per_dim, dtype, kernel_path):
    """A reset on every key dimension at one step, with b = 0 there: the rank-one term reads the
    state before the step's decay (S_t = Diag(w_t) S_{t-1} + b_t (S_{t-1}^T a_t)^T + k_t v_t^T),
    so w_t = 0 alone leaves b_t a_t^T S_{t-1}; with b_t = 0 too the state is k_t v_t^T, and other
    inputs before the step (initial state included) leave every later output and the final
    state identical, bit for bit."""
    q, k, v, log_w, a, b, S0 = dplr_inputs(2, 2, 40, 4, 3, "rwkv7", "typical", per_dim, dtype=dtype, seed=2)
    log_w = place_resets(log_w, [reset_at], time_dim=2)
    b = place_resets(b, [reset_at], time_dim=2, value=0.0)
    g = torch.Generator().manual_seed(3)
    changed = [t.clone() for t in (q, k, v, log_w, a, b)]
    for t in changed:
        t[:, :, :reset_at] = torch.rand(t[:, :, :reset_at].shape, generator=g, dtype=dtype) - 0.5
    changed[3][:, :, :reset_at] = -changed[3][:, :, :reset_at].abs()
    for mode in ("reference", "chunk"):
        o, S = dplr_delta(q, k, v, log_w, a, b, S0, mode=mode, chunk_size=16)
        o2, S2 = dplr_delta(*changed, 2 * S0, mode=mode, chunk_size=16)
        assert torch.equal(o[:, :, reset_at:], o2[:, :, reset_at:]) and torch.equal(S, S2), mode


def test_dplr_half_precision_is_computed_in_float32():
    args = dplr_inputs(1, 2, 20, 4, 4, dtype=torch.float32)
    o32, S32 = dplr_delta(*args, mode="chunk", chunk_size=8)
    o16, S16 = dplr_delta(*(None if t is None else t.bfloat16() for t in args), mode="chunk", chunk_size=8)
    assert o16.dtype == S16.dtype == torch.bfloat16
    torch.testing.assert_close(o16.float(), o32, rtol=0.05, atol=0.05)  # bfloat16 inputs carry ~3 digits


def test_dplr_bad_shapes_raise_naming_the_expected_shape():
    q, k, v, log_w, a, b, S0 = dplr_inputs(2, 2, 5, 4, 3)
    with pytest.raises(ValueError, match="k must have q's shape"):
        dplr_delta(q, k[..., :3], v, log_w, a, b)
    with pytest.raises(ValueError, match="a must have q's shape"):
        dplr_delta(q, k, v, log_w, a[:, :1], b)
    with pytest.raises(ValueError, match="b must have q's shape"):
        dplr_delta(q, k, v, log_w, a, b[:, :, :4])
    with pytest.raises(ValueError, match=r"v must be \[batch=2"):
        dplr_delta(q, k, v[:, :, :4], log_w, a, b)
    with pytest.raises(ValueError, match="log_w"):
        dplr_delta(q, k, v, log_w[..., :3], a, b)
    with pytest.raises(ValueError, match=r"d_v=3"):
        dplr_delta(q, k, v, log_w, a, b, S0[..., :2])
    with pytest.raises(TypeError, match="floating"):
        dplr_delta(q, k, v, log_w, a.long(), b)
    with pytest.raises(ValueError, match="mode"):
        dplr_delta(q, k, v, log_w, a, b, mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        dplr_delta(q, k, v, log_w, a, b, chunk_size=0)
