"""``megabyte``: a global model over patches of P bytes and a local model within each patch (Yu et
al., "MEGABYTE: Predicting Million-byte Sequences with Multiscale Transformers", 2023; the
two-stage form of ``lucidrains/MEGABYTE-pytorch``, there being no official code).

    lm = Megabyte(vocab_size=257, d_model=256, n_layers=4, pattern="gla", patch_size=4, local_d_model=128)
    logits, state = lm(bytes_)            # logits[:, t] predict byte t+1 from bytes <= t

For a document x_0 x_1 ... cut into patches k of P bytes x_{kP} .. x_{kP+P-1} (counted from the
document's first byte, so a packed document is cut as it is alone):

    p_k = LN(W_p LN(concat(E x_{kP}, ..., E x_{kP+P-1})))          patch embedding, P d_local -> d_global
    c   = Global([s, p_0, p_1, ...])                                s: a learned start token; c_k reads
                                                                    s, p_0 .. p_{k-1} (shifted by one patch)
    local input of patch k at j = 0 .. P-1:  [s_local ; E x_{kP} .. E x_{kP+P-2}]_j + (W_l norm(c_k))_j
    logits of byte kP+j = head(norm(Local(patch k's inputs)_j))     local model causal, restarted per patch

``W_l`` maps d_global to P d_local, reshaped into P local positions. In the library's stream form
the logits at position t predict byte t+1, so patch k's local positions sit at stream positions
kP-1 .. kP+P-2: the local model restarts at each patch's last byte (its input there is s_local
plus the projection of c after reading that patch) and at each document start (whose first byte
is never predicted: the local positions j >= 1 of patch 0 start there, conditioned on c after s).

With P = 1 it is a flat byte LM with a one-position head: c_t = Global([s, p(x_0) .. p(x_t)])_{t+1}
and logits_t = head(norm(Local([s_local + W_l norm(c_t)]))), the local stack acting on one
position alone (a per-byte MLP of mixers).

**Deviations.** Global and local models are Backbones of any registered mixer (Transformers in
the paper). Only two stages (the reference's recursion over more stages is not built).

**State.** ``glob`` (the global model), ``local`` (within the current patch), ``context`` (the
global output c conditioning the current local segment, d_global floats), ``fill`` (int: bytes of
the unfinished patch), ``tail`` (int: the last P-1 byte ids, the unfinished patch's bytes) and
``new_doc``. A call may end anywhere in a patch.

**Batching.** With packed documents the rows of a batch finish different numbers of patches in a
call, so the global model runs per group of rows (``recur.models.hierarchical_byte.run_events``);
its mixers need a fixed-size state or full attention (whose caches are padded to one length with
masked keys); swa is refused there. ``state_size`` counts one document read from a fresh state
(1 + seq_len // P global steps; a packed batch holds one more per document start).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.common import positive_int
from recur.layers.norms import build_norm
from recur.models.base import (Architecture, Generator, ModelOutput, check_count, check_positions, check_sizes,
                               check_tokens)
from recur.models.blocks import Backbone
from recur.models.hierarchical_byte import (document_starts, check_unit_backbone, head_output, latest_event,
                                            mixer_options, run_events, sub_patterns)
from recur.models.loops import check_state_entries
from recur.registry import ARCHITECTURES
from recur.state import State


@ARCHITECTURES.register("megabyte", family="hierarchical byte",
                        paper="Yu et al., MEGABYTE: Predicting Million-byte Sequences with Multiscale "
                              "Transformers (2023)")
class Megabyte(Generator, Architecture):
    """Patches of P bytes: a global model over patch embeddings, shifted one patch, and a local model per patch."""

    autoregressive = True
    sparse_head = True

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="gla",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu", mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 patch_size: int = 4, local_d_model: int | None = None, local_layers: int = 1, local_pattern=None):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        check_sizes(d_model, mlp_ratio)
        P = positive_int("patch_size", patch_size)
        d_local = d_model if local_d_model is None else positive_int("local_d_model", local_d_model)
        positive_int("local_layers", local_layers)
        self.vocab_size, self.patch_size, self.d_local = vocab_size, P, d_local
        global_pattern, local_pattern = sub_patterns(pattern, local_pattern)
        parts = dict(mlp=mlp, mlp_ratio=mlp_ratio, norm=norm, channel_options=channel_options)
        self.embed = nn.Embedding(vocab_size, d_local)  # shared by the patch embedding and the local input
        self.patch_in = nn.LayerNorm(P * d_local)
        self.patch = nn.Linear(P * d_local, d_model)
        self.patch_out = nn.LayerNorm(d_model)
        self.start = nn.Parameter(torch.zeros(d_model))
        self.glob = Backbone(d_model, n_layers, global_pattern,
                             mixer_options(mixer_config, global_pattern, local_pattern), **parts)
        check_unit_backbone(self.glob, "the global model (pattern)")
        self.glob_norm = build_norm(norm, d_model)
        self.to_local = nn.Linear(d_model, P * d_local)
        self.local_start = nn.Parameter(torch.zeros(d_local))
        self.local = Backbone(d_local, local_layers, local_pattern,
                              mixer_options(mixer_config, local_pattern, global_pattern), **parts)
        self.norm = build_norm(norm, d_local)
        self.head = nn.Linear(d_local, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.start, std=0.02)
        nn.init.normal_(self.local_start, std=0.02)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> Megabyte:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", patch_size=4)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def _keys(self) -> list[str]:
        return ["context", "fill", "glob", "local", "new_doc", "tail"]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        return State(glob=self.glob.init_state(batch_size, device=device, dtype=dtype),
                     local=self.local.init_state(batch_size, device=device, dtype=dtype),
                     context=torch.zeros(batch_size, self.start.shape[0], device=device, dtype=dtype),
                     fill=torch.zeros(batch_size, dtype=torch.int64, device=device),
                     tail=torch.zeros(batch_size, self.patch_size - 1, dtype=torch.int64, device=device),
                     new_doc=torch.ones(batch_size, dtype=torch.bool, device=device))

    def state_size(self, seq_len: int) -> int:
        steps = 1 + seq_len // self.patch_size  # the start token, then one per finished patch
        return self.glob.state_size(steps) + self.local.state_size(seq_len) + self.start.shape[0]

    def patch_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """p = LN(W_p LN(concat(E x))) for ``ids`` [n, P] -> [n, d_global]."""
        return self.patch_out(self.patch(self.patch_in(self.embed(ids).flatten(1))))

    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        check_state_entries(state, self._keys(), "megabyte")
        if positions is not None:
            check_positions(positions, tokens)
        B, T = tokens.shape
        if T == 0:
            raise ValueError("tokens must hold at least one position")
        P, st = self.patch_size, self.init_state(B, device=tokens.device) if state is None else state
        doc = document_starts(tokens, resets, st["new_doc"])
        idx = torch.arange(T, device=tokens.device).expand(B, T)
        last_doc = torch.where(doc, idx, -1).cummax(1).values
        since = torch.where(last_doc >= 0, idx - last_doc, st["fill"][:, None] + idx)  # bytes before t in its doc
        phase = since % P  # byte t's place in its patch
        ends = phase == P - 1
        ext = torch.cat([st["tail"], tokens], dim=1)  # window t of P ids: bytes t-P+1 .. t
        rows, times = ends.nonzero(as_tuple=True)
        d = self.start.shape[0]
        patches = self.start.new_zeros(B, T, d)
        if rows.numel():
            windows = torch.stack([ext[rows, times + i] for i in range(P)], dim=1)
            patches = patches.index_put((rows, times), self.patch_embedding(windows).to(patches.dtype))
        # events, two slots per position in order: a document start (reads s and resets the global
        # model), then a finished patch (reads p_k)
        slots = torch.stack([self.start.expand(B, T, d), patches], dim=2).reshape(B, 2 * T, d)
        mask = torch.stack([doc, ends], dim=2).reshape(B, 2 * T)
        first = torch.stack([doc, torch.zeros_like(ends)], dim=2).reshape(B, 2 * T)
        out, _, glob = run_events(self.glob, slots, mask, first, st["glob"])
        context = latest_event(out, doc.long() + ends.long(), st["context"])  # c conditioning position t
        # W_l norm(c) once per event (not per byte), then each position takes its local slot j
        cond = latest_event(self.to_local(self.glob_norm(out)), doc.long() + ends.long(),
                            self.to_local(self.glob_norm(st["context"]))).view(B, T, P, self.d_local)
        j = (phase + 1) % P  # the local position that predicts byte t+1
        cond = torch.gather(cond, 2, j[:, :, None, None].expand(-1, -1, 1, self.d_local))[:, :, 0]
        x = torch.where((j == 0)[..., None], self.local_start.to(cond.dtype).expand(B, T, -1), self.embed(tokens))
        h, local = self.local(x + cond, st["local"], resets=doc | ends)
        new = State(glob=glob, local=local, context=context[:, -1], fill=(phase[:, -1] + 1) % P,
                    tail=ext[:, ext.shape[1] - (P - 1):], new_doc=torch.zeros_like(st["new_doc"]))
        return head_output(self, h, new, positions)


__all__ = ["Megabyte"]
