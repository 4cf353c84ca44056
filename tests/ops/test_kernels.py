"""The helpers the compiled kernels share (recur.ops.kernels): numba is there, and the work partition."""

from __future__ import annotations

from recur.ops import kernels


def test_numba_is_installed():
    """numba is a dependency: without it these tests would only exercise the PyTorch path."""
    assert kernels.numba is not None


def test_block_sizes():
    import numba
    numba.set_num_threads(2)
    try:
        assert kernels._block(8, 1024) == 1024  # enough rows: whole rows
        assert kernels._block(1, 1024) == 512  # one row, two threads: two runs
        assert kernels._block(1, 40) == 32  # runs are multiples of 16 ...
        assert kernels._block(1, 1024, cap=256) == 256  # ... and at most the cap
    finally:
        numba.set_num_threads(1)

