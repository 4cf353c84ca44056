"""GLA's compiled chunk decays (recur.ops.gated_kernels) against the PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch

from kernel_paths import kernels
from recur.ops import gated_kernels


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
    assert torch.autograd.gradcheck(lambda *a: gated_kernels.gla_decays(*a, before), args)
