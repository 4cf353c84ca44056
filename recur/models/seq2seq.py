"""``seq2seq``: an encoder-decoder with attention over one token stream ``source SEP target``
(Sutskever, Vinyals & Le, "Sequence to Sequence Learning with Neural Networks", 2014; attention
of Bahdanau, Cho & Bengio 2015 ("additive") or Luong, Pham & Manning 2015 ("dot", their "general"
score), between the decoder's layers as GNMT stacks it).

    source = the tokens of a document before its first SEP;  the target = SEP and what follows
    e_j    = norm(Encoder(E x)_j)          for the source positions j (kept: the memory)
    h^0    = E x,  the decoder starts from its zero state at the first SEP (a reset there)
    h^l    = Block_l(h^{l-1});   h^l <- h^l + W_o sum_j a_tj e_j   after every decoder layer l
             a_t = softmax_j(score(norm(h^l_t), e_j)) over the source positions j <= t
             additive: v^T tanh(W_q h + W_k e);   dot: (W_q h)^T (W_k e) / sqrt(d)
    logits_t = W_head norm(h^L_t)

Encoder and decoder are Backbones of any registered causal mixers (an LSTM of ``n_layers`` by
default, as the papers); the decoder is teacher forced on the target, so training is one parallel
pass, and greedy decoding is the stream continued from ``source SEP`` token by token
(``generate``): exact match under teacher forcing is the exact match of greedy decoding. Before the
SEP the decoder runs too (its outputs there are not supervised on a transduction task) and reads
the source so far: every output depends on the tokens up to it only, so the model is causal.

The state, so a call may end anywhere (inside the source, at the SEP, inside the target) and the
next continues exactly: ``State(encoder=, decoder=<Backbone states>, memory=[batch, max_source,
d_model], memory_len=int64 [batch], seen_sep=bool [batch])``: the memory is a fixed buffer of the
source's encoder outputs (as a bounded KV cache; a source longer than ``max_source`` is an
error), ``seen_sep`` whether the document's SEP has passed. ``resets`` (packed documents) clear
all of it. The encoder keeps reading after the SEP (its outputs there are unused): one causal pass
over the stream, whatever the split.

Deviations: the decoder is not initialised from the encoder's final state (Sutskever's bridge): the
source reaches it through attention at every layer and step, so encoder and decoder may be mixers
of any kind and size; and the attention reads the decoder's own layer output (Luong's order), not
the previous step's state (Bahdanau's), which keeps the decoder one parallel pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.layers.norms import build_norm
from recur.models.base import (Architecture, Generator, ModelOutput, check_count, check_positions, check_sizes,
                               check_tokens)
from recur.models.blocks import Backbone
from recur.models.loops import check_state_entries
from recur.registry import ARCHITECTURES
from recur.state import State

ATTENTIONS = ("additive", "dot")
STATE_KEYS = ("encoder", "decoder", "memory", "memory_len", "seen_sep")


def stream_layout(tokens: torch.Tensor, sep: int, seen_sep: torch.Tensor, resets: torch.Tensor | None):
    """Where the source is in a ``source SEP target`` stream, per position: its document within the
    call, whether a reset came at or before it (it no longer continues the state's document),
    whether it is a source position (before its document's first SEP), and whether it is that first
    SEP. ``seen_sep`` bool [batch]: the state's document already passed its SEP. Shared by the
    encoder-decoders that split the stream there (seq2seq, pointer)."""
    B, T = tokens.shape
    t = torch.arange(T, device=tokens.device).expand(B, T)
    is_sep = tokens == sep
    cum = torch.cumsum(is_sep.long(), dim=1) - is_sep.long()  # SEPs strictly before t in the call
    if resets is None:
        doc = torch.zeros_like(t)
        fresh = torch.zeros_like(is_sep)
        before = cum + seen_sep.long()[:, None]
    else:
        doc = torch.cumsum(resets.long(), dim=1)
        last = torch.where(resets, t, torch.full_like(t, -1)).cummax(dim=1).values  # the doc's start, or -1
        fresh = last >= 0
        at_start = cum.gather(1, last.clamp(min=0))
        before = torch.where(fresh, cum - at_start, cum + seen_sep.long()[:, None])
    source = (before == 0) & ~is_sep
    first_sep = is_sep & (before == 0)
    return doc, fresh, source, first_sep


class CrossAttention(nn.Module):
    """One query per decoder position over the memory: its context, projected (``W_o sum_j a_j e_j``)."""

    def __init__(self, d_model: int, kind: str):
        super().__init__()
        self.kind = kind
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        if kind == "additive":
            self.v = nn.Linear(d_model, 1, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """query [B, T, d], keys [B, K, d], valid bool [B, T, K] -> [B, T, d] (0 where nothing is valid)."""
        q, k = self.w_q(query), self.w_k(keys)
        if self.kind == "additive":
            scores = self.v(torch.tanh(q[:, :, None, :] + k[:, None, :, :])).squeeze(-1)
        else:
            scores = torch.einsum("btd,bkd->btk", q, k) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with no source yet reads nothing
        return self.w_o(torch.einsum("btk,bkd->btd", weights, keys))


@ARCHITECTURES.register("seq2seq", family="encoder-decoder",
                        paper="Sutskever, Vinyals & Le, Sequence to Sequence Learning with Neural Networks (2014); "
                              "Bahdanau, Cho & Bengio, Neural Machine Translation by Jointly Learning to Align and "
                              "Translate (2015)")
class Seq2Seq(Generator, Architecture):
    """An encoder-decoder with attention over ``source SEP target``: the encoder's source outputs
    are the memory the decoder attends to after each of its layers."""

    autoregressive = True
    sparse_head = True

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="lstm",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu", mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 sep: int | None = None, attention: str = "dot", max_source: int = 64, decoder_pattern=None):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        check_sizes(d_model, mlp_ratio)
        if sep is None:
            raise ValueError("seq2seq needs the id of the token that ends the source (sep=...): a transduction task "
                             "gives it (Task.separator); otherwise --set model.args.sep=ID")
        if isinstance(sep, bool) or not isinstance(sep, int) or not 0 <= sep < vocab_size:
            raise ValueError(f"sep must be a token id in [0, {vocab_size}), got {sep!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"seq2seq attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        self.vocab_size, self.sep, self.attention = vocab_size, sep, attention
        self.max_source = positive_int("max_source", max_source, owner="seq2seq")
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        parts = dict(mixer_config=mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                     channel_options=channel_options)
        self.encoder = Backbone(d_model, n_layers, pattern, **parts)
        self.decoder = Backbone(d_model, n_layers, pattern if decoder_pattern is None else decoder_pattern, **parts)
        self.memory_norm = build_norm(norm, d_model)
        self.query_norms = nn.ModuleList(build_norm(norm, d_model) for _ in range(n_layers))
        self.cross = nn.ModuleList(CrossAttention(d_model, attention) for _ in range(n_layers))
        self.norm = build_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    # -- the protocol ------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def mixers(self):
        return self.encoder.mixers + self.decoder.mixers

    def set_mode(self, mode: str) -> None:
        self.encoder.set_mode(mode)
        self.decoder.set_mode(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        d = self.embed.embedding_dim
        return State({"encoder": self.encoder.init_state(batch_size, device=device, dtype=dtype),
                      "decoder": self.decoder.init_state(batch_size, device=device, dtype=dtype),
                      "memory": torch.zeros(batch_size, self.max_source, d, device=device, dtype=dtype),
                      "memory_len": torch.zeros(batch_size, dtype=torch.int64, device=device),
                      "seen_sep": torch.zeros(batch_size, dtype=torch.bool, device=device)})

    def state_size(self, seq_len: int) -> int:
        return (self.encoder.state_size(seq_len) + self.decoder.state_size(seq_len)
                + self.max_source * self.embed.embedding_dim)

    def _layout(self, tokens: torch.Tensor, seen_sep: torch.Tensor, resets: torch.Tensor | None):
        return stream_layout(tokens, self.sep, seen_sep, resets)

    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> ModelOutput:
        """``resets`` bool [batch, time]: packed documents (each one's source, memory and SEP apart).
        ``positions``: compute the head only there."""
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        check_state_entries(state, STATE_KEYS, "seq2seq", f"max_source={self.max_source}")
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B, device=tokens.device)
        doc, fresh, source, first_sep = self._layout(tokens, state["seen_sep"], resets)
        x = self.embed(tokens)
        enc, enc_state = self.encoder(x, state["encoder"], resets=resets)
        enc = self.memory_norm(enc)

        # keys: the state's memory, then this call's encoder outputs; a query at t reads the memory
        # while its document continues the state's, and this call's source positions j <= t of its document
        old, old_len = state["memory"], state["memory_len"]
        keys = torch.cat([old, enc], dim=1)
        j = torch.arange(T, device=tokens.device)
        in_call = source[:, None, :] & (j[None, None, :] <= j[None, :, None]) & (doc[:, None, :] == doc[:, :, None])
        in_memory = (torch.arange(old.shape[1], device=tokens.device)[None, None, :] < old_len[:, None, None]) \
            & ~fresh[:, :, None]
        valid = torch.cat([in_memory, in_call], dim=2)

        def attend(i: int, h: torch.Tensor) -> torch.Tensor:
            return h + self.cross[i](self.query_norms[i](h), keys, valid)

        dec_resets = first_sep if resets is None else resets | first_sep
        h, dec_state = self.decoder(x, state["decoder"], resets=dec_resets, after_layer=attend)
        memory, memory_len, seen_sep = self._next_memory(enc, source, first_sep, doc, fresh, state)
        new = State({"encoder": enc_state, "decoder": dec_state, "memory": memory, "memory_len": memory_len,
                     "seen_sep": seen_sep})
        if positions is None:
            return ModelOutput(self.head(self.norm(h)), new)
        return ModelOutput(self.head(self.norm(h[positions])), new, positions=positions)

    def _next_memory(self, enc, source, first_sep, doc, fresh, state):
        """The memory after this call: the last document's source outputs, after the state's memory
        when that document continues it."""
        B, T, d = enc.shape
        last_doc = doc[:, -1:] if T else doc[:, :0]
        restarted = fresh[:, -1] if T else torch.zeros(B, dtype=torch.bool, device=enc.device)
        mine = source & (doc == last_doc)
        base = torch.where(restarted, 0, state["memory_len"])
        memory_len = base + mine.sum(dim=1)
        if bool((memory_len > self.max_source).any()):
            raise ValueError(f"seq2seq: a source of {int(memory_len.max())} tokens exceeds max_source="
                             f"{self.max_source}; build the model with a larger max_source")
        memory = torch.where(restarted[:, None, None], torch.zeros_like(state["memory"]), state["memory"])
        slot = base[:, None] + torch.cumsum(mine.long(), dim=1) - 1  # where each kept output goes
        rows, cols = mine.nonzero(as_tuple=True)
        memory = memory.index_put((rows, slot[rows, cols]), enc[rows, cols])
        seen = (first_sep & (doc == last_doc)).any(dim=1)
        seen_sep = torch.where(restarted, seen, state["seen_sep"] | seen)
        return memory, memory_len, seen_sep

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> Seq2Seq:
        # token 1 ends the source: the suite's random streams hold it anywhere, or not at all
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", sep=1, max_source=32,
                   attention="additive")


__all__ = ["ATTENTIONS", "CrossAttention", "Seq2Seq", "stream_layout"]
