"""Norms for blocks, by name: ``rmsnorm`` (Zhang & Sennrich 2019) and ``layernorm`` (Ba et al. 2016)."""

from __future__ import annotations

from torch import nn

from recur.registry import NORMS

NORMS.add("rmsnorm", nn.RMSNorm, paper="Zhang & Sennrich, Root Mean Square Layer Normalization (2019)",
          description="x / rms(x) * g")
NORMS.add("layernorm", nn.LayerNorm, paper="Ba et al., Layer Normalization (2016)",
          description="(x - mean) / std * g + b")


def build_norm(name: str, d_model: int, eps: float | None = None) -> nn.Module:
    """The norm registered as ``name``; ``eps=None`` keeps the norm's own default (RMSNorm: the
    dtype's machine epsilon, LayerNorm: 1e-5)."""
    cls = NORMS.get(name).cls
    return cls(d_model) if eps is None else cls(d_model, eps=eps)
