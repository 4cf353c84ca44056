"""``state_noise``: every training batch starts from h_0 ~ N(0, std^2 I) in every float state entry
(Buitrago & Gu 2025); counters and empty KV caches stay; drawn from the run's "noise" stream."""

from __future__ import annotations

import math

import pytest
import torch
from harness_tasks import tiny

from recur.state import State
from recur.training import train
from recur.training.methods.state_noise import StateNoise, noise_state
from recur.training.trainer import _SALTS, Trainer, _generator

HYBRID = dict(model=["elman", "attention"], n_layers=2, d_model=32, batch_size=128)


def noise(std: float | None = None) -> dict:
    return {"name": "state_noise", **({} if std is None else {"args": {"std": std}})}


def recorded_inits(trainer: Trainer) -> list[dict]:
    """Wrap the trainer's passes: the initial state and final state of every step."""
    seen = []
    inner = trainer.forward_backward

    def forward_backward(batch, init):
        loss, out = inner(batch, init)
        seen.append({"init": init, "final": out.state})
        return loss, out

    trainer.forward_backward = forward_backward
    return seen


def floats(state: State) -> dict[str, torch.Tensor]:
    return {k: t for k, t in state.tensors() if t.is_floating_point() and t.numel()}


@pytest.mark.parametrize("std", [1.0, 0.5, 0.05])
def test_initial_state_is_gaussian_with_the_given_std_in_every_float_entry(std):
    trainer = Trainer(tiny(**HYBRID, training=[noise(std)]), progress=False)
    init = trainer.methods[0].initial_state(trainer, None)
    template = trainer.model.init_state(trainer.batch_size)
    assert [k for k, _ in init.tensors()] == [k for k, _ in template.tensors()]
    for (name, t), (_, z) in zip(init.tensors(), template.tensors()):
        assert t.shape == z.shape and t.dtype == z.dtype and t.device == z.device, name
    h = init["layer0"]["h"]  # 128 x 32 = 4096 entries: sample std within ~1.1% (sd), so 10% is > 9 sd
    assert h.shape == (128, 32)
    assert 0.9 * std < float(h.std()) < 1.1 * std
    assert abs(float(h.mean())) < 5 * std / math.sqrt(h.numel())
    assert abs(float((h.abs() < std).float().mean()) - 0.6827) < 0.03  # Gaussian, not e.g. uniform
    # the attention layer: an empty KV cache and a zero position counter, as init_state
    kv = init["layer1"]
    assert kv["k"].shape[2] == 0 and kv["v"].shape[2] == 0
    assert kv["pos"].dtype == torch.int64 and torch.equal(kv["pos"], template["layer1"]["pos"])


@pytest.mark.parametrize("mixer", ["lstm", "gla", "mamba", ["lstm", "gla"]])
def test_every_float_entry_is_filled(mixer):
    trainer = Trainer(tiny(model=mixer, n_layers=2, training=[noise(0.3)]), progress=False)
    init = trainer.methods[0].initial_state(trainer, None)
    entries = floats(init)
    assert entries and set(entries) == set(floats(trainer.model.init_state(16)))
    for name, t in entries.items():
        assert (t != 0).all(), name  # no entry left at zero
    every = torch.cat([t.flatten() for t in entries.values()])
    assert 0.25 < float(every.std()) < 0.35


def test_std_zero_is_the_zero_state():
    trainer = Trainer(tiny(**HYBRID, training=[noise(0.0)]), progress=False)
    init = trainer.methods[0].initial_state(trainer, None)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(init.tensors(), trainer.model.init_state(128).tensors()))


def test_negative_std_is_refused():
    with pytest.raises(ValueError, match="std"):
        tiny(training=[noise(-1.0)])


def test_the_state_is_valid_for_the_model_and_used_in_training():
    trainer = Trainer(tiny(**HYBRID, steps=3, training=[noise(0.5)]), progress=False)
    seen = recorded_inits(trainer)
    for _ in range(3):
        trainer.train_step()
    inits = [s["init"] for s in seen]
    assert all(isinstance(i, State) for i in inits)
    h = [i["layer0"]["h"] for i in inits]
    assert not torch.equal(h[0], h[1]) and not torch.equal(h[1], h[2])  # a fresh draw every batch
    assert all(0.45 < float(x.std()) < 0.55 for x in h)


def test_drawn_from_the_runs_noise_stream():
    seed = 7
    trainer = Trainer(tiny(**HYBRID, seed=seed, training=[noise(0.5)]), progress=False)
    seen = recorded_inits(trainer)
    trainer.train_step()
    trainer.train_step()
    gen = _generator(seed, _SALTS["noise"])  # a fresh copy of the run's "noise" stream
    for step in seen:  # entries drawn in the state's order, on the CPU, one after the other
        for name, t in floats(step["init"]).items():
            torch.testing.assert_close(t, 0.5 * torch.randn(t.shape, generator=gen), rtol=0, atol=0, msg=name)
    # the data stream is separate: the batches are those of the run without noise
    plain = Trainer(tiny(**HYBRID, seed=seed), progress=False)
    plain.train_step()
    plain.train_step()
    assert torch.equal(plain.generators["data"].get_state(), trainer.generators["data"].get_state())


def test_runs_are_reproducible_and_the_noise_changes_them():
    cfg = tiny(steps=6, training=[noise()])
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    assert a.train_loss == b.train_loss and a.metrics == b.metrics
    assert train(tiny(steps=6), progress=False).train_loss != a.train_loss
    t0 = Trainer(tiny(seed=0, training=[noise()]), progress=False)
    t1 = Trainer(tiny(seed=1, training=[noise()]), progress=False)
    h0 = t0.methods[0].initial_state(t0, None)["layer0"]["h"]
    h1 = t1.methods[0].initial_state(t1, None)["layer0"]["h"]
    t0b = Trainer(tiny(seed=0, training=[noise()]), progress=False)
    assert torch.equal(h0, t0b.methods[0].initial_state(t0b, None)["layer0"]["h"])
    assert not torch.equal(h0, h1)
    assert t0.methods[0].params.std == 1.0  # the default


def test_legacy_keys_mean_the_method():
    cfg = tiny(state_init="noise", state_noise_std=0.5)
    assert [(m.name, m.params().std) for m in cfg.training] == [("state_noise", 0.5)]


def test_a_state_given_by_another_method_is_kept():
    """[state_passing, state_noise]: the first batch starts from noise, later ones from the carried state."""
    trainer = Trainer(tiny(steps=3, training=["state_passing", noise(0.5)]), progress=False)
    seen = recorded_inits(trainer)
    for _ in range(3):
        trainer.train_step()
    h0 = seen[0]["init"]["layer0"]["h"]
    assert 0.3 < float(h0.std()) < 0.7  # noise on the first batch
    for prev, nxt in zip(seen, seen[1:]):
        for (name, a), (_, b) in zip(prev["final"].tensors(), nxt["init"].tensors()):
            assert torch.equal(a.detach(), b), name  # not replaced by a fresh draw
    given = State(layer0=State(h=torch.full((16, 16), 3.0)))
    method = trainer.methods[1]
    assert isinstance(method, StateNoise) and method.initial_state(trainer, given) is given


def test_noise_state_helper_keeps_the_device_and_layout():
    trainer = Trainer(tiny(**HYBRID), progress=False)
    state = noise_state(trainer.model, 4, 2.0, torch.Generator().manual_seed(0), "cpu")
    trainer.model(torch.zeros(4, 6, dtype=torch.long), state)  # a valid initial state
    assert state["layer0"]["h"].shape == (4, 32) and state["layer1"]["k"].shape[2] == 0
