"""Plain PyTorch reference language models: what a careful PyTorch user would write by hand.

    gpt = SDPAGPT(vocab_size=256, d_model=64, n_layers=2, n_heads=2, max_len=64)
    lstm = TorchLSTMLM(vocab_size=256, d_model=64, n_layers=2)
    logits = gpt(tokens)                      # tokens: int64 [batch, time] -> [batch, time, vocab]

They are the yardsticks of ``recur speed``'s ``lab_step`` case: recur's ``CausalLM`` trains at
lab sizes against these, step for step, on identical batches. Nothing in recur builds on them.

* ``SDPAGPT``: nanoGPT's model (Karpathy, karpathy/nanoGPT ``model.py``; Radford et al., "Language
  Models are Unsupervised Multitask Learners", 2019): token embedding + learned positions,
  pre-norm blocks x + attn(LN(x)), x + MLP(LN(x)) with causal ``F.scaled_dot_product_attention``
  and a GELU MLP of width 4 d, a final LayerNorm and a head tied to the token embedding.
* ``TorchLSTMLM``: embedding -> ``torch.nn.LSTM(d_model, d_model, num_layers=n_layers)`` ->
  linear head (tied); the stacked LSTM is oneDNN's fused RNN primitive on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _SelfAttention(nn.Module):
    """Multi-head causal self-attention: one fused qkv projection, SDPA, an output projection."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"SDPAGPT: n_heads={n_heads} must divide d_model={d_model}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # q, k, v: [batch, heads, time, head_dim]
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in self.qkv(x).split(C, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class _GPTBlock(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with MLP = Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _SelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class SDPAGPT(nn.Module):
    """nanoGPT: token + learned position embeddings, pre-norm LayerNorm blocks of causal SDPA
    attention and a GELU MLP, a final LayerNorm, a head tied to the token embedding.

    Initialisation as nanoGPT's: normal(0, 0.02) weights, zero biases, and the residual output
    projections scaled by 1/sqrt(2 n_layers)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_GPTBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        if T > self.max_len:
            raise ValueError(f"SDPAGPT: sequence of {T} tokens is longer than max_len={self.max_len}")
        x = self.tok(tokens) + self.pos(torch.arange(T, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class TorchLSTMLM(nn.Module):
    """Embedding -> torch.nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first) -> head tied
    to the embedding; torch's own LSTM init."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.lstm = nn.LSTM(d_model, d_model, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def n_params(model: nn.Module) -> int:
    """Trainable parameters, a tied weight counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["SDPAGPT", "TorchLSTMLM", "n_params"]
