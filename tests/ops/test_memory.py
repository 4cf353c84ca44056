"""The test-time MLP memory (Titans' neural long-term memory): the hand-written backprop equals
autograd, the mini-batch-parallel form equals the token-by-token definition, and the special
cases the paper names (b = 1: online gradient descent; a linear memory without momentum and
decay: the delta rule).

Exactness checks run in float64, where modes differ only in summation order (~1e-14), so
RTOL/ATOL leave orders of magnitude of headroom while catching any real mismatch. The two
modes' outputs, states and gradients are compared relative to each tensor's largest entry
(``close_normwise``: sums with cancellation). Learning rates are kept
moderate: an untrained memory with large steps is chaotic, and then tiny rounding differences
grow until any two orders of summation disagree (measured: with momentum up to 1 and lr 0.2,
a 1e-15 relative change of k moved the reference's own gradient by 3e-7).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.delta import delta_rule
from recur.ops.memory import (
    ACTIVATIONS,
    LOSSES,
    MemoryState,
    memory_state,
    mlp_forward,
    mlp_gradients,
    mlp_memory,
)

RTOL, ATOL = 1e-8, 1e-10
F64 = torch.float64


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def close_normwise(a, b, what):
    """Elementwise within RTOL of the tensor's largest entry. Memory, momentum and outer gradients
    are sums of many terms, some much larger than the result (momentum and gradients cancel;
    an outer gradient runs back through every step of the inner optimisation), and the rounding
    of a sum scales with its terms, not with its value. A real mismatch is ~1e-3 of the largest."""
    atol = ATOL + RTOL * b.abs().max().item()
    torch.testing.assert_close(a, b, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def layer_dims(d, hidden, depth):
    return [d] + [hidden] * (depth - 1) + [d]


def problem(B=2, H=2, T=13, d=4, hidden=6, depth=2, phase=0, lr=(0.0, 0.1), norm=True, seed=0, dtype=F64):
    """Inputs and a non-trivial state (anchor != weights, momentum != 0, counter ``phase``)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=dtype)

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)

    q = F.normalize(randn(B, H, T, d), dim=-1)
    k = F.normalize(randn(B, H, T, d), dim=-1)
    v = randn(B, H, T, d)
    gates = uniform(*lr, B, H, T), uniform(0, 0.9, B, H, T), uniform(0, 0.5, B, H, T)
    dims = layer_dims(d, hidden, depth)
    W = [randn(B, H, a, c, scale=a**-0.5) for a, c in zip(dims[:-1], dims[1:])]
    A = [w + randn(*w.shape, scale=0.1) for w in W] if phase else W
    S = [randn(*w.shape, scale=0.05) for w in W]
    state = MemoryState(tuple(W), tuple(A), tuple(S), torch.full((B,), phase, dtype=torch.int64))
    gain = 1 + randn(H, d, scale=0.1) if norm else None
    return (q, k, v, *gates), state, gain


def run(inputs, state, gain, mode, chunk_size, seed=1, **options):
    """Output, final state and gradients of a loss touching both, w.r.t. every input and state tensor."""
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    st_leaves = MemoryState(*(tuple(w.clone().requires_grad_(True) for w in ws) for ws in state[:3]), state.count)
    gain_leaf = None if gain is None else gain.clone().requires_grad_(True)
    o, s = mlp_memory(*leaves, st_leaves, mode=mode, chunk_size=chunk_size, norm=gain_leaf, **options)
    g = torch.Generator().manual_seed(seed)
    outs = [o, *s.weights, *s.anchor, *s.momentum]
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in outs)
    wrt = leaves + [w for ws in st_leaves[:3] for w in ws] + ([] if gain is None else [gain_leaf])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return o.detach(), MemoryState(*(tuple(w.detach() for w in ws) for ws in s[:3]), s.count), grads


def assert_same_state(s1, s2, what, compare=close):
    for name, a, b in zip(("weights", "anchor", "momentum"), s1[:3], s2[:3]):
        for i, (x, y) in enumerate(zip(a, b)):
            compare(x, y, f"{what}: {name}[{i}]")
    assert torch.equal(s1.count, s2.count), f"{what}: counters {s1.count} vs {s2.count}"


def assert_modes_agree(inputs, state, gain, chunk_size, **options):
    o_ref, s_ref, g_ref = run(inputs, state, gain, "reference", chunk_size, **options)
    o, s, g = run(inputs, state, gain, "chunk", chunk_size, **options)
    close_normwise(o, o_ref, "output")
    assert_same_state(s, s_ref, "final state", close_normwise)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        if a is None or b is None:
            assert a is None and b is None, f"gradient of input {i} missing in one mode"
        else:
            close_normwise(a, b, f"gradient of input {i}")


# ------------------------------------------------------------------ hand-written backprop
@settings(max_examples=60, deadline=None)
@given(depth=st.integers(1, 3), d=st.integers(1, 5), hidden=st.integers(1, 7), n=st.integers(1, 5),
       activation=st.sampled_from(sorted(ACTIVATIONS)), residual=st.booleans(), norm=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hand_written_gradient_equals_autograd(depth, d, hidden, n, activation, residual, norm, seed):
    g = torch.Generator().manual_seed(seed)
    dims = layer_dims(d, hidden, depth)
    W = [torch.randn(2, 3, a, c, generator=g, dtype=F64).requires_grad_(True) for a, c in zip(dims[:-1], dims[1:])]
    k, v = torch.randn(2, 3, n, d, generator=g, dtype=F64), torch.randn(2, 3, n, d, generator=g, dtype=F64)
    gain = 1 + 0.3 * torch.randn(3, d, generator=g, dtype=F64) if norm else None
    inputs, deltas = mlp_gradients(W, k, v, LOSSES["l2"], activation, residual, gain)
    for m in range(n):  # token by token: autograd of ||M(k_m) - v_m||^2 w.r.t. each weight
        pred = mlp_forward(W, k[:, :, m : m + 1], activation, residual, gain)
        loss = ((pred - v[:, :, m : m + 1]) ** 2).sum()
        expected = torch.autograd.grad(loss, W)
        for i, (h, dl, e) in enumerate(zip(inputs, deltas, expected)):
            close(h[:, :, m, :, None] * dl[:, :, m, None, :], e, f"token {m}, layer {i}")


def test_gradient_supports_double_backward():
    """The outer loop differentiates through the inner gradient: gradgradcheck in float64."""
    (q, k, v, lr, mom, dec), state, gain = problem(B=1, H=1, T=5, d=3, hidden=4, phase=2)
    W = state.weights

    def f(k, v, w0, w1, gain):
        o, s = mlp_memory(q, k, v, lr, mom, dec, MemoryState((w0, w1), state.anchor, state.momentum, state.count),
                          mode="chunk", chunk_size=3, norm=gain)
        return o, s.weights[0]

    args = [t.clone().requires_grad_(True) for t in (k, v, *W, gain)]
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


# ------------------------------------------------------------------- chunk == reference
@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 2), T=st.integers(1, 20), d=st.integers(1, 5), hidden=st.integers(1, 6),
       depth=st.integers(1, 3), chunk_size=st.sampled_from([1, 2, 3, 4, 8, 16]), phase=st.integers(0, 15),
       norm=st.booleans(), activation=st.sampled_from(sorted(ACTIVATIONS)), seed=st.integers(0, 2**16))
def test_chunk_equals_reference_forward_and_gradients(B, H, T, d, hidden, depth, chunk_size, phase, norm, activation, seed):
    """Any shape, chunk sizes not dividing T, and an initial state in the middle of a mini-batch.

    T <= 20 and lr <= 0.05: random untrained memories (3 layers, no residual, momentum 0.9) can
    be chaotic, doubling any rounding difference per token, so that after 25 tokens a 1e-15
    change of k moved the reference's own output by 3e-7 (measured); no two summation orders
    agree there. The conformance suite checks the layers' real gates at T = 37."""
    eps = 1e-5
    if norm:
        # Where the LayerNorm's input has near-zero variance its Jacobian is ~1/sqrt(var + eps),
        # and the outer gradient (its second derivative) ~1/(var + eps): tiny widths (outputs on a
        # line or plane through 0) get there often, and then a 1e-15 change of k moved the
        # reference's own gradient of 1e6 by 0.09 (measured). Widths >= 4 and eps = 1e-3 keep
        # the random problems well conditioned; the code path is the same.
        d, hidden, eps = max(d, 4), max(hidden, 4), 1e-3
    inputs, state, gain = problem(B, H, T, d, hidden, depth, phase % chunk_size, lr=(0.0, 0.05), norm=norm, seed=seed)
    assert_modes_agree(inputs, state, gain, chunk_size, activation=activation, residual=bool(seed % 2), eps=eps)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
@pytest.mark.parametrize("splits", [(1,), (3, 9), (4, 8, 12), (5, 6, 7, 8, 9)])
def test_state_carry_mid_minibatch_is_exact(mode, splits):
    inputs, state, gain = problem(T=17, phase=1)
    o_full, s_full = mlp_memory(*inputs, state, mode=mode, chunk_size=4, norm=gain)
    outs, s = [], state
    for lo, hi in zip((0, *splits), (*splits, 17)):
        o, s = mlp_memory(*(t[:, :, lo:hi] for t in inputs), s, mode=mode, chunk_size=4, norm=gain)
        outs.append(o)
    close(torch.cat(outs, dim=2), o_full, "output of the split calls")
    assert_same_state(s, s_full, "state after the split calls")


def test_rows_at_different_minibatch_phases():
    """States concatenated from different positions: each row follows its own mini-batch grid."""
    inputs, state, gain = problem(B=3, T=11, phase=0)
    state = state._replace(count=torch.tensor([0, 3, 2]))
    assert_modes_agree(inputs, state, gain, chunk_size=4)
    o, _ = mlp_memory(*inputs, state, mode="chunk", chunk_size=4, norm=gain)
    for row in range(3):
        sub = MemoryState(*(tuple(w[row : row + 1] for w in ws) for ws in state[:3]), state.count[row : row + 1])
        o_row, _ = mlp_memory(*(t[row : row + 1] for t in inputs), sub, mode="reference", chunk_size=4, norm=gain)
        close(o[row : row + 1], o_row, f"row {row} alone")


# ----------------------------------------------------------------- the definition itself
def online_gradient_descent(q, k, v, lr, mom, dec, weights, momentum, gain):
    """b = 1 written plainly: at each token, autograd's gradient at the current memory."""
    W, S, outs = list(weights), list(momentum), []
    for t in range(q.shape[2]):
        leaves = [w.detach().requires_grad_(True) for w in W]
        pred = mlp_forward(leaves, k[:, :, t : t + 1], norm=gain)
        grads = torch.autograd.grad(((pred - v[:, :, t : t + 1]) ** 2).sum(), leaves)
        th, eta, keep = (x[:, :, t, None, None] for x in (lr, mom, 1 - dec))
        S = [eta * s - th * gr for s, gr in zip(S, grads)]
        W = [keep * w + s for w, s in zip(W, S)]
        outs.append(mlp_forward(W, q[:, :, t : t + 1], norm=gain))
    return torch.cat(outs, dim=2), W, S


@pytest.mark.parametrize("mode", ["reference", "chunk"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_size_one_is_online_gradient_descent(mode, depth):
    inputs, state, gain = problem(T=9, depth=depth, lr=(0.0, 0.5))
    o_gd, W, S = online_gradient_descent(*inputs, state.weights, state.momentum, gain)
    o, s = mlp_memory(*inputs, state, mode=mode, chunk_size=1, norm=gain)
    close(o, o_gd, "output")
    for i in range(depth):
        close(s.weights[i], W[i], f"weights[{i}]")
        close(s.anchor[i], W[i], f"anchor[{i}] (b = 1: every token completes a mini-batch)")
        close(s.momentum[i], S[i], f"momentum[{i}]")


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_gradients_within_a_minibatch_are_taken_at_its_start(mode):
    """One mini-batch, linear memory, no momentum or decay: W_T = W_0 - sum_m theta_m 2 k_m^T (k_m W_0 - v_m)."""
    (q, k, v, lr, _, _), state, _ = problem(T=6, depth=1, phase=0)
    zero = torch.zeros_like(lr)
    W0 = state.weights[0]
    o, s = mlp_memory(q, k, v, lr, zero, zero, memory_state([W0]), mode=mode, chunk_size=6, residual=False)
    grads = 2 * k.transpose(-1, -2) @ (lr[..., None] * (k @ W0 - v))  # sum_m theta_m grad at W0
    close(s.weights[0], W0 - grads, "memory after the mini-batch")
    close(s.anchor[0], s.weights[0], "the next mini-batch starts from it")
    # token t reads with W_0 minus the gradients of tokens 1..t, all taken at W_0
    for t in range(6):
        partial = 2 * k[:, :, : t + 1].transpose(-1, -2) @ (lr[:, :, : t + 1, None] * (k[:, :, : t + 1] @ W0 - v[:, :, : t + 1]))
        close(o[:, :, t], (q[:, :, t : t + 1] @ (W0 - partial)).squeeze(2), f"read at token {t}")


@pytest.mark.parametrize("mode", ["reference", "chunk"])
@pytest.mark.parametrize("delta_mode", ["reference", "chunk"])
def test_linear_memory_without_momentum_or_decay_is_the_delta_rule(mode, delta_mode):
    """With L_M = 1, eta = alpha = 0 and b = 1 the memory is DeltaNet's S_t = (I - beta k k^T) S + beta k v^T
    with beta = 2 theta (the loss ||k W - v||^2 has gradient 2 k^T (k W - v)); o_t = S_t^T q_t."""
    (q, k, v, lr, _, _), state, _ = problem(T=19, depth=1, lr=(0.0, 0.5), seed=3)
    zero = torch.zeros_like(lr)
    S0 = state.weights[0]
    o, s = mlp_memory(q, k, v, lr, zero, zero, memory_state([S0]), mode=mode, chunk_size=1, residual=False)
    o_delta, S_delta = delta_rule(q, k, v, 2 * lr, None, S0, mode=delta_mode, chunk_size=4)
    close(o, o_delta, "output")
    close(s.weights[0], S_delta, "state")


def test_attentional_bias_is_pluggable():
    """A callable attentional bias: l = 1/2 ||M(k) - v||^2 with twice the learning rate is the l2 memory."""
    (q, k, v, lr, mom, dec), state, gain = problem(T=11, phase=2)
    o, s = mlp_memory(q, k, v, lr, mom, dec, state, chunk_size=4, norm=gain)
    half = lambda pred, target: pred - target  # noqa: E731
    o2, s2 = mlp_memory(q, k, v, lr * 2, mom, dec, state, chunk_size=4, norm=gain, loss=half)
    close(o2, o, "output")
    assert_same_state(s2, s, "state")


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_bfloat16_is_computed_in_float32(mode):
    """bfloat16 in and out, float32 inside: exactly the float32 result on the same (rounded) inputs."""
    inputs, state, gain = problem(T=10, phase=1, dtype=torch.float32)
    inputs = [t.bfloat16() for t in inputs]
    half = MemoryState(*(tuple(w.bfloat16() for w in ws) for ws in state[:3]), state.count)
    o16, s16 = mlp_memory(*inputs, half, mode=mode, chunk_size=4, norm=gain)
    full = MemoryState(*(tuple(w.float() for w in ws) for ws in half[:3]), state.count)
    o32, s32 = mlp_memory(*(t.float() for t in inputs), full, mode=mode, chunk_size=4, norm=gain)
    assert o16.dtype == torch.bfloat16 and all(w.dtype == torch.bfloat16 for ws in s16[:3] for w in ws)
    assert torch.equal(o16, o32.bfloat16())
    assert all(torch.equal(a, b.bfloat16()) for x, y in zip(s16[:3], s32[:3]) for a, b in zip(x, y))


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_an_empty_sequence_leaves_the_state_alone(mode):
    inputs, state, gain = problem(T=0, phase=3)
    o, s = mlp_memory(*inputs, state, mode=mode, chunk_size=4, norm=gain)
    assert o.shape == (2, 2, 0, 4)
    assert_same_state(s, state, "state")


# ------------------------------------------------------------------------------ errors
def test_bad_arguments_raise_clear_errors():
    (q, k, v, lr, mom, dec), state, _ = problem(T=5)
    with pytest.raises(ValueError, match="mode"):
        mlp_memory(q, k, v, lr, mom, dec, state, mode="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        mlp_memory(q, k, v, lr, mom, dec, state, chunk_size=0)
    with pytest.raises(ValueError, match="attentional bias"):
        mlp_memory(q, k, v, lr, mom, dec, state, loss="l7")
    with pytest.raises(ValueError, match=r"lr must be \[batch=2, heads=2, time=5\]"):
        mlp_memory(q, k, v, lr[..., :4], mom, dec, state)
    with pytest.raises(ValueError, match="memory layer 0"):
        mlp_memory(q, k, v, lr, mom, dec, state._replace(weights=(state.weights[0][..., :3, :], state.weights[1])))
    with pytest.raises(ValueError, match="count"):
        mlp_memory(q, k, v, lr, mom, dec, state._replace(count=state.count.float()))
    with pytest.raises(ValueError, match="another chunk_size"):
        mlp_memory(q, k, v, lr, mom, dec, state._replace(count=torch.tensor([0, 9])), chunk_size=8)
    with pytest.raises(ValueError, match="norm"):
        mlp_memory(q, k, v, lr, mom, dec, state, norm=torch.ones(3, 4, dtype=F64))
    with pytest.raises(TypeError, match="MemoryState"):
        mlp_memory(q, k, v, lr, mom, dec, tuple(state))
