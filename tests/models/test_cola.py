"""CoLa: chains of a trained CausalLM's layers (skip / loop / reorder) and the MCTS that picks one per sample."""

from __future__ import annotations

import math

import pytest
import torch

from recur.models import CausalLM, LoopedLM
from recur.models.cola import cola_report, row, run_chain, search_chain
from recur.tasks import get_task


def _lm(n_layers: int = 3, pattern=("gla", "attention")):
    torch.manual_seed(0)
    return CausalLM(11, 16, n_layers, pattern=list(pattern)).double()


def _tokens(t: int = 9, n: int = 2):
    return torch.randint(11, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("t", [1, 9])
def test_the_identity_chain_is_the_model(t):
    lm = _lm()
    x = _tokens(t)
    assert torch.equal(run_chain(lm, x, (0, 1, 2)).logits, lm(x).logits)
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, -1] = True  # the sparse head: the same logits at those positions only
    sparse = run_chain(lm, x, (0, 1, 2), positions=mask).logits
    assert torch.equal(sparse, lm(x, positions=mask).logits)
    # against the full head: a matmul of other shape may round differently in the last bits
    torch.testing.assert_close(sparse, lm(x).logits[mask], rtol=1e-12, atol=1e-12)


def test_a_skip_chain_is_the_model_without_that_layer():
    lm = _lm()
    torch.manual_seed(5)
    small = CausalLM(11, 16, 2, pattern=["gla", "gla"]).double()  # layer 2 of lm is a gla layer
    weights = {k: v for k, v in lm.state_dict().items() if not k.startswith("backbone.blocks.")}
    for new, old in ((0, 0), (1, 2)):
        weights.update({k.replace(f"backbone.blocks.{old}.", f"backbone.blocks.{new}.", 1): v
                        for k, v in lm.state_dict().items() if k.startswith(f"backbone.blocks.{old}.")})
    small.load_state_dict(weights)
    x = _tokens()
    torch.testing.assert_close(run_chain(lm, x, (0, 2)).logits, small(x).logits, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(run_chain(lm, x, (0, 2)).logits, lm(x).logits)


def test_a_loop_chain_applies_the_block_twice_each_from_a_fresh_state():
    lm = _lm()
    lm.set_mode("recurrent")  # the recurrent form: a carried state would change the second pass
    x = _tokens()
    b0, b1 = lm.backbone.layers[0], lm.backbone.layers[1]
    h = lm.embed(x)
    h = b0(h)[0]
    h = b0(h)[0]
    h = b1(h)[0]
    out = run_chain(lm, x, (0, 0, 1))
    torch.testing.assert_close(out.logits, lm.head(lm.norm(h)), rtol=1e-12, atol=1e-12)
    assert set(out.state) == {"step0", "step1", "step2"}  # one memory per application


def test_reordered_chain_and_bad_chains():
    lm = _lm()
    x = _tokens()
    h = lm.embed(x)
    for i in (2, 0):
        h = lm.backbone.layers[i](h)[0]
    torch.testing.assert_close(run_chain(lm, x, (2, 0)).logits, lm.head(lm.norm(h)), rtol=1e-12, atol=1e-12)
    for bad in ((), (3,), (0, -1), "01", (True,), 1):
        with pytest.raises(ValueError, match="chain"):
            run_chain(lm, x, bad)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="causal_lm"):
        run_chain(LoopedLM(11, 16, 2, pattern="gla", n_loops=2), x, (0, 1))


class _Counting:
    """A contrived scorer: 1 on the chains in ``good``, else 0; counts its calls."""

    def __init__(self, good):
        self.good, self.calls = good, []

    def __call__(self, chain):
        self.calls.append(chain)
        return 1.0 if self.good(chain) else 0.0


def test_edit_search_finds_a_skip_and_loop_chain():
    scorer = _Counting(lambda c: c == (0, 0, 2))  # skip layer 1, loop layer 0: two edits from (0, 1, 2)
    found = search_chain(scorer=scorer, n_layers=3, budget=300, seed=0)
    assert found.chain == (0, 0, 2) and found.score == 1.0 and found.depth == 3
    assert scorer.calls[0] == (0, 1, 2) and found.stats["static_score"] == 0.0  # the static model first


def test_append_search_finds_a_reordering():
    found = search_chain(scorer=_Counting(lambda c: c == (2, 0)), n_layers=3, budget=300, max_depth=3,
                         actions="append", seed=0)
    assert found.chain == (2, 0) and found.score == 1.0


@pytest.mark.parametrize("actions", ["edit", "append"])
def test_the_shortest_chain_wins_at_equal_score(actions):
    found = search_chain(scorer=_Counting(lambda c: 2 in c), n_layers=3, budget=200, max_depth=4,
                         actions=actions, seed=3)
    assert found.chain == (2,) and found.depth == 1


@pytest.mark.parametrize("actions", ["edit", "append"])
def test_deterministic_given_the_seed_and_budget_respected(actions):
    runs = []
    for _ in range(2):
        scorer = _Counting(lambda c: len(c) == 2 and c[0] > c[1])
        found = search_chain(scorer=scorer, n_layers=4, budget=37, actions=actions, seed=11)
        runs.append((found, scorer.calls))
        assert len(scorer.calls) <= 37 and len(set(scorer.calls)) == len(scorer.calls)  # cached per chain
        assert found.stats["simulations"] == 37 and found.stats["evaluations"] == len(scorer.calls)
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    one = search_chain(scorer=_Counting(lambda c: True), n_layers=4, budget=1, actions=actions)
    assert one.stats["evaluations"] == 1


def test_bad_search_options_name_the_option():
    s = _Counting(lambda c: True)
    for kwargs, name in (({"budget": 0}, "budget"), ({"actions": "swap"}, "actions"), ({"max_depth": 2}, "max_depth"),
                         ({"exploration": -1.0}, "exploration"), ({"length_penalty": math.nan}, "length_penalty"),
                         ({"max_block": 0}, "max_block"), ({"n_layers": 0}, "n_layers")):
        with pytest.raises(ValueError, match=name):
            search_chain(scorer=s, **{"n_layers": 3, **kwargs})
    with pytest.raises(ValueError, match="lm, task and batch"):
        search_chain()


def test_search_on_a_model_row_and_the_report():
    task = get_task("parity")
    torch.manual_seed(0)
    lm = CausalLM(task.vocab_size, 16, 2, pattern="gla").double()
    batch = task.batch(4, 8, torch.Generator().manual_seed(2), split="test")
    found = search_chain(lm, task, row(batch, 0), budget=20, seed=0)
    assert found.stats["evaluations"] <= 20 and 1 <= found.depth <= 4 and found.score >= found.stats["static_score"]
    report = cola_report(lm, task, [batch], budget=20, seed=0)
    per_row = [task.score(lm(batch.inputs[r:r + 1]).logits, row(batch, r))["exact_match"] for r in range(4)]
    assert report["rows"] == 4 and report["static_accuracy"] == pytest.approx(sum(per_row) / 4)
    assert report["cola_accuracy"] >= report["static_accuracy"]  # the identity chain is always a candidate
    assert report["cola_depth"] == pytest.approx(sum(len(c) for c in report["chains"]) / 4)
    with pytest.raises(ValueError, match="metric"):
        search_chain(lm, task, row(batch, 0), budget=2, metric="f1")


def test_the_module_runs_on_a_saved_checkpoint(tmp_path, capsys):
    import json

    from recur.config import RunConfig
    from recur.models.cola import main
    from recur.training.trainer import Trainer
    cfg = RunConfig.model_validate({"task": {"name": "chain_addition", "seq_len": 6},
                                    "model": {"mixer": "gla", "d_model": 16, "n_layers": 2},
                                    "optim": {"steps": 3, "batch_size": 4}, "eval": {"batches": 1}, "device": "cpu"})
    Trainer(cfg, progress=False, checkpoint_dir=tmp_path, checkpoint_every=3).fit()
    report = main(["--checkpoint", str(tmp_path), "--rows", "3", "--budget", "5", "--json"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["rows"] == 3 and printed["budget"] == 5 and len(report["chains"]) == 3
    assert printed["cola_accuracy"] >= printed["static_accuracy"]
