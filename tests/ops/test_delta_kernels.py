"""The delta rule's compiled chunk-form kernels (recur.ops.delta_kernels) against the PyTorch ops
they replace (LAPACK's triangular solve, the masks, the input scalings): forward, gradients, gradcheck."""

from __future__ import annotations

import pytest
import torch

from kernel_paths import kernels
from recur.ops import delta_kernels


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
    got = delta_kernels.unit_lower_solve(*got_leaves)
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
    assert torch.autograd.gradcheck(delta_kernels.delta_masks, args)


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
    assert torch.autograd.gradcheck(lambda *a: delta_kernels.delta_inputs(*a), args)



def _reset_decays(shape, generator, dtype):
    """(g, n): a chunk's cumulative log decay with resets (-inf, -1e30, -1e4 among the steps, the
    last row's first and last steps included) and their count (recur.ops.scan.reset_cumsum)."""
    import math

    from recur.ops.scan import reset_cumsum

    la = torch.nn.functional.logsigmoid(torch.randn(*shape, generator=generator, dtype=dtype))
    u = torch.rand(*shape, generator=generator, dtype=dtype)
    la = torch.where(u < 0.3, -math.inf, la)
    la = torch.where(u < 0.1, -1e30, la)
    la = torch.where(u < 0.05, -1e4, la)
    rows = la.view(-1, shape[-1])
    rows[-1, 0] = rows[-1, -1] = -math.inf
    rows[0] = -math.inf  # a row of resets only
    return reset_cumsum(la, -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_delta_masks_with_resets_equal_the_pytorch_masks(dtype):
    """With resets (D_ij = 0 where one lies between j and i), the fused masks against the PyTorch
    ops: forward and the gradients of KK, QK, g and beta."""
    from recur.ops.delta import _masks

    gen = torch.Generator().manual_seed(11)
    C = 13
    g, n = _reset_decays((2, 3, C), gen, dtype)
    assert n is not None
    leaves = [torch.randn(2, 3, C, C, generator=gen, dtype=dtype), torch.randn(2, 3, C, C, generator=gen, dtype=dtype),
              g, torch.rand(2, 3, C, generator=gen, dtype=dtype)]
    weights = [torch.randn(2, 3, C, C, generator=gen, dtype=dtype) for _ in range(2)]
    results = {}
    for path in ("compiled", "torch"):
        args = [t.clone().requires_grad_() for t in leaves]
        with kernels(path == "compiled"):
            A, P = _masks(*args, n)
        grads = torch.autograd.grad((A * weights[0]).sum() + (P * weights[1]).sum(), args)
        results[path] = (A, P, *grads)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(results["compiled"], results["torch"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)
    # across a reset the decay is exactly 0
    across = n[..., :, None] != n[..., None, :]
    assert (results["compiled"][1][across] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_delta_inputs_with_resets_equal_the_pytorch_ops(dtype):
    """With resets (e^{g_i} = 0 after the chunk's first, e^{g_last - g_i} = 0 before its last),
    the fused scalings against the PyTorch ops: forward and every gradient, the chunk decay's
    included."""
    from recur.ops.delta import _scaled_inputs

    gen = torch.Generator().manual_seed(12)
    C, Dk, Dv = 7, 5, 3
    g, n = _reset_decays((2, 3, C), gen, dtype)
    leaves = [torch.randn(2, 3, C, Dk, generator=gen, dtype=dtype), torch.randn(2, 3, C, Dk, generator=gen, dtype=dtype),
              torch.randn(2, 3, C, Dv, generator=gen, dtype=dtype), torch.rand(2, 3, C, generator=gen, dtype=dtype), g]
    results = {}
    for path in ("compiled", "torch"):
        args = [t.clone().requires_grad_() for t in leaves]
        with kernels(path == "compiled"):
            outs = _scaled_inputs(*args, n)
        weights = torch.Generator().manual_seed(13)
        loss = sum((o * torch.randn(o.shape, generator=weights, dtype=dtype)).sum() for o in outs)
        results[path] = (*outs, *torch.autograd.grad(loss, args))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(results["compiled"], results["torch"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol)


def test_delta_kernels_with_resets_gradcheck():
    gen = torch.Generator().manual_seed(14)
    F64 = torch.float64
    g, n = _reset_decays((2, 5), gen, F64)
    masks_args = (torch.randn(2, 5, 5, generator=gen, dtype=F64, requires_grad=True),
                  torch.randn(2, 5, 5, generator=gen, dtype=F64, requires_grad=True),
                  g.clone().requires_grad_(), torch.rand(2, 5, generator=gen, dtype=F64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda *a: delta_kernels.delta_masks(*a, n), masks_args)
    inputs_args = (torch.randn(2, 5, 3, generator=gen, dtype=F64, requires_grad=True),
                   torch.randn(2, 5, 3, generator=gen, dtype=F64, requires_grad=True),
                   torch.randn(2, 5, 2, generator=gen, dtype=F64, requires_grad=True),
                   torch.rand(2, 5, generator=gen, dtype=F64, requires_grad=True), g.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda *a: delta_kernels.delta_inputs(*a, n), inputs_args)
