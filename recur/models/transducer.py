"""``transducer``: the RNN transducer (Graves 2012, "Sequence Transduction with Recurrent Neural
Networks"): a frame encoder, a prediction network over the label history and a joint network,
trained by the transducer loss (``recur.models.transducer_loss``), decoded greedily.

    f_t = W_e norm(Encoder(E x + W_in f)_t) + b_e          the transcription network, any mixer (LSTM default)
    g_u = W_p norm(Predictor(E_y [SOS, y_1 .. y_U])_u)     the prediction network, any mixer (LSTM default)
    z(t, u) = W_out tanh(f_t + g_u) + b_out                the joint network, over blank (class 0) + labels
    loss = -log Pr(y | x) = -log sum over the lattice paths (transducer_loss), divided by the label
           length and averaged over the rows

Label l is class l + 1 (``batch.labels`` hold 0..K-1); the prediction network's first input is a
learned start embedding (row 0 of E_y) where the paper feeds a zero vector for the null label.
The utterance is the supervised frames (``batch.mask``) in order; on a batch without label
sequences (the conformance suite's per-position batches) each row's labelling is the targets of its
supervised positions, as for ``ctc``.

Deviation: the joint is the one of Graves, Mohamed & Hinton (2013, "Speech Recognition with Deep
Recurrent Neural Networks"), z = W_out tanh(W_e f + W_p g); the 2012 paper summed the two networks'
(K + 1)-sized outputs before the softmax (Pr(k|t,u) proportional to exp(f_t^k + g_u^k)). The tanh
joint is the form later transducers use and the one the issue asks for.

The forward pass over the frame stream is the encoder's, with the encoder's state (so a stream read
in pieces gives the same frames): a ``TransducerOutput`` whose ``encoded`` is f_t [batch, time,
joint_dim], what the loss and decoding read over the whole utterance, and whose ``logits`` are
z(t, 0) [batch, time, classes], the lattice's first row: each frame's distribution before any label
is emitted (the blank-or-first-label decision; every other row depends on the label history).

Greedy decoding (Graves 2012 decodes with a beam search; this is its width-1 form): at each frame,
emit the argmax label and advance the prediction network until the blank is the argmax or
``max_symbols`` labels were emitted at this frame, then go to the next frame.
``example()`` reads tokens only (``feature_dim=0``: the frames are embedded tokens).

Options (``--set model.args.NAME=VALUE``): ``n_labels`` (the task gives it), ``predictor_pattern``,
``predictor_layers`` and ``predictor_config`` (the prediction network's mixers, layers and mixer
options; the encoder's are ``--model``, ``--n-layers`` and ``model.mixer_args``), ``joint_dim``
(default d_model), ``max_symbols`` (greedy decoding's labels per frame, default 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recur.layers.norms import build_norm
from recur.models.base import Architecture, ModelOutput, check_count
from recur.models.blocks import Backbone
from recur.models.ctc import BLANK, FrameEncoder, utterance_frames, utterance_labels
from recur.models.transducer_loss import transducer_loss
from recur.registry import ARCHITECTURES
from recur.state import State

SOS = 0  # the prediction network's start symbol (its embedding row 0; label l is row l + 1)


@dataclass
class TransducerOutput(ModelOutput):
    """A ModelOutput with the encoder's term of the joint network, f_t [batch, time, joint_dim]."""

    encoded: torch.Tensor | None = None


def encoded_frames(out: ModelOutput) -> torch.Tensor:
    encoded = getattr(out, "encoded", None)
    if encoded is None:
        raise ValueError("the transducer's loss and decoding read the encoder outputs of its forward pass "
                         "(TransducerOutput.encoded); this output has none (call the model on the whole utterance)")
    return encoded


@ARCHITECTURES.register("transducer", family="structured output",
                        paper="Graves, Sequence Transduction with Recurrent Neural Networks (2012)")
class Transducer(Architecture):
    """Frame encoder + prediction network + joint network, trained by the transducer loss; greedy decoding."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int = 1, pattern="lstm",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu", mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None, feature_dim: int = 0,
                 n_labels: int = 10, predictor_pattern="lstm", predictor_layers: int = 1,
                 predictor_config: Mapping[str, Any] | None = None, joint_dim: int | None = None,
                 max_symbols: int = 4):
        super().__init__()
        self.n_labels = check_count("n_labels", n_labels, 1)
        self.max_symbols = check_count("max_symbols", max_symbols, 1)
        joint_dim = d_model if joint_dim is None else check_count("joint_dim", joint_dim, 2)
        check_count("predictor_layers", predictor_layers, 1)
        self.encoder = FrameEncoder(vocab_size, d_model, n_layers, pattern, mixer_config, mlp, mlp_ratio, norm,
                                    channel_options, feature_dim)
        self.vocab_size, self.feature_dim = vocab_size, feature_dim
        self.label_embed = nn.Embedding(n_labels + 1, d_model)  # row 0: the start symbol
        nn.init.normal_(self.label_embed.weight, std=0.02)
        # the prediction network's own mixer options: model.mixer_args are the encoder's, whose mixers may differ
        self.predictor = Backbone(d_model, predictor_layers, predictor_pattern, predictor_config, mlp=mlp,
                                  mlp_ratio=mlp_ratio, norm=norm, channel_options=channel_options)
        self.predictor_norm = build_norm(norm, d_model)
        self.joint_encoder = nn.Linear(d_model, joint_dim)  # W_e, b_e
        self.joint_predictor = nn.Linear(d_model, joint_dim, bias=False)  # W_p
        self.joint_out = nn.Linear(joint_dim, n_labels + 1)  # W_out over blank + labels

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> Transducer:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", n_labels=3,
                   predictor_pattern="gla", joint_dim=8)

    @property
    def dtype(self) -> torch.dtype:
        return self.joint_out.weight.dtype

    @property
    def mixers(self):
        return self.encoder.backbone.mixers + self.predictor.mixers

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.encoder.backbone.init_state(batch_size, device=device, dtype=dtype or self.dtype)

    def state_size(self, seq_len: int) -> int:
        return self.encoder.backbone.state_size(seq_len)

    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> ModelOutput:
        """f_t (``encoded``), the first lattice row z(t, 0) (``logits``) and the encoder's state."""
        h, state = self.encoder(tokens, state, resets=resets, features=features)
        f = self.joint_encoder(h)
        g0, _ = self.predict(torch.full((1, 1), SOS, dtype=torch.int64, device=tokens.device))  # the same for every row
        return TransducerOutput(self.joint(f, g0.to(f.dtype)), state, encoded=f)

    # -- the prediction and joint networks ------------------------------------------
    def predict(self, history: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """g_u for prediction-network inputs ``history`` (int64 [batch, n]: SOS = 0, label l = l + 1)."""
        p, state = self.predictor(self.label_embed(history), state)
        return self.joint_predictor(self.predictor_norm(p)), state

    def joint(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """z = W_out tanh(f + g): f [..., joint_dim] and g broadcast against each other."""
        return self.joint_out(torch.tanh(f + g))

    def head_loss(self, out: ModelOutput, batch) -> torch.Tensor:
        f = encoded_frames(out)
        f = f if f.dtype in (torch.float32, torch.float64) else f.float()
        frames, frame_lengths = utterance_frames(f, batch.mask)
        labels, label_lengths = utterance_labels(batch, self.n_labels)
        keep = frame_lengths > 0  # a row with no supervised frame has no utterance to score
        frames, frame_lengths = frames[keep, :int(frame_lengths.max())], frame_lengths[keep]
        labels, label_lengths = labels[keep], label_lengths[keep]
        classes = labels + 1  # label l is class l + 1 (padding, -1 -> 0, is never read)
        history = torch.cat([torch.full_like(classes[:, :1], SOS), classes.clamp(min=0)], dim=1)
        g, _ = self.predict(history)
        z = self.joint(frames[:, :, None], g[:, None].to(frames.dtype))  # [B, T, U + 1, classes]
        return transducer_loss(z, classes, frame_lengths, label_lengths, blank=BLANK)

    @torch.no_grad()
    def decode(self, out: ModelOutput, batch) -> list[list[int]]:
        """Greedy decoding of each row's supervised frames: labels 0..n_labels-1 per row."""
        frames, lengths = utterance_frames(encoded_frames(out).detach(), batch.mask)
        B = frames.shape[0]
        g, state = self.predict(torch.full((B, 1), SOS, dtype=torch.int64, device=frames.device))
        hyps: list[list[int]] = [[] for _ in range(B)]
        for t in range(int(lengths.max())):
            going = t < lengths  # rows still reading frame t
            for _ in range(self.max_symbols):
                k = self.joint(frames[:, t], g[:, 0].to(frames.dtype)).argmax(-1)
                emit = going & (k != BLANK)
                if not emit.any():
                    break
                for b in emit.nonzero()[:, 0].tolist():
                    hyps[b].append(int(k[b]) - 1)
                g_new, state_new = self.predict(k[:, None], state)
                g = torch.where(emit[:, None, None], g_new, g)
                state = _where_rows(emit, state_new, state)
                going = emit  # a row that chose the blank moves on to the next frame
        return hyps


def _where_rows(rows: torch.Tensor, new: State, old: State) -> State:
    """The state with ``new``'s entries in the rows where ``rows`` (bool [batch]) holds, ``old``'s elsewhere."""
    old_entries = dict(old.tensors())

    def pick(key: str, t: torch.Tensor) -> torch.Tensor:
        o = old_entries[key]
        return torch.where(rows.view(-1, *(1,) * (t.ndim - 1)), t, o)

    def walk(state: State, prefix: str) -> State:
        return State({k: walk(v, f"{prefix}{k}.") if isinstance(v, State) else pick(f"{prefix}{k}", v)
                      for k, v in state.items()})

    return walk(new, "")
