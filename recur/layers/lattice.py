"""Lattice: a memory of n unit-norm slots per head, each updated only with the part of the write
that is orthogonal to its current state (Karami, Pascanu, Mirrokni, "Lattice: Learning to
Efficiently Compress the Memory", 2025).

Per head, slots s_1..s_n in R^d (d = head_dim), ||s_i|| = 1:
    z_t = sigmoid(x_t W_K)  in (0, 1)^n        write code: how much slot i takes from token t
    r_t = softmax(x_t W_Q)  over the n slots    read code
    v_t = l2norm(x_t W_V)   in R^d
    u_{t,i} = z_{t,i} (I - s_{t-1,i} s_{t-1,i}^T) v_t                 the orthogonal write
    s_{t,i} = (s_{t-1,i} + u_{t,i}) / ||s_{t-1,i} + u_{t,i}||          back onto the sphere
    o_t = sum_i r_{t,i} s_{t,i};   y_t = W_O (RMSNorm(o_t) * SiLU(x_t W_G))

This is one gradient step on the decoding loss ||v_t - S z_t||^2 (the slots S [d, n] decode the
latent code z_t into the value) restricted to normalised slots: the Riemannian gradient on the
sphere keeps only the component orthogonal to s_i, and renormalising is the retraction. Written
unnormalised, s_{t,i} = (1 - z_{t,i} <s_{t-1,i}, v_t>) s_{t-1,i} + z_{t,i} v_t: linear attention
(S += v z^T) with a state- and input-dependent forget gate, the paper's "orthogonal state
recurrence".

Interpretations (recur's choices where the abstract-level description leaves room):
  * the slot-wise decoding form with normalised slots (the paper's ablations single out the
    normalisation; it also bounds the state for any input). The cross-slot term of the full
    reconstruction gradient (-sum_{j != i} z_j s_j) is dropped, so each slot's update depends
    on its own state only (the per-slot recurrence the abstract describes).
  * codes: z = sigmoid (a per-slot write strength in (0, 1)) and r = softmax (the read is a
    convex combination of unit slots); the value is L2-normalised so a write rotates a slot by
    at most 45 degrees. Initial slots are learned (N(0, 1), normalised in ``init_state``).
  * n_slots = 16 per head by default (the paper's compression regime, m = 16).
  * only the recurrent mode: the normalisation makes the recurrence non-linear, so no chunked
    form is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from recur.layers.base import Mixer
from recur.layers.common import merge_heads, positive_int, split_heads
from recur.registry import register
from recur.state import State

PAPER = "Karami, Pascanu, Mirrokni, Lattice: Learning to Efficiently Compress the Memory (2025)"


def orthogonal_write(S: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The update u_i = z_i (v - <s_i, v> s_i) of unit slots S [..., n, d] for codes z [..., n]
    and value v [..., d]: orthogonal to each slot."""
    overlap = (S * v[..., None, :]).sum(-1, keepdim=True)  # <s_i, v>: [..., n, 1]
    return z[..., None] * (v[..., None, :] - overlap * S)


def lattice_step(S: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One token: S <- normalize(S + orthogonal_write(S, z, v)) slot by slot."""
    S = S + orthogonal_write(S, z, v)
    return S * torch.rsqrt((S * S).sum(-1, keepdim=True))  # ||S_i||^2 = 1 + ||u_i||^2 >= 1


def lattice_recurrence(S: torch.Tensor, z: torch.Tensor, r: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence over a sequence: S [batch, heads, n, d]; z, r [batch, heads, time, n];
    v [batch, heads, time, d]. Returns (o [batch, heads, time, d], the last S)."""
    outs = []
    for z_t, r_t, v_t in zip(z.unbind(2), r.unbind(2), v.unbind(2)):
        S = lattice_step(S, z_t, v_t)
        outs.append((r_t[..., None] * S).sum(-2))
    return torch.stack(outs, dim=2), S


@register("lattice", family="test-time-memory", paper=PAPER)
class Lattice(Mixer):
    """Lattice: n unit-norm memory slots per head, each written only orthogonally to its state.

    Per head: u_{t,i} = z_{t,i} (I - s_i s_i^T) v_t ;  s_{t,i} = normalize(s_{t-1,i} + u_{t,i}) ;
    o_t = sum_i r_{t,i} s_{t,i} ;  z = sigmoid(x W_K), r = softmax(x W_Q), v = l2norm(x W_V) ;
    y_t = W_O (RMSNorm(o_t) * SiLU(x_t W_G)).
    Karami, Pascanu, Mirrokni, "Lattice: Learning to Efficiently Compress the Memory" (2025).
    State: the slots [heads, n_slots, head_dim].
    """

    modes = ("recurrent",)
    state_formula = "n_heads * n_slots * head_dim"

    def __init__(self, d_model: int, mode: str | None = None, *, n_heads: int | None = None, head_dim: int | None = None,
                 n_slots: int = 16, norm_eps: float = 1e-5):
        super().__init__(d_model, mode)
        self.n_slots = positive_int("n_slots", n_slots, owner=self.name)
        self._init_heads(n_heads, head_dim)
        H, d = self.n_heads, self.head_dim
        self.code_proj = nn.Linear(d_model, 2 * H * n_slots, bias=False)  # write code z and read code r
        self.v_proj = nn.Linear(d_model, H * d, bias=False)
        self.init_slots = nn.Parameter(torch.randn(H, n_slots, d))
        self.g_proj = nn.Linear(d_model, H * d, bias=False)
        self.o_norm = nn.RMSNorm(d, eps=norm_eps)
        self.o_proj = nn.Linear(H * d, d_model, bias=False)

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        dtype = dtype if dtype is not None else self.init_slots.dtype
        S = F.normalize(self.init_slots.to(device=device, dtype=dtype), dim=-1)
        return State(S=S.unsqueeze(0).expand(batch_size, *S.shape))

    def _forward(self, x, state):
        H = self.n_heads
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        codes = rearrange(self.code_proj(x).to(work), "b t (c h n) -> c b h t n", c=2, h=H)
        z, r = torch.sigmoid(codes[0]), torch.softmax(codes[1], dim=-1)
        v = F.normalize(split_heads(self.v_proj(x).to(work), H), dim=-1)
        o, S = lattice_recurrence(state["S"].to(work), z, r, v)
        o = merge_heads(self.o_norm(o.to(x.dtype)))
        y = self.o_proj(o * F.silu(self.g_proj(x)))
        return y, State(S=S.to(state["S"].dtype))
