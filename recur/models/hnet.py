"""``hnet``: one stage of H-Net dynamic chunking over bytes (Hwang, Wang & Gu, "Dynamic Chunking for
End-to-End Hierarchical Sequence Modeling", 2025; reference code goombalab/hnet, ``hnet/modules/dc.py``).

    x = E bytes;  h = Encoder(x)                                    (a Backbone of any causal mixer)
    routing:   q_t = W_q h_t,  k_t = W_k h_t   (W_q = W_k = I at init)
               p_t = clamp((1 - cos(q_{t-1}, k_t)) / 2, 0, 1),  p_1 = 1;   b_t = [p_t > 0.5]
    chunking:  z_c = h_{t_c} for the boundary positions t_1 < t_2 < ... (b_t = 1), widened to d_main
               by a learned pad vector; ẑ = Main(z) over the chunks (a causal Backbone), cut back to d_model
    dechunk:   P_c = clamp(p_{t_c}, 1e-4, 1 - 1e-4);   z̄_c = P_c ẑ_c + (1 - P_c) z̄_{c-1}   (the smoothing EMA)
               upsampled:  u_t = z̄_{c(t)},  c(t) = the last chunk at or before t
    residual:  o_t = u_t · STE(s_t) + W_res h_t,  s_t = p_t if b_t else 1 - p_t,
               STE: forward 1, backward identity (the router's gradient);  W_res zero-initialised
    y = Decoder(o);  logits = W_head norm(y)
    ratio loss (target ratio 1/N):  F = mean(b), G = mean(p),
               L_ratio = N/(N-1) · ((1-F)(1-G) + (N-1) F G)   (minimal at F = G = 1/N)
    aux["ratio_loss"] = ratio_weight · L_ratio   (alpha = 0.03 and N = 6 for a 1-stage model, the paper's)

Causality: p_t reads h_{t-1} and h_t, the main network is causal over the chunks, chunk c holds
only bytes up to its boundary t_c, and the EMA runs forward; so byte t's logits depend on bytes <= t.

**State** (streaming, byte by byte): ``encoder``, ``main``, ``decoder`` (the three Backbones'
states), ``hidden`` [batch, d_model] (the last byte's encoder output, for the next cosine),
``value`` [batch, d_model] (the EMA's last z̄: bytes before this call's first boundary read it) and
``seen`` int64 [batch] (0 before the first byte: that byte is a boundary with p = 1). A step with
b_t = 0 does not advance the main network; one with b_t = 1 steps it once.

**Ragged chunks.** Rows select different numbers of chunks. The chunks of each row are packed
left-aligned with a per-row count; the rows are then grouped by count, and each group runs the main
network once on its rectangular [rows, count] input from its rows' states (no padding ever enters a
main-network mixer, so every mixer, recurrent or not, is exact), and the outputs are scattered back
into the packed layout. Rows with no chunk in a call keep their main state. The groups' states are
joined row by row: fixed-size entries concatenate; a growing KV cache (attention, swa) is padded on
the left to the longest, which attention hides exactly (the padded keys sit at positions before the
row's ``start``, behind its causal/document mask), and columns that are padding in every row are
dropped. The cost is one main-network call per distinct
count in the batch (about the batch size in training).

Packed documents (``resets``): a document's first byte is a boundary with p = 1 that ignores the
previous byte, the EMA forgets the previous document (z̄_0 = 0), and the main network resets at that
chunk, so a packed row equals its documents alone.

Deviations from the reference: the EMA is a masked closed form in PyTorch (the reference reuses the
Mamba-2 kernel with dt = log(1/(1-P)); the same recurrence); at a document start (and the first byte)
the EMA's previous value is zero, as in the reference's zero initial state. W_res is computed in the
model's dtype (the reference forces fp32). Initialisation is the library's (the reference scales
std 0.02/sqrt(n_residuals) and multiplies each stage's learning rate; neither is here). One stage only
(the main network is a Backbone, not a nested H-Net). The boundary is p_t > 0.5 strictly, as the
reference's argmax over [1 - p, p] breaks the tie toward "no boundary".
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.attention import Attention
from recur.layers.common import positive_int
from recur.layers.norms import build_norm
from recur.models.base import Architecture, Generator, ModelOutput, check_count, check_sizes, check_tokens
from recur.models.blocks import Backbone
from recur.registry import ARCHITECTURES, list_models, resolve_pattern
from recur.state import State

P_MIN = 1e-4  # the reference's clamp of the EMA's boundary probabilities


def routing_probabilities(h: torch.Tensor, previous: torch.Tensor, first: torch.Tensor,
                          w_q: nn.Module, w_k: nn.Module) -> torch.Tensor:
    """p_t = clamp((1 - cos(W_q h_{t-1}, W_k h_t)) / 2, 0, 1), and p_t = 1 where ``first`` [batch, time]
    (a sequence's or document's first byte). ``previous`` [batch, d]: h before h[:, 0]."""
    before = torch.cat([previous[:, None], h[:, :-1]], dim=1)
    cos = F.cosine_similarity(w_q(before), w_k(h), dim=-1, eps=1e-12)
    p = ((1 - cos) / 2).clamp(0.0, 1.0)
    return torch.where(first, torch.ones_like(p), p)


def pack_chunks(x: torch.Tensor, boundary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The boundary positions' vectors of each row, left-aligned: ([batch, max_count, ...], counts [batch])."""
    counts = boundary.sum(1)
    C = int(counts.max()) if counts.numel() else 0
    packed = x.new_zeros((x.shape[0], C, *x.shape[2:]))
    rows, times = boundary.nonzero(as_tuple=True)
    slot = boundary.long().cumsum(1) - 1
    packed[rows, slot[rows, times]] = x[rows, times]
    return packed, counts


def smooth_chunks(z: torch.Tensor, p: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor,
                  z0: torch.Tensor) -> torch.Tensor:
    """The smoothing EMA over packed chunks: z̄_c = P_c ẑ_c + (1 - P_c) z̄_{c-1}, P = clamp(p, 1e-4, 1 - 1e-4),
    z̄_{-1} = ``z0`` [batch, d], and z̄_{c-1} = 0 where ``starts`` [batch, C] (a document starts at chunk c).

    Closed form: z̄_c = sum_{j <= c, same document} P_j prod_{j < i <= c} (1 - P_i) ẑ_j
    (+ prod_{i <= c} (1 - P_i) z0 if no document starts at or before c), the products as exp of
    differences of cumulative log(1 - P) (<= 0, so no overflow). z: [batch, C, d]; p: [batch, C]."""
    B, C = p.shape
    valid = torch.arange(C, device=p.device)[None] < counts[:, None]
    P = torch.where(valid, p.clamp(P_MIN, 1 - P_MIN), torch.zeros_like(p))
    A = torch.log1p(-P).cumsum(1)  # [B, C]
    seg = starts.long().cumsum(1)
    same = (seg[:, :, None] == seg[:, None, :]) & torch.ones(C, C, dtype=torch.bool, device=p.device).tril()
    diff = torch.where(same, A[:, :, None] - A[:, None, :], torch.full_like(A[:, :, None].expand(B, C, C), -torch.inf))
    weights = diff.exp() * P[:, None, :]  # [B, c, j]
    carried = torch.where(seg == 0, A.exp(), torch.zeros_like(A))  # z0 survives until a document starts
    return weights @ z + carried[..., None] * z0[:, None]


def upsample(chunks: torch.Tensor, boundary: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """Back to bytes: byte t reads the last chunk at or before it, u_t = z̄_{c(t)}; bytes before the
    row's first boundary read ``carried`` [batch, d] (the previous call's last value). chunks: [batch, C, d]."""
    extended = torch.cat([carried[:, None], chunks], dim=1)
    index = boundary.long().cumsum(1)  # 0: no boundary yet in this call
    return extended.gather(1, index[..., None].expand(*boundary.shape, chunks.shape[-1]))


def straight_through(x: torch.Tensor) -> torch.Tensor:
    """1 in the forward pass, the identity's gradient in the backward pass."""
    return x - x.detach() + 1


def ratio_loss(boundary: torch.Tensor, p: torch.Tensor, n: float) -> torch.Tensor:
    """L_ratio = N/(N-1) ((1-F)(1-G) + (N-1) F G), F = mean(b) (no gradient), G = mean(p)."""
    f = boundary.to(p.dtype).mean()
    g = p.mean()
    return n / (n - 1) * ((1 - f) * (1 - g) + (n - 1) * f * g)


def _config_for(mixer_config: Mapping[str, Any] | None, pattern) -> dict[str, Any] | None:
    """The options that apply to a Backbone of ``pattern``: flat keys, and the per-model groups of its models."""
    if mixer_config is None:
        return None
    names, models = set(resolve_pattern(pattern)), set(list_models())
    return {k: v for k, v in dict(mixer_config).items() if not (k in models and isinstance(v, Mapping)) or k in names}


def _join_rows(parts: list[tuple[torch.Tensor, State]], batch: int, backbone: Backbone) -> State:
    """The Backbone state of the whole batch from per-group states (``parts``: (rows, state)): fixed
    entries concatenate; an attention cache is padded on the left (hidden by its mask, see the module)."""
    order = torch.cat([rows for rows, _ in parts])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch, device=order.device)
    joined = {}
    for key in parts[0][1]:
        states = [s[key] for _, s in parts]
        layer = int(key.removeprefix("layer").removeprefix("channel"))
        mixer = backbone.layers[layer].mixer
        if key.startswith("layer") and mixer.growing:
            grow = dict(mixer.growing)
            for entry, dim in grow.items():
                longest = max(s[entry].shape[dim] for s in states)
                if isinstance(mixer, Attention):
                    states = [s.replace(**{entry: _left_pad(s[entry], dim, longest)}) for s in states]
                elif any(s[entry].shape[dim] != longest for s in states):
                    raise ValueError(f"hnet: the main network's layer {layer} ({mixer.name!r}) keeps a growing state "
                                     f"({entry!r}) that cannot hold rows with different numbers of chunks; use a "
                                     f"fixed-size mixer or attention/swa for the main network")
        joined[key] = State.cat(states).select(inverse)
        if key.startswith("layer") and isinstance(mixer, Attention):
            joined[key] = _trim_padding(joined[key], mixer)
    return State(joined)


def _trim_padding(state: State, mixer: Attention) -> State:
    """Drop the cache columns that are padding in every row (a row holds min(pos, window - 1) real keys,
    the last ones), so a stepped batch's cache grows with the chunks, not with the bytes."""
    window = mixer.attention_window()
    real = state["pos"] if window is None else state["pos"].clamp(max=window - 1)
    keep = int(real.max()) if real.numel() else 0
    n = state["k"].shape[2]
    if keep >= n:
        return state
    return state.replace(k=state["k"][:, :, n - keep:].contiguous(), v=state["v"][:, :, n - keep:].contiguous())


def _left_pad(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    if t.shape[dim] == length:
        return t
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@ARCHITECTURES.register("hnet", family="hierarchical byte",
                        paper="Hwang, Wang & Gu, Dynamic Chunking for End-to-End Hierarchical Sequence Modeling (2025)")
class HNet(Generator, Architecture):
    """One-stage H-Net: a byte encoder, learned chunk boundaries, a main network over the chunks, a decoder.

    Encoder -> cosine router -> chunks -> main network -> smoothing dechunk -> straight-through
    residual -> decoder -> head, with the ratio loss toward one chunk per N bytes."""

    autoregressive = True
    STATE_KEYS = ("encoder", "main", "decoder", "hidden", "value", "seen")

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="mamba2",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu", mlp_ratio: float = 4.0,
                 norm: str = "rmsnorm", channel_options: Mapping[str, Any] | None = None,
                 encoder_layers: int = 2, decoder_layers: int = 2, main_pattern=None, d_main: int | None = None,
                 target_ratio: float = 6.0, ratio_weight: float = 0.03):
        super().__init__()
        check_count("vocab_size", vocab_size, 2)
        check_sizes(d_model, mlp_ratio)
        d_main = d_model if d_main is None else d_main
        if isinstance(d_main, bool) or not isinstance(d_main, int) or d_main < d_model:
            raise ValueError(f"d_main must be an int >= d_model={d_model} (the main network's width; the chunks are "
                             f"widened by a learned pad vector), got {d_main!r}")
        if isinstance(target_ratio, bool) or not isinstance(target_ratio, (int, float)) or not target_ratio > 1:
            raise ValueError(f"target_ratio must be a number > 1 (N: one chunk per N bytes is the target), got {target_ratio!r}")
        if isinstance(ratio_weight, bool) or not isinstance(ratio_weight, (int, float)) or ratio_weight < 0:
            raise ValueError(f"ratio_weight must be a number >= 0 (alpha of the ratio loss), got {ratio_weight!r}")
        main_pattern = pattern if main_pattern is None else main_pattern
        self.vocab_size, self.d_model, self.d_main = vocab_size, d_model, d_main
        self.target_ratio, self.ratio_weight = float(target_ratio), float(ratio_weight)
        parts = dict(mlp=mlp, mlp_ratio=mlp_ratio, norm=norm, channel_options=channel_options)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.encoder = Backbone(d_model, positive_int("encoder_layers", encoder_layers), pattern,
                                _config_for(mixer_config, pattern), **parts)
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():  # identity: at init the router compares the encoder's states themselves
            self.w_q.weight.copy_(torch.eye(d_model))
            self.w_k.weight.copy_(torch.eye(d_model))
        self.pad = nn.Parameter(torch.zeros(d_main - d_model)) if d_main > d_model else None
        self.main = Backbone(d_main, positive_int("n_layers", n_layers), main_pattern,
                             _config_for(mixer_config, main_pattern), **parts)
        self.residual = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.residual.weight)  # the skip starts closed: the main network's path carries the signal
        self.decoder = Backbone(d_model, positive_int("decoder_layers", decoder_layers), pattern,
                                _config_for(mixer_config, pattern), **parts)
        self.norm = build_norm(norm, d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> HNet:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=1, pattern="gla", encoder_layers=1,
                   decoder_layers=1, d_main=d_model + 8)

    # -- protocol -----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def mixers(self):
        return self.encoder.mixers + self.main.mixers + self.decoder.mixers

    def set_mode(self, mode: str) -> None:
        for b in (self.encoder, self.main, self.decoder):
            b.set_mode(mode)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        dtype = dtype or self.dtype
        zeros = torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)
        return State(encoder=self.encoder.init_state(batch_size, device, dtype),
                     main=self.main.init_state(batch_size, device, dtype),
                     decoder=self.decoder.init_state(batch_size, device, dtype),
                     hidden=zeros, value=zeros.clone(), seen=torch.zeros(batch_size, dtype=torch.int64, device=device))

    def state_size(self, seq_len: int) -> int:
        """Floats per sequence; the main network's part is its size after ``seq_len`` chunks (an upper
        bound for a growing cache: a call of seq_len bytes selects at most seq_len chunks)."""
        return (self.encoder.state_size(seq_len) + self.main.state_size(seq_len) + self.decoder.state_size(seq_len)
                + 2 * self.d_model)

    def _check_state(self, state: State, batch: int) -> None:
        if not isinstance(state, State) or set(state) != set(self.STATE_KEYS):
            got = sorted(state) if isinstance(state, State) else type(state).__name__
            raise ValueError(f"hnet state must be a State with entries {sorted(self.STATE_KEYS)} (from init_state or "
                             f"a previous call), got {got}")
        for key in ("hidden", "value"):
            if tuple(state[key].shape) != (batch, self.d_model):
                raise ValueError(f"hnet state entry {key!r} must have shape {(batch, self.d_model)}, "
                                 f"got {tuple(state[key].shape)}")
        if tuple(state["seen"].shape) != (batch,):
            raise ValueError(f"hnet state entry 'seen' must have shape {(batch,)}, got {tuple(state['seen'].shape)}")

    # -- the model -------------------------------------------------------------------
    def route(self, h: torch.Tensor, state: State, resets: torch.Tensor | None):
        """(p, b, first): the boundary probabilities and decisions of the encoder outputs ``h``."""
        first = torch.zeros(h.shape[:2], dtype=torch.bool, device=h.device)
        first[:, 0] = state["seen"] == 0
        if resets is not None:
            first = first | resets
        p = routing_probabilities(h, state["hidden"], first, self.w_q, self.w_k)
        return p, p > 0.5, first

    def run_main(self, z: torch.Tensor, counts: torch.Tensor, starts: torch.Tensor, state: State):
        """The main network over packed chunks ``z`` [batch, C, d_main] (row b's first counts[b] are real),
        rows grouped by count (see the module docstring). Returns (outputs [batch, C, d_main], state)."""
        B = z.shape[0]
        out = z.new_zeros(z.shape)
        parts = []
        for c in torch.unique(counts).tolist():
            rows = (counts == c).nonzero(as_tuple=True)[0]
            if c == 0:
                parts.append((rows, state.select(rows)))
                continue
            r = starts[rows, :c]
            y, s = self.main(z[rows, :c], state.select(rows), resets=r if bool(r.any()) else None)
            out[rows, :c] = y
            parts.append((rows, s))
        return out, _join_rows(parts, B, self.main)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        B, T = tokens.shape
        if state is None:
            state = self.init_state(B, device=tokens.device)
        self._check_state(state, B)
        if resets is not None and (not isinstance(resets, torch.Tensor) or resets.dtype != torch.bool
                                   or tuple(resets.shape) != (B, T)):
            raise ValueError(f"resets must be a bool tensor of the tokens' shape {(B, T)}")
        h, enc_state = self.encoder(self.embed(tokens), state["encoder"], resets=resets)
        p, b, first = self.route(h, state, resets)

        z = h if self.pad is None else torch.cat([h, self.pad.to(h.dtype).expand(B, T, -1)], dim=-1)
        chunks, counts = pack_chunks(z, b)
        chunk_p, _ = pack_chunks(p, b)
        chunk_starts, _ = pack_chunks(first & (resets if resets is not None else torch.zeros_like(first)), b)
        main_out, main_state = self.run_main(chunks, counts, chunk_starts, state["main"])
        smoothed = smooth_chunks(main_out[..., :self.d_model], chunk_p, counts, chunk_starts, state["value"])

        up = upsample(smoothed, b, state["value"])
        selected = torch.where(b, p, 1 - p)
        y, dec_state = self.decoder(up * straight_through(selected)[..., None] + self.residual(h),
                                    state["decoder"], resets=resets)
        new_state = State(encoder=enc_state, main=main_state, decoder=dec_state, hidden=h[:, -1],
                          value=up[:, -1], seen=torch.ones_like(state["seen"]))
        F_ratio = b.to(p.dtype).mean()
        aux = {"ratio_loss": self.ratio_weight * ratio_loss(b, p, self.target_ratio),
               "selection_ratio": F_ratio.detach(), "boundary_prob": p.mean().detach()}
        return ModelOutput(self.head(self.norm(y)), new_state, aux)

    @torch.no_grad()
    def boundaries(self, tokens: torch.Tensor) -> torch.Tensor:
        """The router's decisions b [batch, time] (bool) on ``tokens`` from the zero state."""
        check_tokens(tokens, self.vocab_size)
        state = self.init_state(tokens.shape[0], device=tokens.device)
        h, _ = self.encoder(self.embed(tokens), state["encoder"])
        return self.route(h, state, None)[1]


def plot_boundaries(model: HNet, text: str, path, bos: int | None = 256) -> str:
    """Write ``text`` with the model's learned chunk boundaries to ``path`` as an HTML snippet (each chunk
    a boxed span; a boundary byte starts a box), and return the plain-text form with ``|`` before every
    boundary byte. ``bos``: the token the model reads before a document (None: none)."""
    data = list(text.encode("utf-8"))
    tokens = torch.tensor([([bos] if bos is not None else []) + data], device=model.embed.weight.device)
    b = model.boundaries(tokens)[0].tolist()[1 if bos is not None else 0:]
    chunks, current = [], []
    for byte, starts in zip(data, b):
        if starts and current:
            chunks.append(current)
            current = []
        current.append(byte)
    chunks.append(current)
    words = [bytes(c).decode("utf-8", errors="replace") for c in chunks]
    spans = "".join(f'<span style="border:1px solid #c33;border-radius:3px;padding:0 1px;margin:0 1px;'
                    f'white-space:pre">{html.escape(w)}</span>' for w in words)
    ratio = sum(b) / max(1, len(b))
    snippet = (f'<div style="font-family:monospace;line-height:1.9">{spans}</div>\n'
               f'<p>{len(words)} chunks over {len(data)} bytes (selection ratio {ratio:.3f})</p>\n')
    with open(path, "w", encoding="utf-8") as f:
        f.write(snippet)
    return "|".join(words)


__all__ = ["HNet", "pack_chunks", "plot_boundaries", "ratio_loss", "routing_probabilities", "smooth_chunks",
           "straight_through", "upsample"]
