"""rate: the Memory Retention Valve by hand in float64, the cell over segments against an unrolled
computation from the equations, rate without its valve is rmt, the authors' detachment starves the
valve of gradient, bad options are named, and a short Trainer run learns the T-Maze that a model
seeing one segment at a time cannot."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recur.models.rate import RATE
from recur.models.rmt import RMT

V, D, L, M, H = 11, 16, 5, 3, 2


def rate(**options) -> RATE:
    torch.manual_seed(0)
    return RATE(V, D, 2, pattern="attention", segment_len=L, n_memory=M, **{"mrv_heads": H, **options}).double()


def tokens(t: int, seed: int = 1, b: int = 2) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def valve_by_hand(valve, m: torch.Tensor, u: torch.Tensor, act=F.relu) -> torch.Tensor:
    """W_o concat_h softmax(Q_h K_h^T / sqrt(d_h)) V_h + b_o, Q = W_q m + b_q, K, V from act(u): a loop
    over rows, heads and memory slots."""
    d_h = D // H
    a = act(u)
    out = torch.zeros_like(m)
    for b in range(m.shape[0]):
        Q = m[b] @ valve.W_q.weight.T + valve.W_q.bias
        K = a[b] @ valve.W_k.weight.T + valve.W_k.bias
        Vv = a[b] @ valve.W_v.weight.T + valve.W_v.bias
        heads = []
        for h in range(H):
            cols = slice(h * d_h, (h + 1) * d_h)
            rows = []
            for i in range(M):
                scores = torch.stack([Q[i, cols] @ K[j, cols] / math.sqrt(d_h) for j in range(M)])
                w = scores.exp() / scores.exp().sum()
                rows.append(sum(w[j] * Vv[j, cols] for j in range(M)))
            heads.append(torch.stack(rows))
        out[b] = torch.cat(heads, dim=1) @ valve.W_o.weight.T + valve.W_o.bias
    return out


@pytest.mark.parametrize("act", ["relu", "tanh", "none"])
def test_the_valve_by_hand(act):
    model = rate(mrv_act=act)
    gen = torch.Generator().manual_seed(2)
    m, u = (torch.randn(2, M, D, generator=gen, dtype=torch.float64) for _ in range(2))
    fn = {"relu": F.relu, "tanh": torch.tanh, "none": lambda x: x}[act]
    torch.testing.assert_close(model.mrv(m, u), valve_by_hand(model.mrv, m, u, fn), rtol=1e-12, atol=1e-12)


def test_the_cell_over_segments_equals_the_unrolled_equations():
    """Three complete segments and a partial one: [m; E x; m] per segment, logits at the token
    positions, u = norm(write positions), m = MRV(m, u); the partial segment is [m; E x] alone."""
    model = rate()
    x = tokens(3 * L + 2)
    e = model.embed(x)
    m = model.memory.expand(2, M, D)
    logits, memories = [], []
    for s in range(3):
        h, _ = model.backbone(torch.cat([m, e[:, s * L:(s + 1) * L], m], dim=1))
        logits.append(model.head(model.norm(h[:, M:M + L])))
        m = valve_by_hand(model.mrv, m, model.norm(h[:, M + L:]))
        memories.append(m)
    h, _ = model.backbone(torch.cat([m, e[:, 3 * L:]], dim=1))
    logits.append(model.head(model.norm(h[:, M:])))
    out = model(x)
    torch.testing.assert_close(out.logits, torch.cat(logits, dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.state["memory"]["tokens"], m, rtol=1e-10, atol=1e-12)
    # each segment's memory is the valve's (not RMT's u): the states after 1 and 2 segments
    for s in (1, 2):
        torch.testing.assert_close(model(x[:, :s * L]).state["memory"]["tokens"], memories[s - 1],
                                   rtol=1e-10, atol=1e-12)
    assert model.state_size(10 ** 6) == (M + L - 1) * D == out.state.num_floats()


def test_without_the_valve_rate_is_rmt():
    """mrv_heads=0 (the authors' n_head_ca=0): the same parameters and outputs as rmt."""
    x = tokens(4 * L + 3)
    plain = rate(mrv_heads=0)
    torch.manual_seed(0)
    rmt = RMT(V, D, 2, pattern="attention", segment_len=L, n_memory=M).double()
    assert plain.mrv is None and [n for n, _ in plain.named_parameters()] == [n for n, _ in rmt.named_parameters()]
    a, b = plain(x), rmt(x)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    torch.testing.assert_close(a.state["memory"]["tokens"], b.state["memory"]["tokens"], rtol=0, atol=0)
    assert not torch.allclose(rate()(x).logits[:, L:], b.logits[:, L:])  # the valve changes what later segments read


def _valve_gradient(model, x) -> float:
    model.zero_grad()
    model(x).logits[:, -L:].sum().backward()
    return sum(float(p.grad.abs().sum()) for p in model.mrv.parameters() if p.grad is not None)


def test_the_authors_detachment_gives_the_valve_no_gradient():
    """bptt_segments=0 (their trainer detaches the memory before every segment): a loss on the last
    segment never reaches the valve; with full BPTT it does, and the forward pass is the same."""
    x = tokens(4 * L)
    assert _valve_gradient(rate(), x) > 0
    assert _valve_gradient(rate(bptt_segments=0), x) == 0
    torch.testing.assert_close(rate(bptt_segments=0)(x).logits, rate()(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("options, phrase", [
    (dict(mrv_heads=-1), "mrv_heads"), (dict(mrv_heads=True), "mrv_heads"), (dict(mrv_heads=1.5), "mrv_heads"),
    (dict(mrv_heads=3), "divide d_model"), (dict(mrv_act="gelu"), "mrv_act"), (dict(n_memory=0), "n_memory"),
    (dict(segment_len=0), "segment_len"), (dict(bptt_segments=-1), "bptt_segments")])
def test_bad_options_are_named(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        RATE(V, D, 1, **options)


def test_mrv_act_none_means_no_activation():
    assert rate(mrv_act=None).mrv.act_name == "none"


def test_the_trainer_learns_the_tmaze_that_one_segment_cannot_hold():
    """Corridor L = 5 (12 tokens, two segments of three steps): rate carries the cue across the
    segment boundary and succeeds (measured: 1.0 on four seeds in 300 steps); sliding-window
    attention over one segment (window 6) cannot see the cue at the junction and guesses."""
    from recur.config import RunConfig
    from recur.training.trainer import train

    def run(arch, mixer, **args):
        cfg = {"task": {"name": "tmaze", "seq_len": 12},
               "model": {"arch": arch, "mixer": mixer, "d_model": 32, "n_layers": 1, "args": args,
                         **({"mixer_args": {"window": 6}} if mixer == "swa" else {})},
               "optim": {"steps": 300, "batch_size": 32, "lr": 3e-3, "early_stop": None},
               "eval": {"lengths": [12], "batches": 2}, "device": "cpu"}
        return train(RunConfig.model_validate(cfg), progress=False).metrics["12"]

    memory = run("rate", "attention", segment_len=6, n_memory=2)
    assert memory["success"] >= 0.95 and memory["turn_accuracy"] >= 0.95, memory
    window = run("causal_lm", "swa")
    assert window["accuracy"] >= 0.85 and 0.25 <= window["success"] <= 0.75, window
