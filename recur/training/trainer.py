"""One training loop for every task x architecture (docs/design.md section 6), behaviour by hooks.

    result = train(RunConfig(task="parity", model="lstm", steps=500))
    result.metrics      # {"64": {"accuracy": 0.98, "exact_match": 0.41}, "256": {...}}

AdamW with linear warm-up then cosine decay, global-norm gradient clipping, seeded model and data
(train batches from split "train", evaluation from split "test"; with ``eval.every``, an eval
curve on the validation split where the task has one), early stop when the training
accuracy saturates, and evaluation at every length of ``cfg.eval.lengths`` (length
generalisation). The model owns its loss (``model.loss(out, batch)``); training methods
(``cfg.training``, see ``recur.training.method``) change the initial state, the passes, the loss
and the gradients through hooks. With ``checkpoint_every`` the run writes checkpoints that
``resume=True`` continues bit-identically. A failing run raises; nothing is recorded.

With ``dist`` (``recur.training.distributed``, under torchrun) the run is data-parallel over
processes and equals the one-process run of the same config: each rank trains on its rows of the
global batch, gradients are averaged with weights that make the loss the global mean, and rank 0
alone prints, checkpoints and tracks. With ``tracker`` (``recur.tracking``) every step's loss,
accuracy, lr and gradient norm, every validation and the final metrics go to TensorBoard or W&B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import recur
from recur import tracking
from recur.config import RunConfig, config_hash
from recur.models.base import Architecture, ModelOutput
from recur.registry import ARCHITECTURES, METHODS
from recur.state import State
from recur.tasks.base import Batch, Task, get_task
from recur.training.distributed import Distributed
from recur.training.method import Method


class ConfigError(ValueError):
    """The run cannot start: an unknown name, a bad task or model argument, an impossible length."""


class RunResult(BaseModel):
    """What a finished run records (one row of the results store)."""

    model_config = ConfigDict(frozen=True)

    config: RunConfig
    config_hash: str
    task: str
    model: str
    seed: int
    params: int
    state_size: int  # floats per sequence, summed over layers, at the training length
    train_seq_len: int
    steps: int  # optimisation steps actually run (fewer than cfg.optim.steps after an early stop)
    seconds: float  # wall time of training and evaluation
    metrics: dict[str, dict[str, float]]  # eval length -> {"accuracy", "exact_match"}
    train_loss: float  # mean over the last early_stop_window steps
    train_accuracy: float  # idem
    early_stopped: bool
    recur_version: str = recur.__version__
    # The training-loss curve: (step, mean loss over the steps since the previous point, seconds of
    # training at the end of that step). Points: step 1, every ``curve_every(steps)``-th step, the last
    # step. Step 1's seconds are the one-off warm-up (kernel compilation or cache loading, first
    # allocations): the last point's seconds minus the first's is the training time without it.
    curve: list[tuple[int, float, float]] = Field(default_factory=list)
    # The eval curve (``eval.every``): (step, training tokens seen, metrics at the training length on
    # the validation split) every ``eval.every`` steps and at the last step.
    evals: list[tuple[int, int, dict[str, float]]] = Field(default_factory=list)
    # The evaluation at other numbers of iterations (``eval.loops``): {iterations: {eval length: metrics}}.
    depth_metrics: dict[str, dict[str, dict[str, float]]] = Field(default_factory=dict)
    # The task's facts about its data (``Task.info``), and how the run was trained where its config does
    # not say: ``world_size`` for a data-parallel run (``recur.training.distributed``; absent: one process).
    info: dict[str, Any] = Field(default_factory=dict)

    def summary(self) -> dict:
        """The stable JSON of `recur run --json` (``depth_metrics`` only for a run with ``eval.loops``)."""
        keys = ("task", "model", "seed", "params", "state_size", "train_seq_len", "steps", "seconds", "metrics")
        return {k: getattr(self, k) for k in keys + ("depth_metrics",) * bool(self.depth_metrics)}


# ------------------------------------------------------------------ set-up
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} asked for, but CUDA is not available")
    return dev


def build(cfg: RunConfig) -> tuple[Task, Architecture]:
    """The task and the (seeded, untrained) model of a run; every bad name or argument is a ConfigError."""
    try:
        task = get_task(cfg.task.name, **cfg.task.args)
        for n in sorted({cfg.task.seq_len, *cfg.eval.lengths}):
            task.check_seq_len(n)
        arch = ARCHITECTURES.get(cfg.model.arch).cls
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    torch.manual_seed(cfg.seed)
    try:
        model = arch.from_config(cfg.model, vocab_size=task.vocab_size, **task.model_io())
    except TypeError as e:  # an unexpected keyword argument of a mixer or of the architecture
        raise ConfigError(f"bad options for model {cfg.model_name!r} (model.mixer_args {cfg.model.mixer_args}, "
                          f"model.args {cfg.model.args}): {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.eval.loops and model.depth_option is None:
        looped = ", ".join(n for n in ARCHITECTURES.names() if ARCHITECTURES.get(n).cls.depth_option)
        raise ConfigError(f"eval.loops={cfg.eval.loops}: architecture {cfg.model.arch!r} has a fixed depth (no number "
                          f"of iterations to set); the depth-recurrent ones are {looped}")
    return task, model


def evaluate_depths(model: Architecture, task: Task, cfg: RunConfig, device, loops: list[int],
                    dist: Distributed | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """``evaluate`` with the model's depth option (``model.depth_option``, e.g. n_loops) set to each of
    ``loops`` in turn: {iterations: {eval length: metrics}}. The model keeps its own value after."""
    option = model.depth_option
    own = getattr(model, option)
    shared = {} if dist is None else {"dist": dist}
    out = {}
    try:
        for n in loops:
            setattr(model, option, n)
            out[str(n)] = evaluate(model, task, cfg, device, **shared)
    finally:
        setattr(model, option, own)
    return out


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr at optimisation step ``step`` (0-based).

    Linear warm-up over ``warmup`` steps (reaching 1 at step ``warmup - 1``), then a cosine
    from 1 down to ``min_ratio`` at the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    decay = max(1, steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / decay)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW; weight decay on matrices (ndim >= 2) only, not on biases, gains and decay rates."""
    o = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=(0.9, 0.95))
    warmup = o.warmup_steps()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, o.steps, warmup, o.min_lr_ratio))
    return opt, sched


# One independent random stream per purpose, salted by its name; the salts are part of every run's
# identity, so those of the first release stay as they were.
_SALTS = {"data": 1, "test": 2, "noise": 3}


def _salt(purpose: str) -> int:
    if purpose in _SALTS:
        return _SALTS[purpose]
    return int.from_bytes(hashlib.sha256(purpose.encode()).digest()[:6], "big")


def _generator(seed: int, *salt: int) -> torch.Generator:
    value = seed
    for s in salt:
        value = (value * 1_000_003 + s) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def head_inputs(model: Architecture, batch: Batch) -> dict:
    """Keyword arguments of a model call on a whole batch: its resets, and the supervised positions
    as ``positions`` when the model computes its head only where asked (``sparse_head``): the loss and
    the scores read nothing else, so they are the same, at a fraction of the cost when few positions
    are supervised."""
    extra = {"positions": batch.mask} if model.sparse_head else {}
    return {**batch.model_inputs(), **extra}


@torch.no_grad()
def evaluate(model: Architecture, task: Task, cfg: RunConfig, device, split: str | None = None,
             lengths: list[int] | None = None, dist: Distributed | None = None) -> dict[str, dict[str, float]]:
    """Mean ``task.score_output`` (plus the model's scalar ``aux`` diagnostics, e.g. ``ponder_steps``)
    over ``cfg.eval.batches`` batches of ``split`` (default: the task's
    last, test) at every length of ``lengths`` (default: ``cfg.eval.lengths``), from a zero initial
    state. The batches depend only on the seed, the split and the length: every call sees the same.

    With ``dist`` the ranks share the work: each draws every batch (so the batches are one process's)
    and scores those with index i mod world_size == rank; the scores are gathered and summed in batch
    order, so every rank returns the same metrics, those of one process."""
    split = task.splits[-1] if split is None else split
    was_training = model.training
    model.eval()
    metrics = {}
    for length in cfg.eval.lengths if lengths is None else lengths:
        gen = _generator(cfg.seed, _SALTS["test"], length) if split == "test" else \
            _generator(cfg.seed, _salt(split), length)
        scores: list[tuple[int, dict[str, float]]] = []
        for i in range(cfg.eval.batches):
            batch = task.batch(cfg.optim.batch_size, length, gen, split=split)
            if dist is not None and i % dist.world_size != dist.rank:
                continue
            batch = batch.to(device)
            out = model(batch.inputs, **head_inputs(model, batch))
            score = task.score_output(model, out, batch)
            # the model's scalar diagnostics (UT's ponder steps, a router's usage entropy) at this length
            score |= {k: float(v) for k, v in out.aux.items()
                      if not k.endswith("_loss") and isinstance(v, torch.Tensor) and v.ndim == 0
                      and v.is_floating_point() and k not in score}
            scores.append((i, score))
        if dist is not None:
            scores = sorted((p for part in dist.all_gather_object(scores) for p in part), key=lambda p: p[0])
        sums: dict[str, float] = {}
        for _, score in scores:
            for k, v in score.items():
                sums[k] = sums.get(k, 0.0) + v
        metrics[str(length)] = {k: v / cfg.eval.batches for k, v in sums.items()}
    model.train(was_training)
    return metrics


def curve_every(steps: int) -> int:
    """The spacing of the recorded loss curve: about 200 points whatever the step budget."""
    return max(1, steps // 200)


def _progress(enabled: bool) -> Progress:
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}"), TimeElapsedColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )


# ------------------------------------------------------------------ the loop
class Trainer:
    """Trains one RunConfig. ``fit()`` runs the loop (resuming from a checkpoint if asked) and returns
    the RunResult; the attributes below are what training methods read and change.

    ``dist``: this process's rank in a data-parallel run (``recur.training.distributed.session()``);
    ``batch_size`` stays the global batch, and ``model`` the unwrapped model (``forward_model`` is its
    DDP wrapper, which the default passes call). ``tracker``: a ``recur.tracking.Tracker`` (rank 0's
    only is called)."""

    def __init__(self, cfg: RunConfig, progress: bool = True, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int | None = None, resume: bool = False, dist: Distributed | None = None,
                 tracker: tracking.Tracker | None = None):
        if isinstance(cfg, dict):  # a config as a dict (nested or flat keys), validated like a file's
            cfg = RunConfig.model_validate(cfg)
        if not isinstance(cfg, RunConfig):
            raise TypeError(f"Trainer needs a recur.config.RunConfig (or a dict of one), got {type(cfg).__name__}")
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if (checkpoint_every or resume) and checkpoint_dir is None:
            raise ConfigError("checkpoints need a checkpoint_dir")
        self.cfg, self.progress = cfg, progress
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.resume = checkpoint_every, resume
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.tracker = tracker if self.is_main else None
        self._tracking = False  # started (fit); train_step alone logs nothing
        if dist is not None:
            dist.rows(cfg.optim.batch_size)  # the global batch splits evenly, or a ConfigError says how
            if resolve_device(cfg.device).type != dist.device.type:
                raise ConfigError(f"device {cfg.device!r} resolves to {resolve_device(cfg.device).type}, but this "
                                  f"distributed run's ranks are on {dist.device}")
        self.device = resolve_device(cfg.device) if dist is None else dist.device
        self.task, self.model = build(cfg)
        self.model.to(self.device)
        self.methods = [METHODS.get(m.name).cls(m.params()) for m in cfg.training]
        owners = [m.name for m in self.methods if m.owns_forward]
        if len(owners) > 1:
            raise ConfigError(f"training methods {owners} each own the forward and backward passes; use one of them")
        self.opt, self.sched = make_optimizer(self.model, cfg)
        # The model the default passes call: under DDP its wrapper, which all-reduces the gradients.
        self.forward_model: torch.nn.Module = self.model if dist is None else dist.wrap(self.model)
        # A method that carries something from a step's output (state_passing) sees the global batch's state.
        self._gather_state = dist is not None and any(type(m).step_end is not Method.step_end for m in self.methods)
        self._loss_scale: float | None = None  # under DDP: n_rank * world / n_global, this step's backward weight
        self._synced = False  # this step's gradients were all-reduced by DDP
        self._checked_unused = dist is None
        self.generators: dict[str, torch.Generator] = {"data": _generator(cfg.seed, _SALTS["data"])}
        self.batch_size = cfg.optim.batch_size
        self.seq_len = cfg.task.seq_len  # a curriculum may change these two during training
        self.train_task = self.task
        self.step = 0
        self.window: deque[tuple[float, float]] = deque(maxlen=cfg.optim.early_stop_window)
        self.early_stopped = False
        self.saturated_at: int | None = None  # the step at which the early-stop rule first held
        self.curve: list[tuple[int, float, float]] = []  # see RunResult.curve; saved in checkpoints
        self.curve_pending = [0.0, 0]  # loss sum and count of the steps since the last curve point
        self.curve_seconds = 0.0  # training seconds before this process (a resumed run's earlier part)
        self._curve_clock: float | None = None  # when this process started training
        self.tokens = 0  # training tokens seen (input positions of every batch)
        self.evals: list[tuple[int, int, dict[str, float]]] = []  # see RunResult.evals; saved in checkpoints
        for m in self.methods:
            m.setup(self)

    def rng(self, purpose: str) -> torch.Generator:
        """The run's random stream for ``purpose`` (seeded from the run's seed; saved in checkpoints)."""
        if purpose not in self.generators:
            self.generators[purpose] = _generator(self.cfg.seed, _salt(purpose))
        return self.generators[purpose]

    # -------------------------------------------------------------- one step
    def compute_loss(self, out: ModelOutput, batch: Batch) -> torch.Tensor:
        """The model's loss plus every method's terms; a non-finite loss stops the run."""
        loss = self.model.loss(out, batch)
        for m in self.methods:
            loss = m.loss(self, loss, out, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {self.step} "
                                     f"({self.cfg.model_name} on {self.cfg.task.name}, lr={self.cfg.optim.lr})")
        return loss

    def forward_backward(self, batch: Batch, init: State | None) -> tuple[torch.Tensor, ModelOutput]:
        """The default passes: one forward over the batch, one backward of its loss."""
        out = self.forward_model(batch.inputs, init, **head_inputs(self.model, batch))
        loss = self.compute_loss(out, batch)
        self.opt.zero_grad(set_to_none=True)
        if self._loss_scale is None:
            loss.backward()
        else:  # DDP averages over ranks: this weight makes the average the global mean's gradient
            (loss * self._loss_scale).backward()
            self._synced = True
        return loss, out

    def train_step(self) -> tuple[float, float]:
        if self._curve_clock is None:
            self._curve_clock = time.perf_counter()
        self.step += 1
        for m in self.methods:
            m.schedule(self, self.step)
        batch = self.train_task.batch(self.batch_size, self.seq_len, self.generators["data"], split="train")
        tokens = batch.inputs.numel()
        init = None
        for m in self.methods:
            init = m.initial_state(self, init)
        weight = None  # under DDP: this rank's share of the global batch's supervised positions
        if self.dist is not None:  # every rank drew the global batch (and its initial state): keep this rank's rows
            n_global = int(batch.mask.sum())
            batch = self.dist.shard(batch)
            if init is not None:
                if init.batch_size != self.batch_size:
                    raise ConfigError(f"a training method gave an initial state of {init.batch_size} sequences; under "
                                      f"DDP initial states are for the global batch ({self.batch_size})")
                init = self.dist.shard_state(init)
            weight = int(batch.mask.sum()) / max(1, n_global)
            self._loss_scale, self._synced = weight * self.dist.world_size, False
        batch = batch.to(self.device)
        owner = next((m for m in self.methods if m.owns_forward), None)
        loss, out = owner.forward_backward(self, batch, init) if owner else self.forward_backward(batch, init)
        if self.dist is not None:
            if not self._synced:  # a method ran its own passes on the unwrapped model: reduce its gradients here
                self.dist.sum_gradients(list(self.model.parameters()), weight)
            self._check_every_parameter_learns()
        for m in self.methods:
            m.after_backward(self)
        grad_norm = None
        if self.cfg.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        elif self._tracking:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        lr = self.opt.param_groups[0]["lr"]  # the rate this step uses
        self.opt.step()
        self.sched.step()
        step_out = out
        if self._gather_state and out.state is not None:
            step_out = dataclasses.replace(out, state=self.dist.gather_state(out.state))
        for m in self.methods:
            m.step_end(self, step_out)
        with torch.no_grad():
            acc = self.train_task.training_accuracy(self.model, out, batch)
        loss_value = loss.item()
        if self.dist is not None:  # the global batch's loss and accuracy: means weighted by supervised counts
            loss_value, acc = self.dist.sum([loss_value * weight, acc * weight])
        self.window.append((loss_value, acc))
        if self.saturated_at is None and self._saturated():
            self.saturated_at = self.step  # part of the step's state (checkpoints keep it)
        self._record_curve(loss_value)
        self.tokens += tokens
        if self._tracking:
            self.tracker.log(self.step, tracking.train_scalars(loss_value, acc, lr,
                                                               None if grad_norm is None else float(grad_norm)))
        if self.cfg.eval.every and self.step % self.cfg.eval.every == 0:
            self.validate()
        return loss_value, acc

    def _check_every_parameter_learns(self) -> None:
        """DDP runs without ``find_unused_parameters`` (no graph walk each step): a parameter without a
        gradient after the first backward would stall its reduction, so the run stops here, naming it."""
        if self._checked_unused:
            return
        self._checked_unused = True
        unused = [n for n, p in self.model.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            raise ConfigError(f"{len(unused)} parameters of {self.cfg.model_name!r} take no part in the loss "
                              f"({', '.join(unused[:5])}{', ...' if len(unused) > 5 else ''}); a data-parallel run "
                              "needs every trainable parameter in the loss (set requires_grad=False on the others)")

    def validate(self) -> None:
        """One point of the eval curve: the metrics at the training length on the validation split."""
        if self.evals and self.evals[-1][0] == self.step:
            return
        split = self.task.validation_split
        metrics = evaluate(self.model, self.task, self.cfg, self.device, split=split, lengths=[self.cfg.task.seq_len],
                           dist=self.dist)
        self.evals.append((self.step, self.tokens, metrics[str(self.cfg.task.seq_len)]))
        if self._tracking:
            self.tracker.log(self.step, tracking.val_scalars(self.evals[-1][2]))

    def curve_state(self) -> dict:
        """The loss curve so far, for a checkpoint (its seconds include this process's training time)."""
        seconds = self.curve_seconds
        if self._curve_clock is not None:
            seconds += time.perf_counter() - self._curve_clock
        return {"points": [list(p) for p in self.curve], "pending": list(self.curve_pending), "seconds": seconds,
                "tokens": self.tokens, "evals": [list(e) for e in self.evals]}

    def load_curve_state(self, state: dict | None) -> None:
        """Restore ``curve_state()`` (None: a checkpoint written before curves were kept, which resumes
        with the curve empty up to its step)."""
        if state is None:
            return
        self.curve = [(int(s), float(l), float(t)) for s, l, t in state["points"]]
        self.curve_pending = [float(state["pending"][0]), int(state["pending"][1])]
        self.curve_seconds, self._curve_clock = float(state["seconds"]), None
        # checkpoints from before the eval curve: tokens counted from the step (the batch was fixed)
        self.tokens = int(state.get("tokens", self.step * self.batch_size * self.seq_len))
        self.evals = [(int(s), int(n), dict(m)) for s, n, m in state.get("evals", [])]

    def _record_curve(self, loss: float, last: bool = False) -> None:
        """Add this step's loss to the curve's pending interval; close the interval into a point at
        step 1, every ``curve_every`` steps and at the budget's last step (``last``: an early stop)."""
        if not last:
            self.curve_pending[0] += loss
            self.curve_pending[1] += 1
        every = curve_every(self.cfg.optim.steps)
        due = self.step == 1 or self.step % every == 0 or self.step == self.cfg.optim.steps or last
        if due and self.curve_pending[1] and (not self.curve or self.curve[-1][0] != self.step):
            seconds = self.curve_seconds + time.perf_counter() - self._curve_clock
            self.curve.append((self.step, self.curve_pending[0] / self.curve_pending[1], round(seconds, 4)))
            self.curve_pending = [0.0, 0]

    def _saturated(self) -> bool:
        rule = self.cfg.optim.early_stop
        return (rule is not None and len(self.window) == self.window.maxlen
                and sum(a for _, a in self.window) / len(self.window) >= rule)

    def _should_stop(self) -> bool:
        """The early stop: ``early_stop_patience`` steps after the rule first held (``_saturated``)."""
        return self.saturated_at is not None and self.step >= self.saturated_at + self.cfg.optim.patience_steps()

    # -------------------------------------------------------------- the run
    def fit(self) -> RunResult:
        from recur.training import checkpoint

        start = time.perf_counter()
        cfg = self.cfg
        if self.resume:
            checkpoint.load(self, self.checkpoint_dir)  # every rank reads it
        if self.tracker is not None:
            self.tracker.start(tracking.run_name(cfg), json.loads(cfg.full_json()), config_hash(cfg), step=self.step)
            self._tracking = True
        try:
            result = self._fit(start, checkpoint)
        except BaseException:
            if self._tracking:  # close the tracker's files; the run's own error is what the caller sees
                self._tracking = False
                with contextlib.suppress(Exception):
                    self.tracker.finish(None)
            raise
        if self._tracking:
            self._tracking = False
            try:
                self.tracker.finish(result)
            except Exception as e:  # noqa: BLE001 - the run is complete: its result outweighs a tracker's last write
                warnings.warn(f"the tracker failed to finish run {result.config_hash} ({type(e).__name__}: {e}); "
                              "the run itself is complete (recur export can replay it from the store)", stacklevel=2)
        return result

    def _fit(self, start: float, checkpoint) -> RunResult:
        cfg = self.cfg
        with _progress(self.progress and self.is_main) as bar:
            job = bar.add_task(f"{cfg.model_name} on {cfg.task.name}", total=cfg.optim.steps,
                               completed=self.step, loss=float("nan"), acc=0.0)
            while self.step < cfg.optim.steps and not self.early_stopped:
                loss, acc = self.train_step()
                bar.update(job, advance=1, loss=loss, acc=acc)
                self.early_stopped = self._should_stop()  # the same on every rank: the window holds global values
                if self.early_stopped:
                    self._record_curve(loss, last=True)
                if self.checkpoint_every and (self.step % self.checkpoint_every == 0 or self.early_stopped
                                              or self.step == cfg.optim.steps):
                    if self.is_main:
                        checkpoint.save(self, self.checkpoint_dir)
                    if self.dist is not None:
                        self.dist.barrier()  # no rank goes on before the checkpoint is on disk
        for m in self.methods:
            m.finish(self)
        if cfg.eval.every:
            self.validate()  # the curve ends at the last step (an early stop, or a budget not a multiple)
        shared = {} if self.dist is None else {"dist": self.dist}  # one process: the call as it always was
        metrics = evaluate(self.model, self.task, cfg, self.device, **shared)
        depth_metrics = evaluate_depths(self.model, self.task, cfg, self.device, cfg.eval.loops, self.dist) \
            if cfg.eval.loops else {}
        info = self.task.info()
        if self.dist is not None:
            info = {**info, "world_size": self.dist.world_size}
        return RunResult(
            config=cfg,
            config_hash=config_hash(cfg),
            task=cfg.task.name,
            model=cfg.model_name,
            seed=cfg.seed,
            params=sum(p.numel() for p in self.model.parameters()),
            state_size=self.model.state_size(cfg.task.seq_len),
            train_seq_len=cfg.task.seq_len,
            steps=self.step,
            seconds=round(time.perf_counter() - start, 3),
            metrics=metrics,
            depth_metrics=depth_metrics,
            train_loss=sum(l for l, _ in self.window) / max(1, len(self.window)),
            train_accuracy=sum(a for _, a in self.window) / max(1, len(self.window)),
            early_stopped=self.early_stopped,
            curve=self.curve,
            evals=self.evals,
            info=info,
        )


def train(cfg: RunConfig, progress: bool = True, dist: Distributed | None = None,
          tracker: tracking.Tracker | None = None, **checkpointing) -> RunResult:
    """Train ``cfg.model`` on ``cfg.task`` and evaluate it at every eval length (see ``Trainer``)."""
    return Trainer(cfg, progress=progress, dist=dist, tracker=tracker, **checkpointing).fit()
