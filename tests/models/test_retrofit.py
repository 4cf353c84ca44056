"""retrofit: a causal_lm's layers become a recurrent_depth's prelude / core / coda (the paper's split:
first layers, the layers before the coda, the last layers), embedding, norm and head copied; the
adapter initialisations; at r = 1 with s_0 = 0 the model computes the original's layers exactly
(float64), with the final norm also before the coda (recurrent_depth's norm used twice)."""

from __future__ import annotations

import pytest
import torch

from recur.models.causal_lm import CausalLM
from recur.models.recurrent_depth import RecurrentDepth
from recur.models.retrofit import retrofit

V, D = 11, 16


def lm(n_layers: int = 8, pattern="gla", **options) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(V, D, n_layers, pattern=pattern, **options).double().eval()


def tokens(b: int = 2, t: int = 7) -> torch.Tensor:
    return torch.randint(V, (b, t), generator=torch.Generator().manual_seed(1))


def original_with_coda_norm(m: CausalLM, x: torch.Tensor, layers: list[int], coda: int) -> torch.Tensor:
    """The original's layers ``layers`` with its final norm applied once more before the last ``coda``."""
    h = m.embed(x)
    blocks = m.backbone.layers
    for n, i in enumerate(layers):
        if n == len(layers) - coda:
            h = m.norm(h)
        h = blocks[i](h)[0]
    return m.head(m.norm(h))


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_layers_are_copied_to_the_papers_split():
    m = lm(n_layers=10, pattern=["gla", "attention"])
    rd = retrofit(m, prelude=2, core=4, coda=2)
    assert isinstance(rd, RecurrentDepth)
    blocks = m.backbone.layers
    # prelude: layers 0-1; core: the 4 before the coda (4-7; 2-3 dropped); coda: the last 2 (8-9)
    for section, idx in ((rd.prelude, [0, 1]), (rd.core, [4, 5, 6, 7]), (rd.coda, [8, 9])):
        assert section.layer_names == [m.backbone.layer_names[i] for i in idx]
        assert all(same(a, blocks[i]) for a, i in zip(section.layers, idx))
    assert same(rd.embed, m.embed) and same(rd.norm, m.norm) and same(rd.head, m.head)
    assert rd.head.weight is not rd.embed.weight
    # copies, not the same tensors: training the retrofitted model leaves the lm as it was
    assert rd.core.layers[0].mixer is not blocks[4].mixer
    with torch.no_grad():
        next(rd.core.parameters()).add_(1.0)
    assert not torch.equal(next(rd.core.parameters()), next(blocks[4].parameters()))


def test_explicit_indices_and_tied_embeddings():
    m = lm(n_layers=6, tie_embeddings=True)
    rd = retrofit(m, prelude=[0], core=[2, 3], coda=[5])
    assert same(rd.core.layers[1], m.backbone.layers[3]) and same(rd.coda.layers[0], m.backbone.layers[5])
    assert rd.head.weight is rd.embed.weight and torch.equal(rd.embed.weight, m.embed.weight)


@pytest.mark.parametrize("pattern", ["gla", "attention"])
@pytest.mark.parametrize("split", [(2, 4, 2), (1, 2, 1), (3, 3, 2)])
def test_r1_with_zero_s0_is_the_original_with_the_coda_norm(pattern, split):
    m = lm(pattern=pattern)
    p, k, c = split
    rd = retrofit(m, *split, n_loops=1, mean_loops=None, init="zeros").eval()
    x = tokens()
    layers = list(range(p)) + list(range(8 - c - k, 8 - c)) + list(range(8 - c, 8))
    ref = original_with_coda_norm(m, x, layers, c)
    torch.testing.assert_close(rd(x).logits, ref, rtol=1e-12, atol=1e-12)
    if split == (2, 4, 2):  # no layer dropped: only the extra norm separates it from the lm itself
        assert not torch.allclose(rd(x).logits, m(x).logits)


def test_embedding_adapter_ignores_s0_and_sum_adapter_feeds_it_back():
    m = lm()
    x = tokens()
    e_only = retrofit(m, adapter="embedding", n_loops=1, mean_loops=None, init="seeded", init_std=1.0).eval()
    zeros = retrofit(m, adapter="sum", n_loops=1, mean_loops=None, init="zeros").eval()
    torch.testing.assert_close(e_only(x).logits, zeros(x).logits, rtol=1e-12, atol=1e-12)
    w = e_only.adapter.weight
    assert torch.equal(w[:, :D], torch.zeros(D, D, dtype=w.dtype)) and torch.equal(w[:, D:], torch.eye(D, dtype=w.dtype))
    assert torch.equal(zeros.adapter.weight[:, :D], torch.eye(D, dtype=w.dtype))
    # r = 2 with the sum adapter runs the core again on its output plus the embedding
    two = retrofit(m, adapter="sum", n_loops=2, mean_loops=None, init="zeros").eval()
    e, _ = two.prelude(two.embed(x))
    s, _ = two.core(e)
    s, _ = two.core(s + e)
    h, _ = two.coda(two.norm(s))
    torch.testing.assert_close(two(x).logits, two.head(two.norm(h)), rtol=1e-12, atol=1e-12)


def test_random_adapter_keeps_a_fresh_initialisation_and_dtype():
    rd = retrofit(lm(), adapter="random")
    assert rd.adapter.weight.dtype == torch.float64
    assert not torch.equal(rd.adapter.weight[:, D:], torch.eye(D, dtype=torch.float64))


def test_it_trains_and_streams():
    m = lm()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    rd = retrofit(m, n_loops=2, mean_loops=None, init="zeros")
    rd.train()
    x = tokens()
    out = rd(x)
    out.logits.sum().backward()
    assert rd.adapter.weight.grad is not None and rd.embed.weight.grad is not None
    rd.eval()
    full = rd(x).logits
    a = rd(x[:, :3])
    b = rd(x[:, 3:], a.state)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), full, rtol=1e-10, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items()) and not m.training


def test_bad_options():
    m = lm(n_layers=6)
    with pytest.raises(ValueError, match="exceed"):
        retrofit(m, 2, 4, 2)
    with pytest.raises(ValueError, match="adapter"):
        retrofit(m, 2, 2, 2, adapter="identity")
    with pytest.raises(ValueError, match="prelude"):
        retrofit(m, 0, 2, 2)
    with pytest.raises(ValueError, match="core"):
        retrofit(m, 1, [7], 1)
    with pytest.raises(ValueError, match="d_model"):
        retrofit(m, 1, 1, 1, d_model=8)
    with pytest.raises(TypeError, match="causal_lm"):
        retrofit(retrofit(m, 1, 1, 1), 1, 1, 1)
