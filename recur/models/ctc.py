"""``ctc``: a frame encoder trained with Connectionist Temporal Classification (Graves, Fernandez,
Gomez & Schmidhuber 2006, "Connectionist Temporal Classification: Labelling Unsegmented Sequence
Data with Recurrent Neural Networks"), with best-path and prefix beam search decoding.

    h_t = norm(Backbone(E x + W_in f)_t)          any registered mixer (an LSTM by default, as the paper)
    y_t = log_softmax(W h_t + b)                  over blank (class 0) and the labels 0..K-1 (classes 1..K)
    Pr(z | x) = sum over the frame paths pi with B(pi) = z of prod_t y_t[pi_t]
                (B: merge repeats, then drop blanks)     loss = -log Pr(z | x), torch.nn.CTCLoss

The blank is class 0 and label l is class l + 1 (``batch.labels`` hold 0..K-1). The utterance is
the supervised frames (``batch.mask``) in order, the labelling ``batch.labels`` (-1 padded). On a
batch without label sequences (a per-position task, the conformance suite's) each row's labelling
is the targets of its supervised positions in order: the degenerate labelling of one label per
supervised frame, so the loss is defined on any batch, not a different objective.

Decoding (``decode(out, batch)``, per row over its supervised frames): ``decoding="greedy"``, the
best path (argmax per frame, then B), or ``"beam"``, the prefix beam search of Graves's thesis
(2012, section 7.5; also Hannun et al. 2014): prefixes kept with the probability of ending in a
blank and in a label, so a repeated label needs a blank between, the ``beam_width`` most probable
prefixes kept per frame; with a beam wider than the prefixes it is the exact most probable
labelling. ``example()`` reads tokens only (``feature_dim=0``: the frames are embedded tokens).
Options (``--set model.args.NAME=VALUE``): ``n_labels`` (the task gives it), ``decoding``
(greedy, beam), ``beam_width`` (default 8).

The forward pass is the encoder's: per-frame log-probabilities, causal, with the encoder's state,
so a stream read in pieces gives the same frames; the loss and decoding need the whole utterance.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.norms import build_norm
from recur.models.base import Architecture, ModelOutput, check_count, check_features, check_sizes, check_tokens
from recur.models.blocks import Backbone
from recur.registry import ARCHITECTURES
from recur.state import State

BLANK = 0
DECODINGS = ("greedy", "beam")


class FrameEncoder(nn.Module):
    """E x (+ W_in f) -> Backbone -> norm: the per-frame encoder shared by CTC and the transducer."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern, mixer_config, mlp, mlp_ratio,
                 norm: str, channel_options, feature_dim: int):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        check_count("feature_dim", feature_dim, 0)
        check_sizes(d_model, mlp_ratio)
        self.vocab_size, self.feature_dim = vocab_size, feature_dim
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.backbone = Backbone(d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                                 channel_options=channel_options)
        self.norm = build_norm(norm, d_model)
        self.features = nn.Linear(feature_dim, d_model) if feature_dim else None

    def forward(self, tokens, state=None, resets=None, features=None) -> tuple[torch.Tensor, State]:
        check_tokens(tokens, self.vocab_size)
        check_features(features, tokens, self.feature_dim)
        x = self.embed(tokens)
        if features is not None:
            x = x + self.features(features.to(x.dtype))
        h, state = self.backbone(x, state, resets=resets)
        return self.norm(h), state


def utterance_frames(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's supervised frames moved to the front in order: (x gathered [B, T, ...], lengths [B])."""
    if not mask.any():
        raise ValueError("a batch has no supervised frame (mask is all False): there is no utterance to score")
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # masked frames first, in order
    index = order.view(*order.shape, *(1,) * (x.ndim - 2)).expand(*order.shape, *x.shape[2:])
    return x.gather(1, index), mask.sum(1)


def utterance_labels(batch, n_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's labelling, int64 [B, U] padded with -1, and its lengths [B]: ``batch.labels``, or
    (a batch without label sequences) the targets of the supervised positions in order."""
    if batch.labels is not None:
        labels = batch.labels
    else:
        picked, lengths = utterance_frames(batch.targets, batch.mask)
        keep = torch.arange(picked.shape[1], device=picked.device)[None] < lengths[:, None]
        labels = torch.where(keep, picked, -1)[:, :max(1, int(lengths.max()))]
    lengths = (labels >= 0).sum(1)
    if bool((labels >= n_labels).any()):
        raise ValueError(f"labels must lie in [0, {n_labels}) (n_labels={n_labels}), got up to {int(labels.max())}")
    return labels, lengths


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def greedy_decode(log_probs: torch.Tensor, blank: int = BLANK) -> list[int]:
    """Best-path decoding of one utterance's [T, C] frames: the argmax path, repeats merged, blanks dropped
    (class ids)."""
    path = log_probs.argmax(-1).tolist()
    return [c for i, c in enumerate(path) if c != blank and (i == 0 or path[i - 1] != c)]


def prefix_beam_search(log_probs: torch.Tensor, beam_width: int, blank: int = BLANK) -> tuple[list[int], float]:
    """The most probable labelling (class ids) of one utterance's [T, C] frame log-probabilities that
    a prefix beam of ``beam_width`` finds, with its log-probability Pr(z | x)."""
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}  # prefix -> (ends blank, ends label)
    for row in log_probs.tolist():
        grown: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [-math.inf, -math.inf])
        for prefix, (pb, pnb) in beams.items():
            total = _logaddexp(pb, pnb)
            here = grown[prefix]
            here[0] = _logaddexp(here[0], total + row[blank])
            for c, lp in enumerate(row):
                if c == blank:
                    continue
                longer = grown[prefix + (c,)]
                if prefix and prefix[-1] == c:
                    # c again without a blank merges into the prefix; only after a blank it is a new label
                    here[1] = _logaddexp(here[1], pnb + lp)
                    longer[1] = _logaddexp(longer[1], pb + lp)
                else:
                    longer[1] = _logaddexp(longer[1], total + lp)
        ranked = sorted(grown.items(), key=lambda kv: _logaddexp(*kv[1]), reverse=True)[:beam_width]
        beams = {k: (v[0], v[1]) for k, v in ranked}
    best, (pb, pnb) = max(beams.items(), key=lambda kv: _logaddexp(*kv[1]))
    return list(best), _logaddexp(pb, pnb)


@ARCHITECTURES.register("ctc", family="structured output",
                        paper="Graves et al., Connectionist Temporal Classification: Labelling Unsegmented Sequence "
                              "Data with Recurrent Neural Networks (2006)")
class CTC(Architecture):
    """Frame encoder -> per-frame log-probabilities over blank + labels, trained by CTC; greedy or beam decoding."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int = 1, pattern="lstm",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu", mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None, feature_dim: int = 0,
                 n_labels: int = 10, decoding: str = "greedy", beam_width: int = 8):
        super().__init__()
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        self.n_labels = check_count("n_labels", n_labels, 1)
        self.beam_width = check_count("beam_width", beam_width, 1)
        self.decoding = decoding
        self.encoder = FrameEncoder(vocab_size, d_model, n_layers, pattern, mixer_config, mlp, mlp_ratio, norm,
                                    channel_options, feature_dim)
        self.vocab_size, self.feature_dim = vocab_size, feature_dim
        self.head = nn.Linear(d_model, n_labels + 1)  # class 0 the blank

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> CTC:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", n_labels=3)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def mixers(self):
        return self.encoder.backbone.mixers

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.encoder.backbone.init_state(batch_size, device=device, dtype=dtype or self.dtype)

    def state_size(self, seq_len: int) -> int:
        return self.encoder.backbone.state_size(seq_len)

    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> ModelOutput:
        """Per-frame log-probabilities [batch, time, n_labels + 1] (blank first) and the encoder's state."""
        h, state = self.encoder(tokens, state, resets=resets, features=features)
        return ModelOutput(self.head(h).log_softmax(-1), state)

    def head_loss(self, out: ModelOutput, batch) -> torch.Tensor:
        """CTC over each row's supervised frames: -log Pr(labels | frames), divided by the label length,
        averaged over the rows (``torch.nn.CTCLoss``'s mean); an impossible labelling (more labels than
        frames allow) scores 0 rather than inf (``zero_infinity``)."""
        log_probs = out.logits if out.logits.dtype in (torch.float32, torch.float64) else out.logits.float()
        frames, frame_lengths = utterance_frames(log_probs, batch.mask)
        labels, label_lengths = utterance_labels(batch, self.n_labels)
        targets = (labels + 1).clamp(min=0)  # label l is class l + 1; the padding is never read
        return F.ctc_loss(frames.transpose(0, 1), targets, frame_lengths, label_lengths, blank=BLANK,
                          reduction="mean", zero_infinity=True)

    @torch.no_grad()
    def decode(self, out: ModelOutput, batch, decoding: str | None = None) -> list[list[int]]:
        """Each row's labelling (labels 0..n_labels-1) from its supervised frames: the best path
        (``greedy``) or the prefix beam search (``beam``, ``beam_width`` prefixes); default
        ``self.decoding``."""
        decoding = self.decoding if decoding is None else decoding
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {', '.join(DECODINGS)}, got {decoding!r}")
        frames, lengths = utterance_frames(out.logits.detach().float().cpu(), batch.mask.cpu())
        rows = []
        for b, n in enumerate(lengths.tolist()):
            lp = frames[b, :n]
            classes = greedy_decode(lp) if decoding == "greedy" else prefix_beam_search(lp, self.beam_width)[0]
            rows.append([c - 1 for c in classes])
        return rows
