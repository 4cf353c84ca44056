"""RunConfig and SweepConfig: the hash names the full config, stably; sweeps expand to the grid."""

from __future__ import annotations

import pytest
from harness_tasks import tiny

from recur.config import RunConfig, SweepConfig, config_hash


def test_hash_is_stable_across_versions_and_argument_order():
    # A literal: any change to the canonical form (renamed field, new default) changes every
    # run's name and makes old stores unresumable, so it must be a deliberate change.
    cfg = RunConfig(task="mqar", model="gla", task_args={"b": 1, "a": [1, 2]})
    assert config_hash(cfg) == config_hash(RunConfig(model="gla", task_args={"a": [1, 2], "b": 1}, task="mqar"))
    assert config_hash(cfg) == config_hash(RunConfig.model_validate_json(cfg.model_dump_json()))
    assert len(config_hash(cfg)) == 16 and int(config_hash(cfg), 16) >= 0
    assert config_hash(cfg) == "fb4d3ba1f6ff27b2"


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"lr": 2e-3}, {"d_model": 32}, {"n_layers": 3}, {"steps": 31}, {"seq_len": 9},
    {"eval_lengths": [8, 64]}, {"task_args": {"lag": 2}}, {"model_args": {"x": 1}}, {"model": "lstm"},
    {"state_init": "noise"}, {"state_passing": True}, {"mlp": "swiglu"}, {"weight_decay": 0.0}, {"warmup": 5},
])
def test_hash_changes_with_every_field(change):
    assert config_hash(tiny(**change)) != config_hash(tiny())


def test_equal_values_hash_equal():
    assert config_hash(tiny(lr=0.01)) == config_hash(tiny(lr=1e-2))
    assert config_hash(tiny(eval_lengths=[32, 8])) == config_hash(tiny(eval_lengths=[8, 32]))
    assert config_hash(tiny()) == config_hash(tiny(eval_lengths=[8, 32]))  # the default, written out


def test_defaults_and_warmup():
    cfg = RunConfig(task="parity", model="lstm", seq_len=50)
    assert cfg.eval_lengths == [50, 200] and cfg.d_model == 64 and cfg.steps == 2000 and cfg.batch_size == 64
    assert cfg.warmup_steps() == 200
    assert RunConfig(task="parity", model="lstm", warmup=30).warmup_steps() == 30
    assert RunConfig(task="parity", model=["mamba", "swa"]).model_name == "mamba+swa"


def test_bad_values_are_rejected():
    for bad in ({"steps": 0}, {"lr": -1}, {"state_init": "ones"}, {"eval_lengths": [0]}, {"colour": 1}):
        with pytest.raises(ValueError):
            tiny(**bad)


def test_sweep_expands_the_grid_with_shared_fields_and_overrides():
    sweep = SweepConfig.model_validate({
        "models": ["lstm", {"name": ["mamba", "swa"], "overrides": {"lr": 5e-3}}],
        "tasks": ["parity", {"name": "mqar", "args": {"num_kv_pairs": 4}, "overrides": {"seq_len": 128}}],
        "sizes": [{"d_model": 32}, {"d_model": 64, "n_layers": 4}],
        "seeds": [0, 1],
        "steps": 100,
    })
    runs = sweep.expand()
    assert len(runs) == 2 * 2 * 2 * 2 and len({config_hash(r) for r in runs}) == len(runs)
    assert all(r.steps == 100 for r in runs)
    assert {r.seq_len for r in runs if r.task == "mqar"} == {128}
    assert {r.lr for r in runs if r.model == ["mamba", "swa"]} == {5e-3}
    assert {(r.d_model, r.n_layers) for r in runs} == {(32, 2), (64, 4)}
    assert SweepConfig.model_validate({"models": "lstm", "tasks": "parity", "lrs": [1e-3, 1e-3]}).expand() == \
        [RunConfig(task="parity", model="lstm", lr=1e-3)]  # duplicates removed


def test_sweep_rejects_unknown_keys(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("models: [lstm]\ntasks: [parity]\nstep: 10\n")
    with pytest.raises(ValueError, match="unknown sweep key 'step'"):
        SweepConfig.from_yaml(path)
