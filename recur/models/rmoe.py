"""``rmoe``: a causal LM whose channel mixers are top-k mixtures of experts routed by a GRU that
runs over the layer axis (Qiu et al., "Layerwise Recurrent Router for Mixture-of-Experts", 2024;
reference code ``qiuzh20/RMoE``, ``llama_moe_rnn``).

Per token, at layer l (x_l: the hidden state after layer l's token mixer):

    u_l = norm_l(x_l)                                   the MoE's input (pre-norm)
    g_l = GRU(W_in_l u_l, g_{l-1}),   g_0 = 0           one GRU cell shared by every layer
    p_l = softmax(W_out_l g_l)                          router probabilities over n_experts
    S   = top_k(p_l);   w_e = p_e / sum_{e' in S} p_e'  gate renormalised over the chosen experts
    x_{l+1} = x_l + sum_{e in S} w_e Expert_{l,e}(u_l)  experts: the block's channel MLP (SwiGLU)

``recurrent_router=False`` is the plain per-layer router, p_l = softmax(W_out_l W_in_l u_l): the
same parameters less the GRU, so the two differ by the recurrence only (the comparison the paper
makes against a standard linear router).

Load balancing (Switch Transformer), per MoE layer over the call's tokens, averaged over layers:

    balance_loss = balance_weight * mean_l  n_experts * sum_e f_e P_e
    f_e = fraction of the token-to-expert assignments that go to e (sum_e f_e = 1; no gradient)
    P_e = mean over tokens of p_e

It is 1 * balance_weight when routing is uniform. ``aux`` also holds ``expert_usage_entropy``
(the entropy of f over log n_experts, averaged over layers: 1 when every expert gets the same
share) and ``router_entropy`` (the mean entropy of p, in nats).

The GRU runs across the layers of one token, so it holds nothing across time: the state is the
token mixers' states only, ``State(layer0=..., layer1=...)``, exactly a Backbone's.

Defaults and deviations. The reference config uses 8 experts, top-2 and a GRU width of 256 at
d_model 4096; here ``n_experts=8``, ``top_k=2``, ``router_dim=None`` (= d_model). The reference
(HF Mixtral's loss) pools all layers' router outputs into one f and P and uses f_e = count_e / N
(summing to top_k, so its loss is top_k times this one at the same f) with coefficient 0.001;
here the loss is per layer, then averaged, normalised to 1 at balance, with ``balance_weight=0.01``
(Switch's). The reference initialises the router projections and the GRU (biases too) N(0, 0.02),
which at its width 4096 is about PyTorch's default scale 1 / sqrt(fan_in) = 0.016; at recur's small
widths N(0, 0.02) makes the GRU's biases dominate its tiny input term, so every token picked the
same experts at initialisation (measured: an expert of the d_model=16 example received no token).
Here the router keeps PyTorch's default initialisation, the reference's scale at its own width.
Experts run on the tokens that chose them (a loop over experts with index masks): exact, with no
capacity limit and no dropped tokens, like the reference's dropless MoE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.channel import build_channel
from recur.layers.common import positive_int
from recur.layers.norms import build_norm
from recur.models.base import ModelOutput, check_positions, check_tokens
from recur.models.causal_lm import CausalLM
from recur.models.loops import check_state_entries, iteration_keys
from recur.registry import ARCHITECTURES
from recur.state import State

PAPER = "Qiu et al., Layerwise Recurrent Router for Mixture-of-Experts (2024)"


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router probabilities p = softmax(logits) [N, E], the chosen experts [N, k] and their gates
    renormalised over the chosen ones [N, k]."""
    probs = logits.softmax(-1)
    top, chosen = probs.topk(top_k, dim=-1)
    return probs, chosen, top / top.sum(-1, keepdim=True)


def mix_experts(u: torch.Tensor, experts: nn.ModuleList, chosen: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """sum over the chosen experts of gate * expert(u), each expert run on its own tokens only.
    u: [N, d]; chosen, gates: [N, k]."""
    out = torch.zeros_like(u)
    for e, expert in enumerate(experts):
        hit = chosen == e  # [N, k]: a token picks an expert at most once (topk indices are distinct)
        rows = hit.any(-1).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            continue
        weight = (gates * hit).sum(-1)[rows]
        out = out.index_add(0, rows, expert.mix(u[rows]) * weight[:, None])
    return out


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch's load-balancing loss n_experts * sum_e f_e P_e for one layer: f_e the share of the
    N * k assignments that went to e (counted, no gradient), P_e the mean router probability."""
    f = F.one_hot(chosen, n_experts).to(probs.dtype).sum((0, 1)) / chosen.numel()
    return n_experts * (f * probs.mean(0)).sum()


def usage_entropy(chosen: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Entropy of the experts' shares of the assignments over log n_experts (1: uniform use)."""
    f = torch.bincount(chosen.flatten(), minlength=n_experts).double() / chosen.numel()
    return -(f * f.clamp_min(1e-300).log()).sum() / math.log(n_experts)


@ARCHITECTURES.register("rmoe", family="depth-recurrent", paper=PAPER)
class RecurrentRouterMoE(CausalLM):
    """A CausalLM whose blocks mix channels with top-k experts, routed by a GRU over the layers (RMoE)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, n_experts: int = 8, top_k: int = 2,
                 router_dim: int | None = None, recurrent_router: bool = True, balance_weight: float = 0.01):
        # the Backbone holds the token-mixer halves (Blocks without a channel); the MoE half is here
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=None, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm)
        self.n_experts = positive_int("n_experts", n_experts)
        if self.n_experts < 2:
            raise ValueError(f"n_experts must be an int >= 2 (a mixture), got {n_experts!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= self.n_experts:
            raise ValueError(f"top_k must be an int in [1, n_experts={self.n_experts}], got {top_k!r}")
        self.top_k = top_k
        self.router_dim = d_model if router_dim is None else positive_int("router_dim", router_dim)
        if not isinstance(recurrent_router, bool):
            raise ValueError(f"recurrent_router must be True (GRU router) or False (per-layer router), "
                             f"got {recurrent_router!r}")
        self.recurrent_router = recurrent_router
        if (isinstance(balance_weight, bool) or not isinstance(balance_weight, (int, float))
                or not math.isfinite(balance_weight) or balance_weight < 0):
            raise ValueError(f"balance_weight must be a finite number >= 0, got {balance_weight!r}")
        self.balance_weight = float(balance_weight)
        if mlp is None:
            raise ValueError("rmoe's experts are channel MLPs: mlp must name one (swiglu, gelu), got None")
        options = {"ratio": mlp_ratio, **dict(channel_options or {})}
        self.norms = nn.ModuleList(build_norm(norm, d_model) for _ in range(n_layers))
        self.experts = nn.ModuleList(
            nn.ModuleList(build_channel(mlp, d_model, i, n_layers, **options) for _ in range(self.n_experts))
            for i in range(n_layers))
        if self.experts[0][0].stateful:
            raise ValueError(f"rmoe's experts must be stateless channel MLPs (swiglu, gelu), got mlp={mlp!r}, "
                             "which carries a state across tokens")
        self.router_in = nn.ModuleList(nn.Linear(d_model, self.router_dim, bias=False) for _ in range(n_layers))
        self.router_out = nn.ModuleList(nn.Linear(self.router_dim, self.n_experts, bias=False)
                                        for _ in range(n_layers))
        # PyTorch's default initialisation (uniform, scale 1 / sqrt(fan_in)): see the module docstring
        self.gru = nn.GRUCell(self.router_dim, self.router_dim) if recurrent_router else None

    def router_logits(self, l: int, u: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer l's router logits [N, n_experts] from its MoE input u [N, d] and the GRU state g
        [N, router_dim] left by layer l - 1 (None at layer 0: g_0 = 0); returns (logits, g_l)."""
        a = self.router_in[l](u)
        if self.gru is None:
            return self.router_out[l](a), None
        g = self.gru(a, torch.zeros_like(a) if g is None else g)
        return self.router_out[l](g), g

    def forward(self, tokens: torch.Tensor, state: State | None = None,
                resets: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> ModelOutput:
        check_tokens(tokens, self.vocab_size)
        if positions is not None:
            check_positions(positions, tokens)
        n = self.backbone.n_layers
        check_state_entries(state, iteration_keys("layer", n), "rmoe")
        B, T = tokens.shape
        x = self.embed(tokens)
        new, g, losses, usage, entropy = {}, None, [], [], []
        for l, block in enumerate(self.backbone.layers):
            key = f"layer{l}"
            x, new[key], _ = block(x, None if state is None else state[key], resets=resets)  # the mixer half
            u = self.norms[l](x).reshape(B * T, -1)  # routing and experts are per token
            logits, g = self.router_logits(l, u, g)
            probs, chosen, gates = route(logits, self.top_k)
            x = x + mix_experts(u, self.experts[l], chosen, gates).reshape(B, T, -1)
            if u.shape[0]:
                losses.append(balance_loss(probs, chosen, self.n_experts))
                usage.append(usage_entropy(chosen, self.n_experts))
                entropy.append(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean())
        out = self.output(x, State(new), positions)
        if losses:
            out.aux = {"balance_loss": self.balance_weight * torch.stack(losses).mean(),
                       "expert_usage_entropy": torch.stack(usage).mean().to(x.dtype).detach(),
                       "router_entropy": torch.stack(entropy).mean().detach()}
        return out

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> RecurrentRouterMoE:
        return cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="gla", n_experts=4, top_k=2)


__all__ = ["RecurrentRouterMoE", "balance_loss", "mix_experts", "route"]
