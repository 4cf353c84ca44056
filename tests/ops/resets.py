"""Resets in log decays for the primitive tests: log a = -inf (decay 0: the state is dropped, as
at a document boundary of a packed sequence) and very strong finite decays (-1e4, -1e30), whose
exp is also exactly 0. The reference loops handle them by construction; the chunk and parallel
forms must give the same outputs and gradients, with no NaN (see recur.ops.scan, "Resets")."""

from __future__ import annotations

import math

import torch

# the values a reset takes: exp of each is exactly 0 in float32 and float64
RESET_VALUES = (-math.inf, -1e30, -1e4)


def with_resets(log_a: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """log_a with about a fraction p of its entries made resets (-inf mostly, some -1e4 or -1e30)."""
    u = torch.rand(log_a.shape, generator=generator, dtype=torch.float64)
    out = log_a.clone()
    out[u < p] = -math.inf
    out[(u < 0.25 * p)] = -1e30
    out[(u < 0.1 * p)] = -1e4
    return out


def reset_steps(pattern: str, T: int, chunk_size: int) -> list[int]:
    """The steps (along time) that ``pattern`` makes resets, for a sequence of T steps."""
    C = chunk_size
    steps = {
        "first": [0],
        "last": [T - 1],
        "chunk_edge": [C - 1, C],  # the last step of a chunk and the first of the next
        "several_in_one_chunk": [1, 3, 6],
        "consecutive": [C - 2, C - 1, C, C + 1],
        "all": list(range(T)),
        "every_other": list(range(0, T, 2)),
    }[pattern]
    return [t for t in steps if 0 <= t < T]


RESET_PATTERNS = ("first", "last", "chunk_edge", "several_in_one_chunk", "consecutive", "all", "every_other")


def place_resets(log_a: torch.Tensor, steps: list[int], time_dim: int, value: float = -math.inf) -> torch.Tensor:
    """log_a with every entry at the given time steps set to ``value`` (a reset)."""
    out = log_a.clone()
    index = [slice(None)] * out.ndim
    for t in steps:
        index[time_dim] = t
        out[tuple(index)] = value
    return out
