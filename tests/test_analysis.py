"""``recur.analysis.implicit_attention``: the T x T matrix of a linear mixer, checked against
the outputs the mixer's recurrence actually produced on the same input."""

from __future__ import annotations

import pytest
import torch

import recur
from recur.analysis import implicit_attention
from recur.ops import trace

D, T = 16, 13
LINEAR = ["gla", "retnet", "linear_attention", "lru", "mingru", "minlstm", "mamba", "attention", "swa", "rwkv6"]


def _recorded(mixer, x):
    with torch.no_grad(), trace.recording() as calls:
        mixer(x)
    assert len(calls) == 1
    return calls[0]


@pytest.mark.parametrize("name", [n for n in LINEAR if n in recur.list_models()])
def test_implicit_attention_reproduces_the_recurrence_outputs(name):
    torch.manual_seed(0)
    mixer = recur.build(name, d_model=D).double()
    if hasattr(mixer, "window"):
        mixer.window = 5
    x = torch.randn(2, T, D, dtype=torch.float64)
    A = implicit_attention(mixer, x)
    if "chunk" in mixer.modes:  # the mode implicit_attention reads the recurrence in
        mixer.mode = "chunk"
    call = _recorded(mixer, x)
    value, out = call.kwargs[call.linear_in], call.output
    assert A.shape[0] == 2 and A.shape[-2:] == (T, T)
    if call.layout == "channels":  # out[b, t, c] = sum_j A[b, c, t, j] value[b, j, c]
        got = torch.einsum("b...tj,bj...->bt...", A, value)
    else:  # out[b, h, t, :] = sum_j A[b, h, t, j] value[b, h, j, :]
        got = torch.einsum("bhtj,bhjd->bhtd", A, value)
    torch.testing.assert_close(got, out.to(got.dtype), rtol=1e-9, atol=1e-11)
    # causal: nothing from the future
    assert torch.count_nonzero(torch.triu(A.reshape(-1, T, T), diagonal=1)) == 0


def test_attention_rows_are_probabilities_and_swa_respects_its_window():
    torch.manual_seed(1)
    x = torch.randn(1, T, D, dtype=torch.float64)
    A = implicit_attention(recur.build("attention", d_model=D).double(), x)
    torch.testing.assert_close(A.sum(-1), torch.ones_like(A.sum(-1)))
    swa = recur.build("swa", d_model=D).double()
    swa.window = 4
    A = implicit_attention(swa, x)[0, 0]
    assert torch.count_nonzero(torch.tril(A, diagonal=-4)) == 0 and (A.diagonal() > 0).all()


def test_diagonal_family_is_the_product_of_decays():
    """For LRU, A[c, t, j] = lambda_c^(t - j) exactly (time-invariant decay)."""
    torch.manual_seed(2)
    lru = recur.build("lru", d_model=D).double()
    A = implicit_attention(lru, torch.randn(1, T, D, dtype=torch.float64))[0]  # [d_state, T, T]
    lam = lru.log_lambda(torch.float64).exp()
    t = torch.arange(T)
    powers = lam[:, None, None] ** (t[:, None] - t[None, :]).clamp(min=0)
    want = torch.where(t[:, None] >= t[None, :], powers, torch.zeros((), dtype=powers.dtype))
    torch.testing.assert_close(A, want, rtol=1e-10, atol=1e-12)


def test_nonlinear_mixers_are_refused_clearly():
    with pytest.raises(TypeError, match="no linear recurrence"):
        implicit_attention(recur.build("lstm", d_model=D), torch.randn(1, 5, D))
