"""The compiled CPU scan (numba) and the PyTorch chunked scan both equal the reference loop.

``diagonal_scan(mode="chunk")`` runs the compiled kernel for CPU tensors when numba is
installed; the PyTorch two-level path is the device-agnostic fallback (CUDA, or
``RECUR_COMPILED=0``). The hypothesis tests here run each path explicitly, in float64, at the
tolerances of tests/ops/test_scan.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_paths import kernels
from recur.ops import compiled
from recur.ops.scan import diagonal_scan
from test_scan import DECAYS, FORMS, assert_same, make_inputs, run


def test_numba_is_installed():
    """numba is a dependency: without it these tests would only exercise the PyTorch path."""
    assert compiled.numba is not None


@pytest.mark.parametrize("path", ["compiled", "torch"])
@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 40), dims=st.lists(st.integers(1, 300), min_size=1, max_size=2),
    form=st.sampled_from(FORMS), decay=st.sampled_from(sorted(DECAYS)),
    complex_a=st.booleans(), complex_b=st.booleans(), init=st.booleans(), seed=st.integers(0, 2**16),
)
def test_each_chunk_path_equals_reference(path, B, T, dims, form, decay, complex_a, complex_b, init, seed):
    dims = dims[:1] if dims[0] * (dims[-1] if len(dims) > 1 else 1) > 600 else dims  # keep it small
    args = make_inputs(B, T, dims, form, decay, complex_a, complex_b, init, seed=seed)
    with kernels(path == "compiled"):
        assert_same(run(diagonal_scan, args, mode="chunk", chunk_size=8), run(diagonal_scan, args, mode="reference"))


def test_chunk_mode_uses_the_compiled_kernel_on_cpu(monkeypatch):
    calls = []
    real = compiled.scan
    monkeypatch.setattr(compiled, "scan", lambda *a: calls.append(1) or real(*a))
    log_a, b, h0 = make_inputs(2, 9, [3])
    with kernels(True):
        diagonal_scan(log_a, b, h0, mode="chunk")
    assert calls, "the CPU chunk path should run the compiled kernel"
    with kernels(False):
        diagonal_scan(log_a, b, h0, mode="chunk")
    assert len(calls) == 1, "with the kernels disabled the PyTorch path must run"


def test_half_precision_goes_through_float32():
    log_a, b, h0 = make_inputs(2, 30, [5], dtype=torch.float32)
    h, _ = diagonal_scan(log_a, b.bfloat16(), h0.bfloat16(), mode="chunk")
    assert h.dtype == torch.bfloat16


@pytest.mark.parametrize("B,dims", [(1, [40]), (1, [3, 70]), (3, [40])])
def test_rows_split_across_threads_equal_reference(B, dims):
    """With two threads and fewer batch rows than threads, the kernel splits each row's
    channels into runs (recur.ops.compiled._block); the runs must join up exactly."""
    torch.set_num_threads(2)  # the autouse fixture restores one thread for the next test
    args = make_inputs(B, 33, dims, "full", "typical", True, False, True, seed=5)
    with kernels(True):
        assert_same(run(diagonal_scan, args, mode="chunk"), run(diagonal_scan, args, mode="reference"))


def test_block_sizes():
    import numba
    numba.set_num_threads(2)
    try:
        assert compiled._block(8, 1024) == 1024  # enough rows: whole rows
        assert compiled._block(1, 1024) == 512  # one row, two threads: two runs
        assert compiled._block(1, 40) == 32  # runs are multiples of 16 ...
        assert compiled._block(1, 1024, cap=256) == 256  # ... and at most the cap
    finally:
        numba.set_num_threads(1)


def test_decays_shared_along_trailing_dims_take_the_grouped_kernels(monkeypatch):
    """A decay per row of a matrix state ([B, T, d_k, 1] against [B, T, d_k, d_v]) is read per
    group, never expanded: the grouped kernels run, and equal the reference (forward and backward)."""
    calls = []
    for name in ("_forward_grouped", "_backward_grouped"):
        real = getattr(compiled, name)
        monkeypatch.setattr(compiled, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    args = make_inputs(2, 37, [5, 19], "per_key", "typical", False, False, True, seed=11)
    with kernels(True):
        assert_same(run(diagonal_scan, args, mode="chunk"), run(diagonal_scan, args, mode="reference"))
    assert calls == ["_forward_grouped", "_backward_grouped"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unit_lower_solve_equals_lapack_forward_and_backward(dtype):
    """The delta rule's compiled forward substitution against torch.linalg.solve_triangular
    (unit diagonal, strictly lower part of L used): solution and both gradients."""
    g = torch.Generator().manual_seed(0)
    L = torch.randn(3, 5, 17, 17, generator=g, dtype=dtype) * 0.3
    R = torch.randn(3, 5, 17, 6, generator=g, dtype=dtype)
    G = torch.randn(3, 5, 17, 6, generator=g, dtype=dtype)
    eye = torch.eye(17, dtype=dtype)
    leaves = [L.clone().requires_grad_(), R.clone().requires_grad_()]
    want = torch.linalg.solve_triangular(eye + leaves[0].tril(-1), leaves[1], upper=False, unitriangular=True)
    want_grads = torch.autograd.grad((want * G).sum(), leaves)
    got_leaves = [L.clone().requires_grad_(), R.clone().requires_grad_()]
    got = compiled.unit_lower_solve(*got_leaves)
    got_grads = torch.autograd.grad((got * G).sum(), got_leaves)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decayed", [True, False])
def test_delta_masks_equal_the_pytorch_masks(decayed, dtype):
    """The delta rule's fused chunk masks (A = strict_lower(beta KK D), P = lower(QK D)) against
    the PyTorch ops they replace, forward and the gradients of KK, QK, g and beta; odd chunk
    sizes and strongly decaying gates (decays that underflow to exact zeros) included."""
    from recur.ops.delta import _masks

    g = torch.Generator().manual_seed(1)
    C = 13
    leaves = [torch.randn(2, 3, C, C, generator=g, dtype=dtype), torch.randn(2, 3, C, C, generator=g, dtype=dtype),
              (30 * torch.nn.functional.logsigmoid(torch.randn(2, 3, C, generator=g, dtype=dtype))).cumsum(-1),
              torch.rand(2, 3, C, generator=g, dtype=dtype)]
    if not decayed:
        leaves[2] = None
    weights = [torch.randn(2, 3, C, C, generator=g, dtype=dtype) for _ in range(2)]
    results = {}
    for path in ("compiled", "torch"):
        args = [None if t is None else t.clone().requires_grad_() for t in leaves]
        with kernels(path == "compiled"):
            A, P = _masks(*args)
        given_args = [a for a in args if a is not None]
        grads = torch.autograd.grad((A * weights[0]).sum() + (P * weights[1]).sum(), given_args)
        results[path] = (A, P, *grads)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(results["compiled"], results["torch"]):
        torch.testing.assert_close(a, b, **tol)
    assert (results["compiled"][0].triu() == 0).all() and (results["compiled"][1].triu(1) == 0).all()


def test_delta_masks_gradcheck():
    g = torch.Generator().manual_seed(2)
    args = (torch.randn(2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 5, 5, generator=g, dtype=torch.float64, requires_grad=True),
            torch.nn.functional.logsigmoid(torch.randn(2, 5, generator=g, dtype=torch.float64)).cumsum(-1).requires_grad_(),
            torch.rand(2, 5, generator=g, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(compiled.delta_masks, args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decayed", [True, False])
def test_delta_inputs_equal_the_pytorch_ops(decayed, dtype):
    """The delta rule's fused per-position scalings (the solves' right-hand sides, decayed
    queries and keys, the chunk decay) against the PyTorch ops they replace, forward and every
    gradient, with d_k != d_v and only some outputs receiving a gradient."""
    from recur.ops.delta import _scaled_inputs

    g = torch.Generator().manual_seed(3)
    C, Dk, Dv = 7, 5, 3
    leaves = [torch.randn(2, 3, C, Dk, generator=g, dtype=dtype), torch.randn(2, 3, C, Dk, generator=g, dtype=dtype),
              torch.randn(2, 3, C, Dv, generator=g, dtype=dtype), torch.rand(2, 3, C, generator=g, dtype=dtype),
              (4 * torch.nn.functional.logsigmoid(torch.randn(2, 3, C, generator=g, dtype=dtype))).cumsum(-1)]
    if not decayed:
        leaves[4] = None
    results = {}
    for path in ("compiled", "torch"):
        args = [None if t is None else t.clone().requires_grad_() for t in leaves]
        with kernels(path == "compiled"):
            outs = _scaled_inputs(*args)
        weights = torch.Generator().manual_seed(4)
        used = outs[:-1] if decayed else outs  # the chunk decay gets no gradient here (gradcheck gives it one)
        loss = sum((o * torch.randn(o.shape, generator=weights, dtype=dtype)).sum() for o in used)
        given_args = [a for a in args if a is not None and a.requires_grad]
        grads = torch.autograd.grad(loss, given_args, allow_unused=True)
        results[path] = (*outs, *[torch.zeros(()) if x is None else x for x in grads])
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert len(results["compiled"]) == len(results["torch"])
    for a, b in zip(results["compiled"], results["torch"]):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("decayed", [True, False])
def test_delta_inputs_gradcheck(decayed):
    g = torch.Generator().manual_seed(5)
    F64 = torch.float64
    args = [torch.randn(2, 4, 3, generator=g, dtype=F64), torch.randn(2, 4, 3, generator=g, dtype=F64),
            torch.randn(2, 4, 2, generator=g, dtype=F64), torch.rand(2, 4, generator=g, dtype=F64),
            torch.nn.functional.logsigmoid(torch.randn(2, 4, generator=g, dtype=F64)).cumsum(-1)]
    if not decayed:
        args[4] = None
    args = tuple(None if a is None else a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: compiled.delta_inputs(*a), args)


@pytest.mark.parametrize("before", [False, True])
def test_gla_decays_equal_the_pytorch_ops(before):
    """GLA's factored chunk decays (q e^{cq}, k e^{-c}, k e^{c_last - c}, c_last), compiled,
    against the PyTorch ops they replace: forward and the gradients of q, k and g, equal in
    float64; in float32 (chunk decays near the factoring limit, e^-15) as close to the float64
    values as the PyTorch ops' own float32 run, within a factor of two."""
    from recur.ops.gated import _factored_decays

    g = torch.Generator().manual_seed(6)
    leaves = [torch.randn(2, 3, 64, 5, generator=g, dtype=torch.float64),
              torch.randn(2, 3, 64, 5, generator=g, dtype=torch.float64),
              -15.0 / 64 * torch.rand(2, 3, 64, 5, generator=g, dtype=torch.float64) * 2]

    def run(path, dtype):
        args = [t.to(dtype).requires_grad_() for t in leaves]
        with kernels(path == "compiled"):
            outs = _factored_decays(*args, before)
        weights = torch.Generator().manual_seed(7)
        loss = sum((o * torch.randn(o.shape, generator=weights, dtype=torch.float64).to(dtype)).sum() for o in outs)
        return [t.double() for t in (*outs, *torch.autograd.grad(loss, args))]

    exact = run("torch", torch.float64)
    for a, b in zip(run("compiled", torch.float64), exact):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    error = lambda got: max(((a - b).norm() / b.norm()).item() for a, b in zip(got, exact))  # noqa: E731
    assert error(run("compiled", torch.float32)) <= 2 * error(run("torch", torch.float32)) + 1e-7


@pytest.mark.parametrize("before", [False, True])
def test_gla_decays_gradcheck(before):
    g = torch.Generator().manual_seed(8)
    F64 = torch.float64
    args = (torch.randn(2, 6, 3, generator=g, dtype=F64, requires_grad=True),
            torch.randn(2, 6, 3, generator=g, dtype=F64, requires_grad=True),
            torch.nn.functional.logsigmoid(torch.randn(2, 6, 3, generator=g, dtype=F64)).requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: compiled.gla_decays(*a, before), args)
