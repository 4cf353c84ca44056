"""``save_pretrained`` / ``from_pretrained`` round-trip every registered causal mixer bit for bit
(safetensors, offline, through the Auto classes); the config rebuilds the architecture from recur's
own model config; recur models and checkpoints convert; what cannot be a causal LM is refused."""

from __future__ import annotations

import json

import pytest
import torch
from hf_util import CAUSAL_MIXERS, greedy, make, prompts
from transformers import AutoConfig, AutoModelForCausalLM

import recur
from recur.config import ModelConfig, RunConfig, config_hash
from recur.hf import BOS, RecurConfig, RecurForCausalLM


def roundtrip(model, path):
    model.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("mixer", CAUSAL_MIXERS)
def test_save_and_load_is_bit_identical(mixer, tmp_path):
    model = make(mixer)
    loaded = roundtrip(model, tmp_path)
    assert type(loaded) is RecurForCausalLM and (tmp_path / "model.safetensors").exists()
    assert_same_weights(model, loaded)
    x = prompts()
    assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("extra", [{"tie_embeddings": True}, {"arch": "looped_lm", "args": {"n_loops": 3}},
                                   {"n_layers": 3, "mixer": ["mamba", "swa", "lstm"], "block": {"mlp": "rwkv4"},
                                    "mixer_args": {"swa": {"window": 4}}},
                                   {"n_layers": 2, "args": {"shared_blocks": 1}}])
def test_tied_looped_and_hybrid_models_round_trip(extra, tmp_path):
    extra = {"mixer": "gla", **extra}
    model = make(dtype=torch.float64, **extra)
    loaded = roundtrip(model, tmp_path)
    assert_same_weights(model, loaded)
    assert loaded.dtype == torch.float64
    if extra.get("tie_embeddings"):
        assert loaded.lm.head.weight is loaded.lm.embed.weight  # tied again, not two copies
    x = prompts()
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert torch.equal(greedy(loaded, x, 4), model.lm.generate(x, 4))


def test_the_config_holds_the_whole_recur_model_config(tmp_path):
    model = make("gla", n_layers=2, mixer_args={"n_heads": 2}, block={"mlp": "gelu", "ratio": 2.0})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "recur" and saved["architectures"] == ["RecurForCausalLM"]
    assert ModelConfig.model_validate(saved["recur_model"]) == ModelConfig(
        mixer="gla", d_model=16, n_layers=2, mixer_args={"n_heads": 2}, block={"mlp": "gelu", "ratio": 2.0})
    assert saved["use_cache"] is True and saved["hidden_size"] == 16 and saved["num_hidden_layers"] == 2
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, RecurConfig) and config.model_config() == model.config.model_config()
    assert RecurConfig().recur_model is None  # transformers builds a default config to diff against


def test_from_recur_wraps_the_model_itself():
    cfg = RunConfig(task="harness_shift", model="gla", d_model=16, n_layers=1)
    torch.manual_seed(0)
    lm = recur.CausalLM.from_config(cfg.model, vocab_size=32)
    model = RecurForCausalLM.from_recur(lm, cfg)
    assert model.lm is lm and model.config.vocab_size == 32
    assert model.config.model_config() == cfg.model
    with pytest.raises(ValueError, match="does not match its config"):
        RecurForCausalLM.from_recur(lm, cfg.model.model_copy(update={"d_model": 32}))
    with pytest.raises(ValueError, match="does not match its config"):
        RecurForCausalLM.from_recur(lm, cfg.model, vocab_size=40)
    with pytest.raises(TypeError, match="looped_lm"):
        RecurForCausalLM.from_recur(lm, cfg.model.model_copy(update={"arch": "looped_lm"}))


@pytest.mark.parametrize("model,message", [
    ({"mixer": "bidirectional"}, "'bidirectional' is not causal"),
    ({"mixer": ["gla", "bidirectional"], "n_layers": 2}, "'bidirectional' is not causal"),
    ({"mixer": "gla", "arch": "encoder"}, "'encoder' is not a causal language model.*causal_lm.*looped_lm"),
    ({"mixer": "glaa"}, "Did you mean 'gla'"),
    ({"mixer": "gla", "d_model": 0}, "d_model"),
])
def test_what_cannot_be_a_causal_lm_is_refused_when_configured(model, message):
    with pytest.raises(ValueError, match=message):
        RecurConfig(recur_model=model, vocab_size=32)


def test_the_hf_size_fields_are_derived_and_a_contradiction_is_refused():
    config = RecurConfig(recur_model=ModelConfig(mixer="gla", d_model=16, n_layers=3, tie_embeddings=True),
                         vocab_size=32)
    assert (config.hidden_size, config.num_hidden_layers, config.tie_word_embeddings) == (16, 3, True)
    with pytest.raises(ValueError, match="hidden_size=64 contradicts the recur model"):
        RecurConfig(recur_model={"mixer": "gla", "d_model": 16}, vocab_size=32, hidden_size=64)
    with pytest.raises(ValueError, match="tie_word_embeddings=True contradicts"):
        RecurConfig(recur_model={"mixer": "gla"}, vocab_size=32, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="vocab_size must be an int >= 2"):
        RecurConfig(recur_model={"mixer": "gla"}, vocab_size=1)


def test_a_config_without_a_recur_model_cannot_build_one():
    with pytest.raises(ValueError, match="holds no recur model"):
        RecurForCausalLM(RecurConfig())


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    from recur.training import Trainer

    root = tmp_path_factory.mktemp("ckpt")
    cfg = RunConfig(task="text", task_args={"corpus": "prose"}, model="gru", d_model=16, n_layers=1, seq_len=32,
                    steps=3, batch_size=4, eval_batches=1, mlp=None, device="cpu", early_stop=None)
    trainer = Trainer(cfg, progress=False, checkpoint_dir=root / config_hash(cfg), checkpoint_every=3)
    trainer.fit()
    return root, trainer


def test_from_checkpoint_loads_a_text_run_with_bos_as_its_special_tokens(text_checkpoint, tmp_path):
    root, trainer = text_checkpoint
    model = RecurForCausalLM.from_checkpoint(root)
    assert not model.training and model.config.model_config() == trainer.cfg.model
    assert model.config.vocab_size == 257 and model.config.bos_token_id == model.config.eos_token_id == BOS
    assert_same_weights(model.lm, trainer.model)
    prompt = torch.tensor([[BOS, *b"def "]])
    trainer.model.eval()
    expected = trainer.model.generate(prompt, 12)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False)
    # generate stops at a generated BOS (eos): the document ended, as `recur generate` stops there
    assert torch.equal(out[0], expected[0, :out.shape[1]])
    assert out.shape[1] == expected.shape[1] or out[0, -1] == BOS
    loaded = roundtrip(model, tmp_path)
    assert torch.equal(loaded(prompt).logits, model(prompt).logits)


def test_from_pretrained_loads_in_the_dtype_asked_for(tmp_path):
    """Every floating parameter in that dtype, Mamba's explicitly float32 A_log included."""
    model = make("mamba")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert_same_weights(model.double(), loaded)


def test_a_checkpoint_missing_weights_is_refused_not_loaded_with_garbage(tmp_path):
    """transformers would "initialise" a missing weight with the model's _init_weights; recur's
    weights come from their mixer's constructor only, so a missing one is an error."""
    from safetensors.torch import load_file, save_file

    make("gla").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["lm.backbone.blocks.0.channel.up.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks weights of a Linear"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
