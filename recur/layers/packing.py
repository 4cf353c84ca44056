"""Packed sequences: several documents in one batch row, separated by resets.

    y, state = mixer(x, state, resets=mask)     # mask: bool [batch, time], True where a document starts

``resets[b, t]`` True means: before token t of row b, the state is replaced by the initial state
(``init_state``), so the output from t on is what the mixer gives on that document alone, from
the zero state. A packed batch is therefore exactly a batch of separate documents laid end to
end, forward and backward, in every mode; the state returned is the state after the last
document of each row (with a reset at t = 0, the given state is dropped).

A ``[batch, time]`` mask, rather than FlashAttention's ``cu_seqlens`` offsets, because recur's
contract is batch-first and stateful: a row's state must be carried into the next call, which a
flat varlen layout (documents concatenated across rows) cannot express, and a mask of one call
splits into the masks of two calls by slicing, so state carry and packing compose.

Every mixer gets packing from the base class (``Mixer.forward``): the generic path below cuts
the time axis at every position where some row starts a document, runs the mixer on each piece
with the carried state, and swaps in the initial state for the rows that start a document there
(``reset_rows``). It is exact for any mixer that obeys the state-carry contract; its cost is one
call per distinct boundary position in the batch. Mixers with a cheaper exact form set
``native_packing`` and take ``resets`` in ``_forward``: a linear recurrence sets its decay to zero (log decay -inf) at a
reset, attention masks keys outside the query's document (block-diagonal causal mask), a token
shift or short convolution zeroes the inputs from before the document.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from recur.state import State


def check_resets(resets, x: torch.Tensor, name: str) -> torch.Tensor:
    """``resets`` as a bool tensor [batch, time] on x's device, or a clear error."""
    B, T = x.shape[0], x.shape[1]
    if not isinstance(resets, torch.Tensor):
        raise TypeError(f"{name}: resets must be a bool tensor [batch={B}, time={T}] (True where a document "
                        f"starts), got {type(resets).__name__}")
    if resets.dtype != torch.bool:
        raise TypeError(f"{name}: resets must have dtype torch.bool (True where a document starts), got {resets.dtype}")
    if tuple(resets.shape) != (B, T):
        raise ValueError(f"{name}: resets must have shape [batch, time]={(B, T)}, got {tuple(resets.shape)}")
    if resets.device.type != x.device.type:
        raise ValueError(f"{name}: resets is on {resets.device}, x is on {x.device}")
    return resets


def reset_rows(state: State, initial: State, rows: torch.Tensor) -> State:
    """The state with the rows where ``rows`` [batch] is True replaced by ``initial``'s.

    Entry shapes must agree: a state whose entries grow with the sequence (a KV cache) cannot
    swap rows this way and needs its own packed form."""
    def swap(current, fresh, key: str):
        if isinstance(current, State):
            return State({k: swap(current[k], fresh[k], f"{key}.{k}") for k in current})
        if current.shape != fresh.shape:
            raise ValueError(f"cannot reset state entry {key!r} row by row: its shape {tuple(current.shape)} differs "
                             f"from the initial state's {tuple(fresh.shape)} (a growing cache needs a packed form)")
        mask = rows.view(-1, *([1] * (current.ndim - 1)))
        return torch.where(mask, fresh.to(current.dtype), current)

    return State({k: swap(state[k], initial[k], k) for k in state})


def boundaries(resets: torch.Tensor) -> list[int]:
    """The positions t > 0 at which some row starts a document (sorted)."""
    any_row = resets.any(dim=0)
    any_row[0] = False
    return any_row.nonzero().flatten().tolist()


def run_segments(step: Callable[[torch.Tensor, State], tuple[torch.Tensor, State]],
                 reset: Callable[[State, torch.Tensor], State], x: torch.Tensor, state: State,
                 resets: torch.Tensor) -> tuple[torch.Tensor, State]:
    """The generic packed forward: ``step(x_piece, state)`` on the pieces between boundaries, with
    the rows that start a document at a piece's first position reset by ``reset(state, rows)``."""
    cuts = [0, *boundaries(resets), x.shape[1]]
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        rows = resets[:, a]
        if bool(rows.any()):
            state = reset(state, rows)
        y, state = step(x[:, a:b], state)
        outs.append(y)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), state


def hard_reset(log_decay: torch.Tensor | None, resets: torch.Tensor | None, time_dim: int,
               like: torch.Tensor | None = None) -> torch.Tensor | None:
    """A log decay of -inf (decay 0) at every reset: a linear recurrence h_t = a_t h_{t-1} + b_t then
    forgets everything before the document exactly, in every mode of the primitives.

    ``log_decay``: the primitive's log decay with time at ``time_dim`` and the batch first (None:
    no decay, given as zeros shaped like ``like`` without its last dimension, i.e. one per head);
    ``resets``: bool [batch, time] or None (returned unchanged)."""
    if resets is None:
        return log_decay
    if log_decay is None:
        log_decay = like.new_zeros(like.shape[:-1])
    shape = [1] * log_decay.ndim
    shape[0], shape[time_dim] = resets.shape
    return log_decay.masked_fill(resets.view(shape), float("-inf"))


def document_start(resets: torch.Tensor, positions: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Per query, the absolute position where its document starts: [batch, time] int64.

    positions: absolute positions of the queries [batch, time]; start: [batch], the start of the
    document in progress before this call (0 when none was ever reset)."""
    marked = torch.where(resets, positions, torch.full_like(positions, -1))
    return torch.maximum(marked.cummax(dim=1).values, start[:, None])


__all__ = ["boundaries", "check_resets", "document_start", "hard_reset", "reset_rows", "run_segments"]
