"""Fixtures for the primitive tests."""

import pytest

from recur.ops import compiled


@pytest.fixture(params=["compiled", "torch"])
def kernel_path(request):
    """Run the test twice: with the compiled CPU kernels (numba) on, and off, so that the
    PyTorch paths (what CUDA runs) are held to the same references."""
    before = compiled.enabled()
    compiled.set_enabled(request.param == "compiled")
    yield request.param
    compiled.set_enabled(before)
