"""The calls lm-eval-harness's ``HFLM`` makes of a causal LM, without lm-eval itself (it is not a
test dependency; the example in ``recur.hf``'s docstring was run by hand against lm-eval 0.4.13).

``HFLM.loglikelihood`` encodes (context, continuation) pairs, drops the last token of each,
right-pads a batch with zeros and calls ``model(input_ids).logits`` with no attention mask; the
score of a continuation is the sum of its tokens' log-softmax at the positions before them, and
``is_greedy`` says whether each is the argmax. For that to be right, a row's logits must not
depend on the pads after it, nor on the other rows. ``generate_until`` left-pads with an
attention mask: the generate tests cover that."""

from __future__ import annotations

import pytest
import torch
from hf_util import make

from recur import corpus
from recur.hf import byte_tokenizer, padding_resets

PAIRS = [("The cat sat on the", " mat"), ("1 + 1 =", " 2"), ("def f(x):\n    return", " x * x"),
         ("", "hello")]


def hflm_loglikelihoods(model, requests: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """lm-eval 0.4's ``HFLM._loglikelihood_tokens`` for a causal LM, one batch, in its own steps."""
    inps = [torch.tensor((ctx + cont)[:-1]) for ctx, cont in requests]
    width = max(len(i) for i in inps)
    batch = torch.stack([torch.cat([i, i.new_zeros(width - len(i))]) for i in inps])  # right padding, id 0
    with torch.no_grad():
        logp = torch.log_softmax(model(batch).logits, dim=-1, dtype=torch.float64)
    out = []
    for row, (inp, (_, cont)) in enumerate(zip(inps, requests)):
        picked = logp[row, len(inp) - len(cont):len(inp)]
        target = torch.tensor(cont)
        out.append((float(picked.gather(1, target[:, None]).sum()), bool((picked.argmax(-1) == target).all())))
    return out


def stepped_loglikelihood(lm, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The same score by recur alone, reading one token at a time with the carried state."""
    return _stepped(lm, ctx, cont)


@torch.no_grad()
def _stepped(lm, ctx, cont):
    logits, state = lm(torch.tensor([ctx]))
    total, greedy = 0.0, True
    for token in cont:
        logp = logits[0, -1].double().log_softmax(-1)
        total += float(logp[token])
        greedy &= int(logp.argmax()) == token
        logits, state = lm(torch.tensor([[token]]), state)
    return total, greedy


@pytest.mark.parametrize("mixer", ["lstm", "gla", "mamba2", "attention", "rwkv7"])
def test_right_padded_batch_logits_are_each_sequences_own(mixer):
    model = make(mixer, vocab=257, n_layers=2, dtype=torch.float64)
    rows = [torch.randint(0, 257, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]
    batch = torch.stack([torch.cat([r, r.new_zeros(9 - len(r))]) for r in rows])
    logits = model(batch).logits
    for i, r in enumerate(rows):
        torch.testing.assert_close(logits[i, :len(r)], model(r[None]).logits[0], rtol=1e-12, atol=1e-12)


def test_a_right_padding_mask_changes_no_logit_and_needs_no_reset():
    """A mask of right padding (what a collator gives a scoring or training batch) leaves the
    logits of the real tokens as they are without it; only its cache is not to be continued."""
    model = make("lstm")
    x = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    assert padding_resets(mask, x) == (None, True)
    out = model(x, attention_mask=mask)
    assert torch.equal(out.logits, model(x).logits) and out.cache.unusable is not None


@pytest.mark.parametrize("mixer", ["gru", "gated_deltanet", "swa"])
def test_hflm_loglikelihoods_equal_recur_stepping_through_the_continuation(mixer):
    """Contexts as HFLM encodes them with add_bos_token=True (an empty context is BOS alone, its
    prefix token), continuations without special tokens."""
    model = make(mixer, vocab=257, dtype=torch.float64)
    tok = byte_tokenizer()
    requests = [(tok(c).input_ids, tok(x, add_special_tokens=False).input_ids) for c, x in PAIRS]
    assert requests[-1][0] == [corpus.BOS]
    got = hflm_loglikelihoods(model, requests)
    for (ctx, cont), (score, greedy) in zip(requests, got):
        want_score, want_greedy = stepped_loglikelihood(model.lm, ctx, cont)
        assert score == pytest.approx(want_score, rel=1e-10, abs=1e-10) and greedy == want_greedy
    # a continuation recur would generate greedily is "greedy" for HFLM too
    ctx = requests[0][0]
    cont = model.lm.generate(torch.tensor([ctx]), 4)[0, len(ctx):].tolist()
    assert hflm_loglikelihoods(model, [(ctx, cont)])[0][1] is True
