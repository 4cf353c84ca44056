"""Per-iteration state of the depth-recurrent architectures (looped_lm, universal_transformer, ...).

A block applied n times over the sequence is n causal passes, each with its own mixer memory: the
state holds one Backbone state per iteration, under ``{prefix}{i}`` (``loop0``, ``step3``, ...), so
carrying it across calls equals one call on the concatenation and stepping streams. These helpers
build that layout and check a state handed back against it, one way for every architecture.
"""

from __future__ import annotations

from typing import Any

from recur.state import State


def iteration_keys(prefix: str, n: int, start: int = 0) -> list[str]:
    """``[f"{prefix}{start}", ..., f"{prefix}{n - 1}"]``: the state entries of iterations start..n-1."""
    return [f"{prefix}{i}" for i in range(start, n)]


def iteration_states(backbone, keys: list[str], batch_size: int, device=None, dtype=None) -> dict[str, State]:
    """A zero Backbone state per iteration key (each iteration has its own memory)."""
    return {key: backbone.init_state(batch_size, device=device, dtype=dtype) for key in keys}


def check_state_entries(state: Any, keys, owner: str, hint: str = "") -> None:
    """``state`` must be None or a State with exactly the entries ``keys``; else a ValueError naming
    the architecture, the entries it wants (``hint``: what fixes their number, e.g. "n_loops=3") and
    what it got."""
    if state is None:
        return
    want = set(keys)
    if isinstance(state, State) and set(state) == want:
        return
    got = sorted(state) if isinstance(state, State) else type(state).__name__
    where = f" ({hint}; from init_state or a previous call)" if hint else " (from init_state or a previous call)"
    raise ValueError(f"{owner} state must be a State with entries {', '.join(sorted(want, key=_natural))}{where}, "
                     f"got {got}")


def _natural(key: str) -> tuple[str, int]:
    """Sort ``loop10`` after ``loop9``."""
    stem = key.rstrip("0123456789")
    return stem, int(key[len(stem):] or -1)
