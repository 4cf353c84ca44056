"""``tbptt``: truncated BPTT(k1, k2) against gradients computed by hand, in float64.

The reference gradients are written independently of the method's split-and-carry logic: the state
at the start of a window is recomputed from a prefix pass (the state contract: carrying a state
equals one call), detached, and each segment's loss is weighted by its supervised count / total.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from harness_tasks import tiny

from recur.models.base import ModelOutput
from recur.state import State
from recur.tasks.base import Batch
from recur.training import ConfigError, train
from recur.training.methods.tbptt import TBPTT
from recur.training.trainer import Trainer

# Recurrent mixers whose forward is chunked (chunk_size 3): window edges fall inside chunks.
MIXERS = {
    "gla": dict(model="gla", model_args={"chunk_size": 3}),
    "lstm": dict(model="lstm"),
    "gla+lstm": dict(model=["gla", "lstm"], n_layers=2, model_args={"gla": {"chunk_size": 3}}),
}


def make(k1: int, k2: int | None = None, mixer: str = "gla", seed: int = 0) -> tuple[Trainer, TBPTT]:
    cfg = tiny(**MIXERS[mixer], seed=seed, training=[{"name": "tbptt", "k1": k1, "k2": k2}])
    trainer = Trainer(cfg, progress=False)
    trainer.model.double()
    (method,) = trainer.methods
    assert isinstance(method, TBPTT)
    return trainer, method


def batch_of(trainer: Trainer, T: int, n: int = 3, seed: int = 0) -> Batch:
    """``n`` harness rows of length T with a random (uneven, never empty) mask, so the segments have
    different supervised counts (some none) and the n_j / n weights matter."""
    gen = torch.Generator().manual_seed(seed)
    b = trainer.task.batch(n, max(T, 16), gen)
    mask = torch.rand(n, T, generator=gen) < 0.6
    mask[0, T - 1] = True
    return Batch(b.inputs[:, :T], b.targets[:, :T], mask)


def noisy_init(trainer: Trainer, n: int, seed: int = 1) -> State:
    gen = torch.Generator().manual_seed(seed)
    return trainer.model.init_state(n).map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype))


def run_method(trainer: Trainer, method: TBPTT, batch: Batch, init):
    loss, out = method.forward_backward(trainer, batch, init)
    return loss, out, [p.grad.clone() for p in trainer.model.parameters()]


def params(trainer):
    return list(trainer.model.parameters())


def assert_grads_equal(got, want, atol=1e-12):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, w, rtol=1e-10, atol=atol)


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def state_at(model, inputs, init, s: int):
    """The (detached) state at position s of the run from ``init``: one prefix call."""
    if s == 0:
        return None if init is None else init.detach()
    with torch.no_grad():
        return model(inputs[:, :s], init).state.detach()


def reference_grads(trainer, batch: Batch, init, k1: int, k2: int):
    """TBPTT(k1, k2) by its definition: segment j = positions [j k1, e_j), e_j = min((j+1) k1, T), is
    run from the detached state at s_j = max(0, e_j - k2); loss_j is its masked mean cross-entropy
    at positions [j k1, e_j), weighted by n_j / n."""
    model = trainer.model
    T = batch.inputs.shape[1]
    total = int(batch.mask.sum())
    grads = [torch.zeros_like(p) for p in params(trainer)]
    value = 0.0
    for j in range(math.ceil(T / k1)):
        lo, e = j * k1, min((j + 1) * k1, T)
        s = max(0, e - k2)
        mask = batch.mask[:, s:e].clone()
        mask[:, : lo - s] = False
        n = int(mask.sum())
        if n == 0:
            continue
        logits = model(batch.inputs[:, s:e], state_at(model, batch.inputs, init, s)).logits
        loss = F.cross_entropy(logits[mask], batch.targets[:, s:e][mask]) * (n / total)
        for acc, g in zip(grads, torch.autograd.grad(loss, params(trainer), allow_unused=True)):
            if g is not None:
                acc += g
        value += float(loss.detach())
    return value, grads


def full_bptt(trainer, batch: Batch, init):
    out = trainer.model(batch.inputs, init)
    loss = F.cross_entropy(out.logits[batch.mask], batch.targets[batch.mask])
    grads = torch.autograd.grad(loss, params(trainer), allow_unused=True)
    return loss.detach(), out, [torch.zeros_like(p) if g is None else g for p, g in zip(params(trainer), grads)]


# ------------------------------------------------------------------ (a) k2 >= T is full BPTT
@pytest.mark.parametrize("mixer", sorted(MIXERS))
@pytest.mark.parametrize("T,k1,k2", [(11, 4, 11), (11, 4, 40), (12, 4, 12), (11, 3, 11), (7, 1, 7), (5, 7, 7)])
def test_k2_at_least_T_gives_the_full_bptt_gradient(mixer, T, k1, k2):
    trainer, method = make(k1, k2, mixer)
    batch = batch_of(trainer, T)
    init = noisy_init(trainer, 3)
    loss, out, got = run_method(trainer, method, batch, init)
    want_loss, want_out, want = full_bptt(trainer, batch, init)
    assert_grads_equal(got, want)
    assert float(loss) == pytest.approx(float(want_loss), abs=1e-12)
    # the returned output: logits of every position and the final state, as one full pass
    torch.testing.assert_close(out.logits, want_out.logits.detach(), rtol=0, atol=1e-12)
    for (name, a), (_, b) in zip(out.state.tensors(), want_out.state.tensors()):
        assert not a.requires_grad, name
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-12)


def test_k2_at_least_T_from_the_zero_state():
    trainer, method = make(4, 100, "gla")
    batch = batch_of(trainer, 11, seed=3)
    _, _, got = run_method(trainer, method, batch, None)
    _, _, want = full_bptt(trainer, batch, None)
    assert_grads_equal(got, want)


# ------------------------------------------------------------------ (b) k1 = k2: detach at every edge
@pytest.mark.parametrize("mixer", sorted(MIXERS))
@pytest.mark.parametrize("T,K", [(12, 4), (12, 3), (10, 5), (6, 1), (8, 8)])
def test_k1_equal_k2_detaches_the_state_at_every_segment_edge(mixer, T, K):
    trainer, method = make(K, K, mixer)
    batch = batch_of(trainer, T)
    init = noisy_init(trainer, 3)
    loss, out, got = run_method(trainer, method, batch, init)

    # by hand: each segment from the detached final state of the previous segment
    model, total = trainer.model, int(batch.mask.sum())
    want = [torch.zeros_like(p) for p in params(trainer)]
    state, value, logits = init, 0.0, []
    for a in range(0, T, K):
        seg = model(batch.inputs[:, a:a + K], None if state is None else state.detach())
        state = seg.state
        logits.append(seg.logits.detach())
        m = batch.mask[:, a:a + K]
        if m.any():
            seg_loss = F.cross_entropy(seg.logits[m], batch.targets[:, a:a + K][m]) * (int(m.sum()) / total)
            for acc, g in zip(want, torch.autograd.grad(seg_loss, params(trainer), allow_unused=True)):
                if g is not None:
                    acc += g
            value += float(seg_loss.detach())
    assert_grads_equal(got, want)
    assert float(loss) == pytest.approx(value, abs=1e-12)
    torch.testing.assert_close(out.logits, torch.cat(logits, dim=1), rtol=0, atol=1e-12)
    if K < T:  # a truncation happened: the gradient is not the full one
        assert max_diff(got, full_bptt(trainer, batch, init)[2]) > 1e-6


# ------------------------------------------------------------------ (c) k1 < k2 < T
CASES = [(11, 4, 6), (11, 4, 7), (13, 3, 5), (9, 2, 3), (12, 4, 4), (11, 4, 4), (10, 3, 9), (1, 4, 6), (1, 1, 1),
         (2, 1, 1), (7, 7, 7)]


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@pytest.mark.parametrize("T,k1,k2", CASES)
def test_gradient_matches_the_definition(mixer, T, k1, k2):
    trainer, method = make(k1, k2, mixer)
    batch = batch_of(trainer, T, seed=T + k1 + k2)
    init = noisy_init(trainer, 3)
    loss, out, got = run_method(trainer, method, batch, init)
    value, want = reference_grads(trainer, batch, init, k1, k2)
    assert_grads_equal(got, want)
    assert float(loss) == pytest.approx(value, abs=1e-12)
    assert out.logits.shape == (3, T, trainer.task.vocab_size)
    if k2 < T:
        assert max_diff(got, full_bptt(trainer, batch, init)[2]) > 1e-6


def test_the_loss_is_the_batch_mean_whatever_the_windows():
    """Sum_j (n_j / n) mean_j = the mean over all supervised positions: the reported loss is the
    full masked mean cross-entropy (the values do not depend on the truncation)."""
    trainer, method = make(3, 5, "lstm")
    batch = batch_of(trainer, 13, seed=5)
    loss, _, _ = run_method(trainer, method, batch, None)
    with torch.no_grad():
        out = trainer.model(batch.inputs)
        want = F.cross_entropy(out.logits[batch.mask], batch.targets[batch.mask])
    assert float(loss) == pytest.approx(float(want), abs=1e-12)


def test_an_all_unsupervised_batch_is_refused():
    trainer, method = make(4, 4, "gla")
    b = batch_of(trainer, 8)
    with pytest.raises(ValueError, match="no supervised position"):
        method.forward_backward(trainer, Batch(b.inputs, b.targets, torch.zeros_like(b.mask)), None)


def test_gradients_of_a_previous_step_are_cleared():
    trainer, method = make(4, 6, "gla")
    batch = batch_of(trainer, 11)
    _, _, first = run_method(trainer, method, batch, None)
    _, _, again = run_method(trainer, method, batch, None)  # no zero_grad in between
    assert_grads_equal(again, first)


# ------------------------------------------------------------------ (d) windows and options
@pytest.mark.parametrize("T,k1,k2,want", [
    (8, 4, None, [(0, 0, 4), (4, 4, 8)]),
    (11, 4, None, [(0, 0, 4), (4, 4, 8), (7, 8, 11)]),
    (11, 4, 6, [(0, 0, 4), (2, 4, 8), (5, 8, 11)]),
    (11, 4, 11, [(0, 0, 4), (0, 4, 8), (0, 8, 11)]),
    (11, 4, 100, [(0, 0, 4), (0, 4, 8), (0, 8, 11)]),
    (12, 3, 5, [(0, 0, 3), (1, 3, 6), (4, 6, 9), (7, 9, 12)]),
    (5, 2, 3, [(0, 0, 2), (1, 2, 4), (2, 4, 5)]),
    (3, 4, None, [(0, 0, 3)]),
    (1, 4, 6, [(0, 0, 1)]),
    (1, 1, None, [(0, 0, 1)]),
    (3, 1, 2, [(0, 0, 1), (0, 1, 2), (1, 2, 3)]),
])
def test_windows(T, k1, k2, want):
    method = TBPTT(TBPTT.Params(k1=k1, k2=k2))
    assert method.windows(T) == want


def test_k2_below_k1_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match=r"k2=2 must be >= k1=4"):
        tiny(training=[{"name": "tbptt", "k1": 4, "k2": 2}])
    with pytest.raises(ValueError, match="k1"):
        tiny(training=["tbptt"])  # k1 is required
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        tiny(training=[{"name": "tbptt", "k1": 0}])


def test_short_forms_and_label():
    a = tiny(training=[{"name": "tbptt", "k1": 16}])
    b = tiny(training=[{"name": "tbptt", "args": {"k1": 16}}])
    assert a == b and a.training[0].params().k1 == 16 and a.training[0].params().k2 is None
    assert TBPTT(TBPTT.Params(k1=16)).label == "+tbptt(16,16)"
    assert TBPTT(TBPTT.Params(k1=4, k2=9)).label == "+tbptt(4,9)"


def test_only_one_method_may_own_the_passes():
    with pytest.raises(ConfigError, match="each own the forward and backward passes"):
        Trainer(tiny(training=[{"name": "tbptt", "k1": 2}, {"name": "tbptt", "k1": 3}]), progress=False)


# ------------------------------------------------------------------ (e) end to end
def test_trains_end_to_end_and_scores_every_position(monkeypatch):
    seen = []
    original = TBPTT.forward_backward

    def checked(self, trainer, batch, init):
        with torch.no_grad():  # before the optimiser step: the same parameters as the method's passes
            full = trainer.model(batch.inputs, init)
        loss, out = original(self, trainer, batch, init)
        assert isinstance(out, ModelOutput) and out.logits.shape == full.logits.shape
        torch.testing.assert_close(out.logits, full.logits, rtol=1e-4, atol=1e-5)
        assert float(loss) == pytest.approx(float(trainer.model.loss(full, batch)), rel=1e-5)
        seen.append(batch.inputs.shape[1])
        return loss, out

    monkeypatch.setattr(TBPTT, "forward_backward", checked)
    cfg = tiny(**MIXERS["gla"], seq_len=11, steps=80, early_stop=None, lr=2e-2,
               training=[{"name": "tbptt", "k1": 4, "k2": 6}])
    result = train(cfg, progress=False)
    assert seen == [11] * 80 and result.steps == 80
    assert set(result.metrics) == {"11", "44"}
    # harness_shift (copy the previous token) is learnable within any window: far above chance (1/8)
    assert result.metrics["11"]["accuracy"] > 0.5 and result.train_accuracy > 0.4


@pytest.mark.parametrize("fields", [
    {"arch": "encoder", "model": "gla", "model.args": {"head": "pooled"}},
    {"arch": "encoder", "model": "bidirectional"},
])
def test_models_that_do_not_predict_every_position_causally_are_refused(fields):
    with pytest.raises(ConfigError, match="tbptt reads each sequence in segments"):
        Trainer(tiny(**fields, training=[{"name": "tbptt", "k1": 4}]), progress=False)


def test_a_causal_token_encoder_trains_with_tbptt():
    cfg = tiny(arch="encoder", model="gla", training=[{"name": "tbptt", "k1": 3}], steps=3, early_stop=None)
    assert train(cfg, progress=False).steps == 3
