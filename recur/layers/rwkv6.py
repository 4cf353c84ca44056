"""RWKV-6 "Finch" time mixing (Peng et al. 2024): a matrix-valued state with a data-dependent
per-channel decay, read before the update plus a bonus for the current token, and a
data-dependent token shift (ddlerp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import layer_depth, rwkv_ramps, split_heads, token_shift
from recur.ops.gated import gated_matrix
from recur.registry import register
from recur.state import State

BRANCHES = ("w", "k", "v", "r", "g")  # the five ddlerp outputs, in the official LoRA's order


@register(
    "rwkv6",
    family="matrix-state",
    paper="Peng et al., Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence (2024)",
)
class RWKV6(Mixer):
    """RWKV-6 (Finch) time mixing: data-dependent token shift and decay, matrix state per head.

    With x'_t = x_{t-1} - x_t (token shift; x_0 from the state) and, per branch # in (w, k, v, r, g),
        lora_#(y) = lambda_# + tanh(y A_#) B_#
        ddlerp_#(x_t) = x_t + x'_t * lora_#(x_t + x'_t * mu_x)      (the five LoRAs share A's input)
        r_t, k_t, v_t = ddlerp_{r,k,v}(x_t) W_{r,k,v};   g_t = silu(ddlerp_g(x_t) W_g)
        d_t = time_decay + tanh(ddlerp_w(x_t) A_d) B_d;  w_t = exp(-exp(d_t))   (in (0, 1), per channel)
    per head (size 64, or ``head_split`` at widths that are not multiples of 64):
        S_t = Diag(w_t) S_{t-1} + k_t v_t^T
        o_t = r_t (S_{t-1} + Diag(u) k_t v_t^T)          (the state before the update, bonus u)
        y_t = (GroupNorm_heads(o_t) * g_t) W_o
    i.e. ``gated_matrix`` with log alpha = -exp(d_t), output_before_update and bonus u. State:
    the previous input (token shift) and S.

    Time mixing only: recur's Block adds the MLP. RWKV's channel mixing (RWKV-4's, which
    RWKV-6 keeps with the new token shift) is the channel mixer ``rwkv4`` (``recur/layers/channel.py``):
    ``CausalLM(pattern="rwkv6", mlp="rwkv4")``.

    Initialisation (official RWKV-LM x060 code), with r0 = layer_idx / (n_layers - 1) and
    r1 = 1 - layer_idx / n_layers (layer 0 of 1 standalone; r0 = 0 for a single layer),
    ramp_i = i / d_model: mu_x, lambda_{w,k} = 1 - ramp^r1, lambda_v = 1 - (ramp^r1 + 0.3 r0),
    lambda_{r,g} = 1 - ramp^(0.5 r1); A = 0 (LoRA rank 32; decay rank 64), B ~ U(-0.01, 0.01);
    time_decay_n = -6 + 5 (n / (d - 1))^(0.7 + 1.3 r0); u_n = r0 (1 - n / (d - 1)) + 0.1 ((n + 1)
    mod 3 - 1); W_r, W_v orthogonal (gain 1), W_k, W_g orthogonal (gain 0.1); GroupNorm eps
    1e-5 * 8^2, scale ((1 + layer_idx) / n_layers)^0.7, bias 0. Interpretation: the official
    code zero-initialises W_o, which makes a lone layer's output identically zero at init (and
    blind to its input); here W_o is orthogonal with gain 1 (the official rule for the other
    matrices) unless ``zero_init_output=True``.
    """

    modes = ("chunk", "parallel", "recurrent")
    state_formula = "d_model + n_heads * head_dim * head_dim"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        mix_rank: int = 32,
        decay_rank: int = 64,
        chunk_size: int = 64,
        head_size_divisor: int = 8,
        zero_init_output: bool = False,
        layer_idx: int | None = None,
        n_layers: int | None = None,
    ):
        super().__init__(d_model, mode)
        self._init_heads(n_heads, head_dim, preferred_head_dim=64)  # the official head size
        self.chunk_size = chunk_size
        layer_idx, n_layers = layer_depth("rwkv6", layer_idx, n_layers)
        r0, r1, ramp = rwkv_ramps(d_model, layer_idx, n_layers)
        d = d_model
        with torch.no_grad():
            self.mu_x = nn.Parameter((1 - ramp**r1).float())
            lam = {"w": 1 - ramp**r1, "k": 1 - ramp**r1, "v": 1 - (ramp**r1 + 0.3 * r0),
                   "r": 1 - ramp ** (0.5 * r1), "g": 1 - ramp ** (0.5 * r1)}
            self.mix_bias = nn.Parameter(torch.stack([lam[b] for b in BRANCHES]).float())  # lambda: [5, d]
            self.mix_A = nn.Parameter(torch.zeros(d, len(BRANCHES) * mix_rank))
            self.mix_B = nn.Parameter(torch.empty(len(BRANCHES), mix_rank, d).uniform_(-0.01, 0.01))
            n = torch.arange(d, dtype=torch.float64) / max(d - 1, 1)
            self.time_decay = nn.Parameter((-6 + 5 * n ** (0.7 + 1.3 * r0)).float())
            self.decay_A = nn.Parameter(torch.zeros(d, decay_rank))
            self.decay_B = nn.Parameter(torch.empty(decay_rank, d).uniform_(-0.01, 0.01))
            zigzag = 0.1 * ((torch.arange(d) + 1) % 3 - 1).double()
            self.bonus = nn.Parameter((r0 * (1 - n) + zigzag).float().view(self.n_heads, self.head_dim))  # u
        self.receptance = nn.Linear(d, d, bias=False)
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.gate = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        for proj, gain in ((self.receptance, 1.0), (self.key, 0.1), (self.value, 1.0), (self.gate, 0.1), (self.output, 1.0)):
            nn.init.orthogonal_(proj.weight, gain=gain)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
        self.norm = nn.GroupNorm(self.n_heads, d, eps=1e-5 * head_size_divisor**2)
        with torch.no_grad():
            self.norm.weight.fill_(((1 + layer_idx) / n_layers) ** 0.7)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        return State(
            shift=torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
            S=torch.zeros(batch_size, self.n_heads, self.head_dim, self.head_dim, device=device, dtype=dtype),
        )

    def projections(self, x: torch.Tensor, last: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """r, k, v, g (after silu) and the log decay log w = -exp(d) [batch, time, d_model], and the new shift state."""
        x_prev, last = token_shift(x, last)
        dx = x_prev - x
        lora = torch.tanh((x + dx * self.mu_x) @ self.mix_A)
        lora = torch.einsum("btnr,nrd->nbtd", rearrange(lora, "b t (n r) -> b t n r", n=len(BRANCHES)), self.mix_B)
        xs = {b: x + dx * (self.mix_bias[i] + lora[i]) for i, b in enumerate(BRANCHES)}
        d = self.time_decay + torch.tanh(xs["w"] @ self.decay_A) @ self.decay_B
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        out = dict(r=self.receptance(xs["r"]), k=self.key(xs["k"]), v=self.value(xs["v"]),
                   g=F.silu(self.gate(xs["g"])), log_w=-d.to(work).exp())
        return out, last

    def _forward(self, x, state):
        B, T, _ = x.shape
        p, last = self.projections(x, state["shift"])
        r, k, v, log_w = (split_heads(p[name], self.n_heads) for name in ("r", "k", "v", "log_w"))
        o, S = gated_matrix(r, k, v, log_w, state["S"],
                            mode=self.op_mode, chunk_size=self.chunk_size, output_before_update=True, bonus=self.bonus)
        o = self.norm(rearrange(o, "b h t d -> (b t) (h d)")).view(B, T, -1)
        return self.output(o * p["g"]), State(shift=last, S=S)
