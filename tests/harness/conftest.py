"""Harness tests: make the tiny task importable (also by the sweep's spawned workers) and registered."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import harness_tasks  # noqa: E402,F401 - registers harness_shift


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "runs.sqlite"
