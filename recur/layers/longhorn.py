"""Longhorn (Liu et al. 2024): a selective state-space block whose recurrence is the implicit
(proximal) step of an online regression, in a Mamba-like block.

    x, z     = in_proj(u)                                   each [batch, time, d_inner]
    x        = SiLU(ShortConv(x))                           causal depthwise conv, kernel 4
    dt~, k, q = x_proj(x)                                   [dt_rank], [N], [N] per step
    beta     = sigmoid(dt_head(dt~))                        [d_inner], the regression weights
    eps      = beta / (1 + beta |k|^2)                      per value channel
    y_t      = S_t q_t + D * x_t ;  out = out_proj(y * SiLU(z))

The state S_t (per value channel d, a key-space vector S_t[d]: [N]) minimises the online
associative-recall objective

    ||S - S_{t-1}||_F^2 + sum_d beta_d (S[d] . k_t - x_d)^2,

whose closed-form minimiser, one value channel at a time, is

    S_t[d] = (I - eps_d k_t k_t^T) S_{t-1}[d] + eps_d x_d k_t                  (transition="exact")

(the implicit update: the regression error is evaluated at the new state, hence eps and no
forget gate; I - eps_d k k^T has eigenvalues 1 - eps_d |k|^2 in (0, 1] and 1, so it never
expands). The paper's model, and its official code (``selective_scan_online7``), keep only the
diagonal of k k^T so that the recurrence is a diagonal (Mamba) scan:

    S_t[d, n] = (1 - eps_d k_n^2) S_{t-1}[d, n] + eps_d x_d k_n               (transition="diagonal", default)

with 1 - eps_d k_n^2 in (0, 1] too. Sizes as Mamba's: d_inner = expand * d_model (expand 2),
N = d_state = 16, dt_rank = ceil(d_model / 16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import ShortConv, positive_ints
from recur.ops.delta import delta_rule
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State

TRANSITIONS = ("diagonal", "exact")


@register("longhorn", family="delta-rule",
          paper="Liu, Wang, Wu, Feng, Stone, Liu, Longhorn: State Space Models are Amortized Online Learners (2024)")
class Longhorn(Mixer):
    """Longhorn: an SSM whose state takes the closed-form (implicit) step of an online regression.

    Per value channel d, with eps_d = beta_d / (1 + beta_d |k_t|^2), beta = sigmoid(dt):
        S_t[d] = (I - eps_d k_t k_t^T) S_{t-1}[d] + eps_d x_{t,d} k_t    (the objective's minimiser)
    run, as in the paper and its official code, with the diagonal of k k^T (default):
        S_t[d, n] = (1 - eps_d k_{t,n}^2) S_{t-1}[d, n] + eps_d x_{t,d} k_{t,n}
    and y_t = S_t q_t + D x_t, out = out_proj(y * silu(z)) in Mamba's block (short conv, gate).
    ``transition="exact"`` runs the exact minimiser instead (``delta_rule``, one head per value
    channel, d_v = 1). No forget gate and no key normalisation: both transitions are contractions.
    Liu, Wang, Wu, Feng, Stone, Liu, "Longhorn: State Space Models are Amortized Online
    Learners" (ICLR 2025).

    Initialisation (official code): every linear layer at PyTorch's default except dt_head's bias
    = 0 (the model's _init_weights zeroes all linear biases, so beta starts near sigmoid(0) = 1/2);
    D = 1; the conv at nn.Conv1d's default. Not taken: the GPT-2 style 1/sqrt(n_layers) rescale of
    out_proj, a whole-model init that recur leaves to the model.
    """

    modes = ("chunk", "recurrent")
    state_formula = "d_inner * d_state + (d_conv - 1) * d_inner"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | None = None,
        conv_bias: bool = True,
        bias: bool = False,
        transition: str = "diagonal",
        chunk_size: int = 64,
    ):
        super().__init__(d_model, mode)
        positive_ints("longhorn", optional=True, d_state=d_state, expand=expand, dt_rank=dt_rank, d_conv=d_conv)
        if transition not in TRANSITIONS:
            raise ValueError(f"longhorn: transition must be one of {TRANSITIONS}, got {transition!r}")
        self.d_state, self.expand, self.d_conv, self.chunk_size = d_state, expand, d_conv, chunk_size
        self.transition = transition
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = dt_rank if dt_rank is not None else math.ceil(d_model / 16)

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        self.conv = ShortConv(d_inner, d_conv, bias=conv_bias, activation="silu")
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_head = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)
        nn.init.zeros_(self.dt_head.bias)
        self.D = nn.Parameter(torch.ones(d_inner))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            conv=self.conv.init_tail(batch_size, device=device, dtype=dtype),
            S=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype),
        )

    def projections(self, u: torch.Tensor, tail: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """x (the short-conv'd input, the regression targets) and z [batch, time, d_inner], k and q
        [batch, time, N], beta = sigmoid(dt) [batch, time, d_inner]; and the new conv tail."""
        work = torch.float32 if u.dtype in (torch.float16, torch.bfloat16) else u.dtype
        x, z = self.in_proj(u).chunk(2, dim=-1)
        x, tail = self.conv(x, tail)
        dt, k, q = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        beta = torch.sigmoid(self.dt_head(dt).to(work))
        return dict(x=x.to(work), z=z.to(work), k=k.to(work), q=q.to(work), beta=beta), tail

    def recurrence(self, x, k, q, beta, S):
        """Run the state over time; returns (S_t q_t [batch, time, d_inner], S_last [batch, d_inner, N]).

        x, beta: [batch, time, d_inner]; k, q: [batch, time, N]; S: [batch, d_inner, N].
        """
        k2 = k * k
        norm2 = k2.sum(-1, keepdim=True)  # |k|^2: [batch, time, 1]
        eps = beta / (1 + beta * norm2)
        if self.transition == "exact":  # one delta-rule head per value channel, d_v = 1
            per_channel = lambda t: t.unsqueeze(1).expand(-1, self.d_inner, -1, -1)  # noqa: E731
            o, S = delta_rule(per_channel(q), per_channel(k), rearrange(x, "b t d -> b d t 1"),
                              rearrange(eps, "b t d -> b d t"), None, S.unsqueeze(-1),
                              mode=self.op_mode, chunk_size=self.chunk_size)
            return rearrange(o, "b d t 1 -> b t d"), S.squeeze(-1)
        T = x.shape[1]
        block = T if self.mode == "recurrent" else self.chunk_size**2  # bounds the [block, d_inner, N] tensors
        ys = []
        for s in range(0, T, block):
            t = slice(s, s + block)
            # log(1 - eps_d k_n^2) = log(1 + beta_d (|k|^2 - k_n^2)) - log(1 + beta_d |k|^2): no cancellation
            # near 1 - eps k_n^2 = 0, and the argument of each log1p is >= 0.
            rest = (norm2[:, t] - k2[:, t]).clamp(min=0)  # [batch, block, N]
            log_a = torch.log1p(beta[:, t, :, None] * rest[:, :, None, :]) - torch.log1p(beta[:, t] * norm2[:, t])[..., None]
            bx = (eps[:, t] * x[:, t])[..., None] * k[:, t, None, :]
            hs, S = diagonal_scan(log_a, bx, S, mode=self.op_mode, chunk_size=self.chunk_size)
            ys.append(torch.einsum("btdn,btn->btd", hs, q[:, t]))
        return torch.cat(ys, dim=1), S

    def _forward(self, u, state):
        p, tail = self.projections(u, state["conv"])
        y, S = self.recurrence(p["x"], p["k"], p["q"], p["beta"], state["S"].to(p["x"].dtype))
        y = (y + self.D.to(y.dtype) * p["x"]) * F.silu(p["z"])
        return self.out_proj(y.to(u.dtype)), State(conv=tail, S=S.to(u.dtype))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}, "
                f"transition={self.transition!r}, chunk_size={self.chunk_size}")
