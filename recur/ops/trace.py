"""Recording the primitive calls a forward pass makes (for ``recur.analysis``).

Each primitive that is linear in one argument given the others (the values of the matrix-state
and delta-rule recurrences, the inputs b of the diagonal scan, the values of attention) calls
``record`` with its function, its arguments, the name of that linear argument and of its
initial-state argument, and its output. Outside a ``recording()`` block ``record`` costs one
context-variable lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Call:
    fn: Callable[..., Any]
    kwargs: dict[str, Any]  # every argument by name
    linear_in: str  # the argument the output is linear in, given the others
    state_arg: str | None  # the initial-state argument (its contribution is affine, not linear)
    output: torch.Tensor  # the per-step output (not the final state)
    # "heads": the linear argument is [batch, heads, time, d] (matrix-state, delta rule, attention);
    # "channels": it is [batch, time, *channels] (diagonal scans), and ``batched`` names the
    # arguments with a leading batch dimension.
    layout: str = "heads"
    batched: tuple[str, ...] = ()


_CALLS: ContextVar[list[Call] | None] = ContextVar("recur_ops_trace", default=None)


@contextmanager
def recording() -> Iterator[list[Call]]:
    """Collect every primitive call made inside the block, in order."""
    calls: list[Call] = []
    token = _CALLS.set(calls)
    try:
        yield calls
    finally:
        _CALLS.reset(token)


@contextmanager
def paused() -> Iterator[None]:
    """Record nothing inside the block (the analysis re-runs primitives)."""
    token = _CALLS.set(None)
    try:
        yield
    finally:
        _CALLS.reset(token)


def active() -> bool:
    return _CALLS.get() is not None


def record(fn: Callable[..., Any], kwargs: dict[str, Any], linear_in: str, state_arg: str | None,
           output: torch.Tensor, layout: str = "heads", batched: tuple[str, ...] = ()) -> None:
    calls = _CALLS.get()
    if calls is not None:
        calls.append(Call(fn, dict(kwargs), linear_in, state_arg, output, layout, tuple(batched)))
