"""recurrent_depth (Huginn): prelude, a core looped r times over a latent through an adapter over
[state; embedding], coda; the Poisson-lognormal depth schedule, truncated backprop through depth,
the seeded initial latent and the per-token KL exit."""

from __future__ import annotations

import math

import pytest
import torch

from recur import State
from recur.models.recurrent_depth import RecurrentDepth, kl_divergence, seeded_noise

V, D = 11, 16


def model(**options) -> RecurrentDepth:
    torch.manual_seed(0)
    kw = dict(n_layers=1, pattern="gla", n_loops=3, mean_loops=None, init="seeded", init_std=0.5)
    return RecurrentDepth(V, D, **{**kw, **options}).double()


def tokens(seed: int = 1, b: int = 2, t: int = 9) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def reference(m: RecurrentDepth, x: torch.Tensor, r: int, s0: torch.Tensor, detach_before: int = 0):
    """The equations, one call from the zero state: e = Prelude(E x); s_i = Core(W [s_{i-1}; e]);
    logits = head(norm(Coda(norm(s_r)))). Iterations before ``detach_before`` carry no gradient."""
    e, _ = m.prelude(m.embed(x))
    s = s0
    for i in range(r):
        s, _ = m.core(m.adapter(torch.cat([s, e], dim=-1)))
        if i + 1 < detach_before:
            s = s.detach()
    h, _ = m.coda(m.norm(s))
    return m.head(m.norm(h)), e


def between(kl: torch.Tensor) -> float:
    """A threshold halfway between the two middle KLs: no token sits on it, where rounding
    (~1e-15) between one call and two could flip it."""
    v = kl.flatten().sort().values
    return (v[len(v) // 2 - 1] + v[len(v) // 2]).item() / 2


@pytest.mark.parametrize("init", ["zeros", "seeded"])
def test_forward_equals_the_equations(init):
    m = model(init=init, n_loops=4)
    x = tokens()
    pos = torch.arange(x.shape[1]).expand_as(x)
    s0 = torch.zeros(2, 9, D, dtype=torch.float64) if init == "zeros" else seeded_noise(0, pos, D, 0.5)
    want, _ = reference(m, x, 4, s0)
    torch.testing.assert_close(m(x).logits, want, rtol=1e-12, atol=1e-12)
    if init == "zeros":
        assert "position" not in m(x).state
    m.eval()  # eval mode: the same r and s_0
    torch.testing.assert_close(m(x).logits, want, rtol=1e-12, atol=1e-12)


def test_the_seeded_latent_is_a_truncated_normal_of_the_position_alone():
    pos = torch.arange(4000)
    z = seeded_noise(7, pos, 64, 1.0)
    assert z.abs().max() <= 3.0 + 1e-12
    # N(0, 1) truncated at +-3: std sqrt(1 - 6 phi(3) / (1 - 2 Phi(-3))) = 0.9866
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 0.9866) < 0.01
    torch.testing.assert_close(seeded_noise(7, pos[10:20], 64, 1.0), z[10:20], rtol=0, atol=0)
    assert not torch.allclose(seeded_noise(8, pos[:5], 64, 1.0), z[:5])
    # positions restart at a document start (resets), so a packed document sees its own s_0
    m = model()
    resets = torch.zeros(1, 6, dtype=torch.bool)
    resets[0, 3] = True
    assert m._positions(tokens(b=1, t=6), torch.tensor([5]), resets).tolist() == [[5, 6, 7, 0, 1, 2]]


def test_random_init_draws_fresh_noise_in_training_and_the_seeded_noise_in_eval():
    m = model(init="random")
    x = tokens()
    assert not torch.allclose(m(x).logits, m(x).logits)  # the paper's fresh s_0 per call
    m.eval()
    torch.testing.assert_close(m(x).logits, model(init="seeded").eval()(x).logits, rtol=1e-12, atol=1e-12)


def test_bptt_loops_runs_the_early_iterations_without_gradient():
    m = model(n_loops=4, bptt_loops=1)
    enabled = []
    m.core.register_forward_hook(lambda mod, args, out: enabled.append(torch.is_grad_enabled()))
    x = tokens()
    m(x).logits.sum().backward()
    assert enabled == [False, False, False, True]
    truncated = {n: p.grad.clone() for n, p in m.named_parameters()}
    # the equations with the latent detached before the last iteration give the same gradients
    m.zero_grad()
    s0 = seeded_noise(0, torch.arange(9).expand_as(x), D, 0.5)
    reference(m, x, 4, s0, detach_before=4)[0].sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, truncated[n], rtol=1e-10, atol=1e-12, msg=n)
    # and differ from backprop through every iteration (the early iterations' contribution)
    m.zero_grad()
    m.bptt_loops = None
    m(x).logits.sum().backward()
    assert not torch.allclose(m.adapter.weight.grad, truncated["adapter.weight"])


def test_bptt_stops_the_gradient_into_the_latent_of_the_early_iterations():
    """With k = 1 the prelude's output e reaches the loss through the last iteration's injection
    only: the embedding's gradient is the prelude's pull-back of d logits / d e with the first
    two iterations constant."""
    m = model(n_loops=3, bptt_loops=1)
    x = tokens()
    e, _ = m.prelude(m.embed(x))
    e = e.detach().requires_grad_()
    s = seeded_noise(0, torch.arange(9).expand_as(x), D, 0.5)
    with torch.no_grad():
        for _ in range(2):
            s, _ = m.core(m.adapter(torch.cat([s, e], dim=-1)))
    s, _ = m.core(m.adapter(torch.cat([s, e], dim=-1)))
    (g_trunc,) = torch.autograd.grad(m.head(m.norm(m.coda(m.norm(s))[0])).sum(), e)
    m.zero_grad()
    m(x).logits.sum().backward()
    want = torch.autograd.grad(m.prelude(m.embed(x))[0], m.embed.weight, g_trunc)[0]
    torch.testing.assert_close(m.embed.weight.grad, want, rtol=1e-10, atol=1e-12)


def test_the_poisson_lognormal_schedule_has_the_stated_mean():
    m = model(mean_loops=5.0, sigma=0.5)
    m.generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([m.sample_loops() for _ in range(20000)], dtype=torch.float64)
    # Var r = E tau + Var tau = 4 + 16 (e^0.25 - 1) = 8.5: standard error 0.02 over 20000 draws
    assert abs(draws.mean().item() - 5.0) < 0.1 and draws.min() >= 1 and draws.max() <= 15
    assert abs(draws.var().item() - (4 + 16 * (math.exp(0.25) - 1))) < 0.6
    # a training call runs the drawn depth, and a continued state keeps it
    m.generator = torch.Generator().manual_seed(3)
    r = m.sample_loops()
    m.generator = torch.Generator().manual_seed(3)
    x = tokens()
    out = m(x)
    assert sum(k.startswith("iter") for k in out.state) == r
    assert sum(k.startswith("iter") for k in m(x, out.state).state) == r


def test_more_loops_at_test_time_than_in_training():
    m = model(mean_loops=3.0)
    m(tokens()).logits.sum().backward()
    m.eval()
    m.n_loops = 3
    three = m(tokens())
    m.n_loops = 8
    eight = m(tokens())
    assert sum(k.startswith("iter") for k in eight.state) == 8 and torch.isfinite(eight.logits).all()
    assert not torch.allclose(three.logits, eight.logits)
    assert m.state_size(9) == eight.state.num_floats()
    with pytest.raises(ValueError, match="iter7"):
        m(tokens(), three.state)  # a state of the 3-loop model


def test_kl_exit_stops_every_token_when_successive_iterations_agree():
    """Constructed case: the adapter reads only the embedding (W = [0 | I]), so s_1 = s_2 = ... and
    every token's successive distributions agree exactly: all exit after iteration 2."""
    m = model(n_loops=5, exit_threshold=1e-9).eval()
    with torch.no_grad():
        m.adapter.weight.zero_()
        m.adapter.weight[:, D:] = torch.eye(D)
    out = m(tokens())
    assert (out.aux["exit_iterations"] == 2).all()
    assert set(out.state) >= {"probe1", "probe2", "probe3", "probe4"}


def test_kl_exit_stops_exactly_the_tokens_below_the_threshold():
    m = model(n_loops=4).eval()
    x = tokens(t=12)
    s0 = seeded_noise(0, torch.arange(12).expand_as(x), D, 0.5)
    q1, _ = reference(m, x, 1, s0)
    q2, _ = reference(m, x, 2, s0)
    kl = kl_divergence(q2, q1)
    m.exit_threshold = between(kl)
    out = m(x)
    assert torch.equal(out.aux["exit_iterations"] == 2, kl < m.exit_threshold)
    assert (out.aux["exit_iterations"][kl >= m.exit_threshold] > 2).all()
    # a huge threshold stops every token after iteration 2: the 2-loop model's output
    m.exit_threshold = 1e9
    everyone = m(x)
    assert (everyone.aux["exit_iterations"] == 2).all()
    torch.testing.assert_close(everyone.logits, reference(m, x, 2, s0)[0], rtol=1e-12, atol=1e-12)
    # no token exits at threshold 0: the r-loop model
    m.exit_threshold = 0.0
    torch.testing.assert_close(m(x).logits, reference(m, x, 4, s0)[0], rtol=1e-12, atol=1e-12)


def test_kl_exit_keeps_the_state_contract_and_is_off_in_training():
    m = model(n_loops=4).eval()
    x = tokens(t=12)
    kl = kl_divergence(*(reference(m, x, r, seeded_noise(0, torch.arange(12).expand_as(x), D, 0.5))[0]
                         for r in (2, 1)))
    m.exit_threshold = between(kl)
    whole = m(x)
    first = m(x[:, :5])
    second = m(x[:, 5:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), whole.logits, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.cat([first.aux["exit_iterations"], second.aux["exit_iterations"]], 1),
                       whole.aux["exit_iterations"])
    assert m.state_size(12) == whole.state.num_floats()
    m.train()
    out = m(x)
    assert not out.aux and not any(k.startswith("probe") for k in out.state)


def test_parameters_do_not_grow_with_loops():
    assert sum(p.numel() for p in model(n_loops=1).parameters()) == sum(p.numel() for p in model(n_loops=9).parameters())


def test_the_trainer_learns_with_random_depth_and_truncated_backprop():
    """Two key-value pairs then a query, r ~ Poisson-lognormal (mean 3), backprop through the last 2
    iterations: exact match from chance (1/16) to several times it in 150 steps (measured: 0.31,
    and 0.52 at 300 steps; about 5 s on 2 busy cores)."""
    from recur.config import RunConfig
    from recur.training.trainer import train

    cfg = {"task": {"name": "associative_retrieval", "args": {"key_size": 1}, "seq_len": 12},
           "model": {"arch": "recurrent_depth", "mixer": "attention", "d_model": 32, "n_layers": 1,
                     "args": {"n_loops": 3, "mean_loops": 3.0, "bptt_loops": 2}},
           "optim": {"steps": 150, "batch_size": 32, "lr": 3e-3, "early_stop": None},
           "eval": {"lengths": [12], "batches": 4}, "device": "cpu", "seed": 0}
    result = train(RunConfig.model_validate(cfg), progress=False)
    assert result.metrics["12"]["exact_match"] >= 0.2, result.metrics
    assert result.train_loss < 0.7 * result.curve[0][1], (result.train_loss, result.curve[0])


@pytest.mark.parametrize("options, match", [
    ({"init": "noise"}, "init must be one of"),
    ({"init_std": -1.0}, "init_std"),
    ({"init_seed": 1.5}, "init_seed"),
    ({"mean_loops": 1.0}, "mean_loops must be a number > 1"),
    ({"sigma": -0.1}, "sigma"),
    ({"bptt_loops": 0}, "bptt_loops"),
    ({"n_loops": 0}, "n_loops"),
    ({"exit_threshold": -1e-3}, "exit_threshold"),
    ({"n_prelude": 0}, "n_prelude"),
    ({"n_coda": 0}, "n_coda"),
    ({"n_core": 2}, "n_core=2 disagrees with n_layers=1"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        model(**options)


def test_n_core_names_the_core_depth_and_a_wrong_state_is_an_error():
    torch.manual_seed(0)
    assert RecurrentDepth(V, D, n_core=3, pattern="gla").core.n_layers == 3
    with pytest.raises(ValueError, match="state"):
        model()(tokens(), State(iter0=torch.zeros(2, 1)))
