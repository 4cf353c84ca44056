"""Turning the compiled CPU kernels (recur.ops.compiled) on or off inside a test."""

from contextlib import contextmanager

from recur.ops import compiled


@contextmanager
def kernels(on: bool):
    """The compiled kernels on (the CPU default) or off (the PyTorch paths, which CUDA runs)
    inside the block; the previous setting is restored after."""
    before = compiled.enabled()
    compiled.set_enabled(on)
    try:
        yield
    finally:
        compiled.set_enabled(before)
