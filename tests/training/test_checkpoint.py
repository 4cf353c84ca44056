"""Checkpoints: a resumed run ends bit-identical to an uninterrupted one (in process, and after a real
SIGKILL of `recur run`), a checkpoint of another run is refused, and a checkpoint is written atomically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from harness_tasks import HERE, tiny
from safetensors.torch import load_file

from recur.cli import main
from recur.config import config_hash
from recur.results import ResultStore
from recur.training import ConfigError, Trainer, checkpoint, train

REPO = HERE.parent


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"parameter {k} differs"


def _interrupted(cfg, directory: Path, at: int) -> None:
    """Train ``at`` steps, checkpoint, then go on a few steps (work the resumed run must not see) and drop it."""
    trainer = Trainer(cfg, progress=False)
    for _ in range(at):
        trainer.train_step()
    checkpoint.save(trainer, directory)
    for _ in range(3):
        trainer.train_step()


# ------------------------------------------------------------------ in process
@pytest.mark.parametrize("training", [["state_passing", "gradient_noise"], [{"name": "state_noise", "std": 0.5}],
                                      ["state_passing", "state_noise", "gradient_noise"]],
                         ids=["passing+gradnoise", "state_noise", "passing+noise+gradnoise"])
def test_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, training):
    cfg = tiny(steps=24, early_stop=None, training=training)
    full = Trainer(cfg, progress=False)
    expected = full.fit()

    _interrupted(cfg, tmp_path, at=10)
    torch.manual_seed(1234)  # the process's global stream is restored from the checkpoint too
    resumed = Trainer(cfg, progress=False, checkpoint_dir=tmp_path, resume=True)
    result = resumed.fit()

    assert result.steps == expected.steps == 24
    assert result.metrics == expected.metrics
    assert result.train_loss == expected.train_loss and result.train_accuracy == expected.train_accuracy
    _assert_same_params(_params(resumed), _params(full))


def test_resuming_restores_the_early_stop_window(tmp_path):
    cfg = tiny(steps=300, early_stop=0.95, early_stop_window=10)
    expected = train(cfg, progress=False)
    assert expected.early_stopped and expected.steps < 300
    at = expected.steps - 4
    window = cfg.optim.early_stop_window
    # Saved with a full window, close enough to the stop that a resumed run with an empty window
    # could not stop at the same step (it would need `window` new steps first).
    assert at >= window and expected.steps - at < window

    _interrupted(cfg, tmp_path, at=at)
    resumed = Trainer(cfg, progress=False, checkpoint_dir=tmp_path, resume=True)
    result = resumed.fit()
    assert result.early_stopped and result.steps == expected.steps
    assert result.metrics == expected.metrics and result.train_loss == expected.train_loss


def test_fit_writes_periodic_and_final_checkpoints_that_resume_to_the_same_end(tmp_path):
    cfg = tiny(steps=24, early_stop=None, training=["state_passing", "gradient_noise"])
    full = Trainer(cfg, progress=False, checkpoint_dir=tmp_path / "a", checkpoint_every=7)
    expected = full.fit()
    assert checkpoint.latest(tmp_path / "a") == tmp_path / "a" / "step-00000024"  # the end, not only multiples of 7
    # A finished run resumed from its final checkpoint trains nothing and evaluates the same model.
    again = Trainer(cfg, progress=False, checkpoint_dir=tmp_path / "a", resume=True)
    assert again.fit().metrics == expected.metrics and again.step == 24
    _assert_same_params(_params(again), _params(full))


# ------------------------------------------------------------------ a real SIGKILL of `recur run`
STEPS, EVERY, KILL_AFTER = 800, 25, 100  # about 3 ms a step: the kill lands with ~700 steps to go


def _recur() -> list[str]:
    script = Path(sys.executable).with_name("recur")
    return [str(script)] if script.exists() else [sys.executable, "-m", "recur.cli"]


def _run_command(db: Path, ckpt: Path, *extra: str) -> list[str]:
    return [*_recur(), "run", "--task", "harness_shift", "--model", "elman", "--d-model", "16", "--n-layers", "1",
            "--seq-len", "8", "--batch-size", "16", "--lr", "0.01", "--eval-batches", "1", "--mlp", "None",
            "--early-stop", "None", "--steps", str(STEPS), "--train", "state_passing", "--train", "gradient_noise",
            "--device", "cpu", "--checkpoint-every", str(EVERY), "--checkpoint-dir", str(ckpt), "--db", str(db),
            "--json", "--no-progress", "--import", "harness_tasks", *extra]


def _env() -> dict[str, str]:
    path = [str(HERE), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def _latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / checkpoint.LATEST).read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):  # not written yet
        return 0


def _json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    (folder,) = run_dir.glob("step-*")
    assert folder.name == f"step-{STEPS:08d}"
    return load_file(str(folder / "tensors.safetensors"))


def test_run_killed_with_sigkill_resumes_bit_identical_to_an_uninterrupted_run(tmp_path):
    h = config_hash(tiny(steps=STEPS, early_stop=None, training=["state_passing", "gradient_noise"]))
    killed_db, killed_ckpt = tmp_path / "killed.sqlite", tmp_path / "killed-ckpt"
    whole_db, whole_ckpt = tmp_path / "whole.sqlite", tmp_path / "whole-ckpt"
    env = _env()
    # The uninterrupted run goes alongside the one to be killed (one thread each).
    whole = subprocess.Popen(_run_command(whole_db, whole_ckpt), env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_run_command(killed_db, killed_ckpt), env=env, cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _latest_step(killed_ckpt / h) < KILL_AFTER:
            if victim.poll() is not None:
                pytest.fail(f"the run ended (rc {victim.returncode}) before it could be killed: {victim.stderr.read()}")
            assert time.monotonic() < deadline, "no checkpoint in 120 s"
            time.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        victim.stderr.close()
    assert victim.returncode == -signal.SIGKILL
    killed_at = _latest_step(killed_ckpt / h)
    assert KILL_AFTER <= killed_at < STEPS, "the run reached its end before the kill: make it longer"
    with ResultStore(killed_db) as store:
        assert len(store) == 0, "the killed run was recorded: it finished before the kill"

    resumed = subprocess.run(_run_command(killed_db, killed_ckpt, "--resume"), env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    out, err = whole.communicate(timeout=120)
    assert whole.returncode == 0, err

    got, want = _json_line(resumed.stdout), _json_line(out)
    assert got["metrics"] == want["metrics"]
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    with ResultStore(killed_db) as a, ResultStore(whole_db) as b:
        ra, rb = a.get(h), b.get(h)
        assert (ra["train_loss"], ra["train_accuracy"], ra["steps"]) == (rb["train_loss"], rb["train_accuracy"], STEPS)

    mine, theirs = _final_tensors(killed_ckpt / h), _final_tensors(whole_ckpt / h)
    model_keys = sorted(k for k in theirs if k.startswith("model."))
    assert model_keys and model_keys == sorted(k for k in mine if k.startswith("model."))
    for k in model_keys:
        assert torch.equal(mine[k], theirs[k]), f"{k} differs after the resume"
    assert not [p.name for p in (killed_ckpt / h).iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------ errors
def test_resume_without_a_checkpoint_exits_2_with_a_clear_message(tmp_path, capsys):
    argv = ["run", "--task", "harness_shift", "--model", "elman", "--d-model", "16", "--n-layers", "1", "--seq-len",
            "8", "--steps", "5", "--mlp", "None", "--device", "cpu", "--db", str(tmp_path / "runs.sqlite"),
            "--checkpoint-dir", str(tmp_path / "ckpt"), "--no-progress"]
    h = config_hash(tiny(steps=5, batch_size=64, lr=1e-3, eval_batches=4))
    assert main([*argv, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "--resume: no checkpoint of run" in err and h in err and "--checkpoint-every" in err
    assert main([*argv, "--checkpoint-every", "0"]) == 2
    assert "checkpoint_every must be >= 1" in capsys.readouterr().err
    with ResultStore(tmp_path / "runs.sqlite") as store:
        assert len(store) == 0


def test_bad_checkpoint_settings_are_refused(tmp_path):
    cfg = tiny(steps=6, early_stop=None)
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 1"):
        Trainer(cfg, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.raises(ConfigError, match="checkpoint_every must be >= 1"):
        train(cfg, progress=False, checkpoint_dir=tmp_path, checkpoint_every=-3)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        Trainer(cfg, checkpoint_every=2)
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        Trainer(cfg, progress=False, checkpoint_dir=tmp_path / "empty", resume=True).fit()


def test_a_checkpoint_of_another_config_is_refused(tmp_path):
    train(tiny(steps=6, early_stop=None), progress=False, checkpoint_dir=tmp_path, checkpoint_every=3)
    other = tiny(steps=6, early_stop=None, lr=3e-3)
    with pytest.raises(ConfigError, match="not of this run") as info:
        Trainer(other, progress=False, checkpoint_dir=tmp_path, resume=True).fit()
    assert config_hash(other) in str(info.value) and config_hash(tiny(steps=6, early_stop=None)) in str(info.value)


# ------------------------------------------------------------------ atomic writes
def test_a_checkpoint_is_written_atomically_and_only_the_newest_kept(tmp_path):
    cfg = tiny(steps=24, early_stop=None, training=["state_passing"])
    train(cfg, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000024"]  # no .tmp, no older step
    assert (tmp_path / "LATEST").read_text() == "step-00000024\n"
    assert {p.name for p in (tmp_path / "step-00000024").iterdir()} == {"meta.json", "tensors.safetensors"}
    meta = json.loads((tmp_path / "step-00000024" / "meta.json").read_text())
    assert meta["step"] == 24 and meta["config_hash"] == config_hash(cfg)


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_in_place(tmp_path, monkeypatch):
    cfg = tiny(steps=20, early_stop=None, training=["state_passing", "gradient_noise"])
    full = Trainer(cfg, progress=False)
    expected = full.fit()

    trainer = Trainer(cfg, progress=False)
    for _ in range(8):
        trainer.train_step()
    checkpoint.save(trainer, tmp_path)
    trainer.train_step()
    real_save_file = checkpoint.save_file

    def die_midway(tensors, path):  # a truncated tensors file, then the process "dies"
        Path(path).write_bytes(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", die_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(trainer, tmp_path)
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    assert (tmp_path / "LATEST").read_text() == "step-00000008\n"
    assert checkpoint.latest(tmp_path) == tmp_path / "step-00000008"
    assert (tmp_path / ".step-00000009.tmp").exists()  # the half-written one, never named by LATEST

    # Resumed with checkpoints at other steps (9 is never written again): the leftover is cleared.
    resumed = Trainer(cfg, progress=False, checkpoint_dir=tmp_path, checkpoint_every=5, resume=True)
    result = resumed.fit()
    assert result.metrics == expected.metrics and result.train_loss == expected.train_loss
    _assert_same_params(_params(resumed), _params(full))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-00000020"]
