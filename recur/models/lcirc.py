"""``lcirc``: Long-form Context Injection with Recurrent Compression and its query-dependent variant
QD-LCIRC (An, Sung, Park, Park, Seo, "LCIRC: A Recurrent Compression Approach for Efficient
Long-form Context and Query Dependent Modeling in LLMs", NAACL 2025), as the authors' ``Compressor``,
``GatedCrossAttentionBlock``, ``LCIRC`` and ``QDLCIRC`` compute them (ssuminan/LCIRC, ``models.py``,
``train_LCIRC.py``, ``train_QDLCIRC.py``), for a causal LM trained from scratch.

Per segment s of ``segment_len`` tokens, with K = ``n_compressed`` vectors per compressed block and
W = ``memory_segments`` blocks kept:

    h = E x_s;  for each layer l:  h = xattn_l(h, [C_{s-W} ; ... ; C_{s-1}]) if l injects, then h = layer_l(h)
    logits_s = W_head norm(h)
    C_s = Compressor(C_{s-1}, E x_s)                    (QD: Compressor(Mixer(C_{s-1}, Q), E x_s))

    xattn(h, M)       = h' + tanh(g_f) FF(h'),   h' = h + tanh(g_a) CrossAttn(LN(h); M)        g_a = g_f = 0 at init
    Compressor(C, X)  = LN(c_n): c_0 = C, then per compressor layer  c <- c + Attn(LN(c); LN(X + P));  c <- c + FF(c)
    FF(x)             = W_2 silu(W_1 LN(x))   (no biases; width mlp_ratio * d_model, the LM's MLP width)

CrossAttn and Attn are multi-head softmax attention whose queries are the first argument and whose
keys / values come from the second (no positions: the compressed vectors are a set); P is a learned
per-position embedding of the segment. C_0 is a learned parameter ``latents`` [K, d] (randn, as the
authors' ``latent``).

Interpretations, each from the authors' code:

* What is compressed: the segment's token embeddings E x_s plus P (their ``embed_tokens`` output and
  ``Compressor.pos_emb``), not hidden states of any LM layer: the compressor reads what the LM's first
  layer reads, and its own cross-attention layers are all the context it gets.
  The authors initialise ``pos_emb`` randn (std 1) beside Llama-2's embeddings; here P starts at
  randn * the std of the token embedding (recur's embeddings are N(0, 0.02)), so that the token
  identities are not swamped by the positions at the start. Each compressor layer normalises its
  queries and its segment separately (``PerceiverAttention.norm_latents`` / ``norm_x``); the keys
  are the segment's only (their ``kv_input`` with the latents is commented out); a final LayerNorm.
* What the LM reads: the concatenation of the compressed blocks of the segments before (their
  ``total_soft_prompt``, cut to the last 50 segments' blocks). A state of constant size keeps the
  last W blocks (``memory_segments``, default 4; the authors' 50); W = 1 reads C_{s-1} alone, the pure
  recurrent form. The window's blocks not yet written are masked out. The first segment, with no
  block yet, runs the plain backbone (their ``soft_prompt is None``: no cross-attention block at
  all, its feed-forward included). Segment s reads C_{<s} only: C_s is built from segment s and
  feeds later segments, as their training predicts the window after the compressed segments.
* Where: a gated cross-attention block (Flamingo's, their ``GatedCrossAttentionBlock``: LN on the
  LM's side only, keys / values from the compressed vectors as they are) before every third layer
  from layer 0 and before the last layer (their ``arr = [0, 3, ..., 30, 31]`` of 32 layers), unless
  ``xattn_layers`` lists others. Both gates start at 0 (tanh(0) = 0: the model is exactly the plain
  backbone at initialisation, as the authors' frozen Llama is).
* Heads: one ``n_heads`` for the compressor, the cross-attention and the mixer (the authors use the
  LM's 32 heads of 128 for all three); default recur's head split of d_model. Compressor depth:
  ``compressor_layers`` (the authors' 4; default 2 here, a lab-scale model). K: default 4, the authors' 64.

Query-dependent variant (``query_dependent=True``). The authors compress every context segment with
the question known in advance: before each compression step the previous compressed features attend
to the question's token embeddings through one more gated cross-attention block (their ``mixer``,
gates at 0, so QD-LCIRC starts as LCIRC), C_s = Compressor(Mixer(C_{s-1}, Q), E x_s). A causal
stream knows nothing ahead of time, so here the query is the first ``query_segments`` segments of
the stream (the question asked before the context): their token embeddings (all of them, not pooled,
as the authors' mixer reads every question token) are kept in the state, and every compression
step reads them through the mixer. The query segment itself is compressed too (with the query known
by the end of the segment: C_1 = Compressor(Mixer(C_0, E x_1), E x_1)); while the query is still
being read (query_segments > 1), the mixer sees the query segments read so far. Every token still
depends only on the tokens before it and the state stays constant in size. A task exercises the
variant only if it puts the question first (``associative_retrieval`` asks its query last).

Training: the authors detach the compressed features after every segment (LCIRC) or backpropagate
through 8 random segments (QD-LCIRC's selective state BPTT); here ``bptt_segments=k`` truncates the
gradient to the last k compression steps of a call (None: full BPTT). The segment loop, the pending
partial segment and packing are ``recur.models.segments``; any causal recur mixer may be the
backbone (``pattern``).

State: ``State(memory=State(compressed=[batch, W, K, d_model], written=int64 [batch][, query=[batch,
query_segments * segment_len, d_model]]), pending=[batch, segment_len - 1, d_model], count=int64
[batch])``: the last W blocks (the newest last), the number of segments compressed (capped at
max(W, query_segments)), the query's embeddings (QD only, zero until read). Constant in size:
(W K + [query_segments segment_len] + segment_len - 1) d_model floats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.common import head_split, merge_heads, positive_int, split_heads
from recur.models.segments import SegmentLM
from recur.registry import ARCHITECTURES
from recur.state import State


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
    """Unmasked (non-causal) softmax attention: q [batch, heads, n, d] over k, v [batch, heads, m, d];
    ``visible`` bool [batch, m]: the keys each row may read (None: all; at least one per row)."""
    mask = None if visible is None else visible[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class FeedForward(nn.Module):
    """W_2 silu(W_1 LN(x)), no biases (the authors' ``FeedForward``)."""

    def __init__(self, d_model: int, inner: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, inner, bias=False)
        self.down = nn.Linear(inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(self.norm(x))))


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` (queries, layer-normed) over ``media`` (keys and values; normed
    too with ``norm_media``, as the compressor's ``PerceiverAttention``, not as the LM's
    ``MaskedCrossAttention``). No biases, no positions."""

    def __init__(self, d_model: int, n_heads: int, norm_media: bool):
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.LayerNorm(d_model)
        self.norm_media = nn.LayerNorm(d_model) if norm_media else None
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_media is not None:
            media = self.norm_media(media)
        k, v = self.kv(media).chunk(2, dim=-1)
        q, k, v = (split_heads(t, self.n_heads) for t in (self.q(self.norm(x)), k, v))
        return self.out(merge_heads(attend(q, k, v, visible)))


class GatedCrossAttention(nn.Module):
    """Flamingo's gated block: h' = h + tanh(g_a) CrossAttn(h; media), h' + tanh(g_f) FF(h'); g_a = g_f = 0."""

    def __init__(self, d_model: int, n_heads: int, inner: int):
        super().__init__()
        self.attn = CrossAttention(d_model, n_heads, norm_media=False)
        self.attn_gate = nn.Parameter(torch.zeros(()))
        self.ff = FeedForward(d_model, inner)
        self.ff_gate = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, media: torch.Tensor, visible: torch.Tensor | None = None,
                active: torch.Tensor | None = None) -> torch.Tensor:
        """``active`` bool [batch]: the rows that have media (the others pass through unchanged)."""
        y = x + self.attn_gate.tanh() * self.attn(x, media, visible)
        y = y + self.ff_gate.tanh() * self.ff(y)
        return y if active is None else torch.where(active[:, None, None], y, x)


class Compressor(nn.Module):
    """C_s = LN(c): c <- c + Attn(LN(c); LN(X + P)), c <- c + FF(c) per layer, from c = C_{s-1}."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, inner: int, segment_len: int, position_std: float):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleList([CrossAttention(d_model, n_heads, norm_media=True),
                                                   FeedForward(d_model, inner)]) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.positions = nn.Parameter(torch.randn(segment_len, d_model) * position_std)

    def forward(self, latents: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """latents [batch, K, d] (the previous compressed features), e [batch, L, d] (the segment's embeddings)."""
        x = e + self.positions[:e.shape[1]]
        for attn, ff in self.layers:
            latents = latents + attn(latents, x)
            latents = latents + ff(latents)
        return self.norm(latents)


def default_xattn_layers(n_layers: int) -> tuple[int, ...]:
    """Every third layer from 0 and the last (the authors' [0, 3, ..., 30, 31] of 32 layers)."""
    return tuple(sorted({*range(0, n_layers, 3), n_layers - 1}))


def check_xattn_layers(value: Any, n_layers: int) -> tuple[int, ...]:
    if value is None:
        return default_xattn_layers(n_layers)
    layers = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if (not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in layers)
            or len(set(layers)) != len(layers)):
        raise ValueError(f"xattn_layers must be a non-empty list of distinct layer indices in [0, n_layers={n_layers}) "
                         f"(the layers the compressed context is injected before), got {value!r}")
    return tuple(sorted(layers))


@ARCHITECTURES.register("lcirc", family="segment memory",
                        paper="An et al., LCIRC: A Recurrent Compression Approach for Efficient Long-form Context and "
                              "Query Dependent Modeling in LLMs (NAACL 2025)")
class LCIRC(SegmentLM):
    """LCIRC: segments compressed recurrently by a Perceiver into K vectors, injected by gated cross-attention."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 segment_len: int = 32, bptt_segments: int | None = None, n_compressed: int = 4,
                 memory_segments: int = 4, compressor_layers: int = 2, n_heads: int | None = None,
                 xattn_layers: Sequence[int] | None = None, query_dependent: bool = False, query_segments: int = 1):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks, segment_len=segment_len, bptt_segments=bptt_segments)
        self.n_compressed = positive_int("n_compressed", n_compressed)
        self.memory_segments = positive_int("memory_segments", memory_segments)
        positive_int("compressor_layers", compressor_layers)
        self.query_segments = positive_int("query_segments", query_segments)
        if not isinstance(query_dependent, bool):
            raise ValueError(f"query_dependent must be a bool, got {query_dependent!r}")
        self.query_dependent = query_dependent
        self.xattn_layers = check_xattn_layers(xattn_layers, n_layers)
        self.n_heads, _ = head_split(d_model, n_heads)
        inner = max(1, round(mlp_ratio * d_model))
        std = float(self.embed.weight.detach().std())
        self.latents = nn.Parameter(torch.randn(n_compressed, d_model))
        self.compressor = Compressor(d_model, compressor_layers, self.n_heads, inner, self.segment_len, std)
        self.xattn = nn.ModuleDict({str(i): GatedCrossAttention(d_model, self.n_heads, inner)
                                    for i in self.xattn_layers})
        self.mixer = GatedCrossAttention(d_model, self.n_heads, inner) if query_dependent else None

    @property
    def gates(self) -> list[nn.Parameter]:
        """Every tanh gate (the LM's cross-attention blocks, then the QD mixer's): zero at initialisation."""
        blocks = [*self.xattn.values(), *([self.mixer] if self.mixer is not None else [])]
        return [g for b in blocks for g in (b.attn_gate, b.ff_gate)]

    def init_memory(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        entries = dict(compressed=torch.zeros(batch_size, self.memory_segments, self.n_compressed, self.d_model,
                                              device=device, dtype=dtype),
                       written=torch.zeros(batch_size, dtype=torch.int64, device=device))
        if self.query_dependent:
            entries["query"] = torch.zeros(batch_size, self.query_segments * self.segment_len, self.d_model,
                                           device=device, dtype=dtype)
        return State(entries)

    def cell(self, e: torch.Tensor, memory: State, write: bool) -> tuple[torch.Tensor, State | None]:
        C, written = memory["compressed"], memory["written"]
        B, W, K, _ = C.shape
        held = written.clamp(max=W)  # blocks written so far, the newest last in the window
        active = held > 0
        slots = torch.arange(W, device=e.device)[None] >= W - held[:, None]
        # a row without blocks reads all (zero) keys and keeps its input: no all-masked softmax (NaN)
        visible = (slots | ~active[:, None]).repeat_interleave(K, dim=1)
        media = C.flatten(1, 2)
        h = e
        for i, block in enumerate(self.backbone.layers):
            if str(i) in self.xattn:
                h = self.xattn[str(i)](h, media, visible, active)
            h, _, _ = block(h)
        if not write:
            return h, None
        previous = torch.where(active[:, None, None], C[:, -1], self.latents.to(e.dtype).expand(B, -1, -1))
        new = dict(written=(written + 1).clamp(max=max(W, self.query_segments)))
        if self.query_dependent:
            query, L = memory["query"], self.segment_len
            owner = torch.arange(query.shape[1], device=e.device) // L  # the query segment of each slot
            reading = (owner[None] == written[:, None])[..., None]  # this segment's slots, while the query is read
            query = torch.where(reading, e.repeat(1, self.query_segments, 1), query)
            previous = self.mixer(previous, query, owner[None] <= written[:, None])
            new["query"] = query
        compressed = self.compressor(previous, e)
        return h, State(compressed=torch.cat([C[:, 1:], compressed[:, None]], dim=1), **new)

    @classmethod
    def example(cls, vocab_size: int, d_model: int, query_dependent: bool = False) -> LCIRC:
        # T = 23 ends inside the fifth segment of 5, after four compressions that slide a window of
        # two blocks; attention's parallel mode is the fast path
        model = cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="attention", segment_len=5,
                    n_compressed=2, memory_segments=2, compressor_layers=2, query_dependent=query_dependent)
        with torch.no_grad():  # the gates start at 0 (the plain backbone): open them so the tests see the memory
            for g in model.gates:
                g.fill_(1.0)
        return model
