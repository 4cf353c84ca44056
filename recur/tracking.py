"""Experiment tracking: TensorBoard event files and Weights & Biases runs, written while a run trains.

    recur run --task mqar --model gla --track tensorboard [--track-dir runs]   # runs/<name>/events.out.tfevents.*
    recur run --task mqar --model gla --track wandb        # offline (runs/wandb/offline-run-*) unless WANDB_MODE is set
    recur export --tensorboard runs [--db PATH] [--hash H ...]                # the same view of stored runs
    train(cfg, tracker=make_tracker(["tensorboard"], "runs"))

The SQLite store stays the source of truth: a tracker is a live view of a run while it trains, and
``recur export`` rebuilds that view of finished runs from the store alone, without training.

A ``Tracker`` is three calls, which the Trainer makes on rank 0 only (``recur.training.distributed``):

    start(name, config, config_hash, step)   once, before the first step (step > 0: a resumed run)
    log(step, {tag: value})                  after every step, and at every validation
    finish(result)                           once, with the RunResult (None: the run failed)

Tags, the same live and in an export:

    train/loss, train/accuracy   the step's loss and accuracy on its batch (the global batch under DDP)
    train/lr                     the learning rate the step used
    train/grad_norm              the global gradient norm before clipping
    val/<metric>                 the eval curve (``eval.every``), e.g. val/bits_per_byte, val/accuracy
    eval/<metric>@<length>       the final metrics at every eval length, logged at the last step
    run/params, run/state_size, run/steps, run/seconds, run/train_loss, run/train_accuracy (last step)

and the config as hyperparameters (TensorBoard's HParams tab, W&B's run config) with the final eval
metrics as their metrics. An export has no per-step accuracy, lr or gradient norm (the store keeps the
loss curve only). Its train/loss is the stored curve, each point the mean loss since the previous one,
so it equals the live per-step loss wherever the curve has a point per step (runs of up to 399 steps;
longer runs keep about 200 points, each a mean over its interval).

Run names are human and unique: ``<task>-<model>[+method...]-d<d_model>-lr<lr>-seed<seed>-<config hash>``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recur.config import RunConfig
    from recur.results import ResultStore
    from recur.training.trainer import RunResult

DEFAULT_DIR = "runs"


def _missing(package: str, extra: str, what: str) -> Exception:
    from recur.training.trainer import ConfigError

    return ConfigError(f"{what} needs the {package} package, which is not installed: pip install 'recur[{extra}]'")


# ------------------------------------------------------------------ what is logged
def run_name(cfg: RunConfig, config_hash: str | None = None) -> str:
    """``mqar-gla-d64-lr0.001-seed0-3f2a9c0d1e4b5a67``: what a reader looks for, then the hash that
    names the run (characters a file name should not hold become ``_``)."""
    from recur.config import config_hash as hash_of

    h = config_hash or hash_of(cfg)
    model = cfg.model_name + "".join(f"+{m.name}" for m in cfg.training)
    name = f"{cfg.task.name}-{model}-d{cfg.model.d_model}-lr{cfg.optim.lr:g}-seed{cfg.seed}-{h}"
    return re.sub(r"[^A-Za-z0-9._+=-]", "_", name)


def train_scalars(loss: float, accuracy: float, lr: float, grad_norm: float | None = None) -> dict[str, float]:
    out = {"train/loss": loss, "train/accuracy": accuracy, "train/lr": lr}
    if grad_norm is not None:
        out["train/grad_norm"] = grad_norm
    return out


def val_scalars(metrics: dict[str, float]) -> dict[str, float]:
    """One point of the eval curve (metrics at the training length on the validation split)."""
    return {f"val/{k}": v for k, v in metrics.items()}


def eval_scalars(result: RunResult) -> dict[str, float]:
    """The final metrics at every eval length: ``eval/accuracy@64``."""
    return {f"eval/{k}@{length}": v for length, m in result.metrics.items() for k, v in m.items()}


def final_scalars(result: RunResult) -> dict[str, float]:
    """What a finished run is summed up by, logged at its last step."""
    return {**eval_scalars(result), "run/params": result.params, "run/state_size": result.state_size,
            "run/steps": result.steps, "run/seconds": result.seconds, "run/train_loss": result.train_loss,
            "run/train_accuracy": result.train_accuracy}


def hparam_values(config: dict[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """The config as flat ``section.key`` hyperparameters; lists, dicts and None as JSON text."""
    out: dict[str, int | float | str | bool] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(hparam_values(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


# ------------------------------------------------------------------ trackers
class Tracker:
    """The protocol the Trainer calls (see the module docstring); this base does nothing."""

    def start(self, name: str, config: dict[str, Any], config_hash: str, step: int = 0) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def finish(self, result: RunResult | None = None) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files under ``directory/<run name>/`` (torch.utils.tensorboard.SummaryWriter).

    A run's folder is named by its hash, so a run started again writes into the same folder; the
    writer's ``purge_step`` makes TensorBoard drop what an earlier attempt logged from the step this
    one starts at (a resumed run: after its checkpoint; a fresh one: everything), so no step shows
    twice.
    """

    def __init__(self, directory: str | Path = DEFAULT_DIR):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "track", "--track tensorboard") from None
        self._writer_class = SummaryWriter
        self.directory = Path(directory)
        self.writer = None
        self.path: Path | None = None

    def start(self, name, config, config_hash, step=0):
        self.path = self.directory / name
        self.writer = self._writer_class(log_dir=str(self.path), purge_step=step + 1 if step else 0)
        if not step:
            self.writer.add_text("run/config_hash", config_hash, 0)
            self.writer.add_text("run/config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        self._config = config

    def log(self, step, metrics):
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, float(value), step)

    def finish(self, result=None):
        if self.writer is None:
            return
        try:
            if result is not None:
                from torch.utils.tensorboard.summary import hparams

                final = final_scalars(result)
                for tag, value in final.items():
                    self.writer.add_scalar(tag, float(value), result.steps)
                # add_hparams would write into a new sub-folder; the same summaries go into this run's file.
                for summary in hparams(hparam_values(self._config), eval_scalars(result) or {"run/train_loss": 0.0}):
                    self.writer.file_writer.add_summary(summary)
        finally:
            self.writer.close()
            self.writer = None


class WandbTracker(Tracker):
    """A Weights & Biases run per recur run, offline unless the user's environment says otherwise.

    Mode: ``WANDB_MODE`` when set (``online`` syncs as it trains), else ``offline``: the run is written
    to ``<dir>/wandb/offline-run-*`` and needs no account or network (``wandb sync`` uploads it
    later). Directory: ``WANDB_DIR`` when set, else the tracking directory. Project: ``WANDB_PROJECT``,
    else "recur". The run's name is recur's run name and the config hash is its tag; the final
    metrics go to its summary.
    """

    def __init__(self, directory: str | Path = DEFAULT_DIR):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb", "--track wandb") from None
        self._wandb = wandb
        self.directory = Path(directory)
        self.run = None

    def start(self, name, config, config_hash, step=0):
        directory = Path(os.environ.get("WANDB_DIR") or self.directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.run = self._wandb.init(project=os.environ.get("WANDB_PROJECT") or "recur", name=name, dir=str(directory),
                                    config={**config, "config_hash": config_hash}, tags=[config_hash],
                                    mode=os.environ.get("WANDB_MODE") or "offline",
                                    settings=self._wandb.Settings(console="off"))

    def log(self, step, metrics):
        self.run.log(dict(metrics), step=step)

    def finish(self, result=None):
        if self.run is None:
            return
        try:
            if result is not None:
                self.run.summary.update(final_scalars(result))
        finally:
            self.run.finish(exit_code=0 if result is not None else 1)
            self.run = None


class Trackers(Tracker):
    """Several trackers as one (``--track tensorboard,wandb``)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = list(trackers)

    def start(self, name, config, config_hash, step=0):
        for t in self.trackers:
            t.start(name, config, config_hash, step)

    def log(self, step, metrics):
        for t in self.trackers:
            t.log(step, metrics)

    def finish(self, result=None):
        errors = []
        for t in self.trackers:  # every tracker closes its files, whatever another one raised
            try:
                t.finish(result)
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        if errors:
            raise errors[0]


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}


def parse_names(values: list[str] | str | None) -> list[str]:
    """``["tensorboard,wandb"]`` or ``["tensorboard", "wandb"]`` -> ``["tensorboard", "wandb"]``; "none" is no
    tracker. An unknown name is a ConfigError naming the closest one."""
    from recur.training.trainer import ConfigError

    items = [values] if isinstance(values, str) else list(values or [])
    names: list[str] = []
    for item in items:
        for name in (x.strip().lower() for x in item.split(",")):
            if not name or name == "none":
                continue
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"unknown tracker {name!r}: choose from {', '.join(TRACKERS)}{hint}")
            if name not in names:
                names.append(name)
    return names


def make_tracker(names: list[str] | str | None, directory: str | Path = DEFAULT_DIR) -> Tracker | None:
    """The tracker of ``names`` (see ``parse_names``) writing under ``directory``; None for none."""
    trackers = [TRACKERS[n](directory) for n in parse_names(names)]
    if not trackers:
        return None
    return trackers[0] if len(trackers) == 1 else Trackers(trackers)


# ------------------------------------------------------------------ replaying stored runs
def replay(tracker: Tracker, result: RunResult) -> None:
    """Log a finished run as the Trainer would have: its loss curve (train/loss) and eval curve (val/*)
    in step order, then its final metrics and hyperparameters."""
    tracker.start(run_name(result.config, result.config_hash), json.loads(result.config.full_json()),
                  result.config_hash)
    points: dict[int, dict[str, float]] = {}
    for step, loss, _ in result.curve:
        points.setdefault(step, {})["train/loss"] = loss
    for step, _, metrics in result.evals:
        points.setdefault(step, {}).update(val_scalars(metrics))
    try:
        for step in sorted(points):
            tracker.log(step, points[step])
    except BaseException:
        tracker.finish(None)
        raise
    tracker.finish(result)


def stored_results(store: ResultStore, hashes: list[str] | None = None) -> list[RunResult]:
    """The store's runs as RunResults (loss and eval curves included), oldest first; ``hashes``: only
    the runs whose hash is one of these or starts with one (a prefix must name one run)."""
    from recur.config import RunConfig
    from recur.training.trainer import ConfigError, RunResult

    runs = store.all_runs()
    if hashes:
        chosen: set[str] = set()
        for h in hashes:
            hit = [r["hash"] for r in runs if r["hash"].startswith(h)]
            if not hit:
                raise ConfigError(f"no run in {store.path} has a hash starting {h!r} ({len(runs)} runs stored)")
            if len(hit) > 1 and h not in hit:
                raise ConfigError(f"hash prefix {h!r} names {len(hit)} runs ({', '.join(sorted(hit)[:4])}, ...): "
                                  "give more digits")
            chosen.update([h] if h in hit else hit)
        runs = [r for r in runs if r["hash"] in chosen]
    keep = {r["hash"] for r in runs}
    curves, evals = store.curves(keep), store.evals(keep)
    results = []
    for r in runs:
        results.append(RunResult(
            config=RunConfig.model_validate(r["config"]), config_hash=r["hash"], task=r["task"], model=r["model"],
            seed=r["seed"], params=r["params"], state_size=r["state_size"], train_seq_len=r["train_seq_len"],
            steps=r["steps"], seconds=r["seconds"], metrics=r["metrics"],
            train_loss=r["train_loss"] if r["train_loss"] is not None else float("nan"),
            train_accuracy=r["train_accuracy"] if r["train_accuracy"] is not None else float("nan"),
            early_stopped=r["early_stopped"], recur_version=r["recur_version"],
            curve=curves.get(r["hash"], []), evals=evals.get(r["hash"], []), info=r["info"]))
    return results


def export_tensorboard(store: ResultStore, directory: str | Path, hashes: list[str] | None = None) -> list[Path]:
    """Write TensorBoard event files of the store's runs (or of ``hashes``) under ``directory/<run name>/``;
    returns the folders. Exporting again replaces what an earlier export wrote."""
    folders = []
    for result in stored_results(store, hashes):
        tracker = TensorBoardTracker(directory)
        replay(tracker, result)
        folders.append(tracker.path)
    return folders
