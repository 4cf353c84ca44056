"""``state_passing``: init_{n+1} = stop_gradient(final state of batch n) (Buitrago & Gu 2025); only
for bounded states; the carried state is part of a checkpoint."""

from __future__ import annotations

import pytest
import torch
from harness_tasks import tiny

from recur.state import State
from recur.training import ConfigError, checkpoint, train
from recur.training.methods.state_passing import StatePassing
from recur.training.trainer import Trainer


def recorded(trainer: Trainer) -> list[dict]:
    """Wrap the trainer's passes: the initial and final state of every step."""
    seen = []
    inner = trainer.forward_backward

    def forward_backward(batch, init):
        loss, out = inner(batch, init)
        seen.append({"init": init, "final": out.state, "inputs": batch.inputs})
        return loss, out

    trainer.forward_backward = forward_backward
    return seen


def tensors(state: State) -> list[tuple[str, torch.Tensor]]:
    return list(state.tensors())


@pytest.mark.parametrize("fields", [dict(model="lstm"), dict(model=["gla", "elman"], n_layers=2),
                                    dict(model="gla", arch="looped_lm")])
def test_each_batch_starts_from_the_detached_final_state_of_the_previous(fields):
    trainer = Trainer(tiny(**fields, steps=4, training=["state_passing"]), progress=False)
    seen = recorded(trainer)
    for _ in range(4):
        trainer.train_step()
    assert seen[0]["init"] is None  # the first batch: the zero state
    for prev, nxt in zip(seen, seen[1:]):
        assert [k for k, _ in tensors(prev["final"])] == [k for k, _ in tensors(nxt["init"])]
        for (name, a), (_, b) in zip(tensors(prev["final"]), tensors(nxt["init"])):
            assert a.requires_grad or not a.is_floating_point()  # the final state does carry the graph...
            assert not b.requires_grad and b.grad_fn is None, name  # ...the carried one does not
            assert torch.equal(a.detach(), b), name


def test_the_carried_state_is_what_the_model_computes_from_the_previous_one():
    """The second batch's outputs are those of the model run from the first batch's final state
    (not from zeros): check by recomputing them after the fact with a copy of the weights."""
    trainer = Trainer(tiny(model="lstm", steps=2, training=["state_passing"]), progress=False)
    seen = recorded(trainer)
    logits = []
    inner = trainer.model.forward

    def forward(tokens, state=None, **kw):
        out = inner(tokens, state, **kw)
        logits.append(out.logits.detach())
        return out

    trainer.model.forward = forward
    trainer.train_step()
    with torch.no_grad():  # the model after step 1, run on the second batch from the carried state
        carried = trainer.methods[0].carried
        second = trainer.task.batch(16, 8, _copy(trainer.generators["data"]), split="train")
        # the Trainer asks for the head at the supervised positions
        expected = inner(second.inputs, carried, positions=second.mask).logits
        from_zero = inner(second.inputs, positions=second.mask).logits
    trainer.train_step()
    assert torch.equal(seen[1]["init"]["layer0"]["h"], carried["layer0"]["h"])
    # float32 rounding only: torch's fused LSTM (the layer's CPU path) takes another kernel without grad
    torch.testing.assert_close(logits[1], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(logits[1], from_zero, rtol=1e-3, atol=1e-3)


def _copy(gen: torch.Generator) -> torch.Generator:
    out = torch.Generator()
    out.set_state(gen.get_state())
    return out


def test_no_graph_is_kept_alive_between_steps():
    trainer = Trainer(tiny(model=["gla", "lstm"], n_layers=2, steps=3, training=["state_passing"]), progress=False)
    method = trainer.methods[0]
    assert isinstance(method, StatePassing) and method.carried is None
    for _ in range(3):
        trainer.train_step()
        assert all(not t.requires_grad and t.grad_fn is None for _, t in method.carried.tensors())
    # a backward through the second step's loss reaches no earlier step: it succeeds after
    # the first step's graph was freed (a kept graph would raise "backward through the graph a second time")
    batch = trainer.task.batch(16, 8, torch.Generator().manual_seed(0))
    out = trainer.model(batch.inputs, method.carried)
    trainer.model.loss(out, batch).backward()


@pytest.mark.parametrize("model", ["attention", ["elman", "attention"]])
def test_growing_kv_caches_are_refused(model):
    with pytest.raises(ConfigError, match=r"needs a bounded state, but \['attention'\] keep a growing KV cache"):
        train(tiny(model=model, n_layers=2, training=["state_passing"]), progress=False)


def test_a_sliding_window_cache_is_bounded_and_accepted():
    trainer = Trainer(tiny(model=["elman", "swa"], n_layers=2, model_args={"swa": {"window": 4}}, steps=3,
                           training=["state_passing"]), progress=False)
    seen = recorded(trainer)
    for _ in range(3):
        trainer.train_step()
    assert seen[2]["init"]["layer1"]["k"].shape[2] == 3  # the last window - 1 keys, not 2 * 8


def test_the_legacy_key_means_the_method():
    assert [m.name for m in tiny(state_passing=True).training] == ["state_passing"]


def test_state_dict_round_trips():
    trainer = Trainer(tiny(model="lstm", steps=2, training=["state_passing"]), progress=False)
    method = trainer.methods[0]
    assert method.state_dict() == {}
    trainer.train_step()
    saved = method.state_dict()
    assert set(saved) == {"carried"} and isinstance(saved["carried"], State)
    fresh = StatePassing(StatePassing.Params())
    fresh.load_state_dict(saved)
    assert [(k, t) for k, t in fresh.carried.tensors()] == [(k, t) for k, t in method.carried.tensors()]
    fresh.load_state_dict({})
    assert fresh.carried is None


def test_a_resumed_run_continues_from_the_carried_state(tmp_path):
    cfg = tiny(model="lstm", steps=6, early_stop=None, training=["state_passing"])
    straight = train(cfg, progress=False)
    first = Trainer(cfg, progress=False)
    for _ in range(3):
        first.train_step()
    checkpoint.save(first, tmp_path)
    resumed = Trainer(cfg, progress=False, checkpoint_dir=tmp_path, resume=True)
    checkpoint.load(resumed, tmp_path)
    for (name, a), (_, b) in zip(first.methods[0].carried.tensors(), resumed.methods[0].carried.tensors()):
        assert torch.equal(a, b), name
    result = train(cfg, progress=False, checkpoint_dir=tmp_path, resume=True)
    assert result.train_loss == straight.train_loss and result.metrics == straight.metrics


def test_passing_changes_the_run_and_evaluation_starts_from_zeros():
    cfg = tiny(steps=6, training=["state_passing"])
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    assert a.train_loss == b.train_loss and a.metrics == b.metrics
    assert train(tiny(steps=6), progress=False).train_loss != a.train_loss
    trainer = Trainer(cfg, progress=False)
    states = []
    inner = trainer.model.forward

    def forward(tokens, state=None, **kw):
        states.append((trainer.model.training, state))
        return inner(tokens, state, **kw)

    trainer.model.forward = forward
    result = trainer.fit()
    train_states = [s for training, s in states if training]
    eval_states = [s for training, s in states if not training]
    assert len(train_states) == result.steps and train_states[0] is None
    assert all(s is not None for s in train_states[1:])
    assert len(eval_states) == len(cfg.eval.lengths) * cfg.eval.batches and all(s is None for s in eval_states)


def test_with_tbptt_the_carried_state_is_the_final_state_of_the_sequence():
    trainer = Trainer(tiny(model="gla", model_args={"chunk_size": 3}, seq_len=11, steps=2,
                           training=["state_passing", {"name": "tbptt", "k1": 4}]), progress=False)
    passing, tbptt = trainer.methods
    calls = []
    original = tbptt.forward_backward

    def fb(tr, batch, init):
        with torch.no_grad():  # one pass over the whole sequence, with the weights of this step
            final = tr.model(batch.inputs, init).state
        calls.append((init, final))
        return original(tr, batch, init)

    tbptt.forward_backward = fb
    trainer.train_step()
    trainer.train_step()
    assert calls[0][0] is None
    carried_after_1 = calls[1][0]
    assert not any(t.requires_grad for _, t in carried_after_1.tensors())
    for (name, a), (_, b) in zip(carried_after_1.tensors(), calls[0][1].tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
