"""relaxed_recursive: the sharing strategies, the conversion of a causal_lm (average init, SVD init
recovering the original at full rank, random LoRA starting at plain tying, no tying = the original),
the adapters reaching every Linear of gla / attention / lstm blocks, state carry with every strategy,
and the command-line route ``model.args.init_from=<checkpoint>``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recur.models.causal_lm import CausalLM
from recur.models.lora import lora_linears
from recur.models.relaxed_recursive import RelaxedRecursive, loop_indices, sharing_order

V, D = 11, 16


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _trained_like(lm: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter (norm gains included) moved off its initial value, so the layers all differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return lm


def _lm(pattern="gla", n_layers=4, seed=0, **kw) -> CausalLM:
    torch.manual_seed(seed)
    return _trained_like(CausalLM(V, D, n_layers, pattern=pattern, **kw).double(), seed)


def _tokens(batch=2, time=9, seed=1):
    return torch.randint(0, V, (batch, time), generator=torch.Generator().manual_seed(seed))


def _equalise_unrelaxed(lm: CausalLM, order: list[int]) -> None:
    """Give the tied layers equal copies of what the LoRA does not relax (norms, biases, raw weight
    tensors): the full-rank SVD conversion is then exact (everything else is averaged)."""
    layers = lm.backbone.layers
    linear_weights = {f"{n}.weight" for n, m in layers[0].named_modules() if isinstance(m, nn.Linear)}
    first = {}
    for i, j in enumerate(order):
        first.setdefault(j, i)
    with torch.no_grad():
        for i, j in enumerate(order):
            src = dict(layers[first[j]].named_parameters())
            for name, p in layers[i].named_parameters():
                if name not in linear_weights:
                    p.copy_(src[name])


# ------------------------------------------------------------------ strategies
def test_sharing_strategies_give_the_papers_layer_orders():
    assert sharing_order("cycle", 6, 3) == [0, 1, 2, 0, 1, 2]
    assert sharing_order("sequence", 6, 3) == [0, 0, 1, 1, 2, 2]
    assert sharing_order("middle_cycle", 6, 4) == [0, 1, 2, 1, 2, 3]
    assert sharing_order("middle_cycle", 8, 5) == [0, 1, 2, 3, 1, 2, 3, 4]
    assert sharing_order("middle_cycle", 4, 4) == [0, 1, 2, 3]
    assert loop_indices([0, 1, 2, 1, 2, 3]) == [0, 0, 0, 1, 1, 0]
    assert loop_indices([0, 0, 1, 1]) == [0, 1, 0, 1]


@pytest.mark.parametrize("strategy,n_layers,n_unique,match", [
    ("ring", 4, 2, "strategy must be one of cycle, sequence, middle_cycle"),
    ("cycle", 6, 4, "multiple of n_unique"),
    ("sequence", 4, 3, "multiple of n_unique"),
    ("middle_cycle", 6, 2, "n_unique must be >= 3"),
    ("middle_cycle", 7, 4, "multiple of the 2 middle blocks"),
    ("cycle", 2, 3, "n_unique must be <= n_layers"),
    ("cycle", 2, 0, "n_unique must be a positive int"),
])
def test_bad_sharing_options_are_clear_errors(strategy, n_layers, n_unique, match):
    with pytest.raises(ValueError, match=match):
        RelaxedRecursive(V, D, n_layers, pattern="gla", n_unique=n_unique, strategy=strategy)


def test_other_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="mixers differ"):
        RelaxedRecursive(V, D, 4, pattern=["gla", "attention", "attention", "gla"], n_unique=2)
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        RelaxedRecursive(V, D, 2, pattern="gla", lora_rank=-1)
    with pytest.raises(ValueError, match="'svd' needs the original layers"):
        RelaxedRecursive(V, D, 2, pattern="gla", lora_init="svd")
    with pytest.raises(ValueError, match="lora_init must be one of random, svd"):
        RelaxedRecursive.from_causal_lm(_lm(), n_unique=2, lora_rank=2, lora_init="kaiming")
    with pytest.raises(TypeError, match="converts a causal_lm"):
        RelaxedRecursive.from_causal_lm(RelaxedRecursive(V, D, 2, pattern="gla"), n_unique=1)


def test_a_pattern_that_repeats_with_the_blocks_is_accepted():
    model = RelaxedRecursive(V, D, 4, pattern=["gla", "attention"], n_unique=2, strategy="cycle")
    assert [b.mixer.name for b in model.backbone.blocks] == ["gla", "attention"]
    assert len(model.mixers) == 4 and model.mixers[2] is model.mixers[0]


def test_parameters_are_those_of_the_unique_blocks_plus_the_adapters():
    tied = RelaxedRecursive(V, D, 6, pattern="gla", n_unique=2)
    untied = CausalLM(V, D, 6, pattern="gla")
    block = sum(p.numel() for p in untied.backbone.blocks[0].parameters())
    outside = sum(p.numel() for p in untied.parameters()) - 6 * block
    assert sum(p.numel() for p in tied.parameters()) == outside + 2 * block
    relaxed = RelaxedRecursive(V, D, 6, pattern="gla", n_unique=2, lora_rank=2)
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for _, m in lora_linears(relaxed))
    per_use = sum(m.rank * (m.in_features + m.out_features) for _, m in lora_linears(relaxed.backbone.blocks[0]))
    assert lora == 2 * 3 * per_use  # 2 blocks x 3 uses each
    assert sum(p.numel() for p in relaxed.parameters()) == outside + 2 * block + lora


# ------------------------------------------------------------------ conversion
@pytest.mark.parametrize("pattern", ["gla", "attention", "lstm"])
@pytest.mark.parametrize("rank", [0, 3])
def test_without_tying_the_conversion_is_the_original(pattern, rank):
    lm = _lm(pattern)
    model = RelaxedRecursive.from_causal_lm(lm, n_unique=4, strategy="cycle", lora_rank=rank, lora_init="svd")
    x = _tokens()
    torch.testing.assert_close(model(x).logits, lm(x).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy,n_layers,n_unique", [("cycle", 4, 2), ("sequence", 4, 2), ("middle_cycle", 6, 4)])
def test_average_init_is_the_mean_of_the_tied_layers(strategy, n_layers, n_unique):
    lm = _lm("gla", n_layers=n_layers)
    model = RelaxedRecursive.from_causal_lm(lm, n_unique=n_unique, strategy=strategy)
    order = sharing_order(strategy, n_layers, n_unique)
    for j, block in enumerate(model.backbone.blocks):
        tied = [dict(lm.backbone.layers[i].named_parameters()) for i, s in enumerate(order) if s == j]
        for name, p in block.named_parameters():
            torch.testing.assert_close(p, sum(t[name] for t in tied) / len(tied), rtol=1e-14, atol=1e-14)
    for part in ("embed", "norm", "head"):
        for a, b in zip(getattr(model, part).parameters(), getattr(lm, part).parameters()):
            assert torch.equal(a, b) and a is not b  # copied, the original untouched


@pytest.mark.parametrize("pattern", ["gla", "attention", "lstm", "hgrn"])
@pytest.mark.parametrize("strategy,n_layers,n_unique", [("cycle", 4, 2), ("sequence", 4, 1), ("middle_cycle", 5, 3)])
def test_full_rank_svd_init_recovers_the_original_model(pattern, strategy, n_layers, n_unique):
    """W_shared + B A = W_layer for every Linear; what LoRA does not relax is made equal across the
    tied layers first (it is averaged otherwise). hgrn reads its projections' ``.weight`` itself."""
    # hgrn's forget-gate lower bound is a constant set by depth: the tied block has its first use's
    options = {"mixer_config": {"lower_bound": 0.25}} if pattern == "hgrn" else {}
    lm = _lm(pattern, n_layers=n_layers, **options)
    _equalise_unrelaxed(lm, sharing_order(strategy, n_layers, n_unique))
    model = RelaxedRecursive.from_causal_lm(lm, n_unique=n_unique, strategy=strategy, lora_rank=4 * D,
                                            lora_init="svd")
    x = _tokens()
    plain = RelaxedRecursive.from_causal_lm(lm, n_unique=n_unique, strategy=strategy)
    assert (plain(x).logits - lm(x).logits).abs().max() > 1e-3  # tying alone loses the layers' differences
    torch.testing.assert_close(model(x).logits, lm(x).logits, rtol=1e-10, atol=1e-10)


def test_low_rank_svd_init_approximates_each_layer_best_at_rank_r():
    lm = _lm("attention", n_layers=4)
    model = RelaxedRecursive.from_causal_lm(lm, n_unique=2, lora_rank=3, lora_init="svd")
    order, loops = model.backbone.order, model.loops
    for i, (j, k) in enumerate(zip(order, loops)):
        for name, lora in lora_linears(model.backbone.blocks[j]):
            lora.active = k
            target = lm.backbone.layers[i].get_submodule(name).weight
            s = torch.linalg.svdvals(target - lora.base.weight)
            err = torch.linalg.matrix_norm(lora.weight - target)
            torch.testing.assert_close(err, s[lora.rank:].square().sum().sqrt(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("pattern", ["gla", "attention", "lstm"])
def test_random_lora_starts_equal_to_plain_tying(pattern):
    lm = _lm(pattern)
    tied = RelaxedRecursive.from_causal_lm(lm, n_unique=2)
    relaxed = RelaxedRecursive.from_causal_lm(lm, n_unique=2, lora_rank=8, lora_init="random")
    assert all(torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) > 0
               for _, m in lora_linears(relaxed))
    x = _tokens()
    torch.testing.assert_close(relaxed(x).logits, tied(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["gla", "attention", "lstm"])
def test_the_adapters_reach_every_linear_of_the_block(pattern):
    """Every nn.Linear of the shared block (mixer projections and MLP) is wrapped, and every use's B
    gets a gradient (B = 0 at init: its gradient is nonzero only if x A^T B^T is on the path)."""
    model = RelaxedRecursive.from_causal_lm(_lm(pattern), n_unique=2, lora_rank=2, lora_init="random")
    for block in model.backbone.blocks:
        assert not [n for n, m in block.named_modules() if type(m) is nn.Linear and not n.endswith(".base")]
        names = [n for n, _ in lora_linears(block)]
        assert any(n.startswith("channel.") for n in names)
        if pattern != "lstm":  # lstm's weights are raw tensors: shared, not relaxed (module docstring)
            assert any(n.startswith("mixer.") for n in names)
    x = _tokens()
    model(x).logits.square().sum().backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            for k in range(p.shape[0]):
                assert p.grad[k].abs().max() > 0, f"{name}[{k}] gets no gradient"


def test_tying_layers_whose_constants_differ_warns():
    lm = _lm("hgrn", n_layers=4)  # lower bounds 0, 1/4, 1/2, 3/4 by depth
    expected = r"differ in their fixed settings.*layers 0, 2 \(keeping layer 0's\); layers 1, 3"
    with pytest.warns(UserWarning, match=expected):
        model = RelaxedRecursive.from_causal_lm(lm, n_unique=2)
    assert [b.mixer.lower_bound for b in model.backbone.blocks] == [0.0, 0.25]


def test_loop_embedding_starts_at_zero_and_then_counts():
    lm = _lm("gla")
    model = RelaxedRecursive.from_causal_lm(lm, n_unique=2, loop_embedding=True)
    plain = RelaxedRecursive.from_causal_lm(lm, n_unique=2)
    assert model.loop_embed.shape == (2, D) and torch.count_nonzero(model.loop_embed) == 0
    x = _tokens()
    torch.testing.assert_close(model(x).logits, plain(x).logits, rtol=0, atol=0)
    with torch.no_grad():
        model.loop_embed[1].normal_()
    assert (model(x).logits - plain(x).logits).abs().max() > 1e-3


# ------------------------------------------------------------------ state
@pytest.mark.parametrize("strategy,n_layers,n_unique", [("cycle", 4, 2), ("sequence", 4, 2), ("middle_cycle", 5, 3)])
@pytest.mark.parametrize("pattern", ["attention", "lstm"])
def test_state_carry_and_stepping_hold_with_every_strategy(strategy, n_layers, n_unique, pattern):
    model = RelaxedRecursive.from_causal_lm(_lm(pattern, n_layers=n_layers), n_unique=n_unique, strategy=strategy,
                                            lora_rank=3, lora_init="svd", loop_embedding=True)
    with torch.no_grad():
        model.loop_embed.normal_(0.0, 0.1)
    x = _tokens(time=7)
    full, state = model(x)
    assert sorted(state) == sorted(f"layer{i}" for i in range(n_layers))
    a, s = model(x[:, :3])
    b, s = model(x[:, 3:], s)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=1e-10, atol=1e-10)
    s, steps = None, []
    for t in range(x.shape[1]):
        y, s = model(x[:, t:t + 1], s)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    assert model.state_size(7) == n_layers * model.backbone.blocks[0].mixer.state_size(7)
    with pytest.raises(ValueError, match="n_layers=" + str(n_layers)):
        model(x, CausalLM(V, D, 1, pattern=pattern).init_state(2))


# ------------------------------------------------------------------ command line route
def test_init_from_a_checkpoint_converts_that_run_model(tmp_path):
    from harness_tasks import tiny

    from recur.generate import load_checkpoint
    from recur.training import Trainer, checkpoint

    torch.set_default_dtype(torch.float32)
    cfg = tiny(steps=4, early_stop=None)
    trainer = Trainer(cfg, progress=False)
    for _ in range(2):
        trainer.train_step()
    checkpoint.save(trainer, tmp_path / "step-000002")
    lm, task, _ = load_checkpoint(tmp_path / "step-000002", device="cpu")
    m = cfg.model
    args = {"init_from": str(tmp_path / "step-000002"), "n_unique": 1, "lora_rank": 2, "lora_init": "svd"}
    config = m.model_copy(update={"arch": "relaxed_recursive", "args": args})
    model = RelaxedRecursive.from_config(config, vocab_size=task.vocab_size)
    expected = RelaxedRecursive.from_causal_lm(lm, n_unique=1, lora_rank=2, lora_init="svd")
    assert model.training
    x = torch.randint(0, task.vocab_size, (2, 5))
    torch.testing.assert_close(model(x).logits, expected.eval()(x).logits, rtol=0, atol=0)
    other = m.model_copy(update={"arch": "relaxed_recursive", "d_model": m.d_model * 2, "args": args})
    with pytest.raises(ValueError, match="model.d_model"):
        RelaxedRecursive.from_config(other, vocab_size=task.vocab_size)
    without = m.model_copy(update={"arch": "relaxed_recursive", "args": {"init_from": args["init_from"]}})
    with pytest.raises(ValueError, match="n_unique"):
        RelaxedRecursive.from_config(without, vocab_size=task.vocab_size)
