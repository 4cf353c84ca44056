"""rmt (and the segment loop it shares with armt, recur.models.segments): the read and write
positions by hand, truncated BPTT that really detaches, the state's pending segment, constant
memory while streaming, and a training run through `recur run`."""

from __future__ import annotations

import json

import pytest
import torch
from harness_segments import gradient_by_segment

from recur import State
from recur.cli import main
from recur.models.armt import ARMT
from recur.models.rmt import RMT

V, D, L, M = 11, 16, 5, 2


def rmt(**options) -> RMT:
    torch.manual_seed(0)
    return RMT(V, D, 2, pattern="attention", segment_len=L, n_memory=M, **options).double()


def armt(**options) -> ARMT:
    torch.manual_seed(0)
    model = ARMT(V, D, 2, pattern="attention", segment_len=L, n_memory=M, d_mem=4, **options).double()
    for a in model.associative:
        torch.nn.init.normal_(a.W_v.weight, std=0.3)  # a live memory (W_v starts at zero)
    return model


def tokens(t: int, seed: int = 1, b: int = 2) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_memory_is_read_first_and_written_last_by_hand():
    """Two complete segments and a partial one: [m; E x; m] per segment, the logits at the token
    positions, the next memory the normed final hidden states at the write positions; the partial
    segment is [m; E x] alone."""
    model = rmt()
    x = tokens(2 * L + 3)
    e = model.embed(x)
    m = model.memory.expand(2, M, D)
    logits = []
    for s in range(2):
        h, _ = model.backbone(torch.cat([m, e[:, s * L:(s + 1) * L], m], dim=1))
        logits.append(model.head(model.norm(h[:, M:M + L])))
        m = model.norm(h[:, M + L:])
    h, _ = model.backbone(torch.cat([m, e[:, 2 * L:]], dim=1))
    logits.append(model.head(model.norm(h[:, M:])))
    out = model(x)
    torch.testing.assert_close(out.logits, torch.cat(logits, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.state["memory"]["tokens"], m, rtol=1e-12, atol=1e-12)


def test_the_state_is_the_memory_and_the_pending_segment():
    model = rmt()
    x = tokens(2 * L + 3)
    state = model(x).state
    assert state["count"].tolist() == [3, 3]
    torch.testing.assert_close(state["pending"][:, :3], model.embed(x[:, -3:]))
    assert (state["pending"][:, 3:] == 0).all()
    torch.testing.assert_close(state["memory"]["tokens"], model(x[:, :2 * L]).state["memory"]["tokens"])
    assert model.state_size(10 ** 6) == (M + L - 1) * D == state.num_floats()
    # a state of another segment length is refused, naming the entry
    with pytest.raises(ValueError, match="pending"):
        RMT(V, D, 2, segment_len=L + 1, n_memory=M).double()(x, state)


def test_memory_carries_a_token_across_segments():
    """A change in the first segment reaches the logits of the fourth only through the memory."""
    for model in (rmt(), armt()):
        x = tokens(4 * L)
        y = x.clone()
        y[:, 1] = (y[:, 1] + 1) % V
        a, b = model(x).logits, model(y).logits
        assert (a[:, 3 * L:] - b[:, 3 * L:]).abs().max() > 1e-6
        torch.testing.assert_close(a[:, :1], b[:, :1])


@pytest.mark.parametrize("build", [rmt, armt], ids=["rmt", "armt"])
def test_truncated_bptt_detaches_all_but_the_last_k_transitions(build):
    """Four segments, a loss on the last: with full BPTT its gradient reaches the tokens of the first
    segment; with bptt_segments=k only those of the last k + 1 segments (k memory transitions).
    The forward pass is the same."""
    x = tokens(4 * L)
    full = gradient_by_segment(build(), x, L)
    assert (full > 0).all()
    for k in (0, 1, 2):
        grad = gradient_by_segment(build(bptt_segments=k), x, L)
        assert (grad[3 - k:] > 0).all() and (grad[:3 - k] == 0).all(), (k, grad)
    torch.testing.assert_close(build(bptt_segments=1)(x).logits, build()(x).logits, rtol=0, atol=0)


def test_streaming_holds_one_memory_and_one_segment_whatever_the_length():
    model = rmt()
    state, shapes = model(tokens(3)).state, set()
    token = tokens(1, seed=2)
    with torch.no_grad():
        for _ in range(4 * L + 2):
            out = model(token, state)
            state, token = out.state, out.logits[:, -1].argmax(-1, keepdim=True)
            shapes.add(tuple((k, tuple(t.shape)) for k, t in state.tensors()))
    assert len(shapes) == 1 and state.num_floats() == model.state_size(4 * L + 5)


def test_rows_at_different_phases_run_in_groups():
    """A batch whose rows are at different positions of their segments (states concatenated from
    two calls) equals each row run alone."""
    model = rmt()
    a = model(tokens(3, seed=3, b=1)).state
    b = model(tokens(L + 1, seed=4, b=1)).state
    x = tokens(2 * L, seed=5)
    together = model(x, State.cat([a, b]))
    alone = [model(x[:1], a), model(x[1:], b)]
    torch.testing.assert_close(together.logits, torch.cat([o.logits for o in alone]))
    for (k, t), (_, u) in zip(together.state.tensors(), State.cat([o.state for o in alone]).tensors()):
        torch.testing.assert_close(t, u, msg=k)


@pytest.mark.parametrize("options, phrase", [
    (dict(segment_len=0), "segment_len"), (dict(n_memory=0), "n_memory"), (dict(bptt_segments=-1), "bptt_segments"),
    (dict(bptt_segments=True), "bptt_segments"), (dict(segment_len=2.5), "segment_len")])
def test_bad_options_are_named(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        RMT(V, D, 1, **options)


@pytest.mark.parametrize("arch", ["rmt", "armt"])
def test_recur_run_trains_on_associative_retrieval_with_a_curriculum_over_segments(arch, db, capsys):
    """`recur run`: 1 to 3 pairs (2 to 4 segments of one pair) by the seq_len curriculum, evaluated
    at 3 and 12 segments."""
    argv = ["run", "--task", "associative_retrieval", "--task-arg", "key_size=1", "--arch", arch, "--model", "attention",
            "--d-model", "16", "--n-layers", "1", "--seq-len", "16", "--eval-lengths", "12,48", "--steps", "4",
            "--batch-size", "8", "--eval-batches", "1", "--device", "cpu", "--train", "curriculum:start=8",
            "--set", "model.args.segment_len=4", "--set", "model.args.n_memory=2", "--db", str(db), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["metrics"]) == {"12", "48"} and result["steps"] == 4
    assert all(0 <= m["exact_match"] <= 1 for m in result["metrics"].values())
    if arch == "rmt":
        assert result["state_size"] == (2 + 3) * 16


@pytest.mark.slow
def test_rmt_learns_associative_retrieval_above_chance():
    """3 pairs, one per segment (2 layers, d 64, M 4): the memory carries the pairs well above the
    chance of 1/16 in 1500 steps (measured: 0.40 exact match; ARMT reaches 1.0, test_armt.py)."""
    from recur.config import RunConfig
    from recur.training.trainer import train

    cfg = {"task": {"name": "associative_retrieval", "args": {"key_size": 1}, "seq_len": 16},
           "model": {"arch": "rmt", "mixer": "attention", "d_model": 64, "n_layers": 2,
                     "args": {"segment_len": 4, "n_memory": 4}},
           "optim": {"steps": 1500, "batch_size": 32, "lr": 1e-3, "early_stop": None},
           "eval": {"lengths": [16], "batches": 8}, "device": "cpu"}
    metrics = train(RunConfig.model_validate(cfg), progress=False).metrics
    assert metrics["16"]["exact_match"] >= 0.25, metrics


@pytest.mark.parametrize("build", [rmt, armt], ids=["rmt", "armt"])
def test_the_head_at_some_positions_of_a_packed_batch_equals_the_full_head(build):
    """positions= with resets (the Trainer's call on packed text): rows run by documents, the
    picked logits in row-major order."""
    model = build()
    gen = torch.Generator().manual_seed(8)
    x, resets, picked = tokens(23, b=3), torch.rand(3, 23, generator=gen) < 0.15, torch.rand(3, 23, generator=gen) < 0.4
    full, some = model(x, resets=resets), model(x, resets=resets, positions=picked)
    torch.testing.assert_close(some.logits, full.logits[picked], rtol=1e-12, atol=1e-12)
    for (k, a), (_, b) in zip(some.state.tensors(), full.state.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=k)
