"""Every registered mixer under ``torch.compile`` (default backend, inductor) equals eager mode.

While dynamo traces, the numba kernels step aside (``recur.ops.kernels.enabled``) and the
PyTorch twins run, so a compiled graph has no opaque call; data-dependent branches (a chunk
form choosing its numerics from the decays' size) are graph breaks, which are allowed. Slow:
inductor compiles each mixer for tens of seconds on 2 cores (run with ``-m slow``); the default
run compiles two (a chunked matrix-state recurrence, a scanned diagonal one).
"""

from __future__ import annotations

import pytest
import torch

from test_conformance import D, MODELS, make, randn

RTOL, ATOL = 1e-4, 1e-5  # float32: inductor reorders and fuses the arithmetic
T = 9  # short: a nonlinear cell's loop is unrolled into the graph


def check_compiled_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    mixer = make(name, torch.float32)
    x = randn(2, T, D, dtype=torch.float32, seed=31)
    _, state = mixer(randn(2, 4, D, dtype=torch.float32, seed=32))
    for mode in mixer.modes:
        mixer.mode = mode
        compiled = torch.compile(mixer)
        for given in (None, state):
            y, s = mixer(x, given)
            yc, sc = compiled(x, given)
            torch.testing.assert_close(yc, y, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} mode {mode}: {m}")
            for (key, a), (_, b) in zip(sc.tensors(), s.tensors()):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name} mode {mode}, state {key}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_every_mixer_compiles_and_equals_eager(name):
    check_compiled_equals_eager(name)


@pytest.mark.parametrize("name", ["gla", "mingru"])
def test_a_chunked_and_a_scanned_mixer_compile(name):
    check_compiled_equals_eager(name)
