"""Linear attention (Katharopoulos et al. 2020): softmax attention with the kernel
exp(q.k) replaced by phi(q).phi(k), phi = elu + 1, which turns causal attention into a
recurrence over a d_k x d_v matrix state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import head_split
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State

@register(
    "linear_attention",
    family="matrix-state",
    paper="Katharopoulos et al., Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention (2020)",
)
class LinearAttention(Mixer):
    """Causal multi-head linear attention with the elu+1 feature map.

    Per head, with phi(x) = elu(x) + 1:
        S_t = S_{t-1} + phi(k_t) v_t^T;   z_t = z_{t-1} + phi(k_t)
        o_t = S_t^T phi(q_t) / (phi(q_t)^T z_t + eps);   y_t = W_O [o_t of all heads]
    The normaliser z is the last column of one state S' = [S | z] of size d_k x (d_v + 1):
    v is extended with a ones column, so both run through the same gated_matrix primitive
    (with alpha = 1). Projections are biased linear maps, as in the paper's code.
    """

    modes = ("chunk", "parallel", "recurrent")
    state_formula = "n_heads * head_dim * (head_dim + 1)"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        n_heads: int | None = None,
        head_dim: int | None = None,
        eps: float = 1e-6,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, mode)
        self.n_heads, self.head_dim = head_split(d_model, n_heads, head_dim)
        self.eps = eps
        self.chunk_size = chunk_size
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        d = self.head_dim
        return State(S=torch.zeros(batch_size, self.n_heads, d, d + 1, device=device, dtype=dtype))

    def _forward(self, x, state):
        heads = lambda t: rearrange(t, "b t (h d) -> b h t d", h=self.n_heads)  # noqa: E731
        q = F.elu(heads(self.q_proj(x))) + 1
        k = F.elu(heads(self.k_proj(x))) + 1
        v = heads(self.v_proj(x))
        v = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # the ones column accumulates z_t
        o, S = gated_matrix(q, k, v, None, state["S"], mode=self.op_mode, chunk_size=self.chunk_size)
        o = o[..., :-1] / (o[..., -1:] + self.eps)
        y = self.o_proj(rearrange(o, "b h t d -> b t (h d)"))
        return y, State(S=S)
