"""hmt: the memory search and the FIFO cache by hand in float64, the cell against an unrolled
computation written from the equations, causality at every position (the query is encoded from the
previous segment), truncated BPTT that really detaches, and short training runs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from harness_segments import gradient_by_segment

from recur import State
from recur.cli import main
from recur.models.hmt import HMT, MemorySearch, fifo_append

V, D, L, N, K = 11, 16, 5, 2, 2


def hmt(**options) -> HMT:
    torch.manual_seed(0)
    kwargs = {"segment_len": L, "n_cache": N, "n_sensory": K, "recall_dim": 8, **options}
    return HMT(V, D, 2, pattern="attention", **kwargs).double()


def tokens(t: int, seed: int = 1, b: int = 2) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_memory_search_is_a_softmax_over_the_filled_slots_by_hand():
    """P = sum_j softmax_j((W_q q) . (W_k c_j) / sqrt(h)) c_j over the last ``filled`` slots only:
    the unfilled slots (here filled with large garbage) change nothing; a row with none gives 0."""
    torch.manual_seed(0)
    search = MemorySearch(D, 6).double()
    B, slots = 4, 5
    q, cache = randn(B, 1, D, seed=1), randn(B, slots, D, seed=2)
    filled = torch.tensor([1, 3, 5, 0])
    garbage = cache.clone()
    for b in range(B):
        garbage[b, :slots - int(filled[b])] = 1e3
    Wq, Wk = search.W_q.weight.detach(), search.W_k.weight.detach()  # [h, d]
    got = search(q, garbage, filled).detach()
    for b in range(B):
        f = int(filled[b])
        if f == 0:
            assert (got[b] == 0).all()
            continue
        qq = Wq @ q[b, 0]
        s = [float(qq @ (Wk @ cache[b, j])) / math.sqrt(6) for j in range(slots - f, slots)]
        w = [math.exp(v - max(s)) for v in s]
        want = sum(wi / sum(w) * cache[b, j] for wi, j in zip(w, range(slots - f, slots)))
        torch.testing.assert_close(got[b, 0], want, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(got).all()


def test_the_cache_is_a_fifo_of_the_last_n_writes_newest_last():
    cache, filled = torch.zeros(2, 3, D, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)
    writes = [randn(2, 1, D, seed=s) for s in range(5)]
    for i, m in enumerate(writes):
        cache, filled = fifo_append(cache, filled, m)
        assert filled.tolist() == [min(i + 1, 3)] * 2
        if i == 1:  # not yet full: the two writes in order in the last slots, the first slot unfilled
            torch.testing.assert_close(cache[:, 1:], torch.cat(writes[:2], dim=1), rtol=0, atol=0)
            assert (cache[:, 0] == 0).all()
    torch.testing.assert_close(cache, torch.cat(writes[-3:], dim=1), rtol=0, atol=0)  # the oldest two dropped


def unrolled(model: HMT, x: torch.Tensor):
    """The model's equations written out (its backbone, norm, head and parameters; no helper of the
    model's own): per segment [P ; S ; E x ; P], m = norm(h[-1]) appended to a list cache kept at its
    last N, the query encoded from the segment's last r tokens as [t ; E x[L-r:] ; t], and the
    next prompt a softmax over the list."""
    B, T = x.shape
    r, k = model.n_query, model.n_sensory
    e = model.embed(x)
    P, S, Mem = model.memory.expand(B, 1, D), None, []
    Wq, Wk = model.search.W_q.weight, model.search.W_k.weight
    t = model.query_token.expand(B, 1, D)
    logits = []
    for a in range(0, T, L):
        seg = e[:, a:a + L]
        n, write = seg.shape[1], seg.shape[1] == L
        front = [P] if S is None else [P, S]
        h, _ = model.backbone(torch.cat(front + [seg] + ([P] if write else []), dim=1))
        off = sum(f.shape[1] for f in front)
        logits.append(model.head(model.norm(h[:, off:off + n])))
        if write:
            Mem = (Mem + [model.norm(h[:, -1:])])[-model.n_cache:]
            g, _ = model.backbone(torch.cat([t, seg[:, L - r:], t], dim=1))
            q = model.norm(g[:, -1:])
            stack = torch.cat(Mem, dim=1)  # [B, f, d]
            w = torch.softmax((q @ Wq.T) @ (stack @ Wk.T).transpose(1, 2) / math.sqrt(Wq.shape[0]), dim=-1)
            P, S = w @ stack, seg[:, L - k:]
    return torch.cat(logits, dim=1), P, Mem, S


@pytest.mark.parametrize("options", [dict(), dict(sum_fraction=0.6, n_sensory=1), dict(sum_fraction=1.0, n_sensory=0)],
                         ids=["default", "r3-k1", "whole-segment-k0"])
def test_the_cell_equals_the_equations_unrolled_by_hand(options):
    """Four complete segments (the cache of 2 evicts twice) and a partial one, in float64."""
    model = hmt(**options)
    x = tokens(4 * L + 3)
    logits, P, Mem, S = unrolled(model, x)
    out = model(x)
    torch.testing.assert_close(out.logits, logits, rtol=1e-12, atol=1e-12)
    memory = out.state["memory"]
    torch.testing.assert_close(memory["prompt"], P, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(memory["cache"], torch.cat(Mem, dim=1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(memory["sensory"], S, rtol=1e-12, atol=1e-12)
    assert memory["filled"].tolist() == [N, N]
    # the search is live: the prompt is not one of the cached memories
    assert min((P - m).abs().max() for m in Mem) > 1e-6


def test_the_first_segment_reads_the_learned_prompt_and_the_second_the_first_memory():
    """Empty cache: P_1 = ``memory``, no sensory tokens; one entry: P_2 = m_1 exactly."""
    model = hmt()
    x = tokens(L)
    h, _ = model.backbone(torch.cat([model.memory.expand(2, 1, D), model.embed(x), model.memory.expand(2, 1, D)], 1))
    state = model(x).state["memory"]
    torch.testing.assert_close(state["prompt"], model.norm(h[:, -1:]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["cache"][:, -1:], state["prompt"], rtol=0, atol=0)
    assert state["filled"].tolist() == [1, 1] and (state["cache"][:, :-1] == 0).all()


def test_every_token_sees_only_the_tokens_before_it():
    """A change at any position t leaves the logits before t unchanged: the prompt of a segment is
    searched with a query from the previous segment, never from the segment itself (the authors'
    query from the segment's own first half would fail this inside every segment)."""
    model = hmt(sum_fraction=0.6)
    x = tokens(4 * L + 3)
    base = model(x).logits
    for t in range(1, x.shape[1]):
        y = x.clone()
        y[:, t:] = (y[:, t:] + 1) % V
        changed = model(y).logits
        torch.testing.assert_close(changed[:, :t], base[:, :t], rtol=1e-12, atol=1e-12, msg=lambda m: f"t={t}: {m}")
        assert (changed[:, t] - base[:, t]).abs().max() > 0


def test_state_size_is_prompt_cache_sensory_and_pending():
    model = HMT(V, 32, 1, segment_len=8, n_cache=5, n_sensory=3)
    assert model.state_size(10 ** 6) == (1 + 5 + 3 + 7) * 32
    assert model(torch.zeros(1, 19, dtype=torch.long)).state.num_floats() == model.state_size(19)
    assert HMT(V, 32, 1).search.recall_dim == 32  # recall_dim defaults to d_model


def test_rows_with_and_without_a_past_segment_run_in_groups():
    """One row fresh (no sensory tokens yet), one after a segment, at the same phase: the batch
    equals each row run alone."""
    model = hmt()
    a = model.init_state(1)
    b = model(tokens(L, seed=3, b=1)).state
    x = tokens(2 * L + 1, seed=5)
    together = model(x, State.cat([a, b]))
    alone = [model(x[:1], a), model(x[1:], b)]
    torch.testing.assert_close(together.logits, torch.cat([o.logits for o in alone]), rtol=1e-12, atol=1e-12)
    for (k, t), (_, u) in zip(together.state.tensors(), State.cat([o.state for o in alone]).tensors()):
        torch.testing.assert_close(t, u, rtol=1e-12, atol=1e-12, msg=k)


def test_truncated_bptt_detaches_prompt_cache_and_sensory_tokens():
    """Three segments, a loss on the last: with full BPTT its gradient reaches the first segment's
    embeddings (through the prompt, the cache and the sensory tokens); with bptt_segments=k only
    the last k + 1 segments'. The forward pass is the same."""
    x = tokens(3 * L)
    full = gradient_by_segment(hmt(), x, L)
    assert (full > 0).all(), full
    for k in (0, 1):
        grad = gradient_by_segment(hmt(bptt_segments=k), x, L)
        assert (grad[2 - k:] > 0).all() and (grad[:2 - k] == 0).all(), (k, grad)
    torch.testing.assert_close(hmt(bptt_segments=0)(x).logits, hmt()(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("options, phrase", [
    (dict(n_cache=0), "n_cache"), (dict(n_sensory=L), "n_sensory"), (dict(n_sensory=-1), "n_sensory"),
    (dict(n_sensory=True), "n_sensory"), (dict(recall_dim=0), "recall_dim"), (dict(sum_fraction=0), "sum_fraction"),
    (dict(sum_fraction=1.5), "sum_fraction"), (dict(sum_fraction=True), "sum_fraction"),
    (dict(sum_fraction=0.05), "sum_fraction"), (dict(segment_len=0), "segment_len"),
    (dict(bptt_segments=-1), "bptt_segments")])
def test_bad_options_are_named(options, phrase):
    with pytest.raises(ValueError, match=phrase):
        HMT(V, D, 1, **{"segment_len": L, **options})


def test_hmt_learns_to_carry_a_pair_across_segments():
    """One key-value pair in the first segment of 4, the query in the second (no sensory tokens,
    so only the memory carries it): exact match from chance (1/16) to >= 0.9 in 120 steps
    (measured: 1.0 by step 80; about 3 s on one thread of a busy 2-core machine)."""
    from recur.config import RunConfig
    from recur.training.trainer import train

    cfg = {"task": {"name": "associative_retrieval", "args": {"key_size": 1}, "seq_len": 8},
           "model": {"arch": "hmt", "mixer": "attention", "d_model": 32, "n_layers": 1,
                     "args": {"segment_len": 4, "n_cache": 4, "n_sensory": 0}},
           "optim": {"steps": 120, "batch_size": 32, "lr": 3e-3, "early_stop": None},
           "eval": {"lengths": [8], "batches": 4}, "device": "cpu", "seed": 0}
    result = train(RunConfig.model_validate(cfg), progress=False)
    assert result.metrics["8"]["exact_match"] >= 0.9, result.metrics
    assert result.train_loss < 0.5 * result.curve[0][1]


def test_recur_run_trains_hmt(db, capsys):
    argv = ["run", "--task", "associative_retrieval", "--task-arg", "key_size=1", "--arch", "hmt",
            "--model", "attention", "--d-model", "16", "--n-layers", "1", "--seq-len", "16",
            "--eval-lengths", "16,32", "--steps", "4", "--batch-size", "8", "--eval-batches", "1", "--device", "cpu",
            "--set", "model.args.segment_len=4", "--set", "model.args.n_cache=3", "--set", "model.args.n_sensory=1",
            "--db", str(db), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["metrics"]) == {"16", "32"} and result["steps"] == 4
    assert result["state_size"] == (1 + 3 + 1 + 3) * 16
