"""Temporal Kolmogorov-Arnold Networks (Genet & Inzirillo, "TKAN: Temporal Kolmogorov-Arnold
Networks", 2024): an LSTM-like cell whose output gate is computed by recurring KAN sub-layers
(RKAN), each with its own memory.

For every sub-layer l = 1..L (the paper's RKAN), with its own state h~_l:

    s_l,t   = W_l,x x_t + W_l,h h~_l,t-1                      the sub-layer's input  [sub_input_dim]
    o~_l,t  = phi_l(s_l,t)                                    a KAN layer            [sub_output_dim]
    h~_l,t  = w_l,o * o~_l,t + w_l,h * h~_l,t-1               the sub-layer's memory (elementwise weights)

and the cell (units = d_model):

    i_t, f_t, c~_t = sigmoid(W x_t + U h_{t-1} + b)           (forget bias 1)
    r_t = [o~_1,t, ..., o~_L,t]                               the sub-layers' outputs, concatenated
    o_t = sigmoid(W_o r_t + b_o)
    c_t = f_t * c_{t-1} + i_t * c~_t
    h_t = o_t * tanh(c_t);   y_t = h_t

The KAN layer phi (Liu et al., "KAN: Kolmogorov-Arnold Networks", 2024, in the "efficient-KAN"
form that TKAN's code uses: one weight per (input, output) pair on a SiLU base branch plus a
learnable B-spline per pair, the splines sharing one grid):

    z = LayerNorm(s)                                                 (the official KANLinear's use_layernorm)
    phi(s)_o = b_o + sum_i ( W_base[i, o] silu(z_i) + sum_j C[i, j, o] B_j(z_i) )

B_j are the B-splines of order ``spline_order`` on a uniform grid of ``grid_size`` intervals over
``grid_range`` (default [-1, 1]), extended by spline_order knots on each side: knots
t_m = lo + (m - k) h, h = (hi - lo) / grid_size, m = 0..grid_size + 2k, and grid_size + k bases,
computed by the Cox-de Boor recursion; every B_j vanishes outside [t_0, t_last). On [lo, hi] the
bases sum to 1.

Choices, from the official code (remigenet/TKAN, its ``TKANCell``, and the KANLinear it shipped
when the paper appeared, 2024-06):
  * c~_t = sigmoid(W_c x_t + U_c h_{t-1} + b_c), as in the paper and in the code's TensorFlow
    path (its generic Keras-3 path applies tanh on top of that sigmoid; recur follows the paper).
  * Defaults: one RKAN sub-layer (the code's default ``sub_kan_configs=[None]``),
    sub_input_dim = sub_output_dim = d_model (the code's defaults: the input width),
    grid_size 3, spline_order 3, grid_range [-1, 1], SiLU base branch with a bias, LayerNorm
    (Keras epsilon 1e-3) on the KAN input. All sub-layers share grid_size and spline_order here
    (the code allows a different config per sub-layer).
  * W_l,x, W_l,h and (w_l,o, w_l,h) are the code's ``sub_tkan_recurrent_kernel_inputs``,
    ``..._states`` and ``sub_tkan_kernel``: W_l,x, W_l,h orthogonal per sub-layer, the elementwise
    memory weights one orthogonal [L, 2 sub_output_dim] matrix (rows (w_l,o, w_l,h)), as the code's
    orthogonal initializer. W: Glorot uniform, U: orthogonal, b: zero with 1 on the forget gate
    (Keras' unit_forget_bias), W_o: Glorot uniform, b_o: zero.
  * KAN weights: He uniform, bound sqrt(6 / sub_input_dim) for the base and the spline
    coefficients (the code's HeUniform on a [units, in * bases] kernel takes its fan-in from
    ``units``; at the default sub_input_dim = sub_output_dim the two are the same), zero base bias.

State: h and c [batch, d_model] and every sub-layer's h~, stacked as ``sub`` [batch, L,
sub_output_dim]; all start at zero (the code's initial state). Nonlinear recurrence: ``recurrent``
mode only. The input's share of the gates and of every sub-layer's input is one matmul per call;
the L sub-layers run together as one batched matmul each step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import positive_ints
from recur.registry import register
from recur.state import State


def _knots(grid_size: int, spline_order: int, grid_range, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [2, 1, n], scale [2, 1, 1]) with offsets + scale * x = (v, 2 - v) over the grid's first
    n = grid_size + 2k - 1 knots t_m, v_m = (x - t_m) / h (t_m = lo + (m - k) h, m = 0..n-1)."""
    lo, hi = grid_range
    h = (hi - lo) / grid_size
    v0 = spline_order - lo / h - torch.arange(grid_size + 2 * spline_order - 1, device=device, dtype=dtype)  # v_m at x = 0
    offsets = torch.stack([v0, 2.0 - v0])[:, None]
    scale = torch.tensor([1.0 / h, -1.0 / h], device=device, dtype=dtype)[:, None, None]
    return offsets, scale


def _unnormalised_bases(x: torch.Tensor, offsets: torch.Tensor, scale: torch.Tensor, spline_order: int) -> torch.Tensor:
    """k! times the B-spline bases at x [..., n_in]: [..., n_in, grid_size + k], from ``_knots``.

    Order 1 is the hat max(0, 1 - |v_m - 1|) = max(0, min(v_m, 2 - v_m)). On a uniform grid the
    Cox-de Boor recursion is B_m,p = (v_m B_m,p-1 + (p + 1 - v_m) B_m+1,p-1) / p; dropping the 1/p
    leaves p! B_m,p = v_m (N_m - N_m+1) + (p + 1) N_m+1 with N = (p-1)! B_,p-1. The bases vanish
    outside [t_0, t_last] as efficient-KAN's (continuous for k >= 1, so the closed end is the same)."""
    both = torch.addcmul(offsets, x.unsqueeze(-2).unsqueeze(-1), scale)  # [..., 2, n_in, n]: v and 2 - v
    v = both[..., 0, :, :]
    bases = torch.relu(both.amin(dim=-3))
    for p in range(2, spline_order + 1):
        left, right = bases[..., :-1], bases[..., 1:]
        bases = torch.add(v[..., : right.shape[-1]] * (left - right), right, alpha=p + 1)
    return bases


def b_spline_basis(x: torch.Tensor, grid_size: int = 3, spline_order: int = 3, grid_range=(-1.0, 1.0)) -> torch.Tensor:
    """The grid_size + spline_order B-spline bases at x: [...] -> [..., grid_size + spline_order].

    Order ``spline_order`` (degree, >= 1; 3 = cubic) on the uniform grid of ``grid_size`` intervals
    over ``grid_range``, extended by spline_order knots on each side (efficient-KAN's grid)."""
    offsets, scale = _knots(grid_size, spline_order, grid_range, device=x.device, dtype=x.dtype)
    return _unnormalised_bases(x.unsqueeze(-1), offsets, scale, spline_order)[..., 0, :] / math.factorial(spline_order)


def _orthogonal(*shape: int) -> torch.Tensor:
    w = torch.empty(*shape)
    for block in w.view(-1, *shape[-2:]):
        nn.init.orthogonal_(block)
    return w


@register("tkan", family="classic", paper="Genet & Inzirillo, TKAN: Temporal Kolmogorov-Arnold Networks (2024)")
class TKAN(Mixer):
    """Temporal Kolmogorov-Arnold Network: an LSTM-like cell whose output gate reads recurring KAN sub-layers.

    s_l = W_l,x x_t + W_l,h h~_l; o~_l = KAN_l(s_l); h~_l = w_l,o * o~_l + w_l,h * h~_l;
    i, f, c~ = sigmoid(W x_t + U h_{t-1} + b); o = sigmoid(W_o [o~_1..o~_L] + b_o);
    c_t = f c_{t-1} + i c~; h_t = o tanh(c_t). Genet & Inzirillo, "TKAN: Temporal Kolmogorov-Arnold Networks" (2024).
    """

    modes = ("recurrent",)
    state_formula = "2 * d_model + n_sublayers * sub_output_dim"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_sublayers: int = 1,
        sub_input_dim: int | None = None,
        sub_output_dim: int | None = None,
        grid_size: int = 3,
        spline_order: int = 3,
        grid_range: tuple[float, float] = (-1.0, 1.0),
    ):
        super().__init__(d_model, mode)
        sub_input_dim = d_model if sub_input_dim is None else sub_input_dim
        sub_output_dim = d_model if sub_output_dim is None else sub_output_dim
        positive_ints("tkan", n_sublayers=n_sublayers, sub_input_dim=sub_input_dim, sub_output_dim=sub_output_dim,
                      grid_size=grid_size, spline_order=spline_order)
        lo, hi = (float(v) for v in grid_range)
        if not lo < hi:
            raise ValueError(f"tkan: grid_range must be (low, high) with low < high, got {grid_range!r}")
        self.n_sublayers, self.sub_input_dim, self.sub_output_dim = n_sublayers, sub_input_dim, sub_output_dim
        self.grid_size, self.spline_order, self.grid_range = grid_size, spline_order, (lo, hi)
        d, L, s_in, s_out, n_bases = d_model, n_sublayers, sub_input_dim, sub_output_dim, grid_size + spline_order

        # The cell's gates (i, f, c~), Keras layout x @ kernel: [d, 3d].
        self.kernel = nn.Parameter(nn.init.xavier_uniform_(torch.empty(d, 3 * d)))
        self.recurrent_kernel = nn.Parameter(_orthogonal(d, 3 * d))
        self.bias = nn.Parameter(torch.cat([torch.zeros(d), torch.ones(d), torch.zeros(d)]))
        # The RKAN sub-layers, stacked over l.
        self.sub_input_weight = nn.Parameter(_orthogonal(L, d, s_in))       # W_l,x
        self.sub_state_weight = nn.Parameter(_orthogonal(L, s_out, s_in))   # W_l,h
        self.sub_memory_weight = nn.Parameter(_orthogonal(L, 2 * s_out).view(L, 2, s_out))  # (w_l,o, w_l,h)
        self.kan_norm = nn.Parameter(torch.stack([torch.ones(L, s_in), torch.zeros(L, s_in)], 1))  # LN scale, offset
        bound = math.sqrt(6.0 / s_in)
        self.kan_base_weight = nn.Parameter(torch.empty(L, s_in, s_out).uniform_(-bound, bound))
        self.kan_base_bias = nn.Parameter(torch.zeros(L, s_out))
        self.kan_spline_weight = nn.Parameter(torch.empty(L, s_in * n_bases, s_out).uniform_(-bound, bound))
        # The output gate from the concatenated sub-layer outputs.
        self.out_gate_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(L * s_out, d)))
        self.out_gate_bias = nn.Parameter(torch.zeros(d))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        zeros = lambda *shape: torch.zeros(batch_size, *shape, device=device, dtype=dtype)  # noqa: E731
        return State(h=zeros(self.d_model), c=zeros(self.d_model), sub=zeros(self.n_sublayers, self.sub_output_dim))

    def kan(self, s: torch.Tensor) -> torch.Tensor:
        """The L KAN layers on their inputs s [L, batch, sub_input_dim] -> [L, batch, sub_output_dim]."""
        return self._kan(s, *self._kan_parameters(s.dtype))

    def _kan_parameters(self, work):
        """(LN scale, LN offset, LN eps, base weight, base bias, spline weight / k!, knot offsets, knot scale) in ``work``."""
        device = self.kan_norm.device
        offsets, scale = _knots(self.grid_size, self.spline_order, self.grid_range, device=device, dtype=work)
        norm = self.kan_norm.to(work)[:, :, None]  # [L, 2, 1, s_in]
        spline = self.kan_spline_weight.to(work) / math.factorial(self.spline_order)  # the bases come as k! B
        eps = torch.tensor(1e-3, device=device, dtype=work)  # Keras LayerNorm's epsilon
        return norm[:, 0], norm[:, 1], eps, self.kan_base_weight.to(work), self.kan_base_bias.to(work)[:, None], spline, offsets, scale

    def _kan(self, s, ln_scale, ln_offset, eps, base_w, base_b, spline_w, offsets, scale):
        var, mean = torch.var_mean(s, dim=-1, correction=0, keepdim=True)
        z = torch.addcmul(ln_offset, (s - mean) * torch.rsqrt(var + eps), ln_scale)
        base = torch.baddbmm(base_b, F.silu(z), base_w)
        bases = _unnormalised_bases(z, offsets, scale, self.spline_order)  # [L, batch, s_in, grid_size + k]
        return torch.baddbmm(base, bases.flatten(-2), spline_w)

    def _forward(self, x, state):
        dtype = x.dtype
        work = torch.float64 if dtype == torch.float64 else torch.float32
        batch, L = x.shape[0], self.n_sublayers
        xw = x.to(work)
        # The input's share of the gates and of every sub-layer's input, for every step at once.
        gates_in = torch.addmm(self.bias.to(work), xw.flatten(0, 1), self.kernel.to(work)).view(batch, -1, 3 * self.d_model)
        sub_in = torch.einsum("btd,lde->tlbe", xw, self.sub_input_weight.to(work))  # [time, L, batch, s_in]
        U, W_h = self.recurrent_kernel.to(work), self.sub_state_weight.to(work)
        w_o, w_h = self.sub_memory_weight.to(work)[:, :, None].unbind(1)  # [L, 1, s_out] each
        W_out, b_out = self.out_gate_weight.to(work), self.out_gate_bias.to(work)
        kan = self._kan_parameters(work)

        h, c = state["h"].to(work), state["c"].to(work)
        sub = state["sub"].to(work).transpose(0, 1)  # h~: [L, batch, s_out]
        hs = []
        for g_t, s_t in zip(gates_in.unbind(1), sub_in.unbind(0)):
            i, f, c_new = torch.sigmoid(torch.addmm(g_t, h, U)).chunk(3, dim=-1)
            c = torch.addcmul(f * c, i, c_new)
            out = self._kan(torch.baddbmm(s_t, sub, W_h), *kan)  # o~_l: [L, batch, s_out]
            sub = torch.addcmul(w_h * sub, w_o, out)
            r = out.transpose(0, 1).reshape(batch, -1) if L > 1 else out[0]  # [o~_1, ..., o~_L]
            h = torch.sigmoid(torch.addmm(b_out, r, W_out)) * torch.tanh(c)
            hs.append(h)
        y = torch.stack(hs, dim=1)
        return y.to(dtype), State(h=h.to(dtype), c=c.to(dtype), sub=sub.transpose(0, 1).to(dtype))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_sublayers={self.n_sublayers}, sub_input_dim={self.sub_input_dim}, "
                f"sub_output_dim={self.sub_output_dim}, grid_size={self.grid_size}, spline_order={self.spline_order}, "
                f"grid_range={self.grid_range}")
