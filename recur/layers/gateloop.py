"""GateLoop (Katsch, "GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling",
ICLR 2024): linear attention whose state transition is a data-controlled complex diagonal,
on ``recur.ops.scan.diagonal_scan`` with a complex state.

Per head, with q_t, k_t, v_t in R^{d_h} and the state transition a_t in C^{d_h} (one complex
gate per key dimension, broadcast over the value dimension):

    h_t = Diag(a_t) h_{t-1} + k_t v_t^T          h: [d_h (key), d_h (value)], complex
    y_t = Re(q_t^T h_t)                          (the paper's vector form; k is the input gate,
                                                  a the hidden-state gate, q the output gate)
    a_t = sigmoid(W_m x_t + b_m) * exp(i (W_theta x_t + b_theta))      |a_t| < 1
    o_t = W_o (silu(W_g x_t) * y_t)              (output gate and projection)

The recurrence is ``diagonal_scan`` over the flattened [heads, d_k, d_v] state with
log a_t = logsigmoid(W_m x_t + b_m) + i (W_theta x_t + b_theta): complex, real part < 0.
(``gated_matrix`` is real-only; a complex decay per key dimension is exactly a diagonal scan.)

Interpretations (the official repository only holds a later, real-valued simplification):
* magnitude and phase come from two linear projections (magnitude activation sigmoid, phase
  activation identity). Several third-party ports instead take the polar form of one complex
  projection z, a = sigmoid(|z|) exp(i arg z); that confines |a| to [1/2, 1) and has no
  gradient at z = 0, so it is not used here.
* heads: the paper's language models are "max-headed" (d_h = 1, heads = d_model, per the
  author's review of lucidrains/gateloop-transformer), the default here; ``head_dim`` gives the
  general outer-product state.
* the real part is taken of q_t^T h_t, before the (real) output gate and projection, which is
  the same as taking it after them; no normalisation is applied to y (none is specified).
* initialisation: not specified by the paper; PyTorch's Linear defaults (the magnitude and
  phase projections with biases, the others without).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers import packing
from recur.layers.base import Mixer
from recur.layers.common import merge_heads, split_heads
from recur.ops.scan import diagonal_scan
from recur.registry import register
from recur.state import State


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


@register("gateloop", family="matrix-state",
          paper="Katsch, GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling (2023)")
class GateLoop(Mixer):
    """GateLoop: data-controlled complex state transitions on an outer-product (linear attention) state.

    Per head: h_t = Diag(a_t) h_{t-1} + k_t v_t^T (complex), y_t = Re(q_t^T h_t),
    a_t = sigmoid(W_m x_t + b_m) exp(i (W_theta x_t + b_theta)) per key dimension,
    o_t = W_o (silu(W_g x_t) * y_t). Katsch, "GateLoop: Fully Data-Controlled Linear
    Recurrence for Sequence Modeling" (ICLR 2024). Default: the paper's max-headed form
    (head_dim 1, heads = d_model); state [batch, heads, head_dim, head_dim] complex.

    Modes: ``chunk`` (the diagonal scan's fast path) and ``recurrent`` (its reference loop).
    """

    modes = ("chunk", "recurrent")
    native_packing = True  # a reset is a log decay of -inf (recur.layers.packing)
    state_formula = "2 * n_heads * head_dim * head_dim"

    def __init__(
        self,
        d_model: int,
        mode: str | None = None,
        *,
        n_heads: int | None = None,
        head_dim: int | None = None,
        chunk_size: int = 64,
    ):
        super().__init__(d_model, mode)
        self._init_heads(n_heads, head_dim, preferred_head_dim=1)  # max-headed by default
        self.chunk_size = chunk_size
        d = d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.a_proj = nn.Linear(d, 2 * d)  # (magnitude logits, phase), each [heads * d_k]
        self.g_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        H, K = self.n_heads, self.head_dim
        return State(h=torch.zeros(batch_size, H, K, K, device=device, dtype=_complex(dtype)))

    def projections(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """q, k, v [batch, time, heads, d_h], log a (complex) [batch, time, heads, d_k], g [batch, time, d_model]."""
        work = _work_dtype(x.dtype)
        magnitude, phase = self.a_proj(x).chunk(2, dim=-1)
        q, k, v, magnitude, phase = (split_heads(t.to(work), self.n_heads, "b t h d")
                                     for t in (self.q_proj(x), self.k_proj(x), self.v_proj(x), magnitude, phase))
        log_a = torch.complex(F.logsigmoid(magnitude), phase)  # log|a| < 0, arg a
        return dict(q=q, k=k, v=v, log_a=log_a, g=self.g_proj(x).to(work))

    def _forward(self, x, state, resets=None):
        p = self.projections(x)
        kv = p["k"].unsqueeze(-1) * p["v"].unsqueeze(-2)  # k_t v_t^T: [batch, time, heads, d_k, d_v]
        log_a = p["log_a"]
        if resets is not None:  # complex log decay: a real part of -inf is a decay of zero
            log_a = torch.complex(packing.hard_reset(log_a.real, resets, time_dim=1), log_a.imag) if log_a.is_complex() \
                else packing.hard_reset(log_a, resets, time_dim=1)
        h, h_last = diagonal_scan(log_a.unsqueeze(-1), kv, state["h"], mode=self.op_mode, chunk_size=self.chunk_size)
        y = torch.einsum("bthk,bthkv->bthv", p["q"], h.real)  # Re(q^T h), q real
        y = F.silu(p["g"]) * merge_heads(y, "b t h d")
        return self.o_proj(y.to(x.dtype)), State(h=h_last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_heads={self.n_heads}, head_dim={self.head_dim}, chunk_size={self.chunk_size}"
