"""RWKV-4 (Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", 2023): time mixing
(the WKV recurrence) and channel mixing, each a mixer, on ``recur.ops.scan.stabilized_scan``.

    WKV_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{-(t-1-i) w + k_i}     + e^{u + k_t})            per channel

The numerator and denominator are diagonal linear recurrences with decay e^{-w} and input
weight e^{k_t}: num_t = e^{-w} num_{t-1} + e^{k_t} v_t, den_t = e^{-w} den_{t-1} + e^{k_t},
read before the update with the bonus e^{u + k_t} for the current token. e^{k} overflows float32
for k > 88, so (as RWKV-4's CUDA kernel and RNN form do) the state is carried as
(aa, bb, pp) = (num e^{-pp}, den e^{-pp}, pp) with pp the running maximum exponent,

    pp_t = max(pp_{t-1} - w, k_t),      pp_0 = -inf (the official kernel's -1e38),

which ``stabilized_scan`` computes in both modes; pp is then the largest exponent among the
state's terms, a function of the inputs alone, so both modes give the same final state. The
read is the kernel's: q = max(pp_{t-1}, u + k_t), WKV_t = (e^{pp_{t-1} - q} aa_{t-1} +
e^{u + k_t - q} v_t) / (e^{pp_{t-1} - q} bb_{t-1} + e^{u + k_t - q}); one of the two
weights is 1 and bb >= 1 after the first token, so the denominator is >= 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import layer_depth, rwkv_ramps, token_shift
from recur.ops.scan import stabilized_scan
from recur.registry import register
from recur.state import State

PAPER = "Peng et al., RWKV: Reinventing RNNs for the Transformer Era (2023)"


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def wkv(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    *,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """RWKV-4's WKV: returns (wkv [batch, time, C], final (aa, bb, pp) each [batch, C]).

    time_decay, time_first (u): [C] with w = exp(time_decay); k, v: [batch, time, C];
    state (aa, bb, pp): [batch, C] each, None for the zero state (0, 0, -inf). ``mode`` is
    ``stabilized_scan``'s ("reference" = the sequential loop, or "chunk"). Computed in at
    least float32; returned in k's precision.
    """
    work = _work_dtype(k.dtype)
    k, v = k.to(work), v.to(work)
    w, u = time_decay.to(work).exp(), time_first.to(work)
    B, T, C = k.shape
    if state is None:
        aa, bb, pp = k.new_zeros(B, C), k.new_zeros(B, C), k.new_full((B, C), -math.inf)
    else:
        aa, bb, pp = (s.to(work) for s in state)
    # numerator and denominator as one scan over [..., 2], sharing the stabiliser pp: [..., 1]
    h, m = stabilized_scan(-w[:, None], k[..., None], torch.stack([v, torch.ones_like(v)], -1),
                           torch.stack([aa, bb], -1), pp[..., None], mode=mode, chunk_size=chunk_size)
    m = m[..., 0]
    h_prev = torch.cat([torch.stack([aa, bb], -1)[:, None], h[:, :-1]], dim=1)  # the state before step t
    m_prev = torch.cat([pp[:, None], m[:, :-1]], dim=1)
    bonus = u + k
    q = torch.maximum(m_prev, bonus)
    e1, e2 = (m_prev - q).exp(), (bonus - q).exp()
    out = (e1 * h_prev[..., 0] + e2 * v) / (e1 * h_prev[..., 1] + e2)
    last = (h[:, -1, :, 0], h[:, -1, :, 1], m[:, -1])
    return out, last


@register("rwkv4", family="diagonal-ssm", paper=PAPER)
class RWKV4(Mixer):
    """RWKV-4 time mixing: token shift, then the WKV recurrence (per-channel decay w, bonus u).

    With x'_t = x_{t-1} (token shift; the last input carried in the state),
        r_t = W_r (mu_r x_t + (1 - mu_r) x'_t),  k_t, v_t likewise with mu_k, mu_v
        WKV_t = (sum_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
              / (sum_{i<t} e^{-(t-1-i) w + k_i} + e^{u + k_t}),   w = exp(time_decay) > 0
        o_t = W_o (sigmoid(r_t) * WKV_t)
    The WKV state is RWKV-4's stable (aa, bb, pp): numerator and denominator scaled by e^{-pp},
    pp the running maximum exponent (module docstring). State: shift, aa, bb, pp, each [batch, d].

    Modes: ``chunk`` (parallel over time: the running max chunk by chunk, then the diagonal scan
    of the rescaled numerator and denominator) and ``recurrent`` (the sequential loop).

    Initialisation (official RWKV-4 code, RWKV-v4neo/src/model.py), with r0 = layer_idx /
    (n_layers - 1) (0 for a single layer) and r1 = 1 - layer_idx / n_layers, i = channel:
    time_decay_i = -5 + 8 (i / (d - 1))^(0.7 + 1.3 r0); time_first (u)_i = ln 0.3 +
    0.5 ((i + 1) mod 3 - 1); mu_k = (i / d)^r1, mu_v = (i / d)^r1 + 0.3 r0, mu_r = (i / d)^(0.5 r1);
    W_v orthogonal; W_k = W_r = 0 (so k = 0 and sigmoid(r) = 1/2 at init). Interpretation: the
    official code also zeroes W_o, which makes a lone layer's output identically zero (blind to
    its input); here W_o is orthogonal (gain 1) unless ``zero_init_output=True``. The attention
    width is d_model (the official default dim_att = n_embd).
    """

    modes = ("chunk", "recurrent")
    state_formula = "4 * d_model"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        chunk_size: int = 64,
        zero_init_output: bool = False,
        layer_idx: int | None = None,
        n_layers: int | None = None,
    ):
        super().__init__(d_model, mode)
        self.chunk_size = chunk_size
        r0, r1, ramp = rwkv_ramps(d_model, *layer_depth("rwkv4", layer_idx, n_layers))
        d = d_model
        with torch.no_grad():
            n = torch.arange(d, dtype=torch.float64) / max(d - 1, 1)
            self.time_decay = nn.Parameter((-5 + 8 * n ** (0.7 + 1.3 * r0)).float())
            zigzag = 0.5 * ((torch.arange(d) + 1) % 3 - 1).double()
            self.time_first = nn.Parameter((math.log(0.3) + zigzag).float())
            self.mix_k = nn.Parameter((ramp**r1).float())
            self.mix_v = nn.Parameter((ramp**r1 + 0.3 * r0).float())
            self.mix_r = nn.Parameter((ramp ** (0.5 * r1)).float())
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.key.weight)
        nn.init.zeros_(self.receptance.weight)
        nn.init.orthogonal_(self.value.weight)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
        else:
            nn.init.orthogonal_(self.output.weight)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        zeros = lambda: torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)  # noqa: E731
        return State(shift=zeros(), aa=zeros(), bb=zeros(),
                     pp=torch.full((batch_size, self.d_model), -math.inf, device=device, dtype=dtype))

    def _forward(self, x, state):
        x_prev, last = token_shift(x, state["shift"])
        mix = lambda mu: x * mu + x_prev * (1 - mu)  # noqa: E731
        k, v, r = self.key(mix(self.mix_k)), self.value(mix(self.mix_v)), self.receptance(mix(self.mix_r))
        out, (aa, bb, pp) = wkv(self.time_decay, self.time_first, k, v, (state["aa"], state["bb"], state["pp"]),
                                mode=self.op_mode, chunk_size=self.chunk_size)
        y = self.output((torch.sigmoid(r.to(out.dtype)) * out).to(x.dtype))
        return y, State(shift=last, aa=aa.to(x.dtype), bb=bb.to(x.dtype), pp=pp.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"
