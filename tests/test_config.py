"""RunConfig and SweepConfig: nested sections, every key validated, the hash stable across upgrades,
sweeps expand to the grid (any nested key an axis)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from harness_tasks import tiny
from pydantic import Field

from recur.config import OptimConfig, RunConfig, Section, SweepConfig, config_hash, to_nested

# Configs whose names must never change: a change here makes every store forget its finished runs.
# They were run with the head tied to the embedding and stopped the moment the early-stop rule held,
# the defaults until 0.4: written with the new defaults they say so (model.tie_embeddings: true,
# optim.early_stop_patience: 0) and keep their names.
GOLDEN = [
    (dict(task="mqar", model={"mixer": "gla", "tie_embeddings": True}, task_args={"b": 1, "a": [1, 2]},
          early_stop_patience=0),
     "9bf78d2968a24a97"),
    (dict(task={"name": "parity", "seq_len": 16}, model={"mixer": "lstm", "d_model": 32, "n_layers": 1,
                                                          "block": {"mlp": None}, "tie_embeddings": True},
          optim={"lr": 3e-3, "steps": 1500, "early_stop_patience": 0}),
     "b206d863eca4e31d"),
    (dict(task="parity", model={"arch": "looped_lm", "mixer": "gla", "args": {"n_loops": 3}, "tie_embeddings": True},
          training=["state_noise", {"name": "tbptt", "k1": 16}], early_stop_patience=0), "dfbeca0c8ea12f4b"),
    (dict(task="mqar", model={"mixer": ["mamba", "swa"], "tie_embeddings": True}, model_args={"swa": {"window": 32}},
          seed=3, eval_lengths=[64, 512], early_stop_patience=0),
     "491b17788399d3ce"),
]


def test_the_untied_head_default_is_a_new_run_and_builds_untied():
    from recur.training.trainer import build

    old = RunConfig(task="parity", model={"mixer": "gla", "tie_embeddings": True})
    new = RunConfig(task="parity", model="gla")
    assert new.model.tie_embeddings is False and config_hash(new) != config_hash(old)
    _, untied = build(new)
    _, tied = build(old)
    assert untied.head.weight is not untied.embed.weight and tied.head.weight is tied.embed.weight
    # the architecture option given the old way still wins
    _, legacy = build(RunConfig(task="parity", model={"mixer": "gla", "args": {"tie_embeddings": True}}))
    assert legacy.head.weight is legacy.embed.weight
    with pytest.raises(ValueError, match="tie_embeddings"):
        build(RunConfig(task="parity", model={"arch": "encoder", "mixer": "gla", "tie_embeddings": True}))


@pytest.mark.parametrize("fields,golden", GOLDEN)
def test_golden_hashes_never_change(fields, golden):
    cfg = RunConfig(**fields)
    assert config_hash(cfg) == golden
    assert config_hash(RunConfig.model_validate_json(cfg.model_dump_json())) == golden  # a stored run renames to itself


def test_hash_is_independent_of_argument_order_and_shape():
    cfg = RunConfig(task="mqar", model="gla", task_args={"b": 1, "a": [1, 2]})
    assert config_hash(cfg) == config_hash(RunConfig(model="gla", task_args={"a": [1, 2], "b": 1}, task="mqar"))
    nested = RunConfig(task={"name": "mqar", "args": {"a": [1, 2], "b": 1}}, model={"mixer": "gla"})
    dotted = RunConfig(**to_nested({"task.name": "mqar", "task.args": {"a": [1, 2], "b": 1}, "model.mixer": "gla"}))
    assert config_hash(cfg) == config_hash(nested) == config_hash(dotted)
    assert len(config_hash(cfg)) == 16 and int(config_hash(cfg), 16) >= 0


def _with_optim(optim_cls: type[OptimConfig]) -> type[RunConfig]:
    class Later(RunConfig):  # the RunConfig of a later release, with this optim section
        optim: optim_cls = Field(default_factory=optim_cls)  # type: ignore[valid-type]

    return Later


def test_adding_an_option_with_a_default_keeps_every_hash():
    class OptimPlus(OptimConfig):
        FROZEN: ClassVar[dict[str, Any]] = {**OptimConfig.FROZEN, "beta2": 0.95}
        beta2: float = 0.95

    Later = _with_optim(OptimPlus)
    for fields, golden in GOLDEN:
        assert config_hash(Later(**fields)) == golden
    assert config_hash(Later(**GOLDEN[0][0], optim={"beta2": 0.99})) != GOLDEN[0][1]  # a value that differs names a new run


def test_a_changed_default_never_shares_a_hash_with_the_old_default():
    class OptimNewDefault(OptimConfig):  # a later release changes the default lr; FROZEN keeps 1e-3
        lr: float = 3e-3

    Later = _with_optim(OptimNewDefault)
    old_default, new_default = RunConfig(task="parity", model="lstm"), Later(task="parity", model="lstm")
    assert old_default.optim.lr == 1e-3 and new_default.optim.lr == 3e-3
    assert config_hash(new_default) != config_hash(old_default)
    # the old run, written with the new defaults, keeps its name
    assert config_hash(Later(task="parity", model="lstm", lr=1e-3)) == config_hash(old_default)


def test_a_field_without_a_frozen_value_cannot_be_added():
    with pytest.raises(TypeError, match="no FROZEN value"):
        class Bad(Section):  # noqa: F841
            x: int = 1


def test_method_options_hash_by_value_and_frozen_defaults_drop_out():
    a = tiny(training=["state_noise"])
    assert config_hash(a) == config_hash(tiny(training=[{"name": "state_noise", "std": 1.0}]))
    assert config_hash(a) != config_hash(tiny(training=[{"name": "state_noise", "std": 0.5}]))
    assert config_hash(a) == config_hash(tiny(state_init="noise"))  # the flat shape of the first release


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"lr": 2e-3}, {"d_model": 32}, {"n_layers": 3}, {"steps": 31}, {"seq_len": 9},
    {"eval_lengths": [8, 64]}, {"task_args": {"lag": 2}}, {"model_args": {"x": 1}}, {"model": "lstm"},
    {"state_init": "noise"}, {"state_passing": True}, {"mlp": "swiglu"}, {"weight_decay": 0.0}, {"warmup": 5},
    {"arch": "looped_lm"}, {"model.block.norm": "layernorm"}, {"model.args": {"n_loops": 3}},
    {"training": [{"name": "tbptt", "k1": 4}]}, {"training": ["gradient_noise"]}, {"eval_batches": 2},
])
def test_hash_changes_with_every_field(change):
    assert config_hash(tiny(**change)) != config_hash(tiny())


def test_equal_values_hash_equal():
    assert config_hash(tiny(lr=0.01)) == config_hash(tiny(lr=1e-2))
    assert config_hash(tiny(eval_lengths=[32, 8])) == config_hash(tiny(eval_lengths=[8, 32]))
    assert config_hash(tiny()) == config_hash(tiny(eval_lengths=[8, 32]))  # the default, written out
    assert config_hash(tiny()) == config_hash(tiny(**{"optim.weight_decay": 0.1}))  # a default written out


def test_defaults_warmup_and_sections():
    cfg = RunConfig(task="parity", model="lstm", seq_len=50)
    assert cfg.eval.lengths == [50, 200] and cfg.model.d_model == 64 and cfg.optim.steps == 2000
    assert cfg.optim.batch_size == 64 and cfg.model.arch == "causal_lm" and cfg.model.block.mlp == "swiglu"
    assert cfg.warmup_steps() == 200
    assert RunConfig(task="parity", model="lstm", warmup=30).warmup_steps() == 30
    assert RunConfig(task="parity", model=["mamba", "swa"]).model_name == "mamba+swa"
    assert RunConfig(task="parity", model="gla", arch="looped_lm").model_name == "looped_lm:gla"
    both = RunConfig(task="parity", model="lstm", state_init="noise", state_noise_std=0.5, state_passing=True)
    assert [m.name for m in both.training] == ["state_passing", "state_noise"]
    assert both.method("state_noise").params().std == 0.5


@pytest.mark.parametrize("bad,key", [
    ({"steps": 0}, "optim.steps"), ({"lr": -1}, "optim.lr"), ({"state_init": "ones"}, "state_init"),
    ({"eval_lengths": [0]}, "eval.lengths"), ({"colour": 1}, "colour"), ({"model.block.mlp": "glu"}, "model.block.mlp"),
    ({"model.block.norm": "batchnorm"}, "model.block.norm"), ({"training": ["tbpt"]}, "training.0"),
    ({"training": [{"name": "tbptt", "k1": 8, "k2": 4}]}, "training.0"), ({"optim.lrr": 1}, "optim.lrr"),
])
def test_bad_values_are_rejected_naming_the_key(bad, key):
    from pydantic import ValidationError

    from recur.config import config_problems

    with pytest.raises(ValueError) as info:
        tiny(**bad)
    text = config_problems(info.value) if isinstance(info.value, ValidationError) else str(info.value)
    assert key in text


def test_unknown_method_suggests_the_close_name():
    with pytest.raises(ValueError, match="Did you mean 'tbptt'"):
        tiny(training=["tbpt"])


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
    assert all(r.optim.steps == 100 for r in runs)
    assert {r.task.seq_len for r in runs if r.task.name == "mqar"} == {128}
    assert {r.optim.lr for r in runs if r.model.mixer == ["mamba", "swa"]} == {5e-3}
    assert {(r.model.d_model, r.model.n_layers) for r in runs} == {(32, 2), (64, 4)}
    assert SweepConfig.model_validate({"models": "lstm", "tasks": "parity", "lrs": [1e-3, 1e-3]}).expand() == \
        [RunConfig(task="parity", model="lstm", lr=1e-3)]  # duplicates removed


def test_sweep_axes_name_any_nested_key_and_shared_sections_merge():
    sweep = SweepConfig.model_validate({
        "models": [{"name": "gla", "arch": "looped_lm", "overrides": {"model.args": {"n_loops": 2}}}, "lstm"],
        "tasks": ["parity"],
        "axes": {"model.block.mlp": ["swiglu", "gelu"], "training": [[], ["state_noise"]]},
        "optim": {"steps": 50, "batch_size": 8},
        "optim.lr": 2e-3,
        "state_noise_std": 0.5,
    })
    runs = sweep.expand()
    assert len(runs) == 2 * 2 * 2
    assert all(r.optim.steps == 50 and r.optim.batch_size == 8 and r.optim.lr == 2e-3 for r in runs)
    assert {(r.model.arch, r.model.block.mlp, len(r.training)) for r in runs} == {
        (a, m, n) for a in ("looped_lm", "causal_lm") for m in ("swiglu", "gelu") for n in (0, 1)}
    assert all(r.model.args == {"n_loops": 2} for r in runs if r.model.arch == "looped_lm")


def test_sweep_legacy_interventions_combine_across_shared_and_overrides():
    sweep = SweepConfig.model_validate({"models": [{"name": "lru", "overrides": {"state_init": "noise"}}],
                                        "tasks": ["parity"], "state_noise_std": 0.25})
    (run,) = sweep.expand()
    assert run.method("state_noise").params().std == 0.25


def test_sweep_rejects_unknown_keys(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text("models: [lstm]\ntasks: [parity]\nstep: 10\n")
    with pytest.raises(ValueError, match="unknown sweep key 'step'"):
        SweepConfig.from_yaml(path)
    path.write_text("models: [lstm]\ntasks: [parity]\naxes: {optim.stepz: [1, 2]}\n")
    with pytest.raises(ValueError, match="optim.stepz"):
        SweepConfig.from_yaml(path).expand()


def test_the_findings_sweeps_expand_to_registered_runs():
    from pathlib import Path

    import recur
    from recur.registry import resolve_pattern

    files = sorted((Path(__file__).resolve().parent.parent / "docs" / "findings").glob("*.yaml"))
    assert files
    for path in files:
        runs = SweepConfig.from_yaml(path).expand()
        assert runs, path
        for r in runs:
            resolve_pattern(r.model.mixer)
            assert r.task.name in recur.TASKS
