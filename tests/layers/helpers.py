"""Helpers shared by the layer tests (``tests/layers/test_<layer file>.py``): a small layer in
float64 from a seed, seeded inputs, the float64 exactness check, and the norms that several
direct transcriptions of a paper's equations write out."""

from __future__ import annotations

import torch
from einops import rearrange

import recur

D = 16
# float64, where the only differences are summation order and rounding (~1e-15 relative).
RTOL, ATOL = 1e-8, 1e-10


def make(name, seed=0, **options):
    torch.manual_seed(seed)
    return recur.build(name, d_model=D, **options).double()


def randn(*shape, seed=1, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def close(a, b, what="", rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def group_norm_heads(h, weight, bias, eps):
    """Layer norm over each head's channels: h [batch, time, heads, d]; weight, bias [heads * d]."""
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    h = rearrange((h - mean) / torch.sqrt(var + eps), "b t h d -> b t (h d)")
    return h * weight + (0 if bias is None else bias)
