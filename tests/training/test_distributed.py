"""Data-parallel training (recur.training.distributed) with real torch.distributed: gloo, 2 processes.

One spawn of two ranks (``_ddp``, shared by the tests of this module) trains several runs, resumes
one from a checkpoint and runs ``recur run`` twice; each test checks one property of what they wrote:
the ranks end with identical parameters, equal (to float32 tolerance) to one process with the same
global batch; rank 0 alone writes the store, the tracker's files and stdout; a checkpoint resumes
across world sizes. A last test launches ``torchrun --standalone -m recur run`` itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from harness_tasks import HERE, tiny

from recur.config import RunConfig, config_hash
from recur.results import ResultStore
from recur.training import ConfigError, Trainer, checkpoint, train
from recur.training.distributed import Distributed, launched

REPO = HERE.parent
WORLD = 2


def _with_eval_every(cfg: RunConfig, every: int) -> RunConfig:
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"every": every})})


# The runs every rank trains. fuzzy_recall supervises a different number of positions in every row
# (e.g. 10, 5, 3, ... of 32): the ranks' shares of the loss differ, which the exact loss weighting
# must get right; its 3 eval batches split unevenly over 2 ranks.
RUNS = {
    "ragged": _with_eval_every(RunConfig(task="fuzzy_recall", model="lstm", d_model=16, n_layers=1, seq_len=32,
                                         eval_lengths=[32, 48], steps=8, batch_size=8, lr=3e-3, eval_batches=3,
                                         mlp=None, device="cpu", early_stop=None), 3),
    "states": tiny(steps=8, early_stop=None, training=["state_passing", {"name": "state_noise", "std": 0.5},
                                                       "gradient_noise"]),
    "tbptt": tiny(steps=8, early_stop=None, seq_len=12, training=[{"name": "tbptt", "k1": 4}]),
    "early_stop": tiny(steps=200, d_model=32, early_stop=0.9, early_stop_window=5, early_stop_patience=0),
}
RESUME = tiny(steps=12, early_stop=None, training=["state_passing", "state_noise", "gradient_noise"])
RESUME_AT = 6


def _cli_argv(ckpt: Path) -> list[str]:
    return ["run", "--task", "harness_shift", "--model", "elman", "--d-model", "16", "--n-layers", "1",
            "--seq-len", "8", "--batch-size", "16", "--lr", "0.01", "--eval-batches", "3", "--mlp", "None",
            "--early-stop", "None", "--steps", "10", "--device", "cpu", "--db", "runs.sqlite", "--track",
            "tensorboard", "--track-dir", "tb", "--checkpoint-every", "5", "--checkpoint-dir", str(ckpt),
            "--json", "--no-progress"]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, port: int, out: Path) -> None:
    """One rank: torchrun's environment, then every job, each rank saving what it ended with."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from recur.cli import main
    from recur.training import distributed

    with distributed.session("cpu") as dist:
        assert dist is not None and dist.rank == rank and dist.world_size == WORLD and dist.backend == "gloo"
        for name, cfg in RUNS.items():
            trainer = Trainer(cfg, progress=False, dist=dist)
            result = trainer.fit()
            saved = {"params": _params(trainer.model), "result": result.model_dump_json()}
            torch.save(saved, out / f"{name}-{rank}.pt")

        # Interrupted at RESUME_AT: rank 0 writes the checkpoint, both go on (work the resumed run must not
        # see), then both resume from it.
        trainer = Trainer(RESUME, progress=False, dist=dist)
        for _ in range(RESUME_AT):
            trainer.train_step()
        if dist.is_main:
            checkpoint.save(trainer, out / "ckpt")
        dist.barrier()
        for _ in range(2):
            trainer.train_step()
        resumed = Trainer(RESUME, progress=False, dist=dist, checkpoint_dir=out / "ckpt", resume=True)
        result = resumed.fit()
        torch.save({"params": _params(resumed.model), "result": result.model_dump_json()}, out / f"resume-{rank}.pt")

        # `recur run` on every rank, each in its own folder, with the store, tracker and checkpoint paths
        # relative to it but for the checkpoints: whatever appears in rank 1's folder was written by rank 1.
        here = out / f"cwd{rank}"
        here.mkdir()
        os.chdir(here)
        codes, outputs = [], []
        for _ in range(2):  # the second time the run is stored: rank 0's store decides for both
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
                codes.append(main(_cli_argv(out / "cli-ckpt")))
            outputs.append(buf.getvalue())
        os.chdir(out)
        (out / f"cli-{rank}.json").write_text(json.dumps({"codes": codes, "stdout": outputs}))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, request) -> Path:
    """The two ranks' outputs, spawned once per test session: under xdist the workers share the
    session's temporary root, and the first to take the lock spawns while the other waits."""
    xdist = hasattr(request.config, "workerinput")
    root = tmp_path_factory.getbasetemp().parent if xdist else tmp_path_factory.getbasetemp()
    out = root / "ddp-ranks"
    with open(root / "ddp-ranks.lock", "w") as lock:
        with contextlib.suppress(ImportError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
            (out / "done").touch()
    return out


def _load(out: Path, name: str) -> list[dict]:
    return [torch.load(out / f"{name}-{r}.pt") for r in range(WORLD)]


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> float:
    """The largest difference between two sets of parameters, asserted below ``atol``: measured 1e-8 to
    1.2e-7 (float32 ulps of O(1) values after up to ~50 AdamW steps), while averaging the ranks' mean
    losses without the supervised-count weights differs by 1.8e-2 on the ragged run."""
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= atol, f"parameters differ by {worst}"
    return worst


def _untimed(result: dict) -> dict:
    return {**result, "seconds": None, "curve": [p[:2] for p in result["curve"]]}


# ------------------------------------------------------------------ the properties
@pytest.mark.parametrize("name", list(RUNS))
def test_ranks_end_identical_and_equal_to_one_process_with_the_global_batch(ddp, name):
    ranks = _load(ddp, name)
    for k, v in ranks[0]["params"].items():  # DDP's averaged gradients and identical steps: bit-identical ranks
        assert torch.equal(v, ranks[1]["params"][k]), f"{k} differs between the ranks"
    got = [json.loads(r["result"]) for r in ranks]
    assert _untimed(got[0]) == _untimed(got[1])  # the same curve, metrics and decisions on every rank

    cfg = RUNS[name]
    one = Trainer(cfg, progress=False)
    expected = one.fit()
    # Float32 tolerance: the same sums, added in another order (two halves, then the all-reduce).
    _close(ranks[0]["params"], _params(one.model))
    result = got[0]
    assert result["config_hash"] == expected.config_hash == config_hash(cfg)
    assert result["info"] == {**expected.info, "world_size": WORLD}
    assert result["steps"] == expected.steps and result["early_stopped"] == expected.early_stopped
    assert [s for s, _, _ in result["curve"]] == [s for s, _, _ in expected.curve]
    assert [l for _, l, _ in result["curve"]] == pytest.approx([l for _, l, _ in expected.curve], rel=1e-5, abs=1e-6)
    assert result["train_accuracy"] == pytest.approx(expected.train_accuracy, abs=1e-6)
    for length, metrics in expected.metrics.items():
        assert result["metrics"][length] == pytest.approx(metrics, abs=1e-6)
    assert [(s, n) for s, n, _ in result["evals"]] == [(s, n) for s, n, _ in expected.evals]
    for (_, _, m), (_, _, want) in zip(result["evals"], expected.evals):
        assert m == pytest.approx(want, abs=1e-6)


def test_the_ragged_run_has_rows_with_different_supervised_counts():
    """What makes the loss weighting matter: the ranks' halves of a batch supervise different counts."""
    cfg = RUNS["ragged"]
    trainer = Trainer(cfg, progress=False)
    batch = trainer.task.batch(cfg.optim.batch_size, cfg.task.seq_len, torch.Generator().manual_seed(0))
    half = cfg.optim.batch_size // 2
    assert int(batch.mask[:half].sum()) != int(batch.mask[half:].sum())


def test_the_early_stop_is_decided_as_one_process_decides_it(ddp):
    result = json.loads(_load(ddp, "early_stop")[0]["result"])
    assert result["early_stopped"] and result["steps"] < RUNS["early_stop"].optim.steps


def test_a_ddp_checkpoint_resumes_on_every_rank_and_in_one_process(ddp):
    ranks = _load(ddp, "resume")
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k])
    full = Trainer(RESUME, progress=False)
    expected = full.fit()
    _close(ranks[0]["params"], _params(full.model))
    assert json.loads(ranks[0]["result"])["steps"] == expected.steps
    # Rank 0's checkpoint holds the global batch's streams and carried state: one process continues it.
    meta = json.loads((checkpoint.latest(ddp / "ckpt") / "meta.json").read_text())
    assert meta["step"] == RESUME_AT and meta["world_size"] == WORLD
    alone = Trainer(RESUME, progress=False, checkpoint_dir=ddp / "ckpt", resume=True)
    alone.fit()
    _close(_params(alone.model), _params(full.model))


def test_rank_0_alone_writes_the_store_the_tracker_and_stdout(ddp):
    logs = [json.loads((ddp / f"cli-{r}.json").read_text()) for r in range(WORLD)]
    assert logs[0]["codes"] == logs[1]["codes"] == [0, 0]
    assert logs[1]["stdout"] == ["", ""]  # rank 1 printed nothing, the second time it trained nothing either
    first, second = (json.loads(s.strip().splitlines()[-1]) for s in logs[0]["stdout"])
    assert first == second and first["steps"] == 10
    assert sorted(p.name for p in (ddp / "cwd1").iterdir()) == []  # no store, no event files
    assert sorted(p.name for p in (ddp / "cwd0").iterdir()) == ["runs.sqlite", "tb"]
    with ResultStore(ddp / "cwd0" / "runs.sqlite") as store:
        (run,) = store.all_runs()
        assert run["info"] == {"world_size": WORLD} and run["steps"] == 10
        assert len(store.curves()[run["hash"]]) == 10
    (events,) = (ddp / "cwd0" / "tb").iterdir()
    assert events.name.endswith(run["hash"]) and list(events.glob("events.out.tfevents.*"))
    assert checkpoint.latest(ddp / "cli-ckpt" / run["hash"]).name == "step-00000010"


# ------------------------------------------------------------------ without a process group
def test_the_global_batch_must_split_evenly_over_the_ranks():
    dist = Distributed(rank=1, world_size=2, local_rank=1, backend="gloo", device=torch.device("cpu"))
    assert dist.rows(16) == slice(8, 16)
    with pytest.raises(ConfigError, match=r"batch_size=15 is the global batch and must be a multiple of .*\(2\)"):
        Trainer(tiny(batch_size=15), progress=False, dist=dist)


def test_a_half_set_torchrun_environment_is_refused(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="MASTER_ADDR.*torchrun"):
        launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched() is None  # one process: no process group


# ------------------------------------------------------------------ torchrun itself
def test_torchrun_runs_recur_run_on_two_processes(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    argv = [*launcher, "--standalone", "--nproc-per-node", str(WORLD), "-m", "recur", *_cli_argv(tmp_path / "ckpt"),
            "--import", "harness_tasks"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.stdout.count('"metrics"') == 1  # one JSON line: rank 0's
    assert "data-parallel over 2 processes (gloo, cpu)" in done.stderr
    cfg = tiny(steps=10, early_stop=None, eval_batches=3)
    expected = train(cfg, progress=False)
    for length, metrics in expected.metrics.items():
        assert summary["metrics"][length] == pytest.approx(metrics, abs=1e-6)
    with ResultStore(tmp_path / "runs.sqlite") as store:
        assert store.get(config_hash(cfg))["info"] == {"world_size": WORLD}


@pytest.mark.gpus
def test_torchrun_trains_on_two_gpus_with_nccl_as_one_gpu_does(tmp_path):
    """The same command on GPUs: NCCL, each rank on cuda:LOCAL_RANK; metrics as one GPU's (GPU kernels
    reduce in their own order, hence the looser tolerance). Selected with ``-m gpus`` on a machine with
    two GPUs or more (deselected by default: the CPU machines have none)."""
    assert torch.cuda.device_count() >= 2, f"-m gpus needs two GPUs or more; this machine has {torch.cuda.device_count()}"
    torchrun = Path(sys.executable).with_name("torchrun")
    argv = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "recur",
            *[a if a != "cpu" else "cuda" for a in _cli_argv(tmp_path / "ckpt")], "--import", "harness_tasks"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data-parallel over 2 processes (nccl, cuda)" in done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    expected = train(tiny(steps=10, early_stop=None, eval_batches=3, device="cuda"), progress=False)
    for length, metrics in expected.metrics.items():
        assert summary["metrics"][length] == pytest.approx(metrics, abs=1e-3)
