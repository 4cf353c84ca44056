"""Shards of a sweep (``recur sweep --shard i/n``): disjoint, together the whole grid, decided by each
run's hash (so reordering or growing the grid moves no run to another shard), numbered 1 to n with
clear errors otherwise; n machines' shard stores merged are the single machine's sweep."""

from __future__ import annotations

import random

import pytest
import yaml
from harness_tasks import tiny

from recur.cli import main
from recur.config import SweepConfig, config_hash
from recur.results import ResultStore
from recur.sweep import parse_shard, shard


def _grid(seeds: int) -> list:
    return SweepConfig.model_validate({"models": ["elman", "lstm"], "tasks": ["harness_shift"],
                                       "seeds": list(range(seeds)), "lrs": [1e-3, 1e-2]}).expand()


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_shards_are_disjoint_cover_the_grid_and_ignore_its_order(count):
    configs = _grid(10)
    parts = [shard(configs, i, count) for i in range(1, count + 1)]
    hashes = [[config_hash(c) for c in p] for p in parts]
    assert sorted(h for p in hashes for h in p) == sorted(config_hash(c) for c in configs)  # each run once
    assert all(p == [c for c in configs if c in p] for p in parts)  # in the grid's order
    shuffled = configs[:]
    random.Random(0).shuffle(shuffled)
    assert [{config_hash(c) for c in shard(shuffled, i, count)} for i in range(1, count + 1)] == \
        [set(h) for h in hashes]
    if count > 1:
        assert all(parts), "40 runs left a shard empty"


def test_growing_the_grid_moves_no_run_to_another_shard():
    small, large = _grid(5), _grid(12)
    where = {config_hash(c): i for i in (1, 2, 3) for c in shard(large, i, 3)}
    assert all(where[config_hash(c)] == i for i in (1, 2, 3) for c in shard(small, i, 3))


@pytest.mark.parametrize("text, expected", [("1/4", (1, 4)), (" 4/4 ", (4, 4)), ("1/1", (1, 1))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0/4", "expected a shard from 1/4 to 4/4, got 0 (shards are numbered from 1: the first is 1/4)"),
    ("5/4", "expected a shard from 1/4 to 4/4, got 5"),
    ("1/0", "expected at least 1 shard, got 0"),
    ("3", "expected I/N with whole numbers, e.g. 1/4"),
    ("a/b", "expected I/N with whole numbers"),
    ("-1/4", "expected I/N with whole numbers"),
    ("1/4/2", "expected I/N with whole numbers"),
])
def test_a_bad_shard_says_what_is_expected(text, message):
    with pytest.raises(ValueError, match="^bad shard .*" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_shard(text)


def test_cli_shards_run_disjoint_parts_whose_merge_is_the_whole_sweep(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "imports": ["harness_tasks"], "models": ["elman"], "tasks": ["harness_shift"], "seeds": [0, 1, 2, 3],
        "steps": 4, "d_model": 16, "n_layers": 1, "seq_len": 8, "batch_size": 16, "eval_batches": 1, "mlp": None,
        "early_stop": None, "device": "cpu", "lr": 1e-2}))
    everything = {config_hash(c) for c in SweepConfig.from_yaml(grid).expand()}
    parts = []
    for i in (1, 2):
        db = tmp_path / f"part-{i}.sqlite"
        assert main(["sweep", str(grid), "--shard", f"{i}/2", "--db", str(db)]) == 0
        n = len(shard(SweepConfig.from_yaml(grid).expand(), i, 2))
        assert f"shard {i}/2: {n} of the grid's 4 runs (split by run hash)" in capsys.readouterr().err
        with ResultStore(db) as store:
            parts.append(store.hashes())
    assert not parts[0] & parts[1] and parts[0] | parts[1] == everything
    merged = tmp_path / "all.sqlite"
    assert main(["store", "merge", str(tmp_path / "part-1.sqlite"), str(tmp_path / "part-2.sqlite"),
                 "-o", str(merged)]) == 0
    assert f"{merged}: 4 runs: " in capsys.readouterr().out
    with ResultStore(merged) as store:
        assert store.hashes() == everything
    assert main(["sweep", str(grid), "--shard", "0/2", "--db", str(merged)]) == 2
    assert "recur sweep: error: --shard: bad shard '0/2'" in capsys.readouterr().err


def test_a_shard_is_a_plain_list_for_run_sweep():
    configs = [tiny(seed=s) for s in range(6)]
    assert shard(configs, 1, 1) == configs
    with pytest.raises(ValueError, match="expected a shard from 1 to 3, got 4"):
        shard(configs, 4, 3)
