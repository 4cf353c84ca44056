"""``recur.analysis.implicit_attention``: the T x T matrix of a linear mixer, checked against
the outputs the mixer's recurrence actually produced on the same input."""

from __future__ import annotations

import pytest
import torch

import recur
from recur.analysis import implicit_attention
from recur.ops import trace

D, T = 16, 13
# every mixer whose output is one linear recurrence (or attention) of its values, given its gates
LINEAR = ["gla", "retnet", "linear_attention", "lru", "mingru", "minlstm", "mamba", "attention", "swa", "rwkv6",
          "deltanet", "gated_deltanet", "longhorn", "rwkv7", "mamba2", "mlstm", "hgrn", "hgrn2", "lightnet", "rglru",
          "gateloop", "s4d", "aaren"]


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


@pytest.mark.parametrize("name", ["lstm", "scrn", "titans", "titans_mac", "moneta"])
def test_nonlinear_mixers_are_refused_clearly(name):
    """Including those whose nonlinear cell is fed by a linear primitive (SCRN's context scan,
    Titans-MAC's attention): the map of that part is not the layer's."""
    with pytest.raises(TypeError, match="no linear recurrence"):
        implicit_attention(recur.build(name, d_model=D), torch.randn(1, 5, D))


def test_delta_rule_attention_is_the_product_of_householder_like_transitions():
    """DeltaNet's map from the definition: A[t, j] = q_t^T P_{t..j+1} beta_j k_j, with
    P_i = I - beta_i k_i k_i^T applied from the write at j up to t."""
    from recur.ops.delta import delta_rule

    g = torch.Generator().manual_seed(3)
    q, k = (torch.nn.functional.normalize(torch.randn(1, 1, 6, 4, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    beta = torch.rand(1, 1, 6, generator=g, dtype=torch.float64)
    with torch.no_grad(), trace.recording() as calls:
        delta_rule(q, k, torch.randn(1, 1, 6, 3, generator=g, dtype=torch.float64), beta)
    from recur.analysis import attention_of_call

    A = attention_of_call(calls[0])[0, 0]
    eye = torch.eye(4, dtype=torch.float64)
    for t in range(6):
        for j in range(6):
            if j > t:
                assert A[t, j] == 0
                continue
            w = beta[0, 0, j] * k[0, 0, j]  # the key written at j, then carried by the later transitions
            for i in range(j + 1, t + 1):
                w = (eye - beta[0, 0, i] * torch.outer(k[0, 0, i], k[0, 0, i])) @ w
            torch.testing.assert_close(A[t, j], q[0, 0, t] @ w, rtol=1e-10, atol=1e-12)
