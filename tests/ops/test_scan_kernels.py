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
from recur.ops import scan_kernels
from recur.ops.scan import diagonal_scan
from test_scan import DECAYS, FORMS, assert_same, make_inputs, run


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
    real = scan_kernels.scan
    monkeypatch.setattr(scan_kernels, "scan", lambda *a: calls.append(1) or real(*a))
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
    channels into runs (recur.ops.kernels._block); the runs must join up exactly."""
    torch.set_num_threads(2)  # the autouse fixture restores one thread for the next test
    args = make_inputs(B, 33, dims, "full", "typical", True, False, True, seed=5)
    with kernels(True):
        assert_same(run(diagonal_scan, args, mode="chunk"), run(diagonal_scan, args, mode="reference"))


def test_decays_shared_along_trailing_dims_take_the_grouped_kernels(monkeypatch):
    """A decay per row of a matrix state ([B, T, d_k, 1] against [B, T, d_k, d_v]) is read per
    group, never expanded: the grouped kernels run, and equal the reference (forward and backward)."""
    calls = []
    for name in ("_forward_grouped", "_backward_grouped"):
        real = getattr(scan_kernels, name)
        monkeypatch.setattr(scan_kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    args = make_inputs(2, 37, [5, 19], "per_key", "typical", False, False, True, seed=11)
    with kernels(True):
        assert_same(run(diagonal_scan, args, mode="chunk"), run(diagonal_scan, args, mode="reference"))
    assert calls == ["_forward_grouped", "_backward_grouped"]

