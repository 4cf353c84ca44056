"""Fixtures for the primitive tests."""

import pytest
from kernel_paths import kernels


@pytest.fixture(params=["compiled", "torch"])
def kernel_path(request):
    """Run the test twice: with the compiled CPU kernels (numba) on, and off, so that the
    PyTorch paths (what CUDA runs) are held to the same references."""
    with kernels(request.param == "compiled"):
        yield request.param
