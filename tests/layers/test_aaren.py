"""Aaren (``recur/layers/aaren.py``): one layer is softmax attention of a learned, input-independent
query over every prefix of the projected inputs. Checked against the direct computation from the
layer's own weights, and against the properties a fixed query implies."""

from __future__ import annotations

import math

import pytest
import torch

import recur
from recur.analysis import implicit_attention

from .helpers import D, randn


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return recur.build("aaren", d_model=D, **kw).double()


def scores_of(mixer, x):
    """s[b, h, t] = q_h . (W_k x_t)_h / sqrt(head_dim), from the weights."""
    k = (x @ mixer.k_proj.weight.T).unflatten(-1, (mixer.n_heads, mixer.head_dim))  # [b, t, h, d]
    return torch.einsum("bthd,hd->bht", k, mixer.query) / math.sqrt(mixer.head_dim)


def direct(mixer, x):
    """y = W_o concat_h(softmax over each prefix of s_h, applied to v_h), written out with a T x T mask."""
    T = x.shape[1]
    s = scores_of(mixer, x)
    logits = s.unsqueeze(-2).expand(*s.shape[:2], T, T)  # [b, h, t, i]: score of key i for output t
    logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    v = (x @ mixer.v_proj.weight.T).unflatten(-1, (mixer.n_heads, mixer.head_dim)).transpose(1, 2)  # [b, h, i, d]
    o = torch.softmax(logits, dim=-1) @ v
    return o.transpose(1, 2).flatten(2) @ mixer.o_proj.weight.T


@pytest.mark.parametrize("mode", ["chunk", "parallel", "recurrent"])
def test_layer_equals_direct_masked_softmax_with_a_learned_query(mode):
    mixer = build(mode=mode, chunk_size=4)
    x = randn(2, 13, D)
    y, _ = mixer(x)
    torch.testing.assert_close(y, direct(mixer, x), rtol=1e-12, atol=1e-12)
    # continuing from a state is attention over the whole concatenated sequence
    x2 = randn(2, 6, D, seed=2)
    _, state = mixer(x)
    y2, _ = mixer(x2, state)
    torch.testing.assert_close(y2, direct(mixer, torch.cat([x, x2], 1))[:, 13:], rtol=1e-12, atol=1e-12)


def test_first_output_is_the_projected_value_of_the_first_token():
    """Softmax over a single key is 1, whatever the query: y_1 = W_o W_v x_1."""
    mixer = build()
    x = randn(3, 1, D)
    y, state = mixer(x)
    torch.testing.assert_close(y, x @ mixer.v_proj.weight.T @ mixer.o_proj.weight.T, rtol=1e-13, atol=1e-13)
    assert torch.equal(state["u"], torch.ones_like(state["u"]))


def test_zero_query_is_the_causal_running_mean():
    """Equal scores make attention uniform over each prefix: o_t = mean(v_1..v_t)."""
    mixer = build()
    with torch.no_grad():
        mixer.query.zero_()
    x = randn(2, 11, D)
    y, _ = mixer(x)
    v = x @ mixer.v_proj.weight.T
    mean = v.cumsum(1) / torch.arange(1, 12, dtype=torch.float64)[:, None]
    torch.testing.assert_close(y, mean @ mixer.o_proj.weight.T, rtol=1e-12, atol=1e-12)


def test_implicit_attention_is_softmax_of_input_only_scores():
    """A fixed query scores each token on its own: A[t, j] = e^{s_j} / sum_{i<=t} e^{s_i}, so the
    ratio of two tokens' weights is the same in every later row (unlike self-attention)."""
    mixer = build()
    x = randn(2, 9, D)
    A = implicit_attention(mixer, x)  # [b, h, t, j]
    e = scores_of(mixer, x).exp()
    want = (e.unsqueeze(-2) * torch.ones(9, 9, dtype=torch.float64).tril()) / e.cumsum(-1).unsqueeze(-1)
    torch.testing.assert_close(A, want, rtol=1e-12, atol=1e-14)
    ratio = A[..., 4:, 1] / A[..., 4:, 3]
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-12, atol=0)


def test_query_and_projections_receive_gradients():
    mixer = build()
    y, state = mixer(randn(2, 7, D))
    (y.square().sum() + state["w"].sum()).backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} receives no gradient"


def test_state_is_constant_size_and_matches_the_formula():
    mixer = recur.build("aaren", d_model=64)
    assert (mixer.n_heads, mixer.head_dim) == (2, 32)
    assert mixer.state_size(0) == mixer.state_size(10_000) == 2 * (32 + 2)
    m = recur.build("aaren", d_model=48, n_heads=4)
    _, state = m(torch.randn(1, 3, 48))
    assert {k: tuple(t.shape) for k, t in state.items()} == {"m": (1, 4), "u": (1, 4), "w": (1, 4, 12)}


def test_query_initialisation_is_standard_normal():
    torch.manual_seed(0)
    q = recur.build("aaren", d_model=1024).query.detach()  # 16 heads x 64
    assert q.shape == (16, 64)
    assert abs(q.mean().item()) < 4 / 32 and abs(q.std().item() - 1) < 0.1  # 1024 draws: 4 standard errors
