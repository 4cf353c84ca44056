"""Linear attention (Katharopoulos et al. 2020): softmax attention with the kernel exp(q.k)
replaced by phi(q).phi(k), which turns causal attention into a recurrence over a
d_phi x d_v matrix state. The feature map phi is an option: elu + 1 (the paper's), identity,
relu, or Based's second-order Taylor expansion of exp (Arora et al. 2024).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import merge_heads, positive_int, split_heads
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State

FEATURE_MAPS = ("elu+1", "identity", "relu", "taylor")


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = [1, x, vec(x x^T) / sqrt(2)]: [..., d] -> [..., 1 + d + d^2].

    phi(x).phi(y) = 1 + x.y + (x.y)^2 / 2, the second-order Taylor expansion of exp(x.y)
    (Based, Arora et al. 2024). Every pair (i, j) of the outer product is kept, as Based's TaylorExp.
    """
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / math.sqrt(2)
    return torch.cat([torch.ones_like(x[..., :1]), x, outer], dim=-1)


@register(
    "linear_attention",
    family="matrix-state",
    paper="Katharopoulos et al., Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (2020)",
)
class LinearAttention(Mixer):
    """Causal multi-head linear attention with a choice of feature map (default elu+1).

    Per head, with a feature map phi:
        S_t = S_{t-1} + phi(k_t) v_t^T;   z_t = z_{t-1} + phi(k_t)
        o_t = S_t^T phi(q_t) / den(phi(q_t)^T z_t);   y_t = W_O [o_t of all heads]
    The normaliser z is the last column of one state S' = [S | z] of size d_phi x (d_v + 1):
    v is extended with a ones column, so both run through the same gated_matrix primitive
    (with alpha = 1). Projections are biased linear maps, as in the paper's code.

    Feature maps (``feature_map``) and the normaliser den(n) of n = phi(q_t)^T z_t:
      * "elu+1" (the paper's, default): phi = elu + 1 > 0 on q, k of head_dim channels;
        den = n + eps.
      * "relu": phi = relu >= 0; den = n + eps. n = 0 exactly when no key shares a positive
        channel with the query, and then the numerator is 0 too: the output is 0.
      * "taylor" (Based, Arora et al. 2024): q, k projected to ``key_dim`` = 16 channels per head,
        scaled by key_dim^-1/4 each, phi(x) = [1, x, vec(x x^T)/sqrt(2)] of 1 + key_dim + key_dim^2
        features, so phi(q).phi(k) = 1 + s + s^2/2 > 0 with s = q.k / sqrt(key_dim) (Based's
        TaylorExp); den = n + eps, as Based (n >= t/2 after t tokens, so eps never matters).
      * "identity": phi(x) = x, a signed kernel q.k whose sum n can be zero or negative, so the
        ratio has no bound; den = max(|n|, 1) (xLSTM's mLSTM normaliser), which divides by the
        magnitude of the kernel sum once it exceeds 1 and never amplifies.
    With the three non-negative kernels the output is a weighted mean of the values (weights
    >= 0 summing to n / (n + eps) <= 1). eps = 1e-6 (Based uses 1e-12; immaterial for Taylor).
    For all maps but "taylor", q and k have key_dim = head_dim channels (the paper's layer);
    Based's projections have no bias, here they keep the bias of the other maps so that the
    feature map is the only difference. State: n_heads * feature_dim * (head_dim + 1) floats,
    feature_dim = d_phi (head_dim, or 1 + key_dim + key_dim^2 for "taylor").
    """

    modes = ("chunk", "parallel", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "n_heads * feature_dim * (head_dim + 1)"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        n_heads: int | None = None,
        head_dim: int | None = None,
        eps: float = 1e-6,
        chunk_size: int = 64,
        feature_map: str = "elu+1",
        key_dim: int | None = None,
    ):
        super().__init__(d_model, mode)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"linear_attention: feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        self._init_heads(n_heads, head_dim)
        if key_dim is None:
            key_dim = 16 if feature_map == "taylor" else self.head_dim
        positive_int("key_dim", key_dim, owner="linear_attention")
        self.feature_map, self.key_dim = feature_map, key_dim
        self.feature_dim = 1 + key_dim + key_dim**2 if feature_map == "taylor" else key_dim
        self.eps = eps
        self.chunk_size = chunk_size
        self.q_proj = nn.Linear(d_model, self.n_heads * key_dim)
        self.k_proj = nn.Linear(d_model, self.n_heads * key_dim)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(S=torch.zeros(batch_size, self.n_heads, self.feature_dim, self.head_dim + 1, device=device, dtype=dtype))

    def phi(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map on projected queries or keys [..., key_dim] -> [..., feature_dim]."""
        if self.feature_map == "elu+1":
            return F.elu(x) + 1
        if self.feature_map == "relu":
            return F.relu(x)
        if self.feature_map == "taylor":
            return taylor_features(x * self.key_dim**-0.25)
        return x

    def normalise(self, o: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """o_t / den(n_t): see the class docstring for den per feature map."""
        if self.feature_map == "identity":
            return o / n.abs().clamp(min=1.0)
        return o / (n + self.eps)

    def _forward(self, x, state, resets=None):
        H = self.n_heads
        q = self.phi(split_heads(self.q_proj(x), H))
        k = self.phi(split_heads(self.k_proj(x), H))
        v = split_heads(self.v_proj(x), H)
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the ones column accumulates z_t
        log_alpha = packing.hard_reset(None, resets, time_dim=2, like=q)  # no decay, but a reset
        o, S = gated_matrix(q, k, v, log_alpha, state["S"], mode=self.op_mode, chunk_size=self.chunk_size)
        o = self.normalise(o[..., :-1], o[..., -1:])
        y = self.o_proj(merge_heads(o))
        return y, State(S=S)
