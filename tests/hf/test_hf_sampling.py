"""Sampling and beam search through transformers' ``generate``: a fixed torch seed reproduces a
sample; temperature and top-k shape the distribution exactly as recur's own sampler does
(logits / T, then all but the k largest masked); beam search keeps each beam's own state
(``RecurCache.reorder_cache``) and returns the likeliest sequences as recur's logits score them."""

from __future__ import annotations

import itertools

import pytest
import torch
from hf_util import greedy, make, prompts, sequence_logprob

from recur import State
from recur.hf import RecurCache


def sample(model, x, seed, **kw):
    torch.manual_seed(seed)
    return model.generate(x, do_sample=True, max_new_tokens=8, **kw)


def test_sampling_with_a_fixed_torch_seed_is_reproducible():
    model = make("gla")
    x = prompts()
    a, b = sample(model, x, 3, temperature=1.0), sample(model, x, 3, temperature=1.0)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(model, x, 4, temperature=1.0))


@pytest.mark.parametrize("mixer", ["lstm", "attention"])
def test_temperature_and_top_k_shape_the_distribution_as_recur_does(mixer):
    """The scores transformers samples from (softmax of them) are recur's logits of the sampled
    sequence divided by the temperature, with every token outside the top k at -inf; each
    sampled token is among the top k."""
    model = make(mixer)
    x = prompts()
    torch.manual_seed(0)
    out = model.generate(x, do_sample=True, temperature=0.5, top_k=3, max_new_tokens=6,
                         output_scores=True, return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        logits = model.lm(seq).logits
    for step, scores in enumerate(out.scores):
        at = logits[:, x.shape[1] - 1 + step]
        top = at.topk(3, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        assert torch.equal(torch.isfinite(scores), keep), f"step {step}: not the top-3 tokens"
        torch.testing.assert_close(scores[keep], (at / 0.5)[keep], rtol=1e-5, atol=1e-5)
        assert bool(keep.gather(1, seq[:, x.shape[1] + step, None]).all()), f"step {step}: sampled outside top-3"


def test_top_k_one_samples_the_greedy_tokens():
    model = make("mamba")
    x = prompts()
    assert torch.equal(sample(model, x, 0, top_k=1, temperature=0.7), greedy(model, x, 8))


def test_num_return_sequences_samples_each_prompt_independently():
    model = make("gla")
    x = prompts()
    out = sample(model, x, 0, num_return_sequences=3, temperature=1.0)
    assert out.shape == (6, 13)
    assert torch.equal(out[:, :5], x.repeat_interleave(3, dim=0))
    assert len({tuple(r) for r in out[:3, 5:].tolist()}) > 1  # three samples, not one copied


def test_reorder_cache_moves_each_rows_state():
    """Row i of the reordered cache is row beam_idx[i]'s state: continuing from it gives the
    logits that continuing row beam_idx[i] gives."""
    model = make("gla", n_layers=2)
    x = prompts(3)
    cache = model(x, use_cache=True).cache
    before = dict(cache.state.tensors())
    order = torch.tensor([2, 0, 0])
    cache.reorder_cache(order)
    for name, t in cache.state.tensors():
        assert torch.equal(t, before[name][order]), name
    nxt = prompts(3, 1, seed=5)
    got = model(nxt, cache=cache).logits
    want = model(nxt, cache=RecurCache(State(model.lm(x).state).select(order), seen=5)).logits
    assert torch.equal(got, want)
    expected = torch.cat([model.lm(torch.cat([x[i:i + 1], nxt[j:j + 1]], 1)).logits[:, -1:]
                          for j, i in enumerate(order)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixer", ["lstm", "gla", "attention"])
def test_beam_search_with_enough_beams_finds_the_brute_force_best(mixer):
    """Vocabulary 4, 3 new tokens, 16 beams: every 2-token prefix survives as a beam, so beam search
    is exact and must return the best of all 64 continuations, scored by recur's own logits.
    A beam continuing another beam's state (a wrong reorder) scores a different sequence."""
    model = make(mixer, vocab=4, dtype=torch.float64)
    x = prompts(1, 3, vocab=4)
    out = model.generate(x, num_beams=16, num_return_sequences=16, max_new_tokens=3, do_sample=False,
                         length_penalty=0.0, output_scores=True, return_dict_in_generate=True)
    every = torch.tensor([list(x[0]) + list(c) for c in itertools.product(range(4), repeat=3)])
    scores = sequence_logprob(model.lm, every, 3)
    best = scores.argmax()
    assert torch.equal(out.sequences[0], every[best])
    torch.testing.assert_close(out.sequences_scores[0].double(), scores[best], rtol=1e-6, atol=1e-6)
    # and every returned beam's score is recur's score of that sequence
    torch.testing.assert_close(out.sequences_scores.double(), sequence_logprob(model.lm, out.sequences, 3),
                               rtol=1e-6, atol=1e-6)
    assert torch.equal(out.sequences_scores, out.sequences_scores.sort(descending=True).values)


@pytest.mark.parametrize("mixer", ["mamba2", "attention"])
def test_three_beams_return_their_sequences_likeliest_first(mixer):
    model = make(mixer)
    x = prompts()
    new = 5
    out = model.generate(x, num_beams=3, num_return_sequences=3, max_new_tokens=new, do_sample=False,
                         output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (6, 10)
    # length_penalty 1 (the default): a beam's score is its log-probability over its new tokens' count
    recur_scores = sequence_logprob(model.lm, out.sequences, 5) / new
    torch.testing.assert_close(out.sequences_scores.double(), recur_scores, rtol=1e-5, atol=1e-5)
    for row in range(2):
        beams = recur_scores[3 * row:3 * row + 3]
        assert int(beams.argmax()) == 0 and len({tuple(s) for s in out.sequences[3 * row:3 * row + 3].tolist()}) == 3
    # one beam is greedy search's sequence or better
    greedy_score = sequence_logprob(model.lm, greedy(model, x, new), 5) / new
    assert bool((recur_scores.view(2, 3)[:, 0] >= greedy_score - 1e-6).all())
