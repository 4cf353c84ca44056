"""megabyte: the whole-call path against byte-by-byte stepping, causality across patch boundaries,
patches counted from each document's start, and P = 1 as a flat byte LM (float64)."""

from __future__ import annotations

import pytest
import torch

from recur.models.megabyte import Megabyte


def model(pattern="gla", patch_size=3, **kw) -> Megabyte:
    torch.manual_seed(0)
    m = Megabyte(vocab_size=11, d_model=16, n_layers=2, pattern=pattern, patch_size=patch_size, local_d_model=8,
                 **kw).double()
    for mixer in m.mixers:
        if hasattr(mixer, "chunk_size"):
            mixer.chunk_size = 4
    return m


def tokens(b=3, t=29, seed=1) -> torch.Tensor:
    return torch.randint(11, (b, t), generator=torch.Generator().manual_seed(seed))


def close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("pattern, local", [("gla", None), ("attention", None), (["attention", "gla"], "lstm"),
                                            ("gla", "attention")])
@pytest.mark.parametrize("patch_size", [1, 3, 4])
def test_whole_call_equals_byte_by_byte_stepping_with_resets(pattern, local, patch_size):
    """Resets mid-patch put rows out of phase (uneven patch counts: the global model runs per
    group); stepping one byte at a time gives the same logits, and the states carry on alike."""
    m = model(pattern, patch_size, local_pattern=local)
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
    assert torch.equal(state["fill"], whole.state["fill"]) and torch.equal(state["tail"], whole.state["tail"])
    y = tokens(seed=2, t=10)
    close(m(y, state).logits, m(y, whole.state).logits, "after the stepped state")


def test_fast_modes_equal_the_recurrent_reference():
    fast, ref = model(), model()
    ref.set_mode("recurrent")
    x = tokens()
    close(fast(x).logits, ref(x).logits, "fast vs recurrent")


@pytest.mark.parametrize("patch_size", [1, 3, 4])
def test_changing_a_later_byte_never_changes_earlier_logits(patch_size):
    m = model("attention", patch_size)
    x = tokens(b=1, t=17, seed=4)
    base = m(x).logits
    for t in range(x.shape[1]):
        y = x.clone()
        y[0, t] = (y[0, t] + 5) % 11
        changed = m(y).logits
        close(changed[:, :t], base[:, :t], f"logits before {t} after changing byte {t}")
        assert not torch.allclose(changed[:, t], base[:, t])  # byte t is read where it predicts t+1


def test_a_patch_reaches_the_global_model_only_once_it_is_complete():
    """The shift by one patch: changing byte 4 (in patch 1 = bytes 3..5, P = 3) reaches the local
    model of patch 1 directly, and other patches only through the global model, after byte 5."""
    m = model(patch_size=3)
    x = tokens(b=1, t=12, seed=6)
    y = x.clone()
    y[0, 4] = (y[0, 4] + 1) % 11
    with torch.no_grad():  # cut the global model's output: only the local path is left
        m.to_local.weight.zero_()
    lx, ly = m(x).logits, m(y).logits
    close(lx[:, :4], ly[:, :4], "before the change")
    assert not torch.allclose(lx[:, 4], ly[:, 4])  # the local model reads byte 4 (predicting byte 5)
    close(lx[:, 5:], ly[:, 5:], "later patches, with no global signal")


def test_patches_are_counted_from_each_document_start():
    m = model("attention", 4)
    x = tokens(b=1, t=23, seed=5)
    starts = [6, 7, 15]  # odd phases; 6, 7: a one-byte document
    resets = torch.zeros_like(x, dtype=torch.bool)
    resets[0, starts] = True
    whole = m(x, resets=resets)
    cuts = [0, *starts, x.shape[1]]
    close(whole.logits, torch.cat([m(x[:, a:b]).logits for a, b in zip(cuts[:-1], cuts[1:])], dim=1), "packed")
    assert int(whole.state["fill"]) == (23 - 15) % 4
    assert not torch.allclose(m(x).logits[:, 8:], whole.logits[:, 8:])


def test_patch_size_one_is_a_flat_byte_lm_with_a_one_position_local_stack():
    """P = 1: logits_t = head(norm(Local([s_local + W_l norm(c_t)]))) with c_t = Global([s, p(x_0) ..
    p(x_t)])_{t+1}, the local model reading one position at a time."""
    m = model(["attention", "gla"], patch_size=1, local_pattern="lstm")
    x = tokens(b=2, t=13, seed=7)
    g_in = torch.cat([m.start.expand(2, 1, -1), m.patch_embedding(x.reshape(-1, 1)).view(2, 13, -1)], dim=1)
    c, _ = m.glob(g_in)
    u = m.local_start + m.to_local(m.glob_norm(c[:, 1:]))  # [2, 13, d_local]
    h, _ = m.local(u.reshape(26, 1, -1))  # every position alone
    expected = m.head(m.norm(h)).view(2, 13, -1)
    close(m(x).logits, expected, "P = 1")


def test_the_text_task_batch_trains_it():
    from recur.tasks.text import Text

    task = Text(corpus="prose")
    batch = task.batch(2, 64, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    m = Megabyte(vocab_size=task.vocab_size, d_model=16, n_layers=1, pattern="attention", local_pattern="gla")
    out = m(batch.inputs, resets=batch.resets)
    loss = m.loss(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="patch_size"):
        Megabyte(vocab_size=11, d_model=16, n_layers=1, patch_size=0)
    with pytest.raises(ValueError, match="local_layers"):
        Megabyte(vocab_size=11, d_model=16, n_layers=1, local_layers=0)
    with pytest.raises(ValueError, match="global model"):
        Megabyte(vocab_size=11, d_model=16, n_layers=1, pattern="swa")
    with pytest.raises(ValueError, match="state"):
        model()(tokens(), model("attention").init_state(3))
