"""Turning the compiled CPU kernels (recur.ops.kernels' switch) on or off inside a test."""

from contextlib import contextmanager

from recur.ops.kernels import enabled, set_enabled


@contextmanager
def kernels(on: bool):
    """The compiled kernels on (the CPU default) or off (the PyTorch paths, which CUDA runs)
    inside the block; the previous setting is restored after."""
    before = enabled()
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(before)
