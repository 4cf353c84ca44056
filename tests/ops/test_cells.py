"""The fused LSTM/GRU loops (hand-written BPTT) equal the autograd loops in float64: outputs,
final states and the gradients of every input, for any shape, and when only some outputs
receive a gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_paths import kernels
from recur.ops.cells import _can_pack, _Matmul, gru_reference, gru_sequence, lstm_reference, lstm_sequence

F64 = torch.float64


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def inputs(T, S, B, d, gates, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    u = (scale * torch.randn(T, S, B, gates * d, generator=g, dtype=F64)).requires_grad_()
    w = (torch.randn(S, d, gates * d, generator=g, dtype=F64) / d**0.5).requires_grad_()
    b = (0.1 * torch.randn(S, 1, gates * d, generator=g, dtype=F64)).requires_grad_()
    h0 = torch.randn(S, B, d, generator=g, dtype=F64).requires_grad_()
    c0 = torch.randn(S, B, d, generator=g, dtype=F64).requires_grad_()
    return g, u, w, b, h0, c0


def grads_of(outputs, wrt, g, use):
    """Gradients of a random weighting of the outputs marked in ``use``."""
    total = sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o, on in zip(outputs, use) if on)
    return torch.autograd.grad(total, wrt, allow_unused=True)


def assert_fused_is_reference(fused, reference, args, out_names, grad_names, g, use, path):
    """Outputs, and gradients of a random weighting of the outputs marked in ``use``, of the
    fused loop (run on ``path``) equal the autograd loop's."""
    ref = reference(*args)
    with kernels(path == "compiled"):
        out = fused(*args)
    for a, r, what in zip(out, ref, out_names):
        close(a, r, what)
    state = g.get_state()
    want = grads_of(ref, args, g, use)
    g.set_state(state)
    with kernels(path == "compiled"):
        got = grads_of(out, args, g, use)
    for a, r, what in zip(got, want, grad_names):
        close(a, r, what)


@pytest.mark.parametrize("path", ["compiled", "torch"])
@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 9), S=st.integers(1, 3), B=st.integers(1, 3), d=st.integers(1, 6), seed=st.integers(0, 2**16),
       use=st.sampled_from([(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1)]))
def test_fused_lstm_equals_the_autograd_loop(path, T, S, B, d, seed, use):
    g, u, w, _, h0, c0 = inputs(T, S, B, d, 4, seed, scale=2.0)
    assert_fused_is_reference(lstm_sequence, lstm_reference, (u, w, h0, c0), ("outputs", "h_T", "c_T"),
                              ("du", "dW_hh", "dh0", "dc0"), g, use, path)


@pytest.mark.parametrize("path", ["compiled", "torch"])
@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 9), S=st.integers(1, 3), B=st.integers(1, 3), d=st.integers(1, 6), seed=st.integers(0, 2**16),
       use=st.sampled_from([(1, 1), (1, 0), (0, 1)]))
def test_fused_gru_equals_the_autograd_loop(path, T, S, B, d, seed, use):
    g, u, w, b, h0, _ = inputs(T, S, B, d, 3, seed, scale=2.0)
    assert_fused_is_reference(gru_sequence, gru_reference, (u, w, b, h0), ("outputs", "h_T"),
                              ("du", "dW_hh", "db_hh", "dh0"), g, use, path)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_gradcheck(name):
    _, u, w, b, h0, c0 = inputs(4, 2, 2, 3, 4 if name == "lstm" else 3, seed=0)
    if name == "lstm":
        assert torch.autograd.gradcheck(lstm_sequence, (u, w, h0, c0))
    else:
        assert torch.autograd.gradcheck(gru_sequence, (u, w, b, h0))


def test_non_contiguous_inputs_and_float32():
    """The layers pass u as a rearranged (non-contiguous) view; float32 agrees to rounding."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 5, 3, 8, generator=g)  # [batch, time, streams, gates * d]
    u = base.permute(1, 2, 0, 3).requires_grad_()  # [time, streams, batch, 8]
    assert not u.is_contiguous()
    w = (0.5 * torch.randn(3, 2, 8, generator=g)).requires_grad_()
    h0, c0 = torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)
    ref = lstm_reference(u, w, h0, c0)[0]
    out = lstm_sequence(u, w, h0, c0)[0]
    torch.testing.assert_close(out, ref)
    gw_ref, = torch.autograd.grad(ref.sum(), w)
    gw, = torch.autograd.grad(out.sum(), w)
    torch.testing.assert_close(gw, gw_ref)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_matmul_equals_bmm(bias):
    """CPU float32: the recurrent matmul through oneDNN with the weight packed once equals bmm,
    for several streams, with and without the GRU's bias, and on strided rows."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 16, 48, generator=g)
    b = torch.randn(3, 1, 48, generator=g) if bias else None
    x = torch.randn(3, 5, 32, generator=g)[..., ::2]  # [streams, rows, 16], rows not contiguous
    packed = _Matmul(w, rows=5, bias=b)
    assert (packed.packed is not None) == _can_pack(w)  # packed wherever this torch build has oneDNN
    want = torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)
    got = packed(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with kernels(False):
        assert _Matmul(w, rows=5, bias=b).packed is None  # the PyTorch path (CUDA's) is bmm


@pytest.mark.parametrize("path", ["compiled", "torch"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_float32_loops_equal_the_float64_reference(name, path):
    """The float32 loops (on CPU with the kernels on: the packed oneDNN matmul and the compiled
    gates; off: bmm and torch ops) agree with the float64 autograd loop to float32 rounding,
    outputs and every gradient, at a size where the matmul's blocking matters (d = 64)."""
    gates = 4 if name == "lstm" else 3
    g, u, w, b, h0, c0 = inputs(T=6, S=2, B=5, d=64, gates=gates, seed=4)
    args64 = (u, w, h0, c0) if name == "lstm" else (u, w, b, h0)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    fused, reference = (lstm_sequence, lstm_reference) if name == "lstm" else (gru_sequence, gru_reference)
    ref = reference(*args64)
    with kernels(path == "compiled"):
        out = fused(*args32)
        weights = [torch.randn(o.shape, generator=g, dtype=F64) for o in ref]
        got = torch.autograd.grad(sum((o * wt.float()).sum() for o, wt in zip(out, weights)), args32)
    want = torch.autograd.grad(sum((o * wt).sum() for o, wt in zip(ref, weights)), args64)
    for a, r in zip((*out, *got), (*ref, *want)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("path", ["compiled", "torch"])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_u_is_left_alone_unless_handed_over(name, path):
    """By default the loops copy u; with overwrite_u=True (the layers' private projections) they
    keep their gates in it, and the results and gradients are the same either way."""
    g, u, w, b, h0, c0 = inputs(T=5, S=2, B=3, d=4, gates=4 if name == "lstm" else 3, seed=5)
    run = (lambda u, over: lstm_sequence(u, w, h0, c0, overwrite_u=over)) if name == "lstm" else \
        (lambda u, over: gru_sequence(u, w, b, h0, overwrite_u=over))
    with kernels(path == "compiled"):
        before = u.detach().clone()
        kept = run(u, False)
        assert torch.equal(u.detach(), before)
        handed = u.detach().clone().requires_grad_()
        over = run(handed * 1.0, True)  # a non-leaf temporary, as in the layers
        for a, r in zip(over, kept):
            close(a, r, "outputs")
        wt = [torch.randn(o.shape, generator=g, dtype=F64) for o in kept]
        grad_kept, = torch.autograd.grad(sum((o * x).sum() for o, x in zip(kept, wt)), u)
        grad_over, = torch.autograd.grad(sum((o * x).sum() for o, x in zip(over, wt)), handed)
    close(grad_over, grad_kept, "du")
