"""``armt``: the Associative Recurrent Memory Transformer (Rodkin, Kuratov, Bulatov, Burtsev,
"Associative Recurrent Memory Transformer", 2024), as the authors' ``AssociativeLayerWrapper`` /
``AssociativeMemoryCell`` compute it (RodkinIvan/associative-recurrent-memory-transformer,
``modeling_amt/language_modeling.py``).

Every segment is read as ``[E x_s ; mem]``, with ``mem`` [M, d] a learned parameter (the same for
every segment: write tokens only, at the end). Each layer l has its own associative matrix A_l and
normaliser z_l, read by every position before the layer and written from the memory positions
after it:

    phi(x)  = DPFP_nu(x) / ||DPFP_nu(x)||,   DPFP_nu(x) = concat_{j=1..nu} p * roll(p, j),  p = [relu(x), relu(-x)]
    read:   h <- h + phi(W_q h) A_l / (phi(W_q h) . z_l + eps)                       every position
    h <- layer_l(h)
    write:  with m = h at the M memory positions (the layer's output):
            k = phi(W_k m),  v = W_v m  (W_v zero-initialised),  beta = sigmoid(W_b m)  (one per memory head)
            v_prev = k A_l / (k . z_l + eps)
            A_l <- A_l + sum_i beta_i k_i (v_i - v_prev_i)^T                          (a delta rule)
            z_l <- z_l + sum_i gamma_i k_i,   gamma = clip(1 - (k . z_l) / ||k||^2, 0, 1), detached

eps = 1e-5, nu = 3, so d_key = 2 nu d_mem. A_l, z_l start at zero for each sequence (the first
segment's read adds exactly 0 and its v_prev is 0, as the authors' ``first_seg`` branch does).
The M write tokens are written together, each against the same A_l (the authors' one einsum):
for M = 1 that is one step of ``recur.ops.delta.delta_rule`` with strength beta / (k . z + eps) and
value (k . z + eps) v; for M > 1 the sequential delta rule would let each token read the writes
of those before it, so the block update is written here (``associative_write``), and a test checks
it against both. ``gamma`` is the authors' ``correction``: a key direction already counted in z is
not counted again. Their code computes it as 1 - (k . z + eps) / ||k||^2 after the first segment
(1 on the first); the formula above drops that eps (gamma larger by 1e-5, the keys being unit
vectors) and needs no first-segment branch. Logits are the token positions'; the memory
positions feed only the next segments through A and z.

Options: ``segment_len``, ``n_memory`` (M, default 4), ``d_mem`` (default d_model // 2: 64 at
the authors' d = 128), ``memory_heads`` (the authors' ``n_heads``, default 1), ``dpfp_nu`` (3),
``correction`` (True), ``bptt_segments`` (None: full BPTT, the authors' associative-retrieval
setting). The segment loop, the state's pending segment and packing are ``recur.models.segments``.

State: ``State(memory=State(layer0=State(A=[batch, heads, d_key / heads, d_model / heads],
z=[batch, heads, d_key / heads]), ...), pending=[batch, segment_len - 1, d_model], count=int64 [batch])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.common import merge_heads, positive_int, split_heads
from recur.models.segments import SegmentLM
from recur.registry import ARCHITECTURES
from recur.state import State

EPS = 1e-5  # the authors' denominator offset


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag, Irie, Schmidhuber 2021): [..., d] -> [..., 2 nu d],
    p = [relu(x), relu(-x)], then concat_{j=1..nu} p * roll(p, j) (non-negative features)."""
    p = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([p * p.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def associative_read(q: torch.Tensor, A: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """q A / (q . z + eps). q: [batch, heads, time, d_key]; A: [batch, heads, d_key, d_v]; z: [batch, heads, d_key]."""
    return (q @ A) / ((q * z[:, :, None]).sum(-1, keepdim=True) + EPS)


def associative_write(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
                      correction: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The block delta rule of the M write tokens, all against the same (A, z): returns (A', z').

    k: [batch, heads, M, d_key] (non-negative unit features); v: [batch, heads, M, d_v]; beta: [batch, heads, M]."""
    kz = (k * z[:, :, None]).sum(-1, keepdim=True)  # [batch, heads, M, 1]
    v_prev = (k @ A) / (kz + EPS)
    A = A + k.transpose(-1, -2) @ (beta[..., None] * (v - v_prev))
    if correction:
        norm2 = (k * k).sum(-1, keepdim=True).clamp_min(torch.finfo(k.dtype).tiny)
        gamma = (1 - kz / norm2).clamp(0, 1).detach()
    else:
        gamma = torch.ones_like(kz)
    return A, z + (gamma * k).sum(-2)


class AssociativeMemory(nn.Module):
    """One layer's associative memory: the projections W_q, W_k, W_v, W_b and the read / write of (A, z)."""

    def __init__(self, d_model: int, d_mem: int, n_heads: int = 1, nu: int = 3, correction: bool = True):
        super().__init__()
        self.n_heads, self.nu, self.correction = n_heads, nu, bool(correction)
        self.d_key = 2 * nu * d_mem
        self.d_model = d_model
        self.W_q = nn.Linear(d_model, d_mem, bias=False)
        self.W_k = nn.Linear(d_model, d_mem, bias=False)
        self.W_v = nn.Linear(d_model, d_model, bias=False)
        nn.init.zeros_(self.W_v.weight)  # the memory starts silent: reads add nothing until it learns
        self.W_b = nn.Linear(d_model, n_heads)

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        H = self.n_heads
        return State(A=torch.zeros(batch_size, H, self.d_key // H, self.d_model // H, device=device, dtype=dtype),
                     z=torch.zeros(batch_size, H, self.d_key // H, device=device, dtype=dtype))

    def features(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """phi(proj x) per head: [batch, time, d] -> [batch, heads, time, d_key / heads]."""
        return F.normalize(dpfp(split_heads(proj(x), self.n_heads), self.nu), dim=-1)

    def read(self, h: torch.Tensor, state: State) -> torch.Tensor:
        return merge_heads(associative_read(self.features(h, self.W_q), state["A"], state["z"]))

    def write(self, m: torch.Tensor, state: State) -> State:
        k = self.features(m, self.W_k)
        v = split_heads(self.W_v(m), self.n_heads)
        beta = torch.sigmoid(self.W_b(m)).transpose(1, 2)  # [batch, heads, M]
        A, z = associative_write(k, v, beta, state["A"], state["z"], self.correction)
        return State(A=A, z=z)


@ARCHITECTURES.register("armt", family="segment memory",
                        paper="Rodkin, Kuratov, Bulatov, Burtsev, Associative Recurrent Memory Transformer (2024)")
class ARMT(SegmentLM):
    """Associative RMT: per-layer associative matrices written by a delta rule from memory tokens, read by every token."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, pattern="attention",
                 mixer_config: Mapping[str, Any] | None = None, mlp: str | None = "swiglu",
                 mlp_ratio: float = 4.0, tie_embeddings: bool = False, norm: str = "rmsnorm",
                 channel_options: Mapping[str, Any] | None = None, shared_blocks: int | None = None,
                 segment_len: int = 32, n_memory: int = 4, d_mem: int | None = None, memory_heads: int = 1,
                 dpfp_nu: int = 3, correction: bool = True, bptt_segments: int | None = None):
        super().__init__(vocab_size, d_model, n_layers, pattern, mixer_config, mlp=mlp, mlp_ratio=mlp_ratio,
                         tie_embeddings=tie_embeddings, norm=norm, channel_options=channel_options,
                         shared_blocks=shared_blocks, segment_len=segment_len, bptt_segments=bptt_segments)
        d_mem = max(1, d_model // 2) if d_mem is None else d_mem
        self.n_memory = positive_int("n_memory", n_memory)
        positive_int("d_mem", d_mem)
        positive_int("memory_heads", memory_heads)
        positive_int("dpfp_nu", dpfp_nu)
        if d_mem % memory_heads or d_model % memory_heads:
            raise ValueError(f"memory_heads={memory_heads} must divide d_mem={d_mem} and d_model={d_model}")
        self.memory = nn.Parameter(torch.randn(n_memory, d_model) * self.embed.weight.detach().std())
        self.associative = nn.ModuleList(AssociativeMemory(d_model, d_mem, memory_heads, dpfp_nu, correction)
                                         for _ in range(n_layers))

    def init_memory(self, batch_size: int, device=None, dtype=None) -> State:
        return State({f"layer{i}": a.init_state(batch_size, device=device, dtype=dtype or self.dtype)
                      for i, a in enumerate(self.associative)})

    def cell(self, e: torch.Tensor, memory: State, write: bool) -> tuple[torch.Tensor, State | None]:
        n = e.shape[1]
        h = torch.cat([e, self.memory.to(e.dtype).expand(e.shape[0], -1, -1)], dim=1) if write else e
        new = {}
        for i, (block, assoc) in enumerate(zip(self.backbone.layers, self.associative)):
            own = memory[f"layer{i}"]
            h = h + assoc.read(h, own)
            h, _, _ = block(h)
            if write:
                new[f"layer{i}"] = assoc.write(h[:, n:], own)
        return h[:, :n], (State(new) if write else None)

    @classmethod
    def example(cls, vocab_size: int, d_model: int) -> ARMT:
        # T = 23 ends inside the fifth segment of 5; attention's parallel mode is the fast path
        model = cls(vocab_size=vocab_size, d_model=d_model, n_layers=2, pattern="attention", segment_len=5,
                    n_memory=2, d_mem=4)
        for a in model.associative:  # W_v starts at zero (silent memory): open it so the tests see it work
            nn.init.normal_(a.W_v.weight, std=0.3)
        return model
