"""``RecurForCausalLM.generate`` (transformers' loop) produces exactly recur's own tokens, for every
registered causal mixer; left-padded batches generate what each prompt alone does; padding that a
recurrent state cannot honour is refused, never read into the state."""

from __future__ import annotations

import pytest
import torch
from hf_util import CAUSAL_MIXERS, greedy, make, prompts

NEW = 6


@pytest.mark.parametrize("mixer", CAUSAL_MIXERS)
def test_greedy_generate_equals_recur_generate(mixer):
    model = make(mixer)
    x = prompts()
    assert torch.equal(greedy(model, x, NEW), model.lm.generate(x, NEW))


@pytest.mark.parametrize("arch,mixer,extra", [("looped_lm", "gla", {"args": {"n_loops": 2}}),
                                              ("causal_lm", "samba", {"n_layers": 2}),
                                              ("causal_lm", "gla", {"tie_embeddings": True})])
def test_greedy_generate_equals_recur_generate_for_other_architectures_and_hybrids(arch, mixer, extra):
    model = make(mixer, arch=arch, **extra)
    x = prompts()
    assert type(model.lm).name == arch
    assert torch.equal(greedy(model, x, NEW), model.lm.generate(x, NEW))


# One family each: nonlinear RNN, gated matrix state, selective SSM, delta rule, attention
# (KV cache), sliding-window attention, and an attention + recurrent hybrid.
PADDED = ["lstm", "gla", "mamba2", "gated_deltanet", "attention", "swa", "samba"]


@pytest.mark.parametrize("mixer", PADDED)
def test_a_left_padded_batch_generates_what_each_prompt_alone_does(mixer):
    model = make(mixer, n_layers=2, dtype=torch.float64)
    lengths = [6, 2, 4]
    x = prompts(3, 6)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, 6 - n:] = 1
    x = x.masked_fill(mask == 0, 7)  # the pad id is arbitrary: pads never reach the state
    out = greedy(model, x, NEW, attention_mask=mask)
    for row, n in enumerate(lengths):
        alone = model.lm.generate(x[row:row + 1, 6 - n:], NEW)
        assert torch.equal(out[row, 6:], alone[0, n:]), f"row {row} (prompt of {n}): padded batch vs alone"
    # the mask is what makes it so: read as tokens, the pads change what the padded rows generate
    assert not torch.equal(greedy(model, x, NEW)[1:, 6:], out[1:, 6:])
    # the pad tokens do not matter: other pad ids, same generation
    assert torch.equal(greedy(model, x.masked_fill(mask == 0, 0), NEW, attention_mask=mask)[:, 6:], out[:, 6:])


def test_generate_continues_from_a_returned_cache():
    """The cache of one call continues in the next (generate feeds only the tokens it has not
    read, by get_seq_length): 4 then 3 greedy tokens are the 7 of one call."""
    model = make("gla")
    x = prompts()
    first = model.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert first.cache.get_seq_length() == x.shape[1] + 3  # the last token is not read yet
    more = model.generate(first.sequences, cache=first.cache, max_new_tokens=3, do_sample=False)
    assert torch.equal(more, greedy(model, x, 7))


def test_right_padded_prompts_are_refused_not_generated_from():
    model = make("gla")
    x, mask = prompts(), torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match="right-padded.*left"):
        model.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("row,what", [([1, 0, 1, 1, 1], "padding between real tokens"),
                                      ([0, 0, 0, 0, 0], "no real token")])
def test_masks_a_state_cannot_honour_are_refused(row, what):
    model = make("lstm")
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0] = torch.tensor(row)
    with pytest.raises(ValueError, match=f"row 0 has {what}"):
        model(prompts(), attention_mask=mask)
    out = model(prompts(), use_cache=True)
    with pytest.raises(ValueError, match="padding among the tokens that continue a cache"):
        model(prompts(t=2), cache=out.cache, attention_mask=torch.tensor([[1] * 7, [1] * 6 + [0]]))


def test_a_mask_longer_than_the_input_without_a_cache_is_refused():
    with pytest.raises(ValueError, match="pass the cache of the previous call"):
        make("gla")(prompts(t=1), attention_mask=torch.ones(2, 5, dtype=torch.long))


def test_assisted_decoding_is_refused_for_a_stateful_model():
    model = make("gla")
    with pytest.raises(ValueError, match="stateful"):
        model.generate(prompts(), assistant_model=make("gla"), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate(prompts(), prompt_lookup_num_tokens=2, max_new_tokens=2)
    assert model.generate(prompts(), max_new_tokens=2).shape[1] == prompts().shape[1] + 2  # plain decoding still works
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        model(prompts(), use_cache=True).cache.crop(3)


def test_inputs_embeds_and_hidden_states_are_refused_clearly():
    model = make("gla")
    with pytest.raises(ValueError, match="token ids"):
        model(inputs_embeds=torch.zeros(1, 2, 16))
    with pytest.raises(ValueError, match="hidden states"):
        model(prompts(), output_hidden_states=True)
    with pytest.raises(TypeError, match="RecurCache"):
        model(prompts(), cache=object())


def test_logits_to_keep_and_return_dict_as_transformers_defines_them():
    model = make("gla")
    x = prompts()
    full = model(x).logits
    assert torch.equal(model(x, logits_to_keep=2).logits, full[:, -2:])
    assert torch.equal(model(x, logits_to_keep=torch.tensor([0, 3])).logits, full[:, [0, 3]])
    logits, cache = model(x, return_dict=False)
    assert torch.equal(logits, full) and cache.get_seq_length() == 5


def test_labels_give_the_shifted_cross_entropy():
    """What Trainer computes: mean over positions t of -log p(x_{t+1} | x_<=t); -100 ignored."""
    model = make("gla")
    x = prompts()
    labels = x.clone()
    labels[0, 2] = -100
    out = model(x, labels=labels)
    logits = model.lm(x).logits
    targets = labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), targets, ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
