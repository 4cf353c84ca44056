"""Tracking (recur.tracking): TensorBoard event files read back with tensorboard's EventAccumulator,
W&B offline runs read back from their .wandb file, `recur export` replaying the store as the live
run logged it, and the errors of a tracker that cannot start."""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path

import pytest
import torch
from harness_tasks import tiny
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from recur.cli import main
from recur.config import RunConfig, config_hash
from recur.results import ResultStore
from recur.tracking import TensorBoardTracker, WandbTracker, make_tracker, run_name
from recur.training import ConfigError, Trainer, train
from recur.training.trainer import head_inputs, lr_factor

LIVE_ONLY = {"train/accuracy", "train/lr", "train/grad_norm"}  # the store keeps the loss curve only


def _with_eval_every(cfg: RunConfig, every: int) -> RunConfig:
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": every})})


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _hparams(folder: Path) -> dict:
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: (v.number_value if v.HasField("number_value") else v.string_value) for k, v in start.hparams.items()}


def _values(points: list[tuple[int, float]]) -> list[float]:
    return [v for _, v in points]


CLI = ["run", "--task", "harness_shift", "--model", "elman", "--d-model", "16", "--n-layers", "1", "--seq-len", "8",
       "--batch-size", "16", "--lr", "0.01", "--eval-batches", "1", "--mlp", "None", "--device", "cpu",
       "--early-stop", "None", "--steps", "12", "--set", "eval.every=4", "--no-progress", "--json"]


def _cli_cfg() -> RunConfig:
    return _with_eval_every(tiny(steps=12, early_stop=None), 4)


# ------------------------------------------------------------------ TensorBoard, live
@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_tensorboard_holds_every_step_each_validation_and_the_final_metrics(tmp_path, grad_clip):
    cfg = _with_eval_every(tiny(steps=12, early_stop=None, grad_clip=grad_clip), 4)
    result = train(cfg, progress=False, tracker=make_tracker("tensorboard", tmp_path))
    folder = tmp_path / run_name(cfg)
    assert folder.name == f"harness_shift-elman-d16-lr0.01-seed0-{config_hash(cfg)}"
    got = _scalars(folder)

    steps = list(range(1, 13))
    for tag in ("train/loss", "train/accuracy", "train/lr", "train/grad_norm"):
        assert [s for s, _ in got[tag]] == steps, tag
    # 12 steps: the stored curve has a point per step, each that step's loss (float32 in the event file)
    assert _values(got["train/loss"]) == pytest.approx([l for _, l, _ in result.curve], rel=1e-6)
    assert sum(_values(got["train/accuracy"])) / 12 == pytest.approx(result.train_accuracy, rel=1e-6)
    warmup = cfg.optim.warmup_steps()
    assert _values(got["train/lr"]) == pytest.approx([0.01 * lr_factor(s - 1, 12, warmup) for s in steps], rel=1e-6)

    # The gradient norm is measured before clipping, with or without it: step 1's is the first batch's.
    fresh = Trainer(cfg, progress=False)
    batch = fresh.task.batch(16, 8, fresh.generators["data"], split="train")
    fresh.model.loss(fresh.model(batch.inputs, **head_inputs(fresh.model, batch)), batch).backward()
    norm = float(torch.nn.utils.get_total_norm([p.grad for p in fresh.model.parameters()]))
    assert got["train/grad_norm"][0][1] == pytest.approx(norm, rel=1e-6)
    if grad_clip is not None:
        assert norm > grad_clip  # the logged value is the norm clipping saw, not the clipped one

    assert [s for s, _ in got["val/accuracy"]] == [4, 8, 12]
    assert _values(got["val/accuracy"]) == pytest.approx([m["accuracy"] for _, _, m in result.evals], rel=1e-6)
    for length, metrics in result.metrics.items():
        for k, v in metrics.items():
            assert got[f"eval/{k}@{length}"] == [(12, pytest.approx(v, rel=1e-6))]
    assert got["run/state_size"] == [(12, result.state_size)] and got["run/params"] == [(12, result.params)]
    hp = _hparams(folder)
    assert hp["optim.lr"] == pytest.approx(0.01) and hp["task.name"] == "harness_shift" and hp["model.d_model"] == 16


def test_a_run_started_again_replaces_what_the_first_attempt_logged(tmp_path):
    """A resumed run's writer purges from its first step on, a fresh one everything: no step twice."""
    cfg = tiny(steps=12)
    first = TensorBoardTracker(tmp_path)
    first.start(run_name(cfg), {}, config_hash(cfg))
    for s in range(1, 13):
        first.log(s, {"train/loss": 1.0})
    first.finish(None)  # killed at step 12, its checkpoint at step 6
    resumed = TensorBoardTracker(tmp_path)
    resumed.start(run_name(cfg), {}, config_hash(cfg), step=6)
    for s in range(7, 13):
        resumed.log(s, {"train/loss": 2.0})
    resumed.finish(None)
    assert _scalars(tmp_path / run_name(cfg))["train/loss"] == [(s, 1.0 if s <= 6 else 2.0) for s in range(1, 13)]
    again = TensorBoardTracker(tmp_path)
    again.start(run_name(cfg), {}, config_hash(cfg))
    again.log(1, {"train/loss": 3.0})
    again.finish(None)
    assert _scalars(tmp_path / run_name(cfg))["train/loss"] == [(1, 3.0)]


# ------------------------------------------------------------------ the CLI and export
def test_export_replays_the_store_as_the_live_run_logged_it(tmp_path, db, capsys):
    live_dir, export_dir = tmp_path / "live", tmp_path / "export"
    assert main([*CLI, "--db", str(db), "--track", "tensorboard", "--track-dir", str(live_dir)]) == 0
    capsys.readouterr()
    name = run_name(_cli_cfg())
    live = _scalars(live_dir / name)
    assert main(["export", "--tensorboard", str(export_dir), "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"] == [name]
    exported = _scalars(export_dir / name)
    assert set(exported) == set(live) - LIVE_ONLY
    for tag, points in exported.items():
        assert points == live[tag], tag  # the same steps and (float32) values
    assert _hparams(export_dir / name) == _hparams(live_dir / name)
    # Exporting again replaces the earlier export: every point once.
    assert main(["export", "--tensorboard", str(export_dir), "--db", str(db)]) == 0
    assert _scalars(export_dir / name) == exported


def test_export_chooses_runs_by_hash_prefix_and_names_a_missing_one(tmp_path, db, capsys):
    for seed in (0, 1):
        assert main([*CLI, "--db", str(db), "--seed", str(seed)]) == 0
    with ResultStore(db) as store:
        hashes = sorted(store.hashes())
    assert main(["export", "--tensorboard", str(tmp_path / "tb"), "--db", str(db), "--hash", hashes[1][:6]]) == 0
    assert [p.name[-16:] for p in (tmp_path / "tb").iterdir()] == [hashes[1]]
    capsys.readouterr()
    assert main(["export", "--tensorboard", str(tmp_path / "tb"), "--db", str(db), "--hash", "zzzz"]) == 2
    err = capsys.readouterr().err
    assert "no run in" in err and "'zzzz'" in err
    assert main(["export", "--tensorboard", str(tmp_path / "tb"), "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no such results store" in capsys.readouterr().err


# ------------------------------------------------------------------ W&B, offline
def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (W&B's LevelDB-style log: 32 KiB blocks of chunks, each
    with a 7-byte header: crc32, length, kind 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, chunk, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            records.append(rec)
            chunk = b""
    return records


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline in a temporary folder, its server an unused local port, and this process's sockets
    limited to the machine (W&B talks to its own local service): any other connection fails the test."""
    for key in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_SILENT", "true")
    remote: list = []
    connect = socket.socket.connect

    def local_only(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            remote.append(address)
            raise OSError(f"test: no network ({address})")
        return connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    yield tmp_path / "wandb-dir"
    assert remote == [], f"connections off the machine: {remote}"


def test_wandb_offline_writes_the_run_history_locally(offline_wandb, db, capsys):
    assert main([*CLI, "--db", str(db), "--track", "wandb"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run_dir,) = (offline_wandb / "wandb").glob("offline-run-*")
    (log,) = run_dir.glob("run-*.wandb")
    records = _wandb_records(log)
    kinds = [r.WhichOneof("record_type") for r in records]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    cfg = _cli_cfg()
    assert run.display_name == run_name(cfg) and list(run.tags) == [config_hash(cfg)] and run.project == "recur"
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["config_hash"] == config_hash(cfg) and config["optim"]["lr"] == 0.01
    rows = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
    assert [r["_step"] for r in rows] == list(range(1, 13))
    with ResultStore(db) as store:
        (stored,) = store.all_runs()
        curve = store.curves()[stored["hash"]]
    assert [r["train/loss"] for r in rows] == pytest.approx([l for _, l, _ in curve], rel=1e-12)
    assert all({"train/accuracy", "train/lr", "train/grad_norm"} <= set(r) for r in rows)
    assert [r["_step"] for r in rows if "val/accuracy" in r] == [4, 8, 12]
    final = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    assert final["eval/accuracy@8"] == pytest.approx(summary["metrics"]["8"]["accuracy"])
    assert final["run/state_size"] == summary["state_size"] and "exit" in kinds


# ------------------------------------------------------------------ errors
def test_a_missing_tracking_package_names_the_extra_to_install(monkeypatch, db, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'recur\[wandb\]'"):
        WandbTracker("runs")
    assert main([*CLI, "--db", str(db), "--track", "wandb"]) == 2
    err = capsys.readouterr().err
    assert "--track wandb needs the wandb package" in err and "recur[wandb]" in err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*CLI, "--db", str(db), "--track", "tensorboard"]) == 2
    assert "pip install 'recur[track]'" in capsys.readouterr().err
    with ResultStore(db) as store:
        assert len(store) == 0  # nothing trained


def test_an_unknown_tracker_is_refused_naming_the_closest(db, capsys):
    assert main([*CLI, "--db", str(db), "--track", "tensorboard,wandbb"]) == 2
    err = capsys.readouterr().err
    assert "unknown tracker 'wandbb'" in err and "did you mean 'wandb'" in err


def test_run_names_are_human_and_end_with_the_hash():
    cfg = tiny(training=["state_passing"], lr=3e-3, seed=7)
    assert run_name(cfg) == f"harness_shift-elman+state_passing-d16-lr0.003-seed7-{config_hash(cfg)}"
    pattern = RunConfig(task="mqar", model=["gla", "swa"], d_model=32)
    assert run_name(pattern).startswith("mqar-") and "/" not in run_name(pattern)
