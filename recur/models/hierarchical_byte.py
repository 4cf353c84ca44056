"""``hierarchical_byte``: a byte encoder per word, a word-level backbone, a byte decoder per word
(Neitemeier et al., "Hierarchical Autoregressive Transformers: Combining Byte- and Word-Level
Processing for Robust, Adaptable Language Models", 2025; the byte-to-word encoder of Byte2Word,
"Word-Level Representation From Bytes For Language Modeling", 2023).

    lm = HierarchicalByte(vocab_size=257, d_model=128, n_layers=4, pattern="gla", byte_d_model=64)
    logits, state = lm(bytes_)            # logits[:, t] predict byte t+1 from bytes <= t

**Words.** A word is the bytes up to and including a boundary byte (``boundary``: an id or a list
of ids, default 32, the space): ``"the  cat"`` is ``["the ", " ", "cat"]`` (a run of spaces makes
one-byte words; the last word is unfinished until its space arrives). A document start (``resets``,
or the first byte after ``init_state``) also starts a word: the unfinished word of the previous
document is dropped, and a BOS byte (the text task's 256) is an ordinary byte of the first word.
``split_words`` is this splitter on a plain list of ids.

**The recurrence**, for word k made of bytes x_a .. x_b (x_b a boundary):

    e_k = W_e norm(Enc(E_enc x_a .. E_enc x_b))[b]        causal encoder, restarted at every word start
    g   = Word([s, e_0, e_1, ...])                         word backbone; s: a learned start vector
                                                           read at every document start
    u_t = E_dec x_t + [t starts a decoder segment] W_u norm(g_latest(t))
    logits_t = head(norm(Dec(u)_t))                        decoder restarted at each segment start

A decoder segment starts at each boundary byte x_b (its input carries g after e_k, the word just
finished, which predicts the next word's first byte) and at each document start (carrying g
after s). So byte t+1 is predicted from the word backbone's output over the *previous* words only
(those finished at or before t) plus, through the decoder, the bytes of the current word up to t:
the paper's shift, where the decoder of word k+1 reads [g_k, bytes of word k+1].

**Deviations from the paper.** Encoder, word backbone and decoder are causal Backbones of any
registered mixer instead of Transformers; the word vector is the encoder's output at the word's
last byte (the boundary), not at a prepended [W] token read bidirectionally, so that a word is
encoded as its bytes stream in (the state holds the encoder's memory of the unfinished word, not
its bytes). The word vector is added to the decoder's first input (the boundary byte's
embedding) instead of being prepended as an extra position, so that every byte position has one
decoder position. Long words are not split (the paper caps word length).

**State.** ``enc`` (the unfinished word in the encoder), ``word`` (the word backbone), ``dec`` (the
decoder within the current segment), ``new_doc`` (bool: the next byte starts a document) and
``after_end`` (bool: the last byte was a boundary). A call may end anywhere in a word.

**Batching the word backbone.** Rows of a batch finish different numbers of words in a call, and a
mixer cannot skip a step, so the word backbone runs once per group of rows with the same count
(``run_events``) and the groups' states are joined again (``join_states``). That join needs each
word-level mixer's state to have a fixed size (gla, mamba2, lstm, ...) or to be full attention's
KV cache, which is padded in front with masked keys; a sliding window's cache (swa) is refused
there. The byte encoder and decoder read every byte and take any mixer. With attention in the
word backbone ``state_size`` is an upper bound: the cache grows with the words read, which the
byte count does not fix (it counts 2 steps per byte, a document start and a word end).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.layers.norms import build_norm
from recur.models.base import (Architecture, Generator, ModelOutput, check_count, check_positions, check_sizes,
                               check_tokens)
from recur.models.blocks import Backbone, check_mixer_config
from recur.models.loops import check_state_entries
from recur.registry import ARCHITECTURES
from recur.state import State


def split_words(ids: Sequence[int], boundary: int | Sequence[int] = 32) -> list[list[int]]:
    """The splitter of ``hierarchical_byte`` on one document: each word ends with (and includes) a
    boundary id; the last word may be unfinished (no boundary)."""
    ends = {boundary} if isinstance(boundary, int) else set(boundary)
    words, word = [], []
    for i in ids:
        word.append(i)
        if i in ends:
            words.append(word)
            word = []
    if word:
        words.append(word)
    return words


def _full_attention(mixer) -> bool:
    from recur.layers.attention import Attention

    return type(mixer) is Attention


def check_unit_backbone(backbone: Backbone, what: str) -> None:
    """``run_events`` joins per-group states: every mixer's state must have a fixed size, or be full
    attention's KV cache (which ``join_states`` pads)."""
    grown = [name for name, m in zip(backbone.layer_names, backbone.mixers)
             if m.state_size(1) != m.state_size(64) and not _full_attention(m)]
    if grown:
        raise ValueError(f"{what} must use mixers with a fixed-size state or full attention (its rows read "
                         f"different numbers of units per call, so their states are run in groups and joined); "
                         f"{sorted(set(grown))} hold a cache that grows with the steps read: use e.g. attention, "
                         f"gla, mamba2 or lstm there")


def join_states(backbone: Backbone, states: list[State]) -> State:
    """``State.cat`` of per-group Backbone states, after padding full attention's KV caches to one
    length: a row's cache gets p zero keys in front and its position and document start move on
    by p, so the zeros lie before its document (masked, as an earlier document's keys are) and
    rotary positions, counted from the document start, are unchanged. (Full attention caches
    every key read, so the cache length equals ``pos``; that stays true after padding.)"""
    attention = [i for i, m in enumerate(backbone.mixers) if _full_attention(m)]
    if not attention or len(states) == 1:
        return State.cat(states)
    padded = list(states)
    for i in attention:
        key = f"layer{i}"
        n = max(s[key]["k"].shape[2] for s in padded)
        for g, s in enumerate(padded):
            a = s[key]
            p = n - a["k"].shape[2]
            if p:
                pad = a["k"].new_zeros(a["k"].shape[0], a["k"].shape[1], p, a["k"].shape[3])
                a = a.replace(pos=a["pos"] + p, start=a["start"] + p, k=torch.cat([pad, a["k"]], dim=2),
                              v=torch.cat([pad, a["v"]], dim=2))
                padded[g] = s.replace(**{key: a})
    return State.cat(padded)


def document_starts(tokens: torch.Tensor, resets: torch.Tensor | None, new_doc: torch.Tensor) -> torch.Tensor:
    """bool [batch, time]: True where a document starts (``resets``, or the first byte after a fresh state)."""
    if resets is not None and (not isinstance(resets, torch.Tensor) or resets.shape != tokens.shape):
        raise ValueError(f"resets must be a bool tensor of the tokens' shape {tuple(tokens.shape)}, got "
                         f"{tuple(getattr(resets, 'shape', ()))}")
    doc = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device) if resets is None else resets.bool().clone()
    doc[:, 0] |= new_doc
    return doc


def run_events(backbone: Backbone, inputs: torch.Tensor, mask: torch.Tensor, resets: torch.Tensor,
               state: State) -> tuple[torch.Tensor, torch.Tensor, State]:
    """The unit-level backbone over each row's events in order: ``inputs`` [batch, n, d] with
    ``mask`` bool [batch, n] (which of the n slots are events) and ``resets`` bool [batch, n].
    Returns (outputs [batch, K, d] with row b's events first, then zeros; the events' count per row;
    the new state). Rows are grouped by their count of events (a mixer cannot skip a step)."""
    B, _, d = inputs.shape
    counts = mask.sum(1)
    K = int(counts.max()) if counts.numel() else 0
    if K == 0:
        return inputs.new_zeros(B, 0, d), counts, state
    rows, slots = mask.nonzero(as_tuple=True)
    rank = (mask.cumsum(1) - 1)[rows, slots]
    packed = inputs.new_zeros(B, K, d).index_put((rows, rank), inputs[rows, slots])
    packed_resets = torch.zeros(B, K, dtype=torch.bool, device=mask.device).index_put((rows, rank), resets[rows, slots])
    values = counts.unique()
    if values.numel() == 1:  # every row read K events: one call
        out, state = backbone(packed, state, resets=packed_resets)
        return out, counts, state
    order, outs, states = [], [], []
    for k in values.tolist():
        idx = (counts == k).nonzero(as_tuple=True)[0]
        sub = state.select(idx)
        if k == 0:
            out = inputs.new_zeros(len(idx), K, d)
        else:
            out, sub = backbone(packed[idx, :k], sub, resets=packed_resets[idx, :k])
            out = torch.cat([out, out.new_zeros(len(idx), K - k, d)], dim=1)
        order.append(idx)
        outs.append(out)
        states.append(sub)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(outs)[inverse], counts, join_states(backbone, states).select(inverse)


def latest_event(out: torch.Tensor, per_position: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """[batch, time, d]: at each position the output of the latest event at or before it
    (``per_position`` int [batch, time]: events at each position); ``fallback`` [batch, d] before any."""
    cum = per_position.cumsum(1)
    idx = (cum - 1).clamp(min=0)
    picked = torch.gather(out, 1, idx[..., None].expand(-1, -1, out.shape[-1])) if out.shape[1] else \
        fallback[:, None].expand(-1, cum.shape[1], -1)
    return torch.where((cum > 0)[..., None], picked, fallback[:, None].to(picked.dtype))


def head_output(model, h: torch.Tensor, state: State, positions: torch.Tensor | None) -> ModelOutput:
    """The byte head at every position or at ``positions`` only (``ModelOutput.positions``)."""
    if positions is None:
        return ModelOutput(model.head(model.norm(h)), state)
    return ModelOutput(model.head(model.norm(h[positions])), state, positions=positions)


def sub_patterns(pattern, byte_pattern):
    return pattern, pattern if byte_pattern is None else byte_pattern


def mixer_options(config: Mapping[str, Any] | None, backbone_pattern, *patterns) -> dict[str, Any] | None:
    """``mixer_config`` for one of several backbones (``patterns``: all of the model's): a per-model
    group of a mixer this backbone lacks belongs to another backbone (``check_mixer_config`` would
    refuse it here); one that names a mixer of no backbone is an error."""
    from recur.registry import list_models, resolve_pattern

    if config is None:
        return None
    check_mixer_config(config, [n for p in (backbone_pattern, *patterns) for n in resolve_pattern(p)])
    names, models = set(resolve_pattern(backbone_pattern)), set(list_models())
    return {k: v for k, v in dict(config).items() if not (k in models and isinstance(v, Mapping) and k not in names)}


@ARCHITECTURES.register("hierarchical_byte", family="hierarchical byte",
                        paper="Neitemeier et al., Hierarchical Autoregressive Transformers: Combining Byte- and "
                              "Word-Level Processing for Robust, Adaptable Language Models (2025)")
class HierarchicalByte(Generator, Architecture):
    """Byte encoder per word -> word backbone over the previous words -> byte decoder per word."""

    autoregressive = True
    sparse_head = True

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="gla",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu", mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 byte_d_model: int | None = None, byte_pattern=None, encoder_layers: int = 1,
                 decoder_layers: int = 1, boundary: int | Sequence[int] = 32):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        check_sizes(d_model, mlp_ratio)
        d_byte = d_model if byte_d_model is None else positive_int("byte_d_model", byte_d_model)
        positive_int("encoder_layers", encoder_layers)
        positive_int("decoder_layers", decoder_layers)
        ids = [boundary] if isinstance(boundary, int) and not isinstance(boundary, bool) else boundary
        if not isinstance(ids, (list, tuple)) or not ids or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"boundary must be a byte id or a list of ids in [0, vocab_size={vocab_size}), "
                             f"got {boundary!r}")
        self.vocab_size, self.boundary = vocab_size, tuple(ids)
        self.register_buffer("boundary_ids", torch.tensor(self.boundary), persistent=False)
        word_pattern, byte_pattern = sub_patterns(pattern, byte_pattern)
        parts = dict(mlp=mlp, mlp_ratio=mlp_ratio, norm=norm, channel_options=channel_options)
        self.embed_enc = nn.Embedding(vocab_size, d_byte)
        byte_config = mixer_options(mixer_config, byte_pattern, word_pattern)
        word_config = mixer_options(mixer_config, word_pattern, byte_pattern)
        self.encoder = Backbone(d_byte, encoder_layers, byte_pattern, byte_config, **parts)
        self.enc_norm = build_norm(norm, d_byte)
        self.to_word = nn.Linear(d_byte, d_model)
        self.start = nn.Parameter(torch.zeros(d_model))
        self.word = Backbone(d_model, n_layers, word_pattern, word_config, **parts)
        check_unit_backbone(self.word, "the word backbone (pattern)")
        self.word_norm = build_norm(norm, d_model)
        self.to_byte = nn.Linear(d_model, d_byte)
        self.embed_dec = nn.Embedding(vocab_size, d_byte)
        self.decoder = Backbone(d_byte, decoder_layers, byte_pattern, byte_config, **parts)
        self.norm = build_norm(norm, d_byte)
        self.head = nn.Linear(d_byte, vocab_size, bias=False)
        for e in (self.embed_enc, self.embed_dec):
            nn.init.normal_(e.weight, std=0.02)
        nn.init.normal_(self.start, std=0.02)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> HierarchicalByte:
        # id 3 is the boundary, so random tokens of 11 ids hold words of a few bytes
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", boundary=3)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def _keys(self) -> list[str]:
        return ["after_end", "dec", "enc", "new_doc", "word"]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        flag = torch.ones(batch_size, dtype=torch.bool, device=device)
        return State(enc=self.encoder.init_state(batch_size, device=device, dtype=dtype),
                     word=self.word.init_state(batch_size, device=device, dtype=dtype),
                     dec=self.decoder.init_state(batch_size, device=device, dtype=dtype),
                     new_doc=flag, after_end=~flag)

    def state_size(self, seq_len: int) -> int:
        # the encoder and decoder read every byte; the word backbone at most two events per byte
        # (exact for a fixed-size state, an upper bound for attention's cache)
        return self.encoder.state_size(seq_len) + self.word.state_size(2 * seq_len) + self.decoder.state_size(seq_len)

    def word_ends(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.isin(tokens, self.boundary_ids.to(tokens.device))

    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        check_state_entries(state, self._keys(), "hierarchical_byte")
        if positions is not None:
            check_positions(positions, tokens)
        B, T = tokens.shape
        st = self.init_state(B, device=tokens.device) if state is None else state
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        doc = document_starts(tokens, resets, st["new_doc"])
        ends = self.word_ends(tokens)
        starts = doc | torch.cat([st["after_end"][:, None], ends[:, :-1]], dim=1)  # a word starts here
        h, enc = self.encoder(self.embed_enc(tokens), st["enc"], resets=starts)
        words = self.to_word(self.enc_norm(h))  # at each boundary byte: the word vector
        # events, two slots per position in order: a document start (reads s, resets the word
        # backbone), then a finished word (reads e_k)
        slots = torch.stack([self.start.to(words.dtype).expand_as(words), words], dim=2).reshape(B, 2 * T, -1)
        mask = torch.stack([doc, ends], dim=2).reshape(B, 2 * T)
        first = torch.stack([doc, torch.zeros_like(ends)], dim=2).reshape(B, 2 * T)
        out, _, word = run_events(self.word, slots, mask, first, st["word"])
        segment = doc | ends  # the decoder restarts here, reading the latest word-level output
        g = latest_event(out, doc.long() + ends.long(), words.new_zeros(B, words.shape[-1]))
        u = self.embed_dec(tokens) + segment[..., None] * self.to_byte(self.word_norm(g))
        h, dec = self.decoder(u, st["dec"], resets=segment)
        new = State(enc=enc, word=word, dec=dec, new_doc=torch.zeros_like(st["new_doc"]), after_end=ends[:, -1])
        return head_output(self, h, new, positions)


__all__ = ["HierarchicalByte", "document_starts", "latest_event", "run_events", "split_words"]
