"""``gradient_noise``: g <- g + N(0, sigma_t^2), sigma_t^2 = eta / (1 + t)^gamma, t = step - 1 (Neelakantan
et al. 2015), from the run's own random stream, before gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from harness_tasks import tiny

from recur.training import checkpoint, train
from recur.training.methods.gradient_noise import GradientNoise
from recur.training.trainer import Trainer, _generator, _salt

# d_model 64: the Elman model has about 9k parameters, enough entries for tight statistics.
WIDE = dict(d_model=64)


def gn(**args) -> dict:
    return {"name": "gradient_noise", **args}


def clean_and_noisy(seed: int = 0, step: int = 1, **args):
    """The gradient of one batch without noise, and the same gradient after the method's hook."""
    trainer = Trainer(tiny(**WIDE, seed=seed, training=[gn(**args)]), progress=False)
    trainer.step = step
    batch = trainer.task.batch(16, 8, torch.Generator().manual_seed(seed))
    trainer.forward_backward(batch, None)
    clean = [p.grad.clone() for p in trainer.model.parameters()]
    trainer.methods[0].after_backward(trainer)
    noisy = [p.grad.clone() for p in trainer.model.parameters()]
    return trainer, clean, noisy


def flat_noise(clean, noisy) -> torch.Tensor:
    return torch.cat([(n - c).flatten() for c, n in zip(clean, noisy)]).double()


def test_std_follows_the_annealing_schedule():
    m = GradientNoise(GradientNoise.Params())
    assert (m.params.eta, m.params.gamma) == (0.3, 0.55)  # the paper's gamma, eta from {0.01, 0.3, 1.0}
    # t = step - 1: sqrt(0.3 / (1 + t)^0.55) at t = 0, 1, 9, 99, 999
    want = [0.5477225575051661, 0.452665481910383, 0.2907773855339057, 0.15436919071410732, 0.08195220201864631]
    assert [m.std(s) for s in (1, 2, 10, 100, 1000)] == pytest.approx(want, rel=1e-12)
    m = GradientNoise(GradientNoise.Params(eta=2.0, gamma=1.0))
    assert [m.std(s) for s in (1, 2, 10)] == pytest.approx([math.sqrt(2), 1.0, math.sqrt(0.2)], rel=1e-12)
    m = GradientNoise(GradientNoise.Params(eta=0.01, gamma=0.0))  # gamma 0: constant
    assert [m.std(s) for s in (1, 50, 5000)] == pytest.approx([0.1] * 3, rel=1e-12)


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="eta"):
        tiny(training=[gn(eta=-1.0)])
    with pytest.raises(ValueError, match="gamma"):
        tiny(training=[gn(gamma=-0.5)])


def test_the_gradient_without_noise_is_the_plain_one():
    """The method changes nothing before its hook: the gradient before noise is the run's without it."""
    _, clean, _ = clean_and_noisy(eta=1.0)
    plain = Trainer(tiny(**WIDE), progress=False)
    plain.forward_backward(plain.task.batch(16, 8, torch.Generator().manual_seed(0)), None)
    for c, p in zip(clean, plain.model.parameters()):
        assert torch.equal(c, p.grad)


@pytest.mark.parametrize("eta,gamma,step", [(0.3, 0.55, 1), (1.0, 0.55, 10), (0.01, 0.55, 3), (4.0, 1.0, 100)])
def test_added_noise_is_gaussian_with_the_scheduled_std(eta, gamma, step):
    trainer, clean, noisy = clean_and_noisy(step=step, eta=eta, gamma=gamma)
    noise = flat_noise(clean, noisy)
    sigma = math.sqrt(eta / (1 + (step - 1)) ** gamma)
    n = noise.numel()
    assert n > 8000
    # sample std of n >= 8000 normals: relative sd ~ 1/sqrt(2n) < 0.8%, so a 10% band is > 12 sd wide
    assert 0.9 * sigma < float(noise.std()) < 1.1 * sigma
    assert abs(float(noise.mean())) < 5 * sigma / math.sqrt(n)
    inside = float((noise.abs() < sigma).double().mean())  # P(|Z| < 1) = 0.6827; sd of the share ~0.005
    assert abs(inside - 0.6827) < 0.03
    assert all(not torch.equal(c, g) for c, g in zip(clean, noisy))  # every parameter gets noise


def test_noise_is_drawn_from_the_runs_gradient_noise_stream():
    trainer, clean, noisy = clean_and_noisy(seed=3, step=5, eta=0.5)
    gen = _generator(3, _salt("gradient_noise"))  # a fresh copy of the run's stream
    sigma = math.sqrt(0.5 / 5 ** 0.55)
    for p, c, g in zip(trainer.model.parameters(), clean, noisy):
        torch.testing.assert_close(g - c, sigma * torch.randn(p.shape, generator=gen), rtol=1e-5, atol=1e-6)
    # the data stream is untouched by the noise: same batches with and without the method
    plain = Trainer(tiny(**WIDE, seed=3), progress=False)
    noisy_run = Trainer(tiny(**WIDE, seed=3, training=[gn()]), progress=False)
    for _ in range(3):
        plain.train_step()
        noisy_run.train_step()
    assert torch.equal(plain.generators["data"].get_state(), noisy_run.generators["data"].get_state())


def test_noise_decays_over_steps():
    stds = []
    for step in (1, 10, 100, 1000):
        trainer, clean, noisy = clean_and_noisy(step=step, eta=1.0)
        measured = float(flat_noise(clean, noisy).std())
        assert measured == pytest.approx(trainer.methods[0].std(step), rel=0.1)
        stds.append(measured)
    assert stds == sorted(stds, reverse=True)
    assert stds[0] / stds[-1] == pytest.approx(1000 ** (0.55 / 2), rel=0.15)  # sqrt((1 + 999)^gamma) ~ 6.7


def test_eta_zero_adds_nothing():
    _, clean, noisy = clean_and_noisy(eta=0.0)
    assert all(torch.equal(c, g) for c, g in zip(clean, noisy))


def test_runs_are_reproducible_and_differ_with_the_seed():
    cfg = tiny(steps=6, training=[gn(eta=1.0)])
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    assert a.train_loss == b.train_loss and a.metrics == b.metrics
    assert train(tiny(steps=6), progress=False).train_loss != a.train_loss  # the noise changes the run
    # the noise itself: identical for the same seed, different for another one
    n0 = flat_noise(*clean_and_noisy(seed=0, eta=1.0)[1:])
    assert torch.equal(n0, flat_noise(*clean_and_noisy(seed=0, eta=1.0)[1:]))
    n1 = flat_noise(*clean_and_noisy(seed=1, eta=1.0)[1:])
    assert not torch.allclose(n0, n1) and abs(float(torch.corrcoef(torch.stack([n0, n1]))[0, 1])) < 0.1


def test_noise_is_added_before_gradient_clipping():
    """With a huge eta the noisy gradient's norm is ~1e3 * sqrt(9k); clipping after the noise leaves
    exactly grad_clip, in the direction of (gradient + noise)."""
    seed, eta, clip = 0, 1e6, 0.5
    trainer = Trainer(tiny(**WIDE, seed=seed, grad_clip=clip, training=[gn(eta=eta)]), progress=False)
    probe = Trainer(tiny(**WIDE, seed=seed, grad_clip=clip), progress=False)  # the same first batch, no noise
    gen = probe.generators["data"]
    batch = probe.task.batch(probe.batch_size, probe.seq_len, gen, split="train")
    probe.forward_backward(batch, None)
    noise_gen = _generator(seed, _salt("gradient_noise"))
    raw = [p.grad + math.sqrt(eta) * torch.randn(p.shape, generator=noise_gen) for p in probe.model.parameters()]
    raw_norm = float(torch.cat([r.flatten() for r in raw]).norm())
    assert raw_norm > 1e4

    trainer.train_step()
    grads = [p.grad for p in trainer.model.parameters()]
    norm = float(torch.cat([g.flatten() for g in grads]).norm())
    assert norm == pytest.approx(clip, rel=1e-4)
    for g, r in zip(grads, raw):
        torch.testing.assert_close(g, r * (clip / raw_norm), rtol=1e-4, atol=1e-9)

    # without clipping the same step keeps the full noisy gradient
    unclipped = Trainer(tiny(**WIDE, seed=seed, grad_clip=None, training=[gn(eta=eta)]), progress=False)
    unclipped.train_step()
    norm = float(torch.cat([p.grad.flatten() for p in unclipped.model.parameters()]).norm())
    assert norm == pytest.approx(raw_norm, rel=1e-4)


def test_a_resumed_run_continues_the_noise_stream(tmp_path):
    cfg = tiny(steps=6, early_stop=None, training=[gn(eta=1.0)])
    straight = train(cfg, progress=False)
    first = Trainer(cfg, progress=False)
    for _ in range(3):
        first.train_step()
    checkpoint.save(first, tmp_path)
    resumed = train(cfg, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps == 6
    assert resumed.train_loss == straight.train_loss and resumed.metrics == straight.metrics
