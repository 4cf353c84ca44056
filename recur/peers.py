"""Peer implementations that ``recur speed`` measures against.

flash-linear-attention ships pure-PyTorch reference forms (``fla/ops/<family>/naive.py``) beside
its Triton kernels. The kernels need a GPU, and importing the ``fla`` package imports Triton, so
the naive files are loaded on their own from the installed ``fla-core`` distribution (they
import only torch and einops). Install them with ``pip install -e .[bench]``.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Callable

FLA_NAIVE = {
    # peer name: (file under fla/ops, function)
    "fla_naive_recurrent_gla": ("gla/naive.py", "naive_recurrent_gla"),
    "fla_naive_retention": ("retention/naive.py", "naive_retention"),
    "fla_delta_rule_recurrence": ("delta_rule/naive.py", "delta_rule_recurrence"),
    "fla_naive_recurrent_gated_delta_rule": ("gated_delta_rule/naive.py", "naive_recurrent_gated_delta_rule"),
}


@cache
def _fla_root() -> Path | None:
    spec = importlib.util.find_spec("fla")  # finds the package without importing it (no Triton)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def _load(relative: str) -> ModuleType | None:
    root = _fla_root()
    if root is None or not (root / "ops" / relative).is_file():
        return None
    name = "_recur_peer_fla_" + relative.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, root / "ops" / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fla_naive(peer: str) -> Callable | None:
    """The named naive function from flash-linear-attention, or None if fla-core is not installed."""
    relative, function = FLA_NAIVE[peer]
    module = _load(relative)
    return None if module is None else getattr(module, function, None)


def fla_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("fla-core")
    except Exception:  # noqa: BLE001 - not installed
        return None
