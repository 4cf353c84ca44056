"""S4D, the diagonal linear state-space layer (Gu, Gupta, Goel, Ré, "On the Parameterization and
Initialization of Diagonal State Space Models", NeurIPS 2022; the LSSL / S4 lineage), on
``recur.ops.scan.diagonal_scan`` and ``recur.ops.conv.causal_fft_conv``.

Every channel h = 1..d_model is its own single-input single-output continuous-time system
x'(t) = A x(t) + B u(t), y(t) = 2 Re(C x(t)) + D u(t), with a diagonal complex A of N/2 modes
(N = d_state; the other N/2 are the complex conjugates, which is why the real part is taken
twice instead of storing them):

    A      = -exp(log_A_real) + i A_imag                    [d_model, N/2], Re A < 0
    dt     = exp(log_dt)                                    [d_model], one step per channel
    A_bar  = exp(dt A)                                      zero-order hold (ZOH)
    B_bar  = (exp(dt A) - 1) / A * B                        B = 1
    h_t    = A_bar * h_{t-1} + B_bar * u_t                  h: [batch, d_model, N/2] complex
    y_t    = 2 Re(C h_t) + D * u_t = (K * u)_t + D u_t      K_l = 2 Re(C A_bar^l B_bar)
    out    = GLU(W GELU(y) + b)                             W: [2 d_model, d_model]

Parameterisation and initialisation follow the paper's standalone S4D code (``s4d.py`` in
state-spaces/s4): S4D-Lin, A_n = -1/2 + i pi n (n = 0..N/2-1); log_dt uniform in
[log dt_min, log dt_max] = [log 1e-3, log 1e-1]; C complex standard normal (real and imaginary
parts N(0, 1/2)); D ~ N(0, 1); B fixed to 1 (only the product C_n B_n enters the map from u to
y, so the standalone code learns C alone); all of log_A_real, A_imag, log_dt, C, D learnable.
The output stage is the standalone code's: GELU, then a pointwise linear to 2 d_model and a
GLU (dropout omitted). The norm, residual and MLP around it are recur's Block.

Modes (equal up to rounding):

* ``conv`` (default): the kernel K_l for l < T by a Vandermonde product (A_bar^l = exp(l dt A)
  directly, no repeated multiplication), then ``causal_fft_conv``. From a given state h_0 the
  zero-input response 2 Re(C A_bar^(t+1) h_0) is added, and the final state is the exact
  Vandermonde-weighted sum h_T = A_bar^T h_0 + B_bar sum_j A_bar^(T-1-j) u_j, so carrying the
  state across calls is exact in this mode too.
* ``chunk``: the recurrence with ``diagonal_scan``'s fast mode (time-invariant decays).
* ``recurrent``: the scan's reference loop, one step at a time.

The SSM runs in at least float32 (complex64): bfloat16 inputs are computed in float32 and cast
back; the state is complex64, as ``State.to(torch.bfloat16)`` keeps a complex entry.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.base import Mixer
from recur.ops.conv import causal_fft_conv
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@register("s4d", family="diagonal-ssm",
          paper="Gu, Gupta, Goel, Ré, On the Parameterization and Initialization of Diagonal State Space Models (2022)")
class S4D(Mixer):
    """S4D: a time-invariant diagonal complex SSM per channel, ZOH-discretised, run as an FFT convolution.

    h_t = exp(dt A) h_{t-1} + (exp(dt A) - 1)/A u_t;  y_t = 2 Re(C h_t) + D u_t = (K * u)_t + D u_t with
    K_l = 2 Re(C A_bar^l B_bar); out = GLU(W GELU(y)). S4D-Lin init A_n = -1/2 + i pi n.
    Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State Space Models" (2022).
    """

    modes = ("conv", "chunk", "recurrent")
    state_formula = "d_model * d_state"

    def __init__(self, d_model: int, mode: str | None = None, *, d_state: int = 64, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, chunk_size: int = 64):
        super().__init__(d_model, mode)
        if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state < 2 or d_state % 2:
            raise ValueError(f"d_state must be an even int >= 2 (N/2 complex modes and their conjugates), got {d_state!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.d_state, self.chunk_size = d_state, chunk_size
        self.dt_min, self.dt_max = dt_min, dt_max
        H, M = d_model, d_state // 2
        self.n_modes = M
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.full((H, M), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(M, dtype=torch.float32).expand(H, M).clone())
        # C as (real, imaginary) pairs: complex standard normal, each part N(0, 1/2)
        self.C = nn.Parameter(torch.randn(H, M, 2) / math.sqrt(2))
        self.D = nn.Parameter(torch.randn(H))
        self.out_proj = nn.Linear(H, 2 * H)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        return State(h=torch.zeros(batch_size, self.d_model, self.n_modes, device=device, dtype=_complex(dtype)))

    # ------------------------------------------------------------------ the SSM
    def discretize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dt A, B_bar, C), each [d_model, N/2] complex, in the precision of real ``dtype``.

        A_bar = exp(dt A); B_bar = (exp(dt A) - 1) / A with expm1 (accurate for |dt A| << 1).
        """
        A = torch.complex(-self.log_A_real.to(dtype).exp(), self.A_imag.to(dtype))
        dtA = A * self.log_dt.to(dtype).exp()[:, None]
        C = torch.view_as_complex(self.C.to(dtype).contiguous())
        return dtA, torch.expm1(dtA) / A, C

    def kernel(self, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The impulse response K_l = 2 Re(C A_bar^l B_bar) for l < length: [length, d_model]."""
        dtA, B_bar, C = self.discretize(dtype)
        powers = torch.exp(dtA[..., None] * torch.arange(length, device=dtA.device, dtype=dtype))
        return 2 * torch.einsum("hn,hnl->lh", C * B_bar, powers).real

    def ssm(self, u: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear part y_t = 2 Re(C h_t) + D u_t in the current mode: (y [batch, T, d_model], h_T).

        u: [batch, T, d_model] real (float32 or float64); h0: [batch, d_model, N/2] complex.
        """
        dtype = u.dtype
        dtA, B_bar, C = self.discretize(dtype)
        if self.mode == "conv":
            T = u.shape[1]
            # powers[h, n, l] = A_bar^l for l = 0..T (exp(l dt A), exact to rounding for every l)
            powers = torch.exp(dtA[..., None] * torch.arange(T + 1, device=u.device, dtype=dtype))
            K = 2 * torch.einsum("hn,hnl->lh", C * B_bar, powers[..., :T]).real
            y = causal_fft_conv(u, K)
            # the zero-input response of h0: 2 Re(C A_bar^(t+1) h0)
            y = y + 2 * torch.einsum("bhn,hnt->bth", C * h0, powers[..., 1:]).real
            # h_T = A_bar^T h0 + B_bar sum_j A_bar^(T-1-j) u_j
            inputs = torch.einsum("bjh,hnj->bhn", u.to(dtA.dtype), powers[..., :T].flip(-1))
            h_last = powers[..., T] * h0 + B_bar * inputs
        else:
            b = u[..., None] * B_bar  # [batch, T, d_model, N/2]
            h, h_last = diagonal_scan(dtA, b, h0, mode=self.op_mode, chunk_size=self.chunk_size)
            y = 2 * torch.einsum("bthn,hn->bth", h, C).real
        return y + self.D.to(dtype) * u, h_last

    def _forward(self, x, state):
        work = _work_dtype(x.dtype)
        y, h_last = self.ssm(x.to(work), state["h"])
        y = F.linear(F.gelu(y), self.out_proj.weight.to(work), self.out_proj.bias.to(work))
        return F.glu(y, dim=-1).to(x.dtype), State(h=h_last)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_state={self.d_state}, dt_min={self.dt_min}, dt_max={self.dt_max}, "
                f"chunk_size={self.chunk_size}")
