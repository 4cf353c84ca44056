"""RetNet's multi-scale retention (Sun et al. 2023): linear attention with a fixed
per-head exponential decay gamma_h and rotary relative positions, followed by a
per-head GroupNorm and a swish output gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import head_split, positions_from, rotary, split_heads
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State

@register(
    "retnet",
    family="matrix-state",
    paper="Sun et al., Retentive Network: A Successor to Transformer for Large Language Models (2023)",
)
class RetNet(Mixer):
    """Multi-scale retention (MSR), the token mixer of RetNet.

    Per head h, with gamma_h = 1 - 2^(-5-h) (h = 0..H-1, the paper's form), q_t and k_t
    rotated by position t (rotary), k scaled by d_k^-0.5 and d_v = 2 d_k:
        S_t = gamma_h S_{t-1} + k_t v_t^T;   o_t = S_t^T q_t
        Y = (swish(X W_G) * GroupNorm_H(o)) W_O
    Positions: the paper's relative position factor e^{i n theta} is applied with
    ``rotary`` (half-split layout, frequencies base^(-2i/d)); the official code uses an
    interleaved layout with frequencies base^(-linspace(0, 1, d/2)) — the same
    relative-position mechanism with a slightly different frequency grid. The absolute
    position is an int64 counter in the state, so carried states stay exact.
    Normalisations: the official parallel form divides the decay mask by the square
    root of its row sums and the scores by max(1, |row sum|); both are positive
    per-(token, head) scalings of o_t, which the per-head GroupNorm removes (exactly,
    but for its eps). They are omitted here, so all modes compute the plain recurrence.
    """

    modes = ("chunk", "parallel", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "n_heads * key_dim * value_dim"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        n_heads: int | None = None,
        head_dim: int | None = None,
        value_factor: int = 2,
        chunk_size: int = 64,
        norm_eps: float = 1e-5,
        rotary_base: float = 10000.0,
    ):
        super().__init__(d_model, mode)
        self.n_heads, self.key_dim = head_split(d_model, n_heads, head_dim, even=True)
        self.value_dim = value_factor * self.key_dim
        self.chunk_size = chunk_size
        self.rotary_base = rotary_base
        v_total = value_factor * d_model
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, v_total, bias=False)
        self.g_proj = nn.Linear(d_model, v_total, bias=False)
        self.o_proj = nn.Linear(v_total, d_model, bias=False)
        self.group_norm = nn.GroupNorm(self.n_heads, v_total, eps=norm_eps)
        # The official initialisation: small Xavier gains on the input projections.
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2**-2.5)
        nn.init.xavier_uniform_(self.o_proj.weight)

    def log_gamma(self, device, dtype) -> torch.Tensor:
        """log(1 - 2^(-5-h)) for each head h: [heads]."""
        h = torch.arange(self.n_heads, device=device, dtype=torch.float64)
        return torch.log1p(-(2.0 ** (-5.0 - h))).to(dtype)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            S=torch.zeros(batch_size, self.n_heads, self.key_dim, self.value_dim, device=device, dtype=dtype),
            pos=torch.zeros(batch_size, device=device, dtype=torch.int64),
        )

    def _forward(self, x, state, resets=None):
        B, T, _ = x.shape
        H = self.n_heads
        positions = positions_from(state["pos"], T)  # [batch, time]
        q = rotary(split_heads(self.q_proj(x), H), positions, self.rotary_base)
        k = rotary(split_heads(self.k_proj(x), H), positions, self.rotary_base) * self.key_dim**-0.5
        v = split_heads(self.v_proj(x), H)
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        log_alpha = self.log_gamma(x.device, work)[None, :, None].expand(B, -1, T)  # [batch, heads, time]
        log_alpha = packing.hard_reset(log_alpha, resets, time_dim=2)
        o, S = gated_matrix(q, k, v, log_alpha, state["S"], mode=self.op_mode, chunk_size=self.chunk_size)
        o = self.group_norm(rearrange(o, "b h t d -> (b t) (h d)"))  # GroupNorm over each head's channels
        o = rearrange(o, "(b t) c -> b t c", b=B)
        y = self.o_proj(F.silu(self.g_proj(x)) * o)
        return y, State(S=S, pos=state["pos"] + T)
