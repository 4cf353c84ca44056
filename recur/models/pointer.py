"""``pointer``: a pointer network over one token stream ``points SEP picks`` (Vinyals, Fortunato &
Jaitly, "Pointer Networks", 2015): the output at each decoder step is the attention distribution
over the input positions, so the answer is an index into the input, whatever its length.

    source = the positions of a document before its first SEP (the input points)
    x_t    = E tok_t + W_f f_t                at a source position or the SEP (the start symbol)
           = p     + W_f f_t                  at a later position holding a pick token j < max_points:
                                              one learned vector p, the point itself is in f_t
    e_j    = norm(Encoder(x)_j)               for the j-th source position (kept: the memory)
    d_t    = norm(Decoder(x)_t)               the decoder reads the whole stream, source included
    u_tj   = v^T tanh(W1 e_j + W2 d_t)        for j < the number of source positions so far
    logits_t = (u_t0, ..., u_t,P-1)           padded to P = max_points: slots without a source
                                              position are -inf; with ``mask_chosen`` the slots
                                              already picked in this document are -inf too

The stream convention (``recur/tasks/sort.py``): at decoder step k the token is the index picked at
step k - 1 (a token id < max_points, teacher forced) and the features are that point's, so the
target of step k is the next index and the token that follows it. Token ids are thus indices only
after the SEP; before it they mark slots (the tasks' POINT), and the points are their features
(``feature_dim`` > 0) or, with ``feature_dim=0``, the token embeddings themselves.

``mask_chosen``: "none" (the paper's training: no mask), "all" (every index at most once: sort, a
permutation) or "keep_first" (every index at most once, except the document's first pick, which
may come again: a convex hull closes back at its start). A target that the mask forbids has loss
inf, so "all" cannot train on a closed tour.

The state, so a call may end anywhere and the next continues exactly: ``State(encoder=, decoder=<Backbone
states>, memory=[batch, max_points, d_model], memory_len=int64 [batch], seen_sep=bool [batch],
chosen=bool [batch, max_points], n_chosen=int64 [batch], first=int64 [batch])``: the memory is the
source's encoder outputs, a fixed buffer grown as a KV cache (a source longer than ``max_points``
is an error); ``chosen``, ``n_chosen`` and ``first`` (the first pick, -1 before it) are the
document's picks so far. ``resets`` (packed documents) clear all of it.

``sep`` defaults to max_points + 1, the SEP of the pointer tasks' vocabulary (``PointerTask``).

Greedy decoding (``decode``) feeds back the picked point's features at each step: every step right
under teacher forcing is the greedy output, so the teacher-forced exact match is greedy's.

Deviations from the paper: the decoder is not initialised with the encoder's final state (a state
cannot pass between mixers of different kinds); it reads the points itself (it runs over the source
too, and the SEP does not reset it), which gives it the whole input before its first pick as the
paper's bridge does. No end-of-sequence slot (the paper's index 0 in some replications): the number
of steps is fixed by the task's layout (n for sort, h + 1 for a closed hull). Pre-norm Blocks of any
mixer (LSTM by default) rather than a bare LSTM; the reference code's uniform ±0.08 init is not used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.common import positive_int
from recur.layers.norms import build_norm
from recur.models.base import Architecture, ModelOutput, check_count, check_features, check_sizes, check_tokens
from recur.models.blocks import Backbone
from recur.models.loops import check_state_entries
from recur.models.seq2seq import stream_layout
from recur.registry import ARCHITECTURES
from recur.state import State

MASK_CHOSEN = ("none", "all", "keep_first")
STATE_KEYS = ("encoder", "decoder", "memory", "memory_len", "seen_sep", "chosen", "n_chosen", "first")


class PointerAttention(nn.Module):
    """The additive score of every query against every key: u = v^T tanh(W1 e + W2 d), [B, T, K]."""

    def __init__(self, d_model: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_model, bias=False)
        self.w2 = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, 1, bias=False)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self.v(torch.tanh(self.w1(keys)[:, None, :, :] + self.w2(queries)[:, :, None, :])).squeeze(-1)


def within_document_cumsum(x: torch.Tensor, start: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """The running sum of ``x`` ([B, T, ...], numeric) over each position's document in the call:
    from its start (``start`` int64 [B, T], the reset position) where ``fresh``, else from the call's
    first position."""
    cum = torch.cumsum(x, dim=1)
    excl = cum - x  # the sum strictly before each position
    idx = start.clamp(min=0).view(*start.shape, *([1] * (x.ndim - 2))).expand_as(x)
    before_start = excl.gather(1, idx)
    fresh = fresh.view(*fresh.shape, *([1] * (x.ndim - 2)))
    return torch.where(fresh, cum - before_start, cum)


@ARCHITECTURES.register("pointer", family="structured output",
                        paper="Vinyals, Fortunato & Jaitly, Pointer Networks (2015)")
class PointerNetwork(Architecture):
    """Encoder over the input points, decoder after SEP; each step's logits: its additive attention over the points.

    The pointer distribution is the output, padded to max_points (see the module docstring)."""

    autoregressive = False  # it predicts indices into its input, not next tokens: ``decode`` generates

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="lstm",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu", mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 sep: int | None = None, feature_dim: int = 0, max_points: int = 64, mask_chosen: str = "none",
                 decoder_pattern=None):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        check_sizes(d_model, mlp_ratio)
        self.max_points = positive_int("max_points", max_points, owner="pointer")
        if sep is None:  # the pointer tasks' layout: index tokens 0 .. max_points-1, then POINT, SEP, PAD
            sep = self.max_points + 1
            if sep >= vocab_size:
                raise ValueError(f"pointer needs the id of the token that ends the input points (sep=...); the "
                                 f"default, max_points + 1 = {sep} (the pointer tasks' SEP), is not below "
                                 f"vocab_size={vocab_size}: a task gives it (Task.separator), or "
                                 "--set model.args.sep=ID")
        if isinstance(sep, bool) or not isinstance(sep, int) or not 0 <= sep < vocab_size:
            raise ValueError(f"sep must be a token id in [0, {vocab_size}), got {sep!r}")
        check_count("feature_dim", feature_dim, 0)
        if mask_chosen not in MASK_CHOSEN:
            raise ValueError(f"pointer mask_chosen must be one of {', '.join(MASK_CHOSEN)}, got {mask_chosen!r}")
        self.vocab_size, self.sep, self.feature_dim, self.mask_chosen = vocab_size, sep, feature_dim, mask_chosen
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pick = nn.Parameter(torch.randn(d_model) * 0.02)  # the input at a decoder step (the point is in f)
        if feature_dim:
            self.features = nn.Linear(feature_dim, d_model)
        parts = dict(mixer_config=mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                     channel_options=channel_options)
        self.encoder = Backbone(d_model, n_layers, pattern, **parts)
        self.decoder = Backbone(d_model, n_layers, pattern if decoder_pattern is None else decoder_pattern, **parts)
        self.memory_norm = build_norm(norm, d_model)
        self.norm = build_norm(norm, d_model)
        self.attention = PointerAttention(d_model)

    # -- the protocol ------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def mixers(self):
        return self.encoder.mixers + self.decoder.mixers

    @property
    def segmentable(self) -> bool:
        return True  # per-position, causal logits: a sequence read in segments gives the same ones

    def set_mode(self, mode: str) -> None:
        self.encoder.set_mode(mode)
        self.decoder.set_mode(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        P, d = self.max_points, self.embed.embedding_dim
        return State({"encoder": self.encoder.init_state(batch_size, device=device, dtype=dtype),
                      "decoder": self.decoder.init_state(batch_size, device=device, dtype=dtype),
                      "memory": torch.zeros(batch_size, P, d, device=device, dtype=dtype),
                      "memory_len": torch.zeros(batch_size, dtype=torch.int64, device=device),
                      "seen_sep": torch.zeros(batch_size, dtype=torch.bool, device=device),
                      "chosen": torch.zeros(batch_size, P, dtype=torch.bool, device=device),
                      "n_chosen": torch.zeros(batch_size, dtype=torch.int64, device=device),
                      "first": torch.full((batch_size,), -1, dtype=torch.int64, device=device)})

    def state_size(self, seq_len: int) -> int:
        return (self.encoder.state_size(seq_len) + self.decoder.state_size(seq_len)
                + self.max_points * self.embed.embedding_dim)

    def _layout(self, tokens: torch.Tensor, seen_sep: torch.Tensor, resets: torch.Tensor | None):
        # the document layout (source before the first SEP, resets) is seq2seq's
        return stream_layout(tokens, self.sep, seen_sep, resets)

    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> ModelOutput:
        """``features`` float [batch, time, feature_dim]: the points (a model built with feature_dim > 0).
        ``resets`` bool [batch, time]: packed documents (each one's points and picks apart)."""
        check_tokens(tokens, self.vocab_size)
        check_features(features, tokens, self.feature_dim)
        check_state_entries(state, STATE_KEYS, "pointer", f"max_points={self.max_points}")
        B, T = tokens.shape
        P = self.max_points
        if state is None:
            state = self.init_state(B, device=tokens.device)
        if T == 0:
            return ModelOutput(torch.zeros(B, 0, P, device=tokens.device, dtype=self.dtype), state)
        dev = tokens.device
        doc, fresh, source, first_sep = self._layout(tokens, state["seen_sep"], resets)
        t = torch.arange(T, device=dev).expand(B, T)
        start = torch.zeros_like(t) if resets is None else \
            torch.where(resets, t, torch.full_like(t, -1)).cummax(dim=1).values
        picks = ~source & ~first_sep & (tokens < P) & (tokens != self.sep)  # a decoder step's previous index

        x = torch.where(picks[..., None], self.pick.expand(B, T, -1), self.embed(tokens))
        if features is not None:
            x = x + self.features(features.to(x.dtype))
        enc, enc_state = self.encoder(x, state["encoder"], resets=resets)
        enc = self.memory_norm(enc)
        dec, dec_state = self.decoder(x, state["decoder"], resets=resets)
        dec = self.norm(dec)

        # the slot of each source position: after the state's memory while its document continues it
        base = torch.where(fresh, 0, state["memory_len"][:, None])
        slot = base + within_document_cumsum(source.long(), start, fresh) - 1
        if bool((slot[source] >= P).any()):
            raise ValueError(f"pointer: a document of {int(slot[source].max()) + 1} input points exceeds "
                             f"max_points={P}; build the model with a larger max_points")
        slot = torch.where(source, slot, 0)

        # keys: the state's memory, then this call's encoder outputs; a query at t reads the memory
        # while its document continues the state's, and the source positions j <= t of its document
        old, old_len = state["memory"], state["memory_len"]
        keys = torch.cat([old, enc], dim=1)
        j = torch.arange(T, device=dev)
        in_call = source[:, None, :] & (j[None, None, :] <= j[None, :, None]) & (doc[:, None, :] == doc[:, :, None])
        in_memory = (torch.arange(P, device=dev)[None, None, :] < old_len[:, None, None]) & ~fresh[:, :, None]
        valid = torch.cat([in_memory, in_call], dim=2)  # [B, T, P + T]
        key_slot = torch.cat([torch.arange(P, device=dev).expand(B, P), slot], dim=1)
        onehot = F.one_hot(key_slot, P).to(x.dtype)  # [B, P + T, P]: which output slot each key fills
        scores = self.attention(dec, keys)  # [B, T, P + T]
        w = valid.to(x.dtype)
        logits = torch.einsum("btk,bkp->btp", scores * w, onehot)  # each slot has at most one valid key
        present = torch.einsum("btk,bkp->btp", w, onehot) > 0

        chosen, n_chosen, first = self._picks(tokens, picks, start, fresh, state)
        allowed = present
        if self.mask_chosen != "none":
            banned = chosen
            if self.mask_chosen == "keep_first":
                banned = banned & ~(F.one_hot(first.clamp(min=0), P).bool() & (first >= 0)[..., None])
            allowed = present & ~banned
        logits = logits.masked_fill(~allowed, float("-inf"))
        # nothing to point at (no point yet, or all picked): a uniform distribution, not NaN
        logits = torch.where(allowed.any(-1, keepdim=True), logits, torch.zeros_like(logits))

        memory, memory_len = self._next_memory(enc, source, slot, doc, fresh, state)
        last_doc = doc[:, -1:]
        restarted = fresh[:, -1]
        seen = (first_sep & (doc == last_doc)).any(dim=1)
        seen_sep = torch.where(restarted, seen, state["seen_sep"] | seen)
        new = State({"encoder": enc_state, "decoder": dec_state, "memory": memory, "memory_len": memory_len,
                     "seen_sep": seen_sep, "chosen": chosen[:, -1], "n_chosen": n_chosen[:, -1],
                     "first": first[:, -1]})
        return ModelOutput(logits, new)

    def _picks(self, tokens, picks, start, fresh, state):
        """Per position: the set of indices picked so far in its document (bool [B, T, P]), their
        number and the first of them (-1 before any)."""
        P = self.max_points
        hot = F.one_hot(torch.where(picks, tokens, 0), P).long() * picks[..., None].long()
        carried = ~fresh
        chosen = (within_document_cumsum(hot, start, fresh) > 0) | (state["chosen"][:, None, :] & carried[..., None])
        n = within_document_cumsum(picks.long(), start, fresh) + torch.where(carried, state["n_chosen"][:, None], 0)
        t = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        at = torch.where(picks & (n == 1), t, torch.full_like(t, -1)).cummax(dim=1).values
        in_doc = at >= start.clamp(min=0)  # the first pick lies in this position's document
        first_here = torch.where((at >= 0) & in_doc, tokens.gather(1, at.clamp(min=0)), -1)
        first = torch.where(carried & (state["n_chosen"][:, None] > 0), state["first"][:, None], first_here)
        return chosen, n, first

    def _next_memory(self, enc, source, slot, doc, fresh, state):
        """The memory after this call: the last document's source outputs, after the state's memory
        when that document continues it."""
        restarted = fresh[:, -1]
        mine = source & (doc == doc[:, -1:])
        memory_len = torch.where(restarted, 0, state["memory_len"]) + mine.sum(dim=1)
        memory = torch.where(restarted[:, None, None], torch.zeros_like(state["memory"]), state["memory"])
        rows, cols = mine.nonzero(as_tuple=True)
        return memory.index_put((rows, slot[rows, cols]), enc[rows, cols]), memory_len

    # -- greedy decoding -------------------------------------------------------------
    @torch.no_grad()
    def decode(self, prompt: torch.Tensor, steps: int, features: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding: ``prompt`` (int64 [batch, L], the points and the SEP, one document per row)
        read in one call, then ``steps`` decoder steps, each fed the index it picked as its token and
        that point's features. Returns the picked indices, int64 [batch, steps]."""
        steps = positive_int("steps", steps, owner="pointer.decode")
        check_tokens(prompt, self.vocab_size)
        check_features(features, prompt, self.feature_dim)
        if self.max_points > self.vocab_size:
            raise ValueError(f"pointer.decode feeds each picked index back as a token: max_points={self.max_points} "
                             f"must be <= vocab_size={self.vocab_size}")
        B = prompt.shape[0]
        logits, state = self(prompt, features=features)
        points = None
        if features is not None:  # the prompt's source features by slot
            source = self._layout(prompt, torch.zeros(B, dtype=torch.bool, device=prompt.device), None)[2]
            points = torch.zeros(B, self.max_points, self.feature_dim, dtype=features.dtype, device=features.device)
            rows, cols = source.nonzero(as_tuple=True)
            points[rows, torch.cumsum(source.long(), dim=1)[rows, cols] - 1] = features[rows, cols]
        out = []
        for _ in range(steps):
            index = logits[:, -1].argmax(-1)
            out.append(index)
            f = None if points is None else points[torch.arange(B), index][:, None]
            logits, state = self(index[:, None], state, features=f)
        return torch.stack(out, dim=1)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> PointerNetwork:
        # points embedded from tokens (no features: the suite feeds tokens alone); token 1 ends the
        # source, which the suite's random streams hold anywhere or not at all; every later token
        # other than SEP is a pick (all ids < max_points)
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", sep=1, max_points=24)


__all__ = ["MASK_CHOSEN", "PointerAttention", "PointerNetwork"]
