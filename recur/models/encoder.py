"""``encoder``: a Backbone of bidirectional or causal mixers with a classification head, per position
(sequence labelling) or pooled over the sequence (sequence classification).

    enc = Encoder(vocab_size=2, d_model=64, n_layers=2, pattern="bidirectional", head="pooled")
    out = enc(tokens)            # out.logits: [batch, time, n_classes] (token) or [batch, n_classes] (pooled)

    h = Backbone(E x)                          (mixers may read the whole sequence: causal=False allowed)
    token head:   logits_t = W norm(h_t)
    pooled head:  logits = W norm(pool(h)),  pool = mean_t h_t  or  h_T (last)

The state is ``State(backbone=..., [pool_sum, pool_count])``: with causal mixers, carrying it across
calls equals one call on the concatenation, for both heads (the mean pool carries its running sum
and count). A bidirectional layer's backward direction restarts each call (see
``recur.layers.bidirectional``), so with it the calls are separate segments. The pooled head's loss
is the cross-entropy of the one label of each sequence (the task must supervise one position per
row, e.g. ``parity`` with ``final_only=true``); it is what the seq2seq and structured-output
architectures build their encoders on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.norms import build_norm
from recur.models.base import Architecture, ModelOutput, check_count, check_sizes, check_tokens
from recur.models.blocks import Backbone
from recur.registry import ARCHITECTURES
from recur.state import State

HEADS = ("token", "pooled")
POOLS = ("mean", "last")


@ARCHITECTURES.register("encoder", family="encoder",
                        paper="Schuster & Paliwal, Bidirectional Recurrent Neural Networks (1997)")
class Encoder(Architecture):
    """Embedding -> Backbone (bidirectional or causal mixers) -> norm -> token or pooled head."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="bidirectional",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 head: str = "token", pool: str = "mean", n_classes: int | None = None,
                 shared_blocks: int | None = None):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        if head not in HEADS:
            raise ValueError(f"encoder head must be one of {HEADS}, got {head!r}")
        if pool not in POOLS:
            raise ValueError(f"encoder pool must be one of {POOLS}, got {pool!r}")
        n_classes = vocab_size if n_classes is None else n_classes
        check_count("n_classes", n_classes, 2)
        check_sizes(d_model, mlp_ratio)
        self.vocab_size, self.n_classes, self.head_kind, self.pool = vocab_size, n_classes, head, pool
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.backbone = Backbone(d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                                 channel_options=channel_options, shared_blocks=shared_blocks, causal=False)
        self.norm = build_norm(norm, d_model)
        self.head = nn.Linear(d_model, n_classes, bias=False)

    @property
    def causal(self) -> bool:
        """True when every mixer is causal (then the token head is a causal sequence labeller)."""
        return all(m.causal for m in self.mixers)

    @property
    def segmentable(self) -> bool:
        return self.causal and self.head_kind == "token"

    @property
    def _mean_pooled(self) -> bool:
        return self.head_kind == "pooled" and self.pool == "mean"

    @property
    def mixers(self):
        return self.backbone.mixers

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.embed.weight.dtype
        entries = {"backbone": self.backbone.init_state(batch_size, device=device, dtype=dtype)}
        if self._mean_pooled:
            entries["pool_sum"] = torch.zeros(batch_size, self.backbone.d_model, device=device, dtype=dtype)
            entries["pool_count"] = torch.zeros(batch_size, device=device, dtype=torch.int64)
        return State(entries)

    def state_size(self, seq_len: int) -> int:
        return self.backbone.state_size(seq_len) + (self.backbone.d_model if self._mean_pooled else 0)

    def set_mode(self, mode: str) -> None:
        self.backbone.set_mode(mode)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> ModelOutput:
        """``resets`` bool [batch, time]: True where a packed document starts; the backbone resets
        there, and the pooled head pools the row's last document (the pool restarts with it)."""
        check_tokens(tokens, self.vocab_size)
        if state is None:
            state = self.init_state(tokens.shape[0], device=tokens.device)
        elif not isinstance(state, State) or set(state) != set(self.init_state(1, device="meta")):
            got = sorted(state) if isinstance(state, State) else type(state).__name__
            raise ValueError(f"encoder state must be a State with entries "
                             f"{sorted(self.init_state(1, device='meta'))}, got {got}")
        h, backbone = self.backbone(self.embed(tokens), state["backbone"], resets=resets)
        new = {"backbone": backbone}
        if self.head_kind == "token":
            return ModelOutput(self.head(self.norm(h)), State(new))
        if self.pool == "last":
            pooled = h[:, -1]
        else:
            total, count = state["pool_sum"], state["pool_count"]
            if resets is None:
                new["pool_sum"], new["pool_count"] = total + h.sum(dim=1), count + h.shape[1]
            else:  # the last document only: positions from the row's last reset on
                t = torch.arange(h.shape[1], device=h.device)
                last = torch.where(resets, t, -1).max(dim=1).values  # -1: no reset in this row
                keep = t[None, :] >= last[:, None]
                restart = last >= 0
                new["pool_sum"] = torch.where(restart[:, None], 0.0, total) + (h * keep.unsqueeze(-1)).sum(dim=1)
                new["pool_count"] = torch.where(restart, 0, count) + keep.sum(dim=1)
            pooled = new["pool_sum"] / new["pool_count"].unsqueeze(-1).to(h.dtype)
        return ModelOutput(self.head(self.norm(pooled)), State(new))

    def position_logits(self, out: ModelOutput, batch) -> torch.Tensor:
        if self.head_kind == "token":
            return out.logits
        # One label per sequence: the pooled prediction stands at every position, and the task scores
        # it where it supervises (its one position per row).
        return out.logits[:, None, :].expand(-1, batch.mask.shape[1], -1)

    def loss(self, out: ModelOutput, batch) -> torch.Tensor:
        if self.head_kind == "token":
            return super().loss(out, batch)
        per_row = batch.mask.sum(dim=1)
        if not bool((per_row == 1).all()):
            raise ValueError(f"the pooled encoder head predicts one label per sequence, but the task supervises "
                             f"{sorted(set(per_row.tolist()))} positions per row; use head='token' (or a task "
                             f"option such as final_only=true)")
        return F.cross_entropy(out.logits.float(), batch.targets[batch.mask])

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> Encoder:
        # Causal mixers: the architecture tests check exact state carry, which bidirectional layers
        # (segment-wise by design) do not have.
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern=["gla", "lstm"], head="pooled")
