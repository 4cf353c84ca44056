"""The LSTM's plain case runs on torch's fused LSTM (``torch.lstm``); it must be our loop exactly:
float64 outputs, final states and every gradient equal to the fused loop's (which the rest of
test_rnn.py holds to torch.nn.LSTM and to the autograd reference)."""

from __future__ import annotations

import pytest
import torch

from recur.layers.rnn import LSTM, _TorchLayoutCell
from recur.state import State

STACKS = [dict(), dict(num_layers=3), dict(bidirectional=True), dict(num_layers=2, bidirectional=True)]


def _run(forward, layer, x, state, g):
    y, s = forward(layer, x, state)
    loss = (y * g).sum() + (s["h"] * 0.3).sum() + (s["c"] * 0.7).sum()
    grads = torch.autograd.grad(loss, [x, state["h"], state["c"], *layer.parameters()])
    return y, s, grads


@pytest.mark.parametrize("options", STACKS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("T", [1, 7])
def test_torch_kernel_equals_our_loop_in_float64(options, T):
    torch.manual_seed(0)
    layer = LSTM(8, **options).double()
    assert layer._torch_kernel_applies(torch.zeros(1, 1, 8, dtype=torch.float64))
    x = torch.randn(3, T, 8, dtype=torch.float64, requires_grad=True)
    init = layer.init_state(3, dtype=torch.float64)
    state = State({k: torch.randn_like(v).requires_grad_() for k, v in init.items()})
    g = torch.randn(3, T, 8, dtype=torch.float64)
    fused = _run(LSTM._forward, layer, x, state, g)
    loop = _run(_TorchLayoutCell._forward, layer, x, state, g)
    torch.testing.assert_close(fused[0], loop[0], rtol=1e-12, atol=1e-12)
    for key in ("h", "c"):
        torch.testing.assert_close(fused[1][key], loop[1][key], rtol=1e-12, atol=1e-12)
    for a, b in zip(fused[2], loop[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_torch_kernel_state_carry_is_exact():
    torch.manual_seed(1)
    layer = LSTM(6, num_layers=2).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    y, s = layer(x)
    y1, s1 = layer(x[:, :4])
    y2, s2 = layer(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s2["c"], s["c"], rtol=1e-12, atol=1e-12)


def test_torch_kernel_gives_gradients_in_eval_mode_and_runs_without_them():
    torch.manual_seed(2)
    layer = LSTM(4).eval()
    x = torch.randn(2, 5, 4, requires_grad=True)
    layer(x)[0].sum().backward()  # eval mode only drops dropout (none here): backward still works
    assert x.grad is not None and layer.weight_hh.grad is not None
    with torch.no_grad():
        assert torch.isfinite(layer(x)[0]).all()


@pytest.mark.parametrize("case", ["headwise", "float16", "bfloat16"])
def test_what_torch_cannot_compute_takes_our_loop(case):
    layer = LSTM(8, n_heads=2) if case == "headwise" else LSTM(8)
    dtype = {"headwise": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[case]
    assert not layer._torch_kernel_applies(torch.zeros(1, 1, 8, dtype=dtype))


def test_forget_bias_init_is_unchanged_by_the_torch_kernel():
    layer = LSTM(8, forget_bias=2.0)
    torch.testing.assert_close(layer.bias_ih[:, 8:16], torch.full((1, 8), 2.0))
    torch.testing.assert_close(layer.bias_hh[:, 8:16], torch.zeros(1, 8))
