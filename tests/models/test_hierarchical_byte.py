"""hierarchical_byte: the word splitter, the whole-call path against byte-by-byte stepping, causality
across word boundaries, packed documents, and the word-level shift (float64)."""

from __future__ import annotations

import pytest
import torch

from recur.models.hierarchical_byte import HierarchicalByte, split_words

SPACE = 3  # the boundary id of the small models (random tokens of 11 ids)


def ids(text: str) -> list[int]:
    return list(text.encode())


def model(pattern="gla", **kw) -> HierarchicalByte:
    torch.manual_seed(0)
    m = HierarchicalByte(vocab_size=11, d_model=16, n_layers=2, pattern=pattern, boundary=SPACE, **kw).double()
    for mixer in m.mixers:
        if hasattr(mixer, "chunk_size"):
            mixer.chunk_size = 4
    return m


def tokens(b=3, t=29, seed=1) -> torch.Tensor:
    return torch.randint(11, (b, t), generator=torch.Generator().manual_seed(seed))


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("text, words", [
    ("the cat", ["the ", "cat"]),
    ("the  cat ", ["the ", " ", "cat "]),     # a run of spaces: one-byte words
    (" a", [" ", "a"]),
    ("   ", [" ", " ", " "]),
    ("word", ["word"]),                        # unfinished: no boundary yet
    ("", []),
])
def test_split_words_on_hand_strings(text, words):
    assert split_words(ids(text)) == [ids(w) for w in words]


def test_split_words_with_several_boundaries_and_a_bos():
    bos = 256
    assert split_words([bos, *ids("a\nbc d")], boundary=[32, 10]) == [[bos, *ids("a\n")], ids("bc "), ids("d")]


def word_vectors(m, x):
    """The encoder's word vector at each position (the word backbone reads those at boundaries)."""
    seen = []
    handle = m.to_word.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        m(x)
    finally:
        handle.remove()
    return seen[0]


def test_the_encoder_restarts_at_every_word_so_a_word_vector_reads_its_own_bytes_only():
    m = model()
    a = torch.tensor([[1, 2, SPACE, 5, 6, SPACE, SPACE, 7, 8, SPACE]])
    b = torch.tensor([[9, 9, 4, SPACE, 5, 6, SPACE, SPACE, 7, 8]])  # other first word, same later words
    va, vb = word_vectors(m, a), word_vectors(m, b)
    close(va[0, 5], vb[0, 6], "word '5 6 _' after different words")
    close(va[0, 6], vb[0, 7], "the one-space word")
    close(va[0, 8], vb[0, 9], "an unfinished word's bytes")
    assert not torch.allclose(va[0, 2], vb[0, 3])  # different words differ


@pytest.mark.parametrize("pattern, byte_pattern", [("gla", None), ("attention", None), (["gla", "attention"], "lstm"),
                                                   ("gla", "attention")])
def test_whole_call_equals_byte_by_byte_stepping_with_resets(pattern, byte_pattern):
    """Rows finish different numbers of words (the word backbone runs per group, full attention's
    caches are padded to join): stepping one byte at a time gives the same logits and state."""
    m = model(pattern, byte_pattern=byte_pattern)
    x = tokens()
    resets = torch.zeros_like(x, dtype=torch.bool)
    resets[0, 5] = resets[1, 17] = resets[1, 18] = resets[2, 0] = True
    whole = m(x, resets=resets)
    state, outs = None, []
    for t in range(x.shape[1]):
        out = m(x[:, t:t + 1], state, resets=resets[:, t:t + 1])
        outs.append(out.logits)
        state = out.state
    close(torch.cat(outs, 1), whole.logits, "stepping")
    # the state after stepping carries on as the whole call's
    y = tokens(seed=2, t=11)
    close(m(y, state).logits, m(y, whole.state).logits, "after the stepped state")


def test_fast_modes_equal_the_recurrent_reference_in_a_batch_of_uneven_word_counts():
    fast, ref = model(), model()
    ref.set_mode("recurrent")
    x = tokens()
    close(fast(x).logits, ref(x).logits, "fast vs recurrent")


@pytest.mark.parametrize("pattern", ["gla", "attention"])
def test_changing_a_later_byte_never_changes_earlier_logits(pattern):
    m = model(pattern)
    x = tokens(b=1, t=20, seed=4)
    x[0, [2, 6, 7, 13]] = SPACE
    base = m(x).logits
    for t in range(x.shape[1]):
        for new in (SPACE, (int(x[0, t]) + 1) % 11):  # to or from a boundary, or another letter
            y = x.clone()
            y[0, t] = new
            if torch.equal(x, y):
                continue
            close(m(y).logits[:, :t], base[:, :t], f"logits before {t} after changing byte {t}")


def test_the_next_words_first_byte_reads_the_word_just_finished_through_the_word_backbone():
    """The shift: at a boundary the decoder restarts, so its prediction of the next word's first byte
    depends on the earlier words through the word backbone only; inside a word the decoder reads
    that word's bytes and the word-level output before it."""
    m = model()
    x = torch.tensor([[1, 2, SPACE, 5, 6, SPACE, 7, 8]])
    y = x.clone()
    y[0, 3] = 9  # a byte of word 1
    lx, ly = m(x).logits, m(y).logits
    close(lx[:, :3], ly[:, :3], "before the change")
    assert not torch.allclose(lx[:, 5], ly[:, 5])  # word 1 reaches the next word's first byte
    # cut the word backbone: zeroing its output projection leaves the decoder blind to earlier words
    with torch.no_grad():
        m.to_byte.weight.zero_()
        m.to_byte.bias.zero_()
    close(m(x).logits[:, 5:], m(y).logits[:, 5:], "after the boundary, with no word-level signal")


@pytest.mark.parametrize("pattern", ["gla", "attention"])
def test_resets_restart_everything_at_a_document_start(pattern):
    """A packed row (a reset inside a word, one on a boundary byte) equals its documents alone."""
    m = model(pattern)
    x = tokens(b=1, t=24, seed=5)
    x[0, [3, 9, 14]] = SPACE
    resets = torch.zeros_like(x, dtype=torch.bool)
    starts = [7, 14, 20]  # 7: inside a word; 14: a boundary byte
    resets[0, starts] = True
    whole = m(x, resets=resets).logits
    cuts = [0, *starts, x.shape[1]]
    alone = torch.cat([m(x[:, a:b]).logits for a, b in zip(cuts[:-1], cuts[1:])], dim=1)
    close(whole, alone, "packed vs alone")
    assert not torch.allclose(m(x).logits[:, 8:], whole[:, 8:])  # without resets the past is read


def test_the_text_task_batch_trains_it():
    from recur.tasks.text import Text

    task = Text(corpus="prose")
    batch = task.batch(2, 64, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = HierarchicalByte(vocab_size=task.vocab_size, d_model=16, n_layers=1, pattern="gla")
    out = m(batch.inputs, resets=batch.resets)
    loss = m.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="boundary"):
        HierarchicalByte(vocab_size=11, d_model=16, n_layers=1, boundary=32)
    with pytest.raises(ValueError, match="boundary"):
        HierarchicalByte(vocab_size=11, d_model=16, n_layers=1, boundary=[])
    with pytest.raises(ValueError, match="encoder_layers"):
        HierarchicalByte(vocab_size=11, d_model=16, n_layers=1, boundary=3, encoder_layers=0)
    with pytest.raises(ValueError, match="word backbone"):
        HierarchicalByte(vocab_size=11, d_model=16, n_layers=1, boundary=3, pattern="swa")
    HierarchicalByte(vocab_size=11, d_model=16, n_layers=1, boundary=3, pattern="gla", byte_pattern="swa")


def test_mixer_options_go_to_the_backbones_that_have_the_mixer():
    m = HierarchicalByte(vocab_size=11, d_model=16, n_layers=1, boundary=3, pattern="gla", byte_pattern="swa",
                         mixer_config={"swa": {"window": 4}})
    assert m.encoder.mixers[0].attention_window() == 4 and m.decoder.mixers[0].attention_window() == 4
    with pytest.raises(ValueError, match="mamba2"):
        HierarchicalByte(vocab_size=11, d_model=16, n_layers=1, boundary=3, mixer_config={"mamba2": {"d_state": 4}})
