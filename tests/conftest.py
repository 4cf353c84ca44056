"""Test-session settings. The suite's tensors are tiny (d_model=16): one intra-op thread is
faster for them than two, and keeps the suite from oversubscribing a 2-core machine (torch's
threaded kernels on [1, 2, 64, 16] tensors cost milliseconds per step under contention)."""

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# The harness's tiny task is importable by name (also in a sweep's spawned workers, which get this
# sys.path) and registered for every test.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness_tasks  # noqa: E402,F401 - registers harness_shift

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one thread, whatever the previous test in this worker set: two
    threads per worker on a 2-core machine under xdist made later tests up to 30x slower (``recur.speed.run``
    used to leave torch at two threads)."""
    torch.set_num_threads(1)
    yield


# Property tests draw the same examples on every run: a CI failure is reproducible, never luck.
settings.register_profile("recur", derandomize=True, print_blob=True)
settings.load_profile("recur")


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "runs.sqlite"
