"""Causal softmax attention over a KV cache: the parallel mode equals the per-query reference.

Exactness checks run in float64, where parallel and reference differ only in summation
order (observed differences ~1e-15), so RTOL/ATOL leave five orders of magnitude of headroom.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recur.ops.attention import append_to_cache, attention, attention_step, trim_cache

RTOL, ATOL = 1e-8, 1e-10
F64 = torch.float64


def rand(*shape, dtype=F64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def qkv(batch, heads, T, cache, d_k=5, d_v=3, dtype=F64, seed=0, scale=1.0):
    S = cache + T
    return (rand(batch, heads, T, d_k, dtype=dtype, seed=seed, scale=scale),
            rand(batch, heads, S, d_k, dtype=dtype, seed=seed + 1, scale=scale),
            rand(batch, heads, S, d_v, dtype=dtype, seed=seed + 2))


def run(q, k, v, **kwargs):
    """Output and gradients of a fixed random loss with respect to q, k, v."""
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, **kwargs)
    weights = rand(*out.shape, dtype=out.dtype, seed=99)
    grads = torch.autograd.grad((out * weights).sum(), [q, k, v])
    return out.detach(), grads


def assert_same(a, b, what=""):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} output: {m}")
    for name, ga, gb in zip("qkv", grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} grad of {name}: {m}")


def dense_oracle(q, k, v, position, window, scale):
    """The definition with absolute positions: queries at P.., keys at P - L.., pos_j <= pos_i, pos_i - pos_j < window."""
    T, S = q.shape[2], k.shape[2]
    pos_q = position + torch.arange(T)
    pos_k = position - (S - T) + torch.arange(S)
    visible = pos_k[None, :] <= pos_q[:, None]
    if window is not None:
        visible &= pos_q[:, None] - pos_k[None, :] < window
    scores = scale * q @ k.transpose(-1, -2)
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("T", [1, 7, 20])
@pytest.mark.parametrize("cache", [0, 5])
@pytest.mark.parametrize("window", [None, 1, 3, 7, 50])
@pytest.mark.parametrize("query_block", [None, 1, 4])
def test_parallel_equals_reference_forward_and_backward(T, cache, window, query_block):
    q, k, v = qkv(2, 3, T, cache)
    ref = run(q, k, v, window=window, mode="reference")
    par = run(q, k, v, window=window, mode="parallel", query_block=query_block)
    assert_same(par, ref, f"T={T} cache={cache} window={window} block={query_block}")


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2), heads=st.integers(1, 3), T=st.integers(1, 12), cache=st.integers(0, 8),
    d_k=st.integers(1, 6), d_v=st.integers(1, 6), window=st.one_of(st.none(), st.integers(1, 15)),
    query_block=st.one_of(st.none(), st.integers(1, 8)), seed=st.integers(0, 1000),
)
def test_parallel_equals_reference_random_shapes(batch, heads, T, cache, d_k, d_v, window, query_block, seed):
    q, k, v = qkv(batch, heads, T, cache, d_k, d_v, seed=seed)
    assert_same(run(q, k, v, window=window, mode="parallel", query_block=query_block),
                run(q, k, v, window=window, mode="reference"), "random shapes")


@pytest.mark.parametrize("window", [None, 1, 4, 30])
@pytest.mark.parametrize("mode", ["reference", "parallel"])
def test_reference_and_parallel_follow_the_absolute_position_rule(window, mode):
    q, k, v = qkv(2, 2, 9, 6)
    out = attention(q, k, v, window=window, mode=mode)
    for position in (0, 6, 1000):  # only relative positions matter
        expected = dense_oracle(q, k, v, position, window, 1 / math.sqrt(q.shape[-1]))
        torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("window", [None, 1, 3, 8, 40])
@pytest.mark.parametrize("cache", [0, 4, 11])
def test_decode_step_equals_last_row_of_full_pass(window, cache):
    q, k, v = qkv(2, 3, 6, cache)
    full = run(q, k, v, window=window)
    qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))
    step = attention_step(qs[:, :, -1], ks, vs, window=window)
    weights = rand(*full[0].shape, dtype=F64, seed=99)[:, :, -1]
    grads = torch.autograd.grad((step * weights).sum(), [qs, ks, vs])
    torch.testing.assert_close(step.detach(), full[0][:, :, -1], rtol=RTOL, atol=ATOL)
    # The last query's gradient is the full pass's gradient restricted to that row's loss.
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    last = attention(q2, k2, v2, window=window)[:, :, -1]
    expected = torch.autograd.grad((last * weights).sum(), [q2, k2, v2])
    for name, a, b in zip("qkv", grads, expected):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("window", [None, 1, 2, 5, 100])
@pytest.mark.parametrize("mode", ["reference", "parallel"])
def test_streaming_through_a_trimmed_cache_equals_one_pass(window, mode):
    """Chunks carried through append_to_cache (trimmed to window - 1) give the one-pass output."""
    q, k, v = qkv(2, 2, 23, 0)
    whole = attention(q, k, v, window=window, mode=mode)
    k_cache, v_cache = k[:, :, :0], v[:, :, :0]
    outs, start = [], 0
    for size in (1, 4, 1, 9, 3, 5):
        stop = start + size
        k_all = torch.cat([k_cache, k[:, :, start:stop]], dim=2)
        v_all = torch.cat([v_cache, v[:, :, start:stop]], dim=2)
        outs.append(attention(q[:, :, start:stop], k_all, v_all, window=window, mode=mode))
        k_cache = append_to_cache(k_cache, k[:, :, start:stop], window)
        v_cache = append_to_cache(v_cache, v[:, :, start:stop], window)
        torch.testing.assert_close(k_cache, trim_cache(k_all, window), rtol=0, atol=0)
        expected_len = stop if window is None else min(stop, window - 1)
        assert k_cache.shape[2] == v_cache.shape[2] == expected_len
        start = stop
    assert start == 23
    torch.testing.assert_close(torch.cat(outs, dim=2), whole, rtol=RTOL, atol=ATOL)


def test_trim_cache_keeps_the_last_window_minus_one_entries():
    kv = rand(2, 3, 10, 4)
    assert trim_cache(kv, None) is kv
    torch.testing.assert_close(trim_cache(kv, 4), kv[:, :, -3:], rtol=0, atol=0)
    assert trim_cache(kv, 1).shape == (2, 3, 0, 4)  # a window of 1 needs no past
    torch.testing.assert_close(trim_cache(kv, 11), kv, rtol=0, atol=0)
    torch.testing.assert_close(trim_cache(kv, 50), kv, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["reference", "parallel"])
def test_window_of_one_returns_each_tokens_own_value(mode):
    q, k, v = qkv(2, 2, 7, 3)
    torch.testing.assert_close(attention(q, k, v, window=1, mode=mode), v[:, :, -7:], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["reference", "parallel"])
def test_window_covering_the_context_equals_full_attention(mode):
    q, k, v = qkv(2, 2, 9, 4)
    full = attention(q, k, v, mode=mode)
    torch.testing.assert_close(attention(q, k, v, window=13, mode=mode), full, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(attention(q, k, v, window=1000, mode=mode), full, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("mode", ["reference", "parallel"])
def test_default_scale_is_inverse_sqrt_of_key_dim(mode):
    q, k, v = qkv(1, 2, 5, 2, d_k=7)
    torch.testing.assert_close(attention(q, k, v, mode=mode), attention(q, k, v, scale=1 / math.sqrt(7), mode=mode), rtol=RTOL, atol=ATOL)
    assert not torch.allclose(attention(q, k, v, mode=mode), attention(q, k, v, scale=1.0, mode=mode))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("mode", ["reference", "parallel"])
def test_float32_matches_float64_and_stays_finite_with_saturated_scores(window, mode):
    """Scores of size ~1e3 (one-hot softmax) stay finite in float32 and agree with float64."""
    for scale in (1.0, 30.0):
        q, k, v = qkv(2, 2, 11, 6, scale=scale)
        out64 = attention(q, k, v, window=window, mode=mode)
        out32 = attention(q.float(), k.float(), v.float(), window=window, mode=mode)
        assert torch.isfinite(out32).all()
        # float32 tolerance: rounding of scores ~1e3 in magnitude moves the softmax by ~1e-4 relative.
        torch.testing.assert_close(out32.double(), out64, rtol=1e-3, atol=1e-4)


def test_parallel_equals_reference_in_float32():
    q, k, v = qkv(2, 3, 13, 5, dtype=torch.float32)
    for window in (None, 4):
        torch.testing.assert_close(attention(q, k, v, window=window, query_block=3), attention(q, k, v, window=window, mode="reference"))


def test_bfloat16_parallel_is_close_to_float64():
    q, k, v = qkv(2, 2, 9, 3)
    out = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), window=4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), attention(q, k, v, window=4), rtol=0.05, atol=0.05)


def test_bad_arguments_raise_clear_value_errors():
    q, k, v = qkv(1, 2, 5, 0)
    with pytest.raises(ValueError, match="S >= T"):
        attention(q, k[:, :, :3], v[:, :, :3])
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="window"):
        attention(q, k, v, window=2.5)
    with pytest.raises(ValueError, match="mode"):
        attention(q, k, v, mode="chunk")
    with pytest.raises(ValueError, match="query_block"):
        attention(q, k, v, query_block=0)
    with pytest.raises(ValueError, match=r"\[batch, heads, time, d\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="must agree"):
        attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match=r"\[batch, heads, d_k\]"):
        attention_step(q, k, v)
