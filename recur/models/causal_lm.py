"""``causal_lm``: token embedding -> Backbone of Blocks -> norm -> (tied or untied) head; one class for every mixer.

    lm = CausalLM(vocab_size=256, d_model=64, n_layers=4, pattern="samba")
    logits, state = lm(tokens)                # tokens: int64 [batch, time]; a ModelOutput that unpacks
    logits, state = lm(more_tokens, state)    # carries every layer's memory
    out = lm.generate(prompt, max_new_tokens=32, temperature=0.8, top_k=20)

p(x_{t+1} | x_{<=t}) = softmax(W_head norm(h_t)), h = Backbone(E x); hybrids are layer patterns.

Real-valued data (``Task.model_io``): with ``feature_dim = F`` the model reads ``features`` [batch,
time, F] beside the tokens, h = Backbone(E x + W_in f); with ``target_dim = k`` the head is a
regression head, y_t = W_out norm(h_t) + b (k reals, trained by squared error), as the in-context
regression models of Garg et al. (2022) read and write vectors.

The head is untied from the embedding by default (``tie_embeddings=False``). Tied, with the mixers'
own (PyTorch-default) projection initialisation, the residual stream and the shared matrix pull
against each other: a 2-layer attention LM reached 0.17 on MQAR at lr 1e-3 in 3000 steps where the
same model untied reached 0.99 in 2100 (Zoology's tied LM initialises every projection at std 0.02,
which also learns: 0.98). Measured in docs/results.md ("causes").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from recur.layers.norms import build_norm
from recur.models.base import (Architecture, Generator, ModelOutput, check_count, check_features, check_positions,
                               check_sizes, check_tokens)
from recur.models.blocks import Backbone
from recur.registry import ARCHITECTURES
from recur.state import State



def build_lm_layers(lm: nn.Module, vocab_size: int, d_model: int, n_layers: int, pattern, mixer_config, mlp,
                    mlp_ratio: float, tie_embeddings: bool, norm: str, channel_options, shared_blocks, *,
                    feature_dim: int = 0, target_dim: int = 0) -> None:
    """Give ``lm`` the layers of a token language model, checked and initialised in this order (so a
    seed gives the same weights whichever model builds them): ``vocab_size``, ``embed`` (N(0, 0.02)),
    ``backbone``, the final ``norm`` and the ``head`` (tied to the embedding if asked). Shared by
    CausalLM and the segment-level models (``recur.models.segments``). ``feature_dim`` > 0 adds the
    input projection ``features`` (after the rest); ``target_dim`` > 0 makes the head a regression
    head of that many outputs (with a bias)."""
    for name, value in (("feature_dim", feature_dim), ("target_dim", target_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0: none), got {value!r}")
    if target_dim and tie_embeddings:
        raise ValueError("a regression head (target_dim > 0) cannot be tied to the token embedding; "
                         "set tie_embeddings=false")
    check_count("vocab_size", vocab_size, 2)
    check_sizes(d_model, mlp_ratio)
    lm.vocab_size = vocab_size
    lm.embed = nn.Embedding(vocab_size, d_model)
    nn.init.normal_(lm.embed.weight, std=0.02)
    lm.backbone = Backbone(d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio, norm=norm,
                           channel_options=channel_options, shared_blocks=shared_blocks)
    lm.norm = build_norm(norm, d_model)
    lm.head = nn.Linear(d_model, target_dim, bias=True) if target_dim else nn.Linear(d_model, vocab_size, bias=False)
    if tie_embeddings:
        lm.head.weight = lm.embed.weight
    lm.feature_dim, lm.target_dim = feature_dim, target_dim
    if feature_dim:
        lm.features = nn.Linear(feature_dim, d_model)

@ARCHITECTURES.register("causal_lm", family="language model",
                        paper="Radford et al., Improving Language Understanding by Generative Pre-Training (2018)")
class CausalLM(Generator, Architecture):
    """Token embedding -> Backbone -> norm -> (tied or untied) head; one class for every mixer."""

    autoregressive = True
    sparse_head = True

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 feature_dim: int = 0, target_dim: int = 0):
        super().__init__()
        build_lm_layers(self, vocab_size, d_model, n_layers, pattern, mixer_config, mlp, mlp_ratio, tie_embeddings,
                        norm, channel_options, shared_blocks, feature_dim=feature_dim, target_dim=target_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def mixers(self):
        return self.backbone.mixers

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.backbone.init_state(batch_size, device=device, dtype=dtype or self.dtype)

    def state_size(self, seq_len: int) -> int:
        return self.backbone.state_size(seq_len)

    def set_mode(self, mode: str) -> None:
        self.backbone.set_mode(mode)

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> ModelOutput:
        """``resets`` bool [batch, time]: True where a packed document starts (every layer's state
        goes back to the initial state before that token). ``positions`` bool [batch, time]: compute
        the head only there (``ModelOutput.positions``); the state is the same either way.
        ``features`` [batch, time, feature_dim]: the real-valued inputs of a model built for them."""
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        h, state = self.backbone(self.embed_inputs(tokens, features), state, resets=resets)
        return self.output(h, state, positions)

    def embed_inputs(self, tokens: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The input of the first layer: E x, plus W_in f for a model with real-valued inputs."""
        check_features(features, tokens, getattr(self, "feature_dim", 0))
        e = self.embed(tokens)
        return e if features is None else e + self.features(features.to(e.dtype))

    def output(self, h: torch.Tensor, state: State, positions: torch.Tensor | None = None) -> ModelOutput:
        """The head over the final hidden states ``h`` [batch, time, d_model], at every position or
        at ``positions`` only."""
        if positions is None:
            return ModelOutput(self.head(self.norm(h)), state)
        return ModelOutput(self.head(self.norm(h[positions])), state, positions=positions)
