"""LightNet (Qin et al., "You Only Scan Once: Efficient Multi-dimension Sequential Modeling with
LightNet", 2024): linear attention with the paper's "additive" recurrence, on
``recur.ops.gated.gated_matrix``.

The additive recurrence sums exp(k~_j) v_j^T with no decay and normalises by the running sum of
exp(k~_j) (per key dimension), like a softmax over the past taken one key dimension at a time:

    S_t = sum_{j<=t} exp(k~_j - z_t) v_j^T,     z_t = log(exp(z_0) + sum_{j<=t} exp(k~_j))

Because z_t is a running logsumexp, this is a multiplicative (gated) recurrence whose decay is
the ratio of consecutive normalisers:

    z_t       = logaddexp(z_{t-1}, k~_t)
    S_t       = Diag(lambda_t) S_{t-1} + k_t v_t^T,   lambda_t = exp(z_{t-1} - z_t) <= 1,
                                                       k_t = exp(k~_t - z_t) <= 1
    o_t       = S_t^T q_t

so it runs on ``gated_matrix`` with log alpha_t = z_{t-1} - z_t per key dimension, and the
running logsumexp z (floats, one per key dimension and head) is part of the state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import merge_heads, positive_int, split_heads
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State


@register(
    "lightnet",
    family="matrix-state",
    paper="Qin et al., You Only Scan Once: Efficient Multi-dimension Sequential Modeling with LightNet (2024)",
)
class LightNet(Mixer):
    """LightNet attention: linear attention whose keys are normalised by a running logsumexp.

    Per head and key dimension: z_t = logaddexp(z_{t-1}, k~_t), S_t = exp(z_{t-1} - z_t) S_{t-1}
    + exp(k~_t - z_t) v_t^T, y_t = S_t^T q_t, i.e. S_t = sum_j exp(k~_j) v_j^T / (exp(z_0) +
    sum_j exp(k~_j)), the paper's additive recurrence with its normalisation. Then
    out = W_o RMSNorm(y * sigmoid(x W_g1 W_g2)). Qin et al., "You Only Scan Once: Efficient
    Multi-dimension Sequential Modeling with LightNet" (2024).

    Following the first author's implementation (xmixers' LightNetAttention): q = silu(x W_q),
    k~ = x W_k (the raw projection is both the key and its decay logit), v = x W_v, no biases,
    no q scaling; key dim = value dim = head_dim per head (``head_split``: at most 64 channels,
    at least two heads); a low-rank sigmoid output gate of rank n_heads; RMSNorm with weight over
    all channels (eps 1e-5) after the gate; the output projection.

    Interpretations: the running logsumexp starts at z_0 = 0 (the author's code initialises its
    logsumexp state with zeros), so the normaliser is 1 + sum_j exp(k~_j): a sink key of weight 1
    with a zero value, which also makes the zero state exact (fla's port starts from an empty sum
    instead, which needs a non-zero initial state). The paper's multi-dimensional positional
    encodings (MD-TPE / MD-LRPE, for images and video) are not included: on 1-D sequences the
    layer is the recurrence above. Linear layers keep PyTorch's default init (the author's
    "token_mixer_init_type 4" test init uses a 0.01 gain and zeroes the output projection).
    State: S [heads, head_dim, head_dim] and z [heads, head_dim].
    """

    modes = ("chunk", "parallel", "recurrent")
    state_formula = "n_heads * head_dim * (head_dim + 1)"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        gate_rank: int | None = None,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
    ):
        super().__init__(d_model, mode)
        self._init_heads(n_heads, head_dim)
        self.gate_rank = positive_int("gate_rank", self.n_heads if gate_rank is None else gate_rank, owner="lightnet")
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.gate_down = nn.Linear(d_model, self.gate_rank, bias=False)
        self.gate_up = nn.Linear(self.gate_rank, d_model, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(d_model))
        self.o_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        H, d = self.n_heads, self.head_dim
        return State(
            S=torch.zeros(batch_size, H, d, d, device=device, dtype=dtype),
            z=torch.zeros(batch_size, H, d, device=device, dtype=dtype),
        )

    @staticmethod
    def additive_decay(k_raw: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The normalised keys and decays of the additive recurrence.

        k_raw: [batch, heads, time, d] (k~), z0: [batch, heads, d] (the running logsumexp before
        the call). Returns (k = exp(k~_t - z_t), log_alpha = z_{t-1} - z_t, z [batch, heads,
        time, d]); every exponent is <= 0.
        """
        z = torch.cat([z0.unsqueeze(2), k_raw], dim=2).logcumsumexp(dim=2)
        return (k_raw - z[:, :, 1:]).exp(), z[:, :, :-1] - z[:, :, 1:], z[:, :, 1:]

    def _forward(self, x, state):
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        H = self.n_heads
        q = split_heads(F.silu(self.q_proj(x)).to(work), H)
        v = split_heads(self.v_proj(x).to(work), H)
        k, log_alpha, z = self.additive_decay(split_heads(self.k_proj(x).to(work), H), state["z"].to(work))
        o, S = gated_matrix(q, k, v, log_alpha, state["S"].to(work), mode=self.op_mode, chunk_size=self.chunk_size)
        o = merge_heads(o) * torch.sigmoid(self.gate_up(self.gate_down(x)).to(work))
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight.to(work)
        return self.o_proj(o.to(x.dtype)), State(S=S.to(x.dtype), z=z[:, :, -1].to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.n_heads}x{self.head_dim}, gate_rank={self.gate_rank}, chunk_size={self.chunk_size}"
