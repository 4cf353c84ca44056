"""The segment-level memory loop shared by the memory transformers (``rmt``, ``armt``; a base for
HMT, RATE, LCIRC and the like).

A segment model reads its tokens in segments of ``segment_len``. A *cell* (a causal transformer
over one segment and the memory) maps the segment's embeddings and the memory left by the
segments before it to the segment's hidden states and, once the segment is complete, the next
memory:

    h_s, m_s = cell(E x_s, m_{s-1}, write=True)      s = 1, 2, ...;   m_0 = the model's initial memory
    logits = W_head norm(h)

The recurrence runs over segments only: within a segment the cell starts its inner mixers from
their zero state (the segment is its own short sequence), so a token sees the memory and the
earlier tokens of its segment, and nothing of earlier segments but what the memory carries.

The (y, state) contract holds at the segment level (docs/design.md section 5): carrying the state
across calls equals one call on the concatenation, whatever the split. A call may end inside a
segment; the state then holds what the next call needs to resume exactly:

    State(memory=<the cell's memory>, pending=[batch, segment_len - 1, d_model], count=int64 [batch])

``pending`` holds the embeddings of the ``count`` tokens read so far of the unfinished segment
(zero-padded to a fixed size, so states of any phase have one shape and concatenate, index and
save like any State). The next call runs that segment again from its start with the new tokens
appended: the cell is causal, so the outputs already returned are unchanged, and the memory is
written only when a segment is complete. Streaming generation therefore holds one memory and at
most one segment of tokens, whatever the length (a step costs one partial segment's forward).

Rows at different phases (a packed batch, a state concatenated from others) run in groups of
equal phase; a packed batch (``resets``) runs its documents separately, batched where they have
equal lengths, so each is exactly its own run from the initial state.

Truncated BPTT (``bptt_segments=k``): within a call, gradient flows through the memory over the
last k segment transitions only; the memory entering every earlier segment is detached (a real
``detach``: the authors' ``framework_accel`` branch assigned it to a local and kept full BPTT).
None: full BPTT over the call (a state carried in from a previous call is the caller's to
detach, as for every recur model).

A subclass implements ``init_memory(batch_size, device, dtype) -> State`` and
``cell(e, memory, write) -> (h, new memory or None)``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from recur.layers import packing
from recur.layers.common import positive_int
from recur.models.base import Architecture, Generator, ModelOutput, check_positions, check_tokens
from recur.models.causal_lm import build_lm_layers
from recur.state import State


def check_bptt(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"bptt_segments must be None (full BPTT) or an int >= 0 (segment transitions the gradient "
                         f"crosses), got {value!r}")
    return value


class SegmentLM(Generator, Architecture):
    """Embedding -> segment loop of a memory cell over a Backbone -> norm -> head (see the module)."""

    autoregressive = True
    sparse_head = True

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 segment_len: int = 32, bptt_segments: int | None = None):
        super().__init__()
        self.d_model = d_model
        self.segment_len = positive_int("segment_len", segment_len)
        self.bptt_segments = check_bptt(bptt_segments)
        build_lm_layers(self, vocab_size, d_model, n_layers, pattern, mixer_config, mlp, mlp_ratio, tie_embeddings,
                        norm, channel_options, shared_blocks)

    # -- the cell (to implement) ------------------------------------------------
    @abstractmethod
    def init_memory(self, batch_size: int, device=None, dtype=None) -> State:
        """The memory the first segment reads."""

    @abstractmethod
    def cell(self, e: torch.Tensor, memory: State, write: bool) -> tuple[torch.Tensor, State | None]:
        """One segment: ``e`` [batch, n, d_model] (n <= segment_len) read with ``memory``. Returns the
        tokens' final hidden states [batch, n, d_model] (before the norm and head) and, with
        ``write`` (the segment is complete), the memory of the next segment; else None. The hidden
        state of a token may depend only on the memory and the tokens up to it."""

    # -- protocol -----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def mixers(self):
        return self.backbone.mixers

    def set_mode(self, mode: str) -> None:
        self.backbone.set_mode(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        pending = torch.zeros(batch_size, self.segment_len - 1, self.d_model, device=device, dtype=dtype)
        return State(memory=self.init_memory(batch_size, device=device, dtype=dtype), pending=pending,
                     count=torch.zeros(batch_size, dtype=torch.int64, device=device))

    def state_size(self, seq_len: int) -> int:
        """The memory plus the pending segment's buffer (segment_len - 1 embeddings): constant."""
        return self.init_state(1, device="meta").num_floats()

    def check_state(self, state: Any, batch_size: int, device) -> None:
        """``state`` has the entries, shapes, dtypes and device of ``init_state`` for this batch."""
        template = self.init_state(batch_size, device="meta")
        if not isinstance(state, State):
            raise ValueError(f"{self.name} state must be a recur.State (from init_state or a previous call), "
                             f"got {type(state).__name__}")
        _match(self.name, state, template, "", torch.device(device))
        count = state["count"]
        if bool(((count < 0) | (count >= self.segment_len)).any()):
            raise ValueError(f"{self.name} state entry 'count' (tokens read of the pending segment) must lie in "
                             f"[0, segment_len={self.segment_len}), got {count.tolist()}")

    # -- forward ------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> ModelOutput:
        """``resets`` bool [batch, time]: True where a packed document starts (from there the row
        runs from the initial state). ``positions`` bool [batch, time]: the head only there.

        Tokens are embedded and the head applied segment by segment, so without autograd a call
        holds one segment's activations whatever its length (and the logits it returns)."""
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B, device=tokens.device)
        else:
            self.check_state(state, B, tokens.device)
        if resets is not None:
            resets = packing.check_resets(resets, tokens, self.name)
            if not bool(resets.any()):
                resets = None
        if T == 0:
            h = self.embed(tokens)
            return ModelOutput(self.head(self.norm(h if positions is None else h[positions])), state,
                               positions=positions)
        count = state["count"]
        if resets is None and bool((count == count[0]).all()):  # every row at the same phase
            pieces, state = self.segments(tokens, state, int(count[0]), self._emitter(positions, None, None, T))
            if positions is None:
                return ModelOutput(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0], state)
            return _sorted(pieces, positions, state)
        # Jobs (row, start, end, fresh): the documents of each row (one per row without resets),
        # run in groups of equal phase and length; a fresh job starts from the initial state, the
        # others from the row's given state.
        jobs = []
        for r in range(B):
            cuts = [0, *(() if resets is None else resets[r, 1:].nonzero().flatten().add(1).tolist()), T]
            for a, b in zip(cuts[:-1], cuts[1:]):
                jobs.append((r, a, b, resets is not None and bool(resets[r, a])))
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (r, a, b, fresh) in enumerate(jobs):
            groups.setdefault((0 if fresh else int(count[r]), b - a), []).append(i)
        outs: list[torch.Tensor | None] = [None] * len(jobs)
        final: list[State | None] = [None] * B
        picked = []
        fresh_state = self.init_state(1, device=tokens.device)
        for (c, _), members in groups.items():
            rows = torch.tensor([jobs[i][0] for i in members], device=tokens.device)
            offsets = torch.tensor([jobs[i][1] for i in members], device=tokens.device)
            starts = State.cat([fresh_state if jobs[i][3] else state.select(jobs[i][0]) for i in members])
            x = torch.stack([tokens[r, a:b] for r, a, b, _ in (jobs[i] for i in members)])
            pieces, out = self.segments(x, starts, c, self._emitter(positions, rows, offsets, T))
            if positions is None:
                logits = torch.cat(pieces, dim=1)
                for k, i in enumerate(members):
                    outs[i] = logits[k]
            else:
                picked += pieces
            for k, i in enumerate(members):
                if jobs[i][2] == T:
                    final[jobs[i][0]] = out.select(k)
        state = State.cat(final)
        if positions is not None:
            return _sorted(picked, positions, state)
        return ModelOutput(torch.stack([torch.cat([outs[i] for i, job in enumerate(jobs) if job[0] == r])
                                        for r in range(B)]), state)

    def _emitter(self, positions, rows, offsets, T: int):
        """The head on a piece of hidden states ``h`` [n, m, d] at tokens [t0, t1) of a group whose
        rows are ``rows`` starting at call positions ``offsets`` (None: every row, from 0). With
        ``positions``: (logits at the picked positions, their flat indices row * T + t)."""
        def emit(h, t0, t1):
            if positions is None:
                return self.head(self.norm(h))
            times = torch.arange(t0, t1, device=h.device)
            if rows is None:
                sel, flat = positions[:, t0:t1], torch.arange(h.shape[0], device=h.device)[:, None] * T + times
            else:
                times = offsets[:, None] + times
                sel, flat = positions[rows[:, None], times], rows[:, None] * T + times
            return self.head(self.norm(h[sel])), flat[sel]
        return emit

    def segments(self, x: torch.Tensor, state: State, c: int, emit) -> tuple[list, State]:
        """Every row ``c`` tokens into its pending segment: run the pending segment and those after
        it over the tokens ``x`` [n, T]. ``emit(h, t0, t1)`` receives the hidden states of tokens
        [t0, t1) of each piece; returns (what emit returned, per piece; the new state)."""
        L = self.segment_len
        memory, pending = state["memory"], state["pending"]
        S = c + x.shape[1]
        starts = range(0, S, L)
        k = self.bptt_segments
        results = []
        for j, a in enumerate(starts):
            if j and k is not None and j < len(starts) - k:
                memory = memory.detach()  # the gradient crosses only the last k transitions
            b = min(a + L, S)
            e = self.embed(x[:, max(a - c, 0):b - c])
            if a < c:  # the first piece runs the pending tokens again
                e = torch.cat([pending[:, a:c], e], dim=1)
            h, written = self.cell(e, memory, b - a == L)
            if b - a == L:
                memory = written
            lo = max(c - a, 0)
            results.append(emit(h[:, lo:], a + lo - c, b - c))
        r = S % L
        pending = F.pad(e[:, :r], (0, 0, 0, L - 1 - r))  # the last piece, when it is incomplete
        count = torch.full((x.shape[0],), r, dtype=torch.int64, device=x.device)
        return results, State(memory=memory, pending=pending, count=count)


def _sorted(picked: list, positions: torch.Tensor, state: State) -> ModelOutput:
    """The picked rows of every piece in row-major order (``ModelOutput.positions``)."""
    logits, flat = torch.cat([p[0] for p in picked]), torch.cat([p[1] for p in picked])
    return ModelOutput(logits[flat.argsort()], state, positions=positions)


def _match(name: str, state: State, template: State, prefix: str, device: torch.device) -> None:
    if set(state) != set(template):
        where = f" entry {prefix[:-1]!r}" if prefix else ""
        raise ValueError(f"{name} state{where} must have entries {sorted(template)} (from init_state or a previous "
                         f"call), got {sorted(state)}")
    for key, want in template.items():
        got, label = state[key], prefix + key
        if isinstance(want, State):
            if not isinstance(got, State):
                raise ValueError(f"{name} state entry {label!r} must be a State, got {type(got).__name__}")
            _match(name, got, want, label + ".", device)
            continue
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape):
            raise ValueError(f"{name} state entry {label!r} must have shape {tuple(want.shape)}, got "
                             f"{tuple(getattr(got, 'shape', ())) or type(got).__name__}")
        if got.dtype != want.dtype:
            raise TypeError(f"{name} state entry {label!r} must have dtype {want.dtype}, got {got.dtype}")
        if got.device.type != device.type:
            raise ValueError(f"{name} state entry {label!r} is on {got.device}, the tokens are on {device}")


__all__ = ["SegmentLM", "check_bptt"]
