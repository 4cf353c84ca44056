"""The Linear Recurrent Unit (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu, De, "Resurrecting
Recurrent Neural Networks for Long Sequences", ICML 2023), on ``recur.ops.scan.diagonal_scan``.

    lambda = exp(-exp(nu_log) + i exp(theta_log))         complex diagonal, |lambda| < 1
    h_t    = lambda * h_{t-1} + gamma * (B x_t)           h: [batch, d_state] complex
    y_t    = Re(C h_t) + D * x_t                          gamma = exp(gamma_log)

Initialisation (the paper's Section 3 and Appendix A): |lambda| uniform on the ring
[r_min, r_max] (|lambda|^2 uniform on [r_min^2, r_max^2]) and phase uniform in
[0, max_phase]; gamma_log = log sqrt(1 - |lambda|^2) (trainable) so that a white-noise input
keeps the state's variance at init; B = (B_re + i B_im) with entries N(0, 1/(2 d_model))
(Glorot-like, the 2 splitting the variance between the real and imaginary parts);
C = (C_re + i C_im) with entries N(0, 1/d_state); D ~ N(0, 1).
The defaults r_min = 0.9, r_max = 0.999, max_phase = 2 pi are the ring the paper uses for its
long-range experiments (its code listing defaults to the full disc r_min = 0, r_max = 1).

This is the recurrent layer alone (the mixer); the paper's block adds a norm, an MLP/GLU and
the residual, which recur's Block provides.

Precision: the recurrence always runs in at least float32 (complex64). A bfloat16 decay
|lambda| = 0.999 rounds to 1 and torch has no complex bfloat16, so bfloat16 inputs are
computed in float32 and the output is cast back; the state is complex64, which is what
``State.to(torch.bfloat16)`` gives a complex entry.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import positive_int
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@register("lru", family="diagonal-ssm",
          paper="Orvieto et al., Resurrecting Recurrent Neural Networks for Long Sequences (2023)")
class LRU(Mixer):
    """Linear Recurrent Unit: a complex diagonal linear RNN with exponential parameterisation.

    h_t = lambda * h_{t-1} + gamma * (B x_t);  y_t = Re(C h_t) + D * x_t, with
    lambda = exp(-exp(nu_log) + i exp(theta_log)) initialised on a ring, gamma = sqrt(1 - |lambda|^2).
    Orvieto et al., "Resurrecting Recurrent Neural Networks for Long Sequences" (ICML 2023).
    """

    modes = ("chunk", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "2 * d_state"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        d_state: int | None = None,
        r_min: float = 0.9,
        r_max: float = 0.999,
        max_phase: float = 2 * math.pi,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, mode)
        N = positive_int("d_state", d_model if d_state is None else d_state, owner=self.name)
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"need 0 <= r_min < r_max <= 1 for a stable ring, got r_min={r_min}, r_max={r_max}")
        if not max_phase > 0:
            raise ValueError(f"max_phase must be positive, got {max_phase}")
        self.d_state, self.chunk_size = N, chunk_size
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        H = d_model

        u1, u2 = torch.rand(N), torch.rand(N)
        nu = -0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2)  # |lambda| = exp(-nu)
        self.nu_log = nn.Parameter(nu.log())
        self.theta_log = nn.Parameter((max_phase * u2).log())
        self.gamma_log = nn.Parameter(0.5 * torch.log(-torch.expm1(-2 * nu)))  # log sqrt(1 - |lambda|^2)
        self.B_re = nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H))
        self.B_im = nn.Parameter(torch.randn(N, H) / math.sqrt(2 * H))
        self.C_re = nn.Parameter(torch.randn(H, N) / math.sqrt(N))
        self.C_im = nn.Parameter(torch.randn(H, N) / math.sqrt(N))
        self.D = nn.Parameter(torch.randn(H))

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        return State(h=torch.zeros(batch_size, self.d_state, device=device, dtype=_complex(dtype)))

    def log_lambda(self, dtype: torch.dtype) -> torch.Tensor:
        """log lambda = -exp(nu_log) + i exp(theta_log): [d_state] complex, real part < 0."""
        return torch.complex(-self.nu_log.to(dtype).exp(), self.theta_log.to(dtype).exp())

    def _forward(self, x, state, resets=None):
        work = _work_dtype(x.dtype)
        u = x.to(work)
        gamma = self.gamma_log.to(work).exp()
        # gamma * (B x_t) as two real matmuls: [batch, time, d_state] complex
        bx = torch.complex(u @ self.B_re.to(work).T, u @ self.B_im.to(work).T) * gamma
        log_lambda = self.log_lambda(work)
        if resets is not None:  # one decay per step, zero at a reset
            log_lambda = packing.hard_reset(log_lambda.expand(*bx.shape), resets, time_dim=1)
        h, h_last = diagonal_scan(
            log_lambda, bx, state["h"],
            mode=self.op_mode, chunk_size=self.chunk_size,
        )
        # Re(C h) = C_re h_re - C_im h_im
        y = h.real @ self.C_re.to(work).T - h.imag @ self.C_im.to(work).T + self.D.to(work) * u
        return y.to(x.dtype), State(h=h_last)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, d_state={self.d_state}, r_min={self.r_min}, r_max={self.r_max}, "
                f"max_phase={self.max_phase:.4g}, chunk_size={self.chunk_size}")
