"""RWKV-7 "Goose" time mixing (Peng et al. 2025): a matrix state evolved by the generalised delta
rule, with a per-channel decay, a vector-valued in-context learning rate and separate removal and
replacement keys, on ``recur.ops.delta.dplr_delta``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import layer_depth, merge_heads, positive_ints, rwkv_ramps, split_heads, token_shift
from recur.ops.delta import dplr_delta
from recur.registry import register
from recur.state import State

BRANCHES = ("r", "w", "k", "v", "a", "g")  # the six token-shift lerps, in the official order
LOG_W_SCALE = math.exp(-0.5)  # log w_t = -e^{-0.5} sigmoid(d_t): w_t in (exp(-e^{-0.5}), 1) = (0.545, 1)


def _lora_rank(d_model: int, factor: float) -> int:
    """The official LoRA width rule: max(32, round(factor * sqrt(C) / 32) * 32)."""
    return max(32, int(round(factor * d_model**0.5 / 32)) * 32)


def _orthogonal(rows: int, cols: int, scale: float) -> torch.Tensor:
    """The official ``ortho_init``: orthogonal with gain scale * sqrt(rows / cols) when rows > cols."""
    gain = math.sqrt(rows / cols) if rows > cols else 1.0
    return nn.init.orthogonal_(torch.empty(rows, cols), gain=gain * scale)


@register("rwkv7", family="delta-rule",
          paper='Peng et al., RWKV-7 "Goose" with Expressive Dynamic State Evolution (2025)')
class RWKV7(Mixer):
    """RWKV-7 (Goose) time mixing: the generalised delta rule with vector decay and learning rate.

    With x'_t the previous input (token shift; from the state at t = 0) and, per branch
    # in (r, w, k, v, a, g), x#_t = x_t + (x'_t - x_t) * mu_# (per-channel lerp):
        r_t = x^r W_r,  k_t = x^k W_k,  v_t = x^v W_v
        d_t = w0 + tanh(x^w W1) W2;       w_t = exp(-e^{-0.5} sigmoid(d_t))     (decay, per channel)
        a_t = sigmoid(a0 + x^a A1 A2)                                          (in-context learning rate)
        g_t = sigmoid(x^g G1) G2                                               (output gate)
        kappa^_t = normalise_head(k_t * xi)                                    (removal key)
        k~_t     = k_t * (1 + (a_t - 1) * alpha)                               (replacement key)
    per head, in the paper's layout (S: [d_v, d_k], row vectors):
        S_t = S_{t-1} (diag(w_t) - kappa^_t^T (a_t * kappa^_t)) + v_t^T k~_t ;  wkv_t = S_t r_t^T
    which in recur's layout (S: [d_k, d_v]) is ``dplr_delta`` with q = r, k = k~, read key
    a = -kappa^ and write key b = kappa^ * a_t:
        S_t = (Diag(w_t) + b_t a_t^T) S_{t-1} + k~_t v_t^T ;  wkv_t = S_t^T r_t
    and the output
        p_t = GroupNorm_heads(wkv_t) + (sum_head r_t * k~_t * rho) v_t        (bonus, after the norm)
        y_t = (g_t * p_t) W_o
    State: the previous input (token shift) and S. Time mixing only: recur's Block adds the MLP.

    The value residual (v_t lerped towards the first layer's v) needs the first layer's values,
    which a mixer does not see: it is left out (every layer behaves as the official layer 0).

    Initialisation (official RWKV-LM RWKV-v7/train_temp code, with its generate_init_weight),
    r0 = layer_idx / (n_layers - 1) (0 for one layer), r1 = 1 - layer_idx / n_layers, ramp_i = i / C,
    lin_n = n / (C - 1) - 0.5, zz_n = z|z| with z = ((n mod N) - (N-1)/2) / ((N-1)/2) (per head):
    mu_{r,g} = 1 - ramp^(0.2 r1), mu_{w,a} = 1 - ramp^(0.9 r1), mu_{k,v} = 1 - ramp^(0.7 r1);
    w0 = -6 + 6 (n / (C-1))^(1 + r0^0.3) + 0.5 + 2.5 zz; a0 = -0.19 + 0.3 zz + 0.4 lin;
    xi = 0.71 - 0.1 lin; alpha = 1.02; rho = -0.04; W1, A1, G1 = 0 and W2, A2, G2 orthogonal
    (scale 0.1), LoRA ranks max(32, round(2.5 sqrt(C) / 32) * 32) for w and a,
    max(32, round(5 sqrt(C) / 32) * 32) for g; W_r, W_v orthogonal (gain 1), W_k orthogonal
    (gain 0.1); GroupNorm eps 64e-5, scale ((1 + layer_idx) / n_layers)^0.7, bias 0. Heads of 64
    when d_model is a multiple of 64, else ``head_split``. Interpretation: the official code
    zero-initialises W_o, which makes a lone layer's output identically zero (and blind to its
    input); here W_o is orthogonal with gain 1 unless ``zero_init_output=True`` (as ``rwkv6``).
    """

    modes = ("chunk", "recurrent")
    state_formula = "d_model + n_heads * head_dim * head_dim"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        decay_rank: int | None = None,
        lr_rank: int | None = None,
        gate_rank: int | None = None,
        chunk_size: int = 64,
        zero_init_output: bool = False,
        layer_idx: int | None = None,
        n_layers: int | None = None,
    ):
        super().__init__(d_model, mode)
        self._init_heads(n_heads, head_dim, preferred_head_dim=64)  # the official head size
        self.chunk_size = chunk_size
        layer_idx, n_layers = layer_depth("rwkv7", layer_idx, n_layers)
        C, N, H = d_model, self.head_dim, self.n_heads
        positive_ints("rwkv7", optional=True, decay_rank=decay_rank, lr_rank=lr_rank, gate_rank=gate_rank)
        self.decay_rank = decay_rank or _lora_rank(C, 2.5)
        self.lr_rank = lr_rank or _lora_rank(C, 2.5)
        self.gate_rank = gate_rank or _lora_rank(C, 5.0)

        r0, r1, ramp = rwkv_ramps(C, layer_idx, n_layers)
        with torch.no_grad():
            powers = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}
            self.mix = nn.Parameter(torch.stack([1 - ramp ** (powers[b] * r1) for b in BRANCHES]).float())  # mu: [6, C]
            n = torch.arange(C, dtype=torch.float64)
            lin = n / max(C - 1, 1) - 0.5
            half = max((N - 1) / 2, 0.5)
            zz = ((n % N) - (N - 1) / 2) / half
            zz = zz * zz.abs()
            www = -6 + 6 * (n / max(C - 1, 1)) ** (1 + r0**0.3)
            self.w0 = nn.Parameter((www + 0.5 + 2.5 * zz).float())
            self.w1 = nn.Parameter(torch.zeros(C, self.decay_rank))
            self.w2 = nn.Parameter(_orthogonal(self.decay_rank, C, 0.1))
            self.a0 = nn.Parameter((-0.19 + 0.3 * zz + 0.4 * lin).float())
            self.a1 = nn.Parameter(torch.zeros(C, self.lr_rank))
            self.a2 = nn.Parameter(_orthogonal(self.lr_rank, C, 0.1))
            self.g1 = nn.Parameter(torch.zeros(C, self.gate_rank))
            self.g2 = nn.Parameter(_orthogonal(self.gate_rank, C, 0.1))
            self.k_k = nn.Parameter((0.71 - 0.1 * lin).float())  # xi: the removal key's per-channel scale
            self.k_a = nn.Parameter(torch.full((C,), 1.02))  # alpha: how much a_t shrinks the replacement key
            self.r_k = nn.Parameter(torch.full((H, N), -0.04))  # rho: the bonus weights
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        for proj, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.output, 1.0)):
            nn.init.orthogonal_(proj.weight, gain=gain)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
        self.norm = nn.GroupNorm(H, C, eps=64e-5)
        with torch.no_grad():
            self.norm.weight.fill_(((1 + layer_idx) / n_layers) ** 0.7)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            shift=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
            S=torch.zeros(batch_size, self.n_heads, self.head_dim, self.head_dim, device=device, dtype=dtype),
        )

    def projections(self, x: torch.Tensor, last: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """r, k~ (replacement key), v, log w, a (learning rate), kappa^ (removal key, normalised per
        head) and g, each [batch, time, d_model], and the new token-shift state."""
        x_prev, last = token_shift(x, last)
        xs = dict(zip(BRANCHES, (x + (x_prev - x) * mu for mu in self.mix)))
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        k = self.key(xs["k"])
        d = self.w0 + torch.tanh(xs["w"] @ self.w1) @ self.w2
        a = torch.sigmoid(self.a0 + (xs["a"] @ self.a1) @ self.a2)
        kappa = split_heads(k * self.k_k, self.n_heads, "b t h d")
        out = dict(
            r=self.receptance(xs["r"]),
            k=k * (1 + (a - 1) * self.k_a),
            v=self.value(xs["v"]),
            log_w=-LOG_W_SCALE * torch.sigmoid(d.to(work)),
            a=a,
            kappa=merge_heads(F.normalize(kappa, dim=-1), "b t h d"),
            g=torch.sigmoid(xs["g"] @ self.g1) @ self.g2,
        )
        return out, last

    def _forward(self, x, state):
        B, T, _ = x.shape
        H = self.n_heads
        p, last = self.projections(x, state["shift"])
        r, k, v = split_heads(p["r"], H), split_heads(p["k"], H), split_heads(p["v"], H)
        o, S = dplr_delta(r, k, v, split_heads(p["log_w"], H), split_heads(-p["kappa"], H),
                          split_heads(p["kappa"] * p["a"], H), state["S"], mode=self.op_mode, chunk_size=self.chunk_size)
        o = self.norm(rearrange(o, "b h t d -> (b t) (h d)")).view(B, T, -1)
        bonus = (r * k * self.r_k[:, None, :]).sum(-1, keepdim=True) * v  # [b, h, t, d]
        o = o + merge_heads(bonus)
        return self.output(o * p["g"]), State(shift=last, S=S)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"ranks=(w {self.decay_rank}, a {self.lr_rank}, g {self.gate_rank}), chunk_size={self.chunk_size}")
