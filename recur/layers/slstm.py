"""xLSTM's scalar LSTM (Beck et al., "xLSTM: Extended Long Short-Term Memory", 2024) with
head-wise recurrence as in FlashRNN (Pöppel et al., "FlashRNN: Optimizing Traditional RNNs on
Modern Hardware", 2024): n_heads small LSTMs side by side, each mixing only its own channels.

Per head, with pre-activations from the input (W, block-diagonal over heads) and from the
previous output (R, block-diagonal over heads, only the blocks stored):

    z_t = tanh(W_z x_t + R_z h_{t-1} + b_z)           i~_t = W_i x~_t + R_i h_{t-1} + b_i
    o_t = sigmoid(W_o x_t + R_o h_{t-1} + b_o)        f~_t = W_f x~_t + R_f h_{t-1} + b_f
    log f_t = logsigmoid(f~_t)   (or f~_t with forget_gate="exp"),   i_t = exp(i~_t)
    m_t  = max(log f_t + m_{t-1}, i~_t)               the stabiliser
    i'_t = exp(i~_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t)
    c_t  = f'_t c_{t-1} + i'_t z_t,   n_t = f'_t n_{t-1} + i'_t,   h_t = o_t * c_t / n_t

x~ = silu(causal depthwise conv4(x)) feeds the input and forget gates, x itself the cell input
and output gates (the official sLSTM layer's default, conv1d_kernel_size = 4). The layer's
output is a per-head group norm of h (scale, no bias), as in the xLSTM sLSTM block; the block's
pre-norm, residual and post up-projection MLP are recur's Block.

The stabiliser. (c, n, m) stands for the unstabilised (exp(m) c, exp(m) n), which grow like
exp(sum i~); h = o c / n does not depend on m. One of i', f' is 1 at every step, so once n > 0
it stays >= min(1, n_{t-1}) and never underflows to 0. The only n = 0 is the empty memory of the
zero state; for it the official kernels set m_t = i~_t (their ``n == 0`` branch), which makes
the first step i' = 1, f' = 0, n_1 = 1 whatever m_0 and i~ are. Here the same is done per
element by setting m_0 = -inf where n_0 = 0 before the loop (so f' = exp(-inf) = 0, with zero
gradients). The state is (h, c, n, m) and the conv tail; gradients flow through m as in the
official vanilla code (the output does not depend on m, so this changes nothing but rounding).

Output projection. The official sLSTM layer and block have none (the block's up-projection MLP
follows the group norm), so by default y = GroupNorm(h) and heads never mix inside the mixer
(Block's MLP mixes them); ``out_proj=True`` adds a Linear(d_model, d_model) without bias.

Initialisation (the official xlstm code, sLSTMLayer/sLSTMCell defaults): W ~ N(0, 2 / (5 d_model))
("small init"), no input bias; R = 0 (recurrent_weight_init="zeros"); biases of z, i, o zero and
the forget bias "powerlaw_blockdependent": per head, unit k of head_dim gets
b_f = 5 - 12 (k / (head_dim - 1))^(0.3 + 1.3 r), r = layer_idx / (n_layers - 1) (0 for a lone
layer), i.e. from +5 (long memory) down to -7; the group-norm scale is ones (the official code
parameterises it as 1 + w, w = 0); the conv keeps PyTorch's Conv1d init. Heads default to
``head_split(d_model)`` (the official default is 4).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import ShortConv, merge_heads, split_heads
from recur.registry import register
from recur.state import State


def forget_bias_powerlaw(head_dim: int, layer_idx: int | None, n_layers: int | None) -> torch.Tensor:
    """The official "powerlaw_blockdependent" forget-gate bias of one head: [head_dim]."""
    ratio = layer_idx / (n_layers - 1) if layer_idx is not None and n_layers and n_layers > 1 else 0.0
    k = torch.arange(head_dim, dtype=torch.float64) / max(head_dim - 1, 1)
    return 5.0 - 12.0 * k ** (0.3 + 1.3 * ratio)


@register("slstm", family="classic",
          paper="Beck et al., xLSTM: Extended Long Short-Term Memory (2024); Pöppel et al., FlashRNN (2024)")
class SLSTM(Mixer):
    """xLSTM's sLSTM: exponential input gate, normaliser and stabiliser, block-diagonal recurrence over heads.

    m_t = max(log f_t + m_{t-1}, i~_t); c_t = f'_t c_{t-1} + i'_t z_t; n_t = f'_t n_{t-1} + i'_t;
    h_t = o_t c_t / n_t with i' = exp(i~ - m_t), f' = exp(log f + m_{t-1} - m_t), log f = logsigmoid(f~);
    y_t = GroupNorm_heads(h_t). Beck et al., "xLSTM: Extended Long Short-Term Memory" (2024),
    head-wise as in Pöppel et al., "FlashRNN: Optimizing Traditional RNNs on Modern Hardware" (2024).
    """

    modes = ("recurrent",)
    state_formula = "4 * d_model + max(conv_size - 1, 0) * d_model"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        conv_size: int = 4,
        forget_gate: str = "sigmoid",
        out_proj: bool = False,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
        n_layers: int | None = None,
    ):
        super().__init__(d_model, mode)
        H, d = self._init_heads(n_heads, head_dim)
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size == 1 or conv_size < 0:
            raise ValueError(f"slstm: conv_size must be 0 (no conv) or an int >= 2, got {conv_size!r}")
        if forget_gate not in ("sigmoid", "exp"):
            raise ValueError(f"slstm: forget_gate must be 'sigmoid' or 'exp', got {forget_gate!r}")
        self.conv_size = conv_size
        self.forget_gate, self.norm_eps = forget_gate, norm_eps

        self.conv = ShortConv(d_model, conv_size, bias=True, activation="silu") if conv_size else None
        std = math.sqrt(2 / (5 * d_model))
        # Per head [in, out]: W_if reads the conv'd input (gates i, f), W_zo the input (z, o).
        self.W_if = nn.Parameter(torch.randn(H, d, 2 * d) * std)
        self.W_zo = nn.Parameter(torch.randn(H, d, 2 * d) * std)
        self.R = nn.Parameter(torch.zeros(H, d, 4 * d))  # [head, in, (i f z o) out]
        bias = torch.zeros(H, 4, d)
        bias[:, 1] = forget_bias_powerlaw(d, layer_idx, n_layers)
        self.bias = nn.Parameter(bias.reshape(H, 4 * d))
        self.norm_weight = nn.Parameter(torch.ones(d_model))
        self.out_proj = nn.Linear(d_model, d_model, bias=False) if out_proj else None

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        cell = {k: torch.zeros(batch_size, self.d_model, device=device, dtype=dtype) for k in "hcnm"}
        if self.conv is None:
            return State(cell)
        return State(conv=self.conv.init_tail(batch_size, device, dtype), **cell)

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        H = self.n_heads
        xw = x.to(work)
        tail = None
        if self.conv is not None:
            x_conv, tail = self.conv(xw, state["conv"].to(work))
        else:
            x_conv = xw
        x_conv, xw = (split_heads(t, H, "b t h d") for t in (x_conv, xw))
        pre = torch.cat([
            torch.einsum("bthd,hde->bthe", x_conv, self.W_if.to(work)),  # i, f from the conv'd input
            torch.einsum("bthd,hde->bthe", xw, self.W_zo.to(work)),      # z, o from the input
        ], dim=-1) + self.bias.to(work)
        pre = rearrange(pre, "b t h g -> t h b g").contiguous()  # [time, heads, batch, 4 * head_dim]

        h, c, n, m = (rearrange(state[k].to(work), "b (h d) -> h b d", h=H) for k in ("h", "c", "n", "m"))
        m = m.masked_fill(n == 0, -math.inf)  # empty memory: m_1 = i~_1 (the official n == 0 branch)
        R, exp_forget, hs = self.R.to(work), self.forget_gate == "exp", []
        for pre_t in pre.unbind(0):
            i, f, z, o = torch.baddbmm(pre_t, h, R).chunk(4, dim=-1)
            log_f_m = (f if exp_forget else F.logsigmoid(f)) + m
            m = torch.maximum(log_f_m, i)
            i_gate, f_gate = torch.exp(i - m), torch.exp(log_f_m - m)
            c = torch.addcmul(f_gate * c, i_gate, torch.tanh(z))
            n = torch.addcmul(i_gate, f_gate, n)
            h = torch.sigmoid(o) * c / n
            hs.append(h)

        y = rearrange(torch.stack(hs), "t h b d -> b t h d")
        y = F.layer_norm(y, (self.head_dim,), eps=self.norm_eps)  # group norm: one group per head
        y = merge_heads(y, "b t h d") * self.norm_weight.to(work)
        if self.out_proj is not None:
            y = y @ self.out_proj.weight.to(work).T
        cell = {k: rearrange(v, "h b d -> b (h d)").to(dtype) for k, v in zip("hcnm", (h, c, n, m))}
        if tail is None:
            return y.to(dtype), State(cell)
        return y.to(dtype), State(conv=tail.to(dtype), **cell)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}, "
                f"conv_size={self.conv_size}, forget_gate={self.forget_gate!r}, out_proj={self.out_proj is not None}")
