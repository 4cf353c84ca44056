"""A linear layer with one shared weight and one low-rank adapter per use (LoRA, Hu et al., "LoRA:
Low-Rank Adaptation of Large Language Models", 2021), as the layer-wise relaxation of Bae et al.,
"Relaxed Recursive Transformers" (2024) uses it: a block applied n times keeps one W and gets n
pairs (A_k, B_k), the loop driver choosing which one is active.

    y = x W^T + b + (x A_k^T) B_k^T          k = the active adapter (``set_adapter``)
    A_k: [r, in],  B_k: [out, r]             r = min(rank, in, out); no alpha / rank scaling (see below)

Initialisations:

* ``random`` (plain LoRA): A_k Kaiming-uniform (a = sqrt(5), PyTorch's nn.Linear default, as peft),
  B_k = 0, so every use starts at the shared weight.
* ``svd`` (Bae et al.'s SVD init from the residual): for a target weight W_k of use k,
  Delta = W_k - W,  U S V^T = svd(Delta),  A_k = V_r^T (the first r rows of V^T),  B_k = U_r S_r,
  so W + B_k A_k is the best rank-r approximation of W_k (Eckart-Young), and exactly W_k at full rank.

Deviation: plain LoRA scales the update by alpha / rank; the paper's SVD init puts the singular
values into B, which only means something unscaled, so there is no scale (alpha = rank).

Mixers that read ``proj.weight`` / ``proj.bias`` themselves (``F.linear(x, self.proj.weight)``,
e.g. hgrn, s4d, slstm) get the adapted weight: ``weight`` is W + B_k A_k, so the LoRA applies
whether the module is called or its weight is read. A Linear whose weight is also registered under
another name (an alias used outside the module) cannot be adapted: ``add_lora`` raises, naming it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from recur.layers.common import positive_int

LORA_INITS = ("random", "svd")


class LoRALinear(nn.Module):
    """``base`` (an nn.Linear, its weight shared by every use) plus ``n_adapters`` rank-``rank`` adapters."""

    def __init__(self, base: nn.Linear, n_adapters: int, rank: int):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        n_adapters, rank = positive_int("n_adapters", n_adapters), positive_int("lora_rank", rank)
        # a rank above min(in, out) adds nothing (the update is full rank there already)
        rank = min(rank, base.in_features, base.out_features)
        self.base = base
        w = base.weight
        self.lora_A = nn.Parameter(torch.zeros(n_adapters, rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, rank, dtype=w.dtype, device=w.device))
        self.active = 0
        self.reset_random()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def n_adapters(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def weight(self) -> torch.Tensor:
        """The active use's weight W + B_k A_k (what a mixer reading ``.weight`` must see)."""
        k = self.active
        return self.base.weight + self.lora_B[k] @ self.lora_A[k]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active
        # rank-r path apart (x A^T then B^T): r (in + out) work per token instead of in * out
        return self.base(x) + F.linear(F.linear(x, self.lora_A[k]), self.lora_B[k])

    @torch.no_grad()
    def reset_random(self) -> None:
        """Plain LoRA: A Kaiming-uniform, B = 0 (every use starts at the shared weight)."""
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_B.zero_()

    @torch.no_grad()
    def init_svd(self, k: int, target: torch.Tensor) -> None:
        """Adapter ``k`` from the residual of ``target`` ([out, in], the original layer's weight)
        to the shared weight: W + B_k A_k is its best rank-r approximation."""
        if tuple(target.shape) != tuple(self.base.weight.shape):
            raise ValueError(f"SVD init: the target weight must have shape {tuple(self.base.weight.shape)}, "
                             f"got {tuple(target.shape)}")
        r = self.rank
        delta = (target.to(torch.float64) - self.base.weight.to(torch.float64)).cpu()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        self.lora_A[k].copy_(vh[:r])
        self.lora_B[k].copy_(u[:, :r] * s[:r])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, adapters={self.n_adapters}"


def lora_linears(module: nn.Module) -> list[tuple[str, LoRALinear]]:
    """The LoRALinear modules under ``module`` with their names."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]


def set_adapter(module: nn.Module, k: int) -> None:
    """Make adapter ``k`` the active one in every LoRALinear under ``module`` (the loop driver's call)."""
    for _, m in lora_linears(module):
        if not 0 <= k < m.n_adapters:
            raise IndexError(f"adapter {k} of a LoRALinear with {m.n_adapters} adapters")
        m.active = k


def add_lora(module: nn.Module, n_adapters: int, rank: int, owner: str = "module") -> list[str]:
    """Replace every nn.Linear under ``module`` by a LoRALinear around it (the same weight object,
    so the parameters are kept); returns the wrapped names. ``owner`` names the module in errors.

    A Linear whose weight or bias is also registered elsewhere (a mixer keeping ``self.w =
    proj.weight`` and computing with it) would bypass the adapter: that is an error naming it."""
    linears = [(n, m) for n, m in module.named_modules(remove_duplicate=False) if type(m) is nn.Linear]
    seen: dict[int, str] = {}
    for n, m in linears:
        if id(m) in seen:
            raise ValueError(f"{owner}: the Linear {seen[id(m)]!r} is also registered as {n!r}; a LoRA cannot "
                             "tell its uses apart")
        seen[id(m)] = n
    for name, p in module.named_parameters(remove_duplicate=False):
        for n, m in linears:
            if (p is m.weight or p is m.bias) and not name.startswith(f"{n}."):
                raise ValueError(f"{owner}: the weight of Linear {n!r} is also used as {name!r} outside the "
                                 "module, so a LoRA on it would not apply; this mixer cannot take lora_rank > 0")
    for n, m in linears:
        parent_name, _, child = n.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, LoRALinear(m, n_adapters, rank))
    return [n for n, _ in linears]


__all__ = ["LORA_INITS", "LoRALinear", "add_lora", "lora_linears", "set_adapter"]
