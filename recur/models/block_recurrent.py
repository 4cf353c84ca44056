"""``block_recurrent``: the Block-Recurrent Transformer (Hutchins, Schlag, Wu, Dyer & Neyshabur, NeurIPS 2022).

    lm = BlockRecurrentTransformer(vocab_size=256, d_model=64, n_layers=4, window=32, n_states=8)
    logits, state = lm(tokens)               # a causal LM; recurrence over windows of `window` tokens
    logits, state = lm(more_tokens, state)   # the call may have ended mid-window: it resumes exactly

A causal LM whose layers are pre-norm transformer blocks over a sliding window, and whose
``recurrent_layers`` (default: layer n_layers // 2) also carry N state vectors S from one window of
W tokens to the next. Per recurrent layer, with h the block's normed input, windows w = 0, 1, ...
counted from the document's start, and S_0 the learned ``initial_state``:

    tokens (horizontal):  q, k, v, q2 = W_q h, W_k h, W_v h, W_q2 h
                          self_t  = softmax(rot(q_t) . rot(k_j) / sqrt(d)) v_j   over j in t-W .. t
                          read_t  = softmax(q2_t . rk(S_w) / sqrt(d)) rv(S_w)    (t in window w: the OLD state)
                          y_t     = W_o [self_t ; read_t]                        (then the block's residual + FFN)
    state (vertical):     z = norm(S_w) + P;  rq, rk, rv, rq2 = W z (four projections; P: learned positions)
                          a = [softmax(rq . rk / sqrt(d)) rv ; softmax(rq2 . k_w / sqrt(d)) v_w]   (k_w, v_w:
                              the W tokens of window w, unmasked: the update uses the whole window)
                          S_{w+1} = gate(S_w, W_s a, a)                          at the end of window w
    gates:                fixed: g = sigmoid(b);  S' = S * g + y * (1 - g)       (the paper's "fixed" gate)
                          lstm:  f = sigmoid(W_f a + b_f + 1), i = sigmoid(W_i a + b_i - 1);  S' = S * f + y * i
    state_ffn=True:       then S'' = gate'(S', W_2 u, u), u = relu(W_1 norm(S'))  (the "dual" configuration)

Tokens read S_w, the state from before their window, so a token never sees the later tokens of its
own window; the update reads the whole window and only later windows see it. The other layers are
the mixer ``pattern`` (default ``swa``, whose window is set to W + 1 so that each token attends to
itself and the W tokens before it, as the recurrent layer's own self-attention does); any causal
mixer may take their place.

State per recurrent layer: ``S`` [batch, N, d_model], the keys and values of the last W tokens
(unrotated, [batch, heads, min(T, W), head_dim]) and the counters ``pos`` / ``start``. The cache is
at once the previous window's keys/values and the pending partial window (its last
(pos - start) mod W entries), so a call may end anywhere in a window: carrying the state equals one
call on the concatenation. Modes of the recurrent layer: ``parallel`` (all tokens' attention at once,
the state updated once per window, the state reads batched by window) and ``recurrent`` (token by
token through the cache, the state updated when a window ends: the reference). Packed documents
(``resets``) restart the windows, the state (back to ``initial_state``) and the attention at each
document's first token.

Interpreted from the reference code (google-research/meliad, first commit: transformer_layer.py,
transformer_base.py, nn_components.py), which this follows for the projections (the state's keys and
values serve both its self-attention and the tokens' read; the window's keys for the update are the
tokens' own, unrotated), the concatenated heads before one projection, the gates and their
initialisation, the learned initial state and state positions. It differs in: scores scaled by
1/sqrt(head_dim) with rotary positions (recur's attention; meliad L2-normalises keys and queries with
a learned per-head scale and adds T5 relative biases); a token attends to itself and the W tokens
before it (meliad: the W tokens before it, itself excluded); the state cross-attends to the current
window only (meliad: the previous and the current window, 2W keys, an all-zero previous window at a
document's start, which recur's first window simply does not have); windows count from each
document's start, so any length and any split of a call work (meliad: a training segment is a
multiple of W). As in meliad, the gradient flows through the state over the windows of one call;
meliad trains one segment per step with the state carried without gradient, which here is the
caller's choice (a detached state, e.g. the ``tbptt`` training method). Not here:
meliad's ``single_gate`` variant, the "feedback" configuration (every layer reads the recurrent
state) and dropout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import merge_heads, positive_int, rotary, split_heads
from recur.layers.norms import build_norm
from recur.models.base import ModelOutput, check_positions, in_pieces
from recur.models.blocks import Block
from recur.models.causal_lm import CausalLM
from recur.ops.attention import attention, attention_step, trim_cache
from recur.registry import ARCHITECTURES, resolve_pattern
from recur.state import State

GATES = ("fixed", "lstm")
PAPER = "Hutchins et al., Block-Recurrent Transformers (NeurIPS 2022)"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Unmasked softmax attention over the last two dimensions: q [..., Lq, d], k, v [..., Lk, d]."""
    return torch.softmax(scale * q @ k.transpose(-1, -2), dim=-1) @ v


def _shifted(t: torch.Tensor, shift: torch.Tensor, length: int) -> torch.Tensor:
    """t [batch, heads, L, d] read at entries shift[b] .. shift[b] + length - 1 of each row b:
    [batch, heads, length, d]. Entries outside 0 .. L - 1 are filler (zeros, or a copy of an edge
    entry when the rows' shifts differ), which no caller reads."""
    if bool((shift == shift[0]).all()):  # one shift for every row (no packed documents): a slice
        a = int(shift[0])
        piece = t[:, :, max(a, 0):max(a + length, 0)]
        before = min(max(-a, 0), length)
        after = length - before - piece.shape[2]
        return F.pad(piece, (0, 0, before, after)) if before or after else piece
    index = (shift[:, None] + torch.arange(length, device=t.device)).clamp(0, t.shape[2] - 1)
    return t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))


class Gate(nn.Module):
    """The state's gate (meliad's ``MLP._gate``): the new value from the old one ``s``, the branch's
    output ``y`` and the hidden vector ``h`` the branch read.

    fixed: g = sigmoid(b), s * g + y * (1 - g);  lstm: s * sigmoid(W_f h + b_f + 1) + y * sigmoid(W_i h + b_i - 1).
    Biases start at N(0, 0.1), kernels at a truncated normal of variance 0.1 / fan_in (as meliad).
    """

    def __init__(self, kind: str, hidden: int, d_model: int):
        super().__init__()
        if kind not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)} (the paper's fixed and LSTM gates), got {kind!r}")
        self.kind = kind
        if kind == "fixed":
            self.bias = nn.Parameter(0.1 * torch.randn(d_model))
        else:
            self.forget = nn.Linear(hidden, d_model)
            self.input = nn.Linear(hidden, d_model)
            std = math.sqrt(0.1 / hidden)
            for layer in (self.forget, self.input):
                nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.normal_(layer.bias, std=0.1)

    def forward(self, s: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "fixed":
            g = torch.sigmoid(self.bias)
            return s * g + y * (1 - g)
        # biased to remember (+1) and to write little (-1) at the start
        return s * torch.sigmoid(self.forget(h) + 1) + y * torch.sigmoid(self.input(h) - 1)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class StateKVQ(NamedTuple):
    """The state's queries, keys, values and cross-attention queries, each [batch, heads, N, head_dim]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q2: torch.Tensor


class BlockRecurrentLayer(Mixer):
    """The recurrent layer's token mixer: sliding-window self-attention plus a read of the old state,
    and the state's update at every window's end (see the module docstring).

    ``window`` W (tokens per window; each token attends to itself and the W before it), ``n_states``
    N, ``gate`` (fixed or lstm), ``state_ffn`` (a gated FFN after the state's attention, hidden width
    ``ffn_ratio * d_model``), ``n_heads`` / ``head_dim`` (default: at least two heads of at most 64),
    ``norm`` (the state's pre-attention norm), ``rotary_base``.
    """

    name = "block_recurrent"
    modes = ("parallel", "recurrent")
    growing = (("k", 2), ("v", 2))
    linear_recurrence = False
    state_formula = "2 * n_heads * head_dim * min(T, window) + n_states * d_model"

    def __init__(self, d_model: int, window: int = 32, n_states: int = 8, gate: str = "fixed",
                 state_ffn: bool = False, mode: str | None = None, n_heads: int | None = None,
                 head_dim: int | None = None, norm: str = "rmsnorm", ffn_ratio: float = 4.0,
                 rotary_base: float = 10000.0):
        super().__init__(d_model, mode)
        self.window = positive_int("window", window, owner=self.name)
        self.n_states = positive_int("n_states", n_states, owner=self.name)
        if not isinstance(state_ffn, bool):
            raise ValueError(f"{self.name}: state_ffn must be true or false, got {state_ffn!r}")
        n_heads, head_dim = self._init_heads(n_heads, head_dim, even=True)
        self.rotary_base = rotary_base
        inner = n_heads * head_dim
        # tokens: self-attention (q, k, v) and the read of the state (q2), one output projection
        self.q_proj, self.k_proj, self.v_proj, self.q2_proj = (nn.Linear(d_model, inner, bias=False) for _ in range(4))
        self.o_proj = nn.Linear(2 * inner, d_model, bias=False)
        # the state: learned start and positions, its own norm and projections, the gated update
        self.initial_state = nn.Parameter(0.1 * torch.randn(n_states, d_model))
        self.state_positions = nn.Parameter(torch.randn(n_states, d_model))
        self.state_norm = build_norm(norm, d_model)
        self.state_proj = nn.Linear(d_model, 4 * inner, bias=False)  # rq, rk, rv, rq2
        self.state_out = nn.Linear(2 * inner, d_model, bias=False)
        self.gate = Gate(gate, 2 * inner, d_model)
        self.state_ffn = state_ffn
        if state_ffn:
            hidden = max(1, int(round(ffn_ratio * d_model)))
            self.ffn_norm = build_norm(norm, d_model)
            self.ffn_in = nn.Linear(d_model, hidden, bias=False)
            self.ffn_out = nn.Linear(hidden, d_model, bias=False)
            self.ffn_gate = Gate(gate, hidden, d_model)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size, device=None, dtype=None) -> State:
        empty = torch.zeros(batch_size, self.n_heads, 0, self.head_dim, device=device, dtype=dtype)
        counter = torch.zeros(batch_size, device=device, dtype=torch.int64)
        # the learned initial state, a copy per row (the gradient reaches the parameter through it)
        S = self.initial_state.to(device=device, dtype=dtype).expand(batch_size, -1, -1).clone()
        return State(pos=counter, start=counter.clone(), k=empty, v=empty.clone(), S=S)

    def state_size(self, seq_len: int) -> int:
        return 2 * self.n_heads * self.head_dim * min(seq_len, self.window) + self.n_states * self.d_model

    def reset_rows(self, state, rows, initial):
        """Rows where ``rows`` is True start a document at their next token: the state vectors go back
        to the initial state, the window restarts and the cached keys are hidden (``start``)."""
        return state.replace(start=torch.where(rows, state["pos"], state["start"]),
                             S=torch.where(rows[:, None, None], initial["S"].to(state["S"].dtype), state["S"]))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, window={self.window}, n_states={self.n_states}, gate={self.gate.kind!r}, "
                f"state_ffn={self.state_ffn}, n_heads={self.n_heads}, head_dim={self.head_dim}")

    # ------------------------------------------------------------ the state's side
    def state_kvq(self, S: torch.Tensor) -> StateKVQ:
        """S [batch, N, d_model] -> its queries, keys, values and cross queries [batch, heads, N, head_dim]."""
        z = self.state_norm(S) + self.state_positions.to(S.dtype)
        return StateKVQ(*(split_heads(p, self.n_heads) for p in self.state_proj(z).chunk(4, dim=-1)))

    def state_update(self, S: torch.Tensor, kvq: StateKVQ, k_w: torch.Tensor, v_w: torch.Tensor) -> torch.Tensor:
        """The state after a window whose keys and values are k_w, v_w [batch, heads, W, head_dim]."""
        scale = 1.0 / math.sqrt(self.head_dim)
        a = merge_heads(torch.cat([_attend(kvq.q, kvq.k, kvq.v, scale), _attend(kvq.q2, k_w, v_w, scale)], dim=1))
        S = self.gate(S, self.state_out(a), a)
        if self.state_ffn:
            u = F.relu(self.ffn_in(self.ffn_norm(S)))
            S = self.ffn_gate(S, self.ffn_out(u), u)
        return S

    # ------------------------------------------------------------------ forward
    def _forward(self, x, state):
        T, H, W = x.shape[1], self.n_heads, self.window
        pos, start, S = state["pos"], state["start"], state["S"]
        q, k, v, q2 = (split_heads(p(x), H) for p in (self.q_proj, self.k_proj, self.v_proj, self.q2_proj))
        if self.mode == "parallel":
            n = state["k"].shape[2]
            k_all, v_all = torch.cat([state["k"], k], dim=2), torch.cat([state["v"], v], dim=2)
            o_self = self._self_attention(q, k_all, v_all, pos, start)
            o_read, S = self._windows(q2, k_all, v_all, S, (pos - start) % W, n)
            k_cache, v_cache = trim_cache(k_all, W + 1), trim_cache(v_all, W + 1)
        else:
            o_self, o_read, S, k_cache, v_cache = self._reference(q, k, v, q2, state)
        y = self.o_proj(merge_heads(torch.cat([o_self, o_read], dim=1)))
        return y, State(pos=pos + T, start=start, k=k_cache, v=v_cache, S=S)

    def _rotate(self, t: torch.Tensor, first_position: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Rotary positions counted from the document's start; t [batch, heads, L, d] holds the tokens at
        absolute positions first_position .. first_position + L - 1 (per row)."""
        positions = first_position[:, None] + torch.arange(t.shape[2], device=t.device)
        return rotary(t, positions - start[:, None], self.rotary_base)

    def _self_attention(self, q, k_all, v_all, pos, start):
        """Every new token over itself and the W tokens before it (cached keys first)."""
        T, first_key = q.shape[2], pos - (k_all.shape[2] - q.shape[2])  # absolute position of key index 0
        first = None
        if bool((start > first_key).any()):  # the cache holds keys of an earlier document: hide them
            first = (start - first_key).clamp(min=0)[:, None].expand(-1, T)
        return attention(self._rotate(q, pos, start), self._rotate(k_all, first_key, start), v_all,
                         window=self.window + 1, scale=1.0 / math.sqrt(self.head_dim), mode="parallel", first=first)

    def _windows(self, q2, k_all, v_all, S, phase, n):
        """Window-parallel: the state updated once per complete window, every token's read batched by window.

        Row b's stream is its ``phase`` pending tokens (the last entries of the cache) and then the new
        ones, laid on a grid of windows: stream index s is window s // W. The rows' phases may differ
        (packed documents), so row b completes ``done[b]`` windows and some rows one fewer than others.
        """
        T, dh, W = q2.shape[2], q2.shape[3], self.window
        length = phase + T
        done = length // W  # complete windows per row
        c = int(done.max())
        reads = int(((length - 1) // W).max()) + 1  # windows whose state some new token reads: c or c + 1
        kvqs = []
        if c:
            k_w = _shifted(k_all, n - phase, c * W).unflatten(2, (c, W))  # [B, H, c, W, dh]
            v_w = _shifted(v_all, n - phase, c * W).unflatten(2, (c, W))
            uneven = bool((done < c).any())
        for j in range(c):
            kvqs.append(self.state_kvq(S))
            updated = self.state_update(S, kvqs[-1], k_w[:, :, j], v_w[:, :, j])
            # a row with one window fewer keeps its state at the last step
            S = torch.where((done > j)[:, None, None], updated, S) if uneven and j == c - 1 else updated
        if reads > c:
            kvqs.append(self.state_kvq(S))
        # the reads: queries on the grid ([B, reads, H, W, dh]) against their window's state
        queries = _shifted(q2, -phase, reads * W).unflatten(2, (reads, W)).transpose(1, 2).flatten(0, 1)
        rk = torch.stack([kv.k for kv in kvqs], dim=1).flatten(0, 1)  # [B * reads, H, N, dh]
        rv = torch.stack([kv.v for kv in kvqs], dim=1).flatten(0, 1)
        out = F.scaled_dot_product_attention(queries, rk, rv, scale=1.0 / math.sqrt(dh)).unflatten(0, (-1, reads))
        return _shifted(out.transpose(1, 2).flatten(2, 3), phase, T), S

    def _reference(self, q, k, v, q2, state):
        """Token by token through the cache; the state is updated when a row's window ends."""
        T, W = q.shape[2], self.window
        pos, start, S = state["pos"], state["start"], state["S"]
        k_cache, v_cache = state["k"], state["v"]
        scale = 1.0 / math.sqrt(self.head_dim)
        kvq = self.state_kvq(S)
        o_self, o_read = [], []
        for t in range(T):
            p = pos + t
            k_cache = torch.cat([k_cache, k[:, :, t:t + 1]], dim=2)
            v_cache = torch.cat([v_cache, v[:, :, t:t + 1]], dim=2)
            first_key = p + 1 - k_cache.shape[2]
            first = (start - first_key).clamp(min=0) if bool((start > first_key).any()) else None
            o_self.append(attention_step(self._rotate(q[:, :, t:t + 1], p, start)[:, :, 0],
                                         self._rotate(k_cache, first_key, start), v_cache,
                                         window=W + 1, scale=scale, first=first))
            o_read.append(_attend(q2[:, :, t:t + 1], kvq.k, kvq.v, scale)[:, :, 0])
            k_cache, v_cache = trim_cache(k_cache, W + 1), trim_cache(v_cache, W + 1)
            ended = (p - start + 1) % W == 0
            if bool(ended.any()):  # the cache now holds exactly the window that ended (in those rows)
                S = torch.where(ended[:, None, None], self.state_update(S, kvq, k_cache, v_cache), S)
                kvq = self.state_kvq(S)
        return torch.stack(o_self, dim=2), torch.stack(o_read, dim=2), S, k_cache, v_cache


def _recurrent_indices(recurrent_layers, n_layers: int) -> tuple[int, ...]:
    """The recurrent layers as sorted non-negative indices (negative ones count from the top)."""
    if recurrent_layers is None:
        return (n_layers // 2,)
    given = [recurrent_layers] if isinstance(recurrent_layers, int) and not isinstance(recurrent_layers, bool) \
        else recurrent_layers
    ok = isinstance(given, Sequence) and not isinstance(given, str) and len(given) > 0 and all(
        isinstance(i, int) and not isinstance(i, bool) and -n_layers <= i < n_layers for i in given)
    indices = sorted({i % n_layers for i in given}) if ok else []
    if not ok or len(indices) != len(given):
        raise ValueError(f"recurrent_layers must be a layer index or a list of distinct ones in [-{n_layers}, "
                         f"{n_layers}) (n_layers={n_layers}; negative ones count from the top), got {recurrent_layers!r}")
    return tuple(indices)


@ARCHITECTURES.register("block_recurrent", family="segment memory", paper=PAPER)
class BlockRecurrentTransformer(CausalLM):
    """Causal LM of sliding-window blocks whose recurrent layers carry N state vectors across windows.

    The Block-Recurrent Transformer: see the module docstring for the equations, the state and the
    options (``window`` W, ``n_states`` N, ``recurrent_layers``, ``gate``, ``state_ffn``, ``n_heads`` /
    ``head_dim`` of the recurrent layers); the other layers are the mixer ``pattern`` (default ``swa``).
    """

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="swa",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, window: int = 32, n_states: int = 8,
                 recurrent_layers: int | Sequence[int] | None = None, gate: str = "fixed", state_ffn: bool = False,
                 n_heads: int | None = None, head_dim: int | None = None):
        window = positive_int("window", window, owner="block_recurrent")
        if isinstance(n_layers, int) and not isinstance(n_layers, bool) and n_layers >= 1:
            indices = _recurrent_indices(recurrent_layers, n_layers)
        else:
            indices = ()  # the Backbone names the bad n_layers
        super().__init__(vocab_size, d_model, n_layers, pattern, _swa_window(mixer_config, pattern, window),
                         mlp=mlp, mlp_ratio=mlp_ratio, tie_embeddings=tie_embeddings, norm=norm,
                         channel_options=channel_options)
        self.window, self.recurrent_layers = window, indices
        for i in indices:  # the recurrent layers take the place of the pattern's mixer there
            layer = BlockRecurrentLayer(d_model, window=window, n_states=n_states, gate=gate, state_ffn=state_ffn,
                                        n_heads=n_heads, head_dim=head_dim, norm=norm, ffn_ratio=mlp_ratio)
            self.backbone.blocks[i] = Block(layer, channel=mlp, mlp_ratio=mlp_ratio, norm=norm,
                                            channel_options=channel_options, layer_idx=i, n_layers=n_layers)
            self.backbone.layer_names[i] = BlockRecurrentLayer.name

    #: Without autograd, a call longer than this many windows runs in pieces of it (``in_pieces``):
    #: equal to one call by the state contract, and evaluation memory stays flat in the length, as
    #: the segment-memory models' is (benchmarks/segment_memory.py measures it).
    eval_windows = 8

    def forward(self, tokens: torch.Tensor, state: State | None = None, resets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> ModelOutput:
        piece = self.eval_windows * self.window
        if torch.is_grad_enabled() or not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 \
                or tokens.shape[1] <= piece:
            return super().forward(tokens, state, resets=resets, positions=positions)
        if positions is not None:
            check_positions(positions, tokens)
        return in_pieces(super().forward, tokens, state, piece, resets=resets, positions=positions)

    @property
    def recurrent(self) -> list[BlockRecurrentLayer]:
        """The recurrent layers' mixers, bottom to top."""
        return [self.backbone.blocks[i].mixer for i in self.recurrent_layers]

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> BlockRecurrentTransformer:
        # T = 23 ends mid-window (W = 5); the recurrent layer sits above a sliding-window layer
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="swa", window=5, n_states=2,
                   gate="lstm")


def _swa_window(mixer_config: Mapping[str, Any] | None, pattern, window: int):
    """``mixer_config`` with the ``swa`` layers' window at W + 1 (each token sees itself and the W before
    it, as in the recurrent layer), unless the config sets a window itself."""
    try:
        names = resolve_pattern(pattern)
    except Exception:
        return mixer_config  # the Backbone names the bad pattern
    if "swa" not in names or (mixer_config is not None and not isinstance(mixer_config, Mapping)):
        return mixer_config
    config = dict(mixer_config or {})
    own = config.get("swa")
    if "window" in config or (isinstance(own, Mapping) and "window" in own):
        return mixer_config
    config["swa"] = {**(dict(own) if isinstance(own, Mapping) else {}), "window": window + 1}
    return config


__all__ = ["BlockRecurrentLayer", "BlockRecurrentTransformer", "Gate"]
