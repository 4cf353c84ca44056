"""Attention over packed documents (``first``): the block-diagonal causal mask, in every mode."""

from __future__ import annotations

import pytest
import torch

from recur.ops.attention import attention, attention_step


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def first_keys(B, T, S, seed):
    """Per query, the first key of its document: random document starts, some reaching into the cache."""
    g = torch.Generator().manual_seed(seed)
    cached = S - T
    starts = torch.rand(B, T, generator=g) < 0.08
    idx = torch.arange(T) + cached
    doc = torch.where(starts, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    carried = torch.randint(0, cached + 1, (B,), generator=g)  # the document in progress when the call began
    return torch.maximum(doc, carried[:, None])


def dense(q, k, v, first, window):
    """The definition: softmax over the visible keys j, first_i <= j <= a_i (and within the window)."""
    T, S = q.shape[2], k.shape[2]
    a = torch.arange(S - T, S)[:, None]
    j = torch.arange(S)[None, :]
    visible = (j <= a)[None] & (j[None] >= first[:, :, None])  # [batch, T, S]
    if window is not None:
        visible = visible & ((a - j) < window)[None]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 5, 300])
@pytest.mark.parametrize("T,cached", [(1, 0), (1, 7), (37, 0), (300, 11)])
def test_every_mode_equals_the_masked_definition(T, cached, window):
    B, H, d = 2, 2, 4
    S = T + cached
    q, k, v = randn(B, H, T, d, seed=1), randn(B, H, S, d, seed=2), randn(B, H, S, d, seed=3)
    first = first_keys(B, T, S, seed=4)
    want = dense(q, k, v, first, window)
    for kwargs in (dict(mode="reference"), dict(mode="parallel"), dict(mode="parallel", query_block=4)):
        got = attention(q, k, v, window=window, first=first, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"{kwargs}: {m}")
    step = attention_step(q[:, :, -1], k, v, window=window, first=first[:, -1])
    torch.testing.assert_close(step, want[:, :, -1], rtol=1e-10, atol=1e-12)


def test_a_bad_first_is_a_clear_error():
    q = randn(1, 1, 3, 2, seed=5)
    with pytest.raises(ValueError, match="int64"):
        attention(q, q, q, first=torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[batch, queries\]"):
        attention(q, q, q, first=torch.zeros(1, 2, dtype=torch.int64))
