"""The diffusion-forcing (wavefront) sampler for recurrent_depth: with r full iterations per committed
token it gives exactly model.generate's tokens (float64, recurrent and attention mixers, seeded and
zero s_0, greedy and sampled); a model whose drafts are right after one iteration emits one token
per pass after an r - 1 pass warm-up; fewer iterations or the latent exit differ gracefully."""

from __future__ import annotations

import pytest
import torch

from recur.models.parallel_sampler import agreement, parallel_generate
from recur.models.recurrent_depth import RecurrentDepth

V, D = 11, 16


def model(**options) -> RecurrentDepth:
    torch.manual_seed(0)
    kw = dict(n_layers=1, pattern="gla", n_loops=3, mean_loops=None, init="seeded", init_std=0.5)
    return RecurrentDepth(V, D, **{**kw, **options}).double().eval()


def prompt(b: int = 2, t: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pattern", ["gla", "attention"])
@pytest.mark.parametrize("init", ["seeded", "zeros"])
def test_full_iterations_equal_the_plain_sampler(pattern, init):
    m = model(pattern=pattern, init=init)
    p = prompt()
    out, stats = parallel_generate(m, p, 10)
    assert torch.equal(out, m.generate(p, 10))
    assert stats["tokens"] == 10 and stats["mean_iterations"] == 3.0
    assert m.n_loops == 3 and m.exit_threshold is None  # the model is left as it was


@pytest.mark.parametrize("r", [1, 2, 4])
def test_iterations_equal_the_plain_sampler_at_that_depth(r):
    m = model(n_layers=2, n_prelude=2, pattern=["gla", "attention"])
    p = prompt(b=1, t=3)
    out, _ = parallel_generate(m, p, 8, iterations=r)
    m.n_loops = r
    assert torch.equal(out, m.generate(p, 8))


def test_sampling_equals_the_plain_sampler_with_the_same_generator():
    m = model()
    p = prompt()
    out, _ = parallel_generate(m, p, 9, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    ref = m.generate(p, 9, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, ref)


def test_the_exit_of_a_model_with_the_kl_exit_is_off_and_restored():
    m = model(exit_threshold=1e-3)
    p = prompt()
    out, _ = parallel_generate(m, p, 6)
    assert m.exit_threshold == 1e-3
    m.exit_threshold = None
    assert torch.equal(out, m.generate(p, 6))


def settled_model(r: int) -> RecurrentDepth:
    """A model whose latent is the prelude's output from the first iteration on (adapter = [0 | I],
    a core that adds nothing), so every draft is already the committed token."""
    m = model(n_loops=r)
    with torch.no_grad():
        for q in m.core.parameters():
            q.zero_()
        m.adapter.weight.copy_(torch.cat([torch.zeros(D, D), torch.eye(D)], dim=1))
    return m


@pytest.mark.parametrize("r", [1, 2, 4])
def test_one_token_per_pass_after_warm_up(r):
    m = settled_model(r)
    p = prompt()
    n = 9
    out, stats = parallel_generate(m, p, n)
    assert torch.equal(out, m.generate(p, n))
    assert stats["restarts"] == 0
    # the first token comes from the prompt; the next n - 1 after r - 1 passes of warm-up, one a pass
    assert stats["passes"] == r - 1 + n - 1
    assert stats["emitted"] == [0] * (r - 1) + [1] * (n - 1)
    # every pass after the first r - 1 refines r positions at once, in one batched core call (gla)
    assert stats["core_calls"] == stats["passes"]


def test_a_changing_draft_restarts_and_costs_passes():
    m = model()  # random weights: drafts after one iteration are rarely the final token
    out, stats = parallel_generate(m, prompt(), 8)
    assert stats["restarts"] > 0
    assert stats["passes"] > 3 - 1 + 8 - 1
    assert all(e <= 1 for e in stats["emitted"])  # r iterations each: at most one position completes a pass


def test_fewer_iterations_differ_gracefully():
    m = model(n_loops=4)
    p = prompt(b=3, t=5)
    full = m.generate(p, 12)
    scores = []
    for r in (1, 2, 4):
        out, stats = parallel_generate(m, p, 12, iterations=r)
        assert out.shape == full.shape and torch.equal(out[:, :5], p)
        assert stats["mean_iterations"] == r
        scores.append(agreement(out, full, 5))
    assert all(0.0 <= a <= 1.0 for a in scores) and scores[-1] == 1.0


def test_latent_exit():
    m = model(n_loops=4)
    p = prompt()
    never, s0 = parallel_generate(m, p, 7, exit_threshold=0.0)  # a change below 0 never happens
    assert torch.equal(never, m.generate(p, 7)) and s0["mean_iterations"] == 4.0
    early, s1 = parallel_generate(m, p, 7, exit_threshold=1e9)  # every position commits at depth 2
    assert s1["mean_iterations"] == 2.0 and early.shape == never.shape
    assert 0.0 <= agreement(early, never, 4) <= 1.0
    # a settled model exits at depth 2 and still gives the plain tokens (its frozen latents are final)
    sm = settled_model(4)
    out, s2 = parallel_generate(sm, p, 7, exit_threshold=1e-6)
    assert torch.equal(out, sm.generate(p, 7)) and s2["mean_iterations"] == 2.0


def test_edges():
    m = model()
    p = prompt(t=1)
    out, stats = parallel_generate(m, p, 0)
    assert torch.equal(out, p) and stats["passes"] == 0
    out, stats = parallel_generate(m, p, 1)
    assert torch.equal(out, m.generate(p, 1)) and stats["passes"] == 0


def test_agreement():
    a = torch.tensor([[1, 2, 3, 4]])
    assert agreement(a, torch.tensor([[1, 2, 3, 0]]), 2) == 0.5
    assert agreement(a, a, 4) == 1.0
    with pytest.raises(ValueError, match="one shape"):
        agreement(a, a[:, :3], 2)


def test_bad_options():
    m = model()
    p = prompt()
    with pytest.raises(ValueError, match="iterations"):
        parallel_generate(m, p, 3, iterations=0)
    with pytest.raises(ValueError, match="exit_threshold"):
        parallel_generate(m, p, 3, exit_threshold=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        parallel_generate(m, p, -1)
    with pytest.raises(ValueError, match="prompt"):
        parallel_generate(m, p[:, :0], 3)
    with pytest.raises(TypeError, match="recurrent_depth"):
        parallel_generate(torch.nn.Linear(2, 2), p, 3)
    m.train()
    with pytest.raises(ValueError, match="eval"):
        parallel_generate(m, p, 3)
