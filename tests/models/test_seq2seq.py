"""seq2seq: the stream 'source SEP target' is an encoder over the source and a decoder from SEP that
attends to the source after every layer, exactly as one would write it apart; the memory carries
across calls and resets; errors are clear; greedy decoding is the stream continued."""

from __future__ import annotations

import pytest
import torch

from recur.models.seq2seq import Seq2Seq

V, SEP = 12, 1


def model(attention="additive", n_layers=2, pattern="gla", **kw):
    torch.manual_seed(0)
    return Seq2Seq(V, 16, n_layers, pattern=pattern, sep=SEP, attention=attention, max_source=8, **kw).double()


def by_hand(m: Seq2Seq, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The logits at the target positions: the encoder over the source alone, the decoder over the
    target alone from its zero state, each decoder layer followed by attention over every source output."""
    e, _ = m.encoder(m.embed(src))
    e = m.memory_norm(e)
    h = m.embed(tgt)
    state = m.decoder.init_state(tgt.shape[0], dtype=h.dtype)
    for i, block in enumerate(m.decoder.layers):
        h, _, _ = block(h, state[f"layer{i}"])
        valid = torch.ones(h.shape[0], h.shape[1], e.shape[1], dtype=torch.bool)
        h = h + m.cross[i](m.query_norms[i](h), e, valid)
    return m.head(m.norm(h))


@pytest.mark.parametrize("attention", ["additive", "dot"])
@pytest.mark.parametrize("pattern", ["gla", "lstm"])
def test_the_stream_is_an_encoder_decoder_with_attention(attention, pattern):
    m = model(attention, pattern=pattern)
    src = torch.tensor([[3, 4, 5, 6, 2]])
    tgt = torch.tensor([[SEP, 7, 8, 9, 10, 11, 7]])
    out = m(torch.cat([src, tgt], dim=1))
    torch.testing.assert_close(out.logits[:, src.shape[1]:], by_hand(m, src, tgt), rtol=1e-10, atol=1e-12)
    assert int(out.state["memory_len"]) == 5 and bool(out.state["seen_sep"])
    # a later SEP is a target token: the source and the memory stay as they were
    again = m(torch.cat([src, tgt, torch.tensor([[SEP, 3]])], dim=1))
    assert int(again.state["memory_len"]) == 5
    torch.testing.assert_close(again.logits[:, :12], out.logits, rtol=1e-12, atol=1e-12)


def test_calls_split_anywhere_equal_one_call_and_rows_have_their_own_sources():
    m = model()
    x = torch.tensor([[3, 4, SEP, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, SEP, 8, 9]])
    whole = m(x)
    for split in range(1, 8):
        a = m(x[:, :split])
        b = m(x[:, split:], a.state)
        torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), whole.logits, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b.state["memory"], whole.state["memory"], rtol=1e-10, atol=1e-12)
    assert whole.state["memory_len"].tolist() == [2, 5]
    alone = m(x[1:])
    torch.testing.assert_close(alone.logits, whole.logits[1:], rtol=1e-10, atol=1e-12)


def test_resets_start_a_new_source_and_memory():
    m = model()
    first, second = torch.tensor([[3, 4, SEP, 5, 6]]), torch.tensor([[7, SEP, 8, 9]])
    packed = torch.cat([first, second], dim=1)
    resets = torch.zeros_like(packed, dtype=torch.bool)
    resets[0, 0] = resets[0, 5] = True
    out = m(packed, resets=resets)
    torch.testing.assert_close(out.logits[:, 5:], m(second).logits, rtol=1e-10, atol=1e-12)
    assert int(out.state["memory_len"]) == 1  # the second document's one source token
    cont = m(torch.tensor([[5, 6]]), m(first).state)  # no reset: the stream continues the first document
    assert int(cont.state["memory_len"]) == 2


def test_source_longer_than_max_source_and_missing_sep_are_clear_errors():
    m = model()
    with pytest.raises(ValueError, match="max_source=8"):
        m(torch.full((1, 9), 3))
    with pytest.raises(ValueError, match="sep"):
        Seq2Seq(V, 16, 1, pattern="gla")
    with pytest.raises(ValueError, match="attention"):
        Seq2Seq(V, 16, 1, pattern="gla", sep=SEP, attention="cosine")
    with pytest.raises(ValueError, match="seq2seq state"):
        m(torch.tensor([[3]]), m.decoder.init_state(1))


def test_greedy_decoding_is_the_stream_continued_from_source_sep():
    m = model()
    prompt = torch.tensor([[3, 4, 5, SEP]])
    out = m.generate(prompt, 5)
    x = prompt
    for _ in range(5):  # the whole stream re-read each time: the same tokens
        x = torch.cat([x, m(x).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, x)


def test_a_transduction_task_gives_its_separator_and_seq2seq_learns_scan_primitives():
    from recur.config import RunConfig
    from recur.tasks.scan import SEP as SCAN_SEP
    from recur.training.trainer import Trainer, build

    cfg = RunConfig.model_validate({"task": {"name": "scan", "seq_len": 60},
                                    "model": {"arch": "seq2seq", "mixer": "lstm", "d_model": 32, "n_layers": 1},
                                    "optim": {"steps": 2, "batch_size": 4}, "eval": {"batches": 1, "lengths": [60]}})
    _, built = build(cfg)
    assert built.sep == SCAN_SEP
    assert set(Trainer(cfg, progress=False).fit().metrics["60"]) == {"accuracy", "exact_match"}
