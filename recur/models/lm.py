"""Assembly: Block, Backbone (layer patterns, hybrids) and CausalLM with streaming generation.

    lm = CausalLM(vocab_size=256, d_model=64, n_layers=4, pattern="samba")
    logits, state = lm(tokens)                # tokens: int64 [batch, time]
    logits, state = lm(more_tokens, state)    # carries every layer's memory
    out = lm.generate(prompt, max_new_tokens=32, temperature=0.8, top_k=20)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.registry import build, list_models, model_info, resolve_pattern
from recur.state import State


class MLP(nn.Module):
    """Channel mixing: SwiGLU (Shazeer 2020) or GELU MLP."""

    def __init__(self, d_model: int, kind: str = "swiglu", ratio: float = 4.0):
        super().__init__()
        if kind not in ("swiglu", "gelu"):
            raise ValueError(f"mlp must be 'swiglu', 'gelu' or None, got {kind!r}")
        self.kind = kind
        if kind == "swiglu":
            hidden = max(8, int(round(2 * ratio * d_model / 3 / 8)) * 8)  # same parameter count as a ratio-x MLP
            self.up = nn.Linear(d_model, 2 * hidden, bias=False)
        else:
            hidden = int(ratio * d_model)
            self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            a, b = h.chunk(2, dim=-1)
            h = F.silu(a) * b
        else:
            h = F.gelu(h)
        return self.down(h)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (MLP optional)."""

    def __init__(self, mixer: Mixer, mlp: str | None = "swiglu", mlp_ratio: float = 4.0, norm_eps: float = 1e-5):
        super().__init__()
        d = mixer.d_model
        self.mixer = mixer
        self.norm1 = nn.RMSNorm(d, eps=norm_eps)
        self.mlp = MLP(d, mlp, mlp_ratio) if mlp else None
        self.norm2 = nn.RMSNorm(d, eps=norm_eps) if mlp else None

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        y, state = self.mixer(self.norm1(x), state)
        x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x, state


def _mixer_kwargs(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options for one mixer: flat keys apply to every mixer, a key naming a model to that model only."""
    config = dict(config or {})
    models = set(list_models())
    flat = {k: v for k, v in config.items() if not (k in models and isinstance(v, Mapping))}
    return {**flat, **dict(config.get(name, {}) if isinstance(config.get(name), Mapping) else {})}


def _depth_kwargs(name: str, layer_idx: int, n_layers: int) -> dict[str, int]:
    """``layer_idx`` and ``n_layers`` for mixers whose constructor takes them (HGRN's
    forget-gate lower bound grows with depth); nothing for the others."""
    params = inspect.signature(model_info(name).cls.__init__).parameters
    return {"layer_idx": layer_idx, "n_layers": n_layers} if {"layer_idx", "n_layers"} <= set(params) else {}


class Backbone(nn.Module):
    """A stack of Blocks whose mixers follow ``pattern`` repeated to ``n_layers``.

    ``pattern`` is a model name, a preset (``"samba"``) or a list such as
    ``["mamba", "mamba", "swa"]``; hybrids (Samba, Griffin, 1-in-N attention) are patterns.
    The state is ``State(layer0=..., layer1=...)``.
    """

    def __init__(self, d_model: int, n_layers: int, pattern, mixer_config: Mapping[str, Any] | None = None,
                 mlp: str | None = "swiglu", mlp_ratio: float = 4.0):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        names = resolve_pattern(pattern)
        self.layer_names = [names[i % len(names)] for i in range(n_layers)]
        self.d_model = d_model
        self.blocks = nn.ModuleList(
            Block(build(n, d_model=d_model, **_depth_kwargs(n, i, n_layers), **_mixer_kwargs(n, mixer_config)),
                  mlp=mlp, mlp_ratio=mlp_ratio)
            for i, n in enumerate(self.layer_names)
        )
        for i, m in enumerate(self.mixers):
            if not m.causal:
                # An encoder layer (e.g. bidirectional) lets position t see tokens after t: a causal
                # LM trained with it would learn to copy the next token, and generation would break.
                raise ValueError(f"layer {i} ({self.layer_names[i]!r}) is not causal (causal=False, an encoder "
                                 f"layer that reads the future); a Backbone / CausalLM needs causal mixers")

    @property
    def mixers(self) -> list[Mixer]:
        return [b.mixer for b in self.blocks]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return State({f"layer{i}": m.init_state(batch_size, device=device, dtype=dtype) for i, m in enumerate(self.mixers)})

    def state_size(self, seq_len: int) -> int:
        return sum(m.state_size(seq_len) for m in self.mixers)

    def set_mode(self, mode: str) -> None:
        """Use ``mode`` in every mixer that supports it (others keep theirs)."""
        for m in self.mixers:
            if mode in m.modes:
                m.mode = mode

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if state is not None:
            if not isinstance(state, State) or set(state) != {f"layer{i}" for i in range(len(self.blocks))}:
                raise ValueError(f"backbone state must be a State with entries layer0..layer{len(self.blocks) - 1}")
        new = {}
        for i, block in enumerate(self.blocks):
            x, new[f"layer{i}"] = block(x, None if state is None else state[f"layer{i}"])
        return x, State(new)


class CausalLM(nn.Module):
    """Token embedding -> Backbone -> RMSNorm -> (tied or untied) head; one class for every mixer."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = True):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.backbone = Backbone(d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio)
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.backbone.init_state(batch_size, device=device, dtype=dtype or self.dtype)

    def state_size(self, seq_len: int) -> int:
        return self.backbone.state_size(seq_len)

    def set_mode(self, mode: str) -> None:
        self.backbone.set_mode(mode)

    def forward(self, tokens: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an integer tensor of shape [batch, time], got {getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape [batch, time], got {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]")
        h, state = self.backbone(self.embed(tokens), state)
        return self.head(self.norm(h)), state

    @torch.no_grad()
    def stream(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               state: State | None = None, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Yield new tokens ([batch] each) one at a time.

        The prompt is read in one call (fast mode); each new token is then one step with the
        carried state, so recurrent models generate in constant memory and attention uses its
        KV cache. ``temperature=0`` is greedy; otherwise sample, optionally from the top-k logits.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.vocab_size}], got {top_k}")
        logits, state = self(prompt, state)
        last = logits[:, -1]
        for _ in range(max_new_tokens):
            token = _sample(last, temperature, top_k, generator)
            yield token
            logits, state = self(token[:, None], state)
            last = logits[:, -1]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The prompt followed by ``max_new_tokens`` generated tokens: int64 [batch, time + new]."""
        new = list(self.stream(prompt, max_new_tokens, temperature, top_k, generator=generator))
        return torch.cat([prompt, torch.stack(new, dim=1)], dim=1) if new else prompt.clone()


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
