"""``rmt``: the Recurrent Memory Transformer, decoder-only form (Bulatov, Kuratov, Burtsev, "Recurrent
Memory Transformer", NeurIPS 2022; Bulatov et al., "Scaling Transformer to 1M tokens and beyond with
RMT", 2023), as the authors' ``MemoryCell`` / ``RecurrentWrapper`` compute it
(booydar/recurrent-memory-transformer, ``modeling_rmt/language_modeling.py``, babilong-release).

Per segment s of ``segment_len`` tokens, with M = ``n_memory`` memory vectors m_{s-1} [M, d]:

    h = Backbone([m_{s-1} ; E x_s ; m_{s-1}])        one causal pass over M + L + M positions
    logits_s = W_head norm(h[M : M + L])               the tokens' positions
    m_s = norm(h[M + L :])                             the write positions' final hidden states

The same memory vectors sit at the read positions (first: every token sees them) and at the write
positions (last: they see the whole segment, and what they produce feeds later segments only).
m_0 is a learned parameter ``memory`` (initialised randn * std of the token embedding). The
new memory is the final hidden state after the final norm, as the authors' ``hidden_states[-1]``
of a Hugging Face causal LM is (GPT-2's last hidden state is taken after ``ln_f``). A segment that
the input ends inside is read as ``[m ; E x]`` with no write block (the authors' generation form):
it is causal, so its outputs are those the complete segment would give.

Any causal recur mixer may be the cell's token mixer (``pattern``; attention by default, whose
rotary positions restart at every segment as the cell's positions do). ``bptt_segments=k``
truncates the gradient to the last k memory transitions (the authors' ``k2``; None: full).
A curriculum over the number of segments is the ``curriculum`` training method over ``seq_len``
(on ``associative_retrieval``, whose pair count grows with the length). The segment loop, the
state (memory + the pending partial segment) and packing are ``recur.models.segments``.

State: ``State(memory=State(tokens=[batch, M, d_model]), pending=[batch, segment_len - 1,
d_model], count=int64 [batch])``, constant in size: (M + segment_len - 1) * d_model floats.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.models.segments import SegmentLM
from recur.registry import ARCHITECTURES
from recur.state import State


@ARCHITECTURES.register("rmt", family="segment memory",
                        paper="Bulatov, Kuratov, Burtsev, Recurrent Memory Transformer (NeurIPS 2022); Bulatov et al., "
                              "Scaling Transformer to 1M tokens and beyond with RMT (2023)")
class RMT(SegmentLM):
    """Recurrent Memory Transformer: a causal transformer over segments, memory tokens read first and written last."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 segment_len: int = 32, n_memory: int = 4, bptt_segments: int | None = None):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks, segment_len=segment_len, bptt_segments=bptt_segments)
        self.n_memory = positive_int("n_memory", n_memory)
        self.memory = nn.Parameter(torch.randn(n_memory, d_model) * self.embed.weight.detach().std())

    def init_memory(self, batch_size: int, device=None, dtype=None) -> State:
        m = self.memory.to(device=device, dtype=dtype or self.dtype)
        return State(tokens=m.expand(batch_size, -1, -1))

    def cell(self, e: torch.Tensor, memory: State, write: bool) -> tuple[torch.Tensor, State | None]:
        m, M, n = memory["tokens"], self.n_memory, e.shape[1]
        h, _ = self.backbone(torch.cat([m, e, m] if write else [m, e], dim=1))
        return h[:, M:M + n], (State(tokens=self.norm(h[:, M + n:])) if write else None)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> RMT:
        # T = 23 ends inside the fifth segment of 5; attention's parallel mode is the fast path
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="attention", segment_len=5, n_memory=2)
