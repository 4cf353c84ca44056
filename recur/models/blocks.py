"""Blocks from parts and the Backbone that stacks them.

    block = Block(recur.build("gla", d_model=64), channel="swiglu", norm="rmsnorm")
    y, state = block(x, state)                        # pre-norm residual: x + mixer(norm(x)), then + channel(norm(x))
    backbone = Backbone(64, n_layers=6, pattern="samba", channel="gelu", shared_blocks=2)
    h, state = backbone(x, state)                     # State(layer0=..., layer1=..., [channel{i}=...])
    h, state = backbone(x, state, resets=mask)        # packed documents: every layer resets where mask is True

A block is assembled from named parts (Mamba's ``Block(dim, mixer_cls, mlp_cls, norm_cls)``): a
token mixer, a channel mixer (``swiglu``, ``gelu``, ``rwkv4``, or None) and a norm (``rmsnorm``,
``layernorm``). The Backbone's layer i uses the mixer ``pattern[i % len(pattern)]``; with
``shared_blocks=k`` only k blocks are built and layer i reuses block ``i % k`` (tied weights, one
state per layer all the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.layers.channel import build_channel, depth_kwargs
from recur.layers.norms import build_norm
from recur.models.base import check_mode_name
from recur.registry import build, list_models, model_info, resolve_pattern
from recur.state import State


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm1(x)), then x + channel(norm2(x)) (channel optional)."""

    def __init__(self, mixer: Mixer, channel: str | None = "swiglu", mlp_ratio: float = 4.0, norm: str = "rmsnorm",
                 norm_eps: float = 1e-5, channel_options: Mapping[str, Any] | None = None,
                 layer_idx: int = 0, n_layers: int = 1):
        super().__init__()
        d = mixer.d_model
        self.mixer = mixer
        self.norm1 = build_norm(norm, d, norm_eps)
        options = {"ratio": mlp_ratio, **dict(channel_options or {})}
        self.channel = build_channel(channel, d, layer_idx, n_layers, **options)
        self.norm2 = build_norm(norm, d, norm_eps) if self.channel is not None else None

    @property
    def stateful_channel(self) -> bool:
        return self.channel is not None and self.channel.stateful

    def forward(self, x: torch.Tensor, state: State | None = None, channel_state: State | None = None,
                resets: torch.Tensor | None = None) -> tuple[torch.Tensor, State, State | None]:
        """Returns (output, mixer state, channel state or None). ``resets``: packed documents (the mixer's)."""
        y, state = self.mixer(self.norm1(x), state, resets=resets)
        x = x + y
        if self.channel is not None:
            y, channel_state = self.channel(self.norm2(x), channel_state, resets=resets)
            x = x + y
        return x, state, channel_state if self.stateful_channel else None


def mixer_kwargs(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Options for one mixer: flat keys apply to every mixer, a key naming a model to that model only."""
    config = dict(config or {})
    models = set(list_models())
    flat = {k: v for k, v in config.items() if not (k in models and isinstance(v, Mapping))}
    return {**flat, **dict(config.get(name, {}) if isinstance(config.get(name), Mapping) else {})}


def check_mixer_config(config: Mapping[str, Any] | None, names) -> None:
    """``config`` is a mapping, and a per-model group (``{"swa": {"window": 64}}``) names a model of the
    pattern ``names``: options for a mixer the model does not have are an error, not ignored."""
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise TypeError(f"mixer_config (model.mixer_args) must be a mapping of options, got {type(config).__name__}")
    models = set(list_models())
    absent = [k for k, v in config.items() if k in models and isinstance(v, Mapping) and k not in names]
    if absent:
        mixers = ", ".join(dict.fromkeys(names))
        raise ValueError(f"mixer options for {', '.join(repr(a) for a in absent)}, which {'is' if len(absent) == 1 else 'are'}"
                         f" not in this model: its mixers are {mixers} (options MODEL.KEY apply to that model's layers)")


def _mixer_depth(name: str, layer_idx: int, n_layers: int) -> dict[str, int]:
    return depth_kwargs(model_info(name).cls, layer_idx, n_layers)


class Backbone(nn.Module):
    """A stack of Blocks whose mixers follow ``pattern`` repeated to ``n_layers``.

    ``pattern`` is a model name, a preset (``"samba"``) or a list such as
    ``["mamba", "mamba", "swa"]``; hybrids (Samba, Griffin, 1-in-N attention) are patterns.
    The state is ``State(layer0=..., layer1=...)`` (each mixer's state), plus ``channel{i}`` for
    the blocks whose channel mixer carries a state (RWKV's token shift).
    ``causal=False`` admits encoder mixers (bidirectional), for encoders only.
    """

    def __init__(self, d_model: int, n_layers: int, pattern, mixer_config: Mapping[str, Any] | None = None,
                 mlp: str | None = "swiglu", mlp_ratio: float = 4.0, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 causal: bool = True):
        super().__init__()
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
        names = resolve_pattern(pattern)
        check_mixer_config(mixer_config, names)
        self.layer_names = [names[i % len(names)] for i in range(n_layers)]
        unique = n_layers if shared_blocks is None else shared_blocks
        if isinstance(unique, bool) or not isinstance(unique, int) or not 1 <= unique <= n_layers:
            raise ValueError(f"shared_blocks must be an int in [1, n_layers={n_layers}] or None, got {shared_blocks!r}")
        if shared_blocks is not None and any(self.layer_names[i] != self.layer_names[i % unique] for i in range(n_layers)):
            raise ValueError(f"shared_blocks={unique}: layer i reuses block i % {unique}, so the pattern "
                             f"{list(names)} must repeat every {unique} layers")
        self.d_model, self.n_layers, self.causal = d_model, n_layers, causal
        built = []
        for i in range(unique):
            n = self.layer_names[i]
            mixer = build(n, d_model=d_model, **_mixer_depth(n, i, n_layers), **mixer_kwargs(n, mixer_config))
            built.append(Block(mixer, channel=mlp, mlp_ratio=mlp_ratio, norm=norm, channel_options=channel_options,
                               layer_idx=i, n_layers=n_layers))
        self.blocks = nn.ModuleList(built)
        self.order = [i % unique for i in range(n_layers)]  # layer i runs blocks[order[i]]
        for i, m in enumerate(self.mixers):
            if causal and not m.causal:
                # An encoder layer (e.g. bidirectional) lets position t see tokens after t: a causal
                # LM trained with it would learn to copy the next token, and generation would break.
                raise ValueError(f"layer {i} ({self.layer_names[i]!r}) is not causal (causal=False, an encoder "
                                 f"layer that reads the future); a Backbone / CausalLM needs causal mixers")

    @property
    def layers(self) -> list[Block]:
        """The block each layer runs (a shared block appears once per layer that uses it)."""
        return [self.blocks[j] for j in self.order]

    @property
    def mixers(self) -> list[Mixer]:
        return [b.mixer for b in self.layers]

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        entries = {}
        for i, b in enumerate(self.layers):
            entries[f"layer{i}"] = b.mixer.init_state(batch_size, device=device, dtype=dtype)
            if b.stateful_channel:
                entries[f"channel{i}"] = b.channel.init_state(batch_size, device=device, dtype=dtype)
        return State(entries)

    def state_size(self, seq_len: int) -> int:
        return sum(b.mixer.state_size(seq_len) + (b.channel.state_size() if b.stateful_channel else 0)
                   for b in self.layers)

    def set_mode(self, mode: str) -> None:
        """Use ``mode`` in every mixer that supports it (others keep theirs)."""
        check_mode_name(mode)
        for m in self.mixers:
            if mode in m.modes:
                m.mode = mode

    def _state_keys(self) -> set[str]:
        keys = {f"layer{i}" for i in range(self.n_layers)}
        return keys | {f"channel{i}" for i, b in enumerate(self.layers) if b.stateful_channel}

    def forward(self, x: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, after_layer=None) -> tuple[torch.Tensor, State]:
        """``resets`` bool [batch, time]: True where a packed document starts (every layer resets).
        ``after_layer(i, x) -> x``: applied to each layer's output before the next layer reads it (a
        decoder's cross-attention between its layers)."""
        if state is not None and (not isinstance(state, State) or set(state) != self._state_keys()):
            got = sorted(state) if isinstance(state, State) else type(state).__name__
            raise ValueError(f"backbone state must be a State with entries {sorted(self._state_keys())} "
                             f"(from init_state or a previous call), got {got}")
        new = {}
        for i, block in enumerate(self.layers):
            get = (lambda k: None) if state is None else state.get
            x, new[f"layer{i}"], ch = block(x, get(f"layer{i}"), get(f"channel{i}"), resets=resets)
            if ch is not None:
                new[f"channel{i}"] = ch
            if after_layer is not None:
                x = after_layer(i, x)
        return x, State(new)


__all__ = ["Backbone", "Block", "mixer_kwargs"]
