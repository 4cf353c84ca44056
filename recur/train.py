"""One training loop for every task x model (DESIGN.md section 6).

    result = train(RunConfig(task="parity", model="lstm", steps=500))
    result.metrics      # {"64": {"accuracy": 0.98, "exact_match": 0.41}, "256": {...}}

AdamW with linear warm-up then cosine decay, global-norm gradient clipping, seeded model
and data (train batches from split "train", evaluation from split "test"), early stop
when the training accuracy saturates, and evaluation at every length of
``cfg.eval_lengths`` (length generalization). A failing run raises; nothing is recorded.

Length-generalization interventions (Buitrago & Gu, "Understanding and Improving Length
Generalization in Recurrent Models", ICML 2025): ``state_init="noise"`` starts every
training sequence from a Gaussian initial state instead of zeros, and
``state_passing=True`` starts each training batch from the (detached) final state of the
previous one. Both expose the model to states it will reach on sequences longer than the
training length.
"""

from __future__ import annotations

import math
import time
from collections import deque

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import recur
from recur.config import RunConfig, config_hash
from recur.models.lm import CausalLM
from recur.state import State
from recur.tasks.base import Task, get_task


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
    steps: int  # optimisation steps actually run (fewer than cfg.steps after an early stop)
    seconds: float  # wall time of training and evaluation
    metrics: dict[str, dict[str, float]]  # eval length -> {"accuracy", "exact_match"}
    train_loss: float  # mean over the last early_stop_window steps
    train_accuracy: float  # idem
    early_stopped: bool
    recur_version: str = recur.__version__

    def summary(self) -> dict:
        """The stable JSON of `recur run --json`."""
        return {k: getattr(self, k) for k in
                ("task", "model", "seed", "params", "state_size", "train_seq_len", "steps", "seconds", "metrics")}


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


def build(cfg: RunConfig) -> tuple[Task, CausalLM]:
    """The task and the (seeded, untrained) model of a run; every bad name or argument is a ConfigError."""
    try:
        task = get_task(cfg.task, **cfg.task_args)
        for n in sorted({cfg.seq_len, *cfg.eval_lengths}):
            task.check_seq_len(n)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    torch.manual_seed(cfg.seed)
    try:
        model = CausalLM(task.vocab_size, cfg.d_model, cfg.n_layers, pattern=cfg.model,
                         mixer_config=cfg.model_args, mlp=cfg.mlp)
    except TypeError as e:  # an unexpected keyword argument of a mixer
        raise ConfigError(f"bad model_args {cfg.model_args} for model {cfg.model_name!r}: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.state_passing:
        growing = sorted({m.name for m in model.backbone.mixers if m.growing and m.state_size(10**6) > m.state_size(10**3)})
        if growing:
            raise ConfigError(f"state_passing needs a bounded state, but {growing} keep a growing KV cache")
    return task, model


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
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    keep = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))
    warmup = cfg.warmup_steps()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, warmup, cfg.min_lr_ratio))
    return opt, sched


def noise_state(model: CausalLM, batch_size: int, std: float, generator: torch.Generator, device) -> State:
    """``model.init_state`` with Gaussian values in every float entry; counters and growing KV caches stay."""

    def fill(state: State, skip: set[str]) -> State:
        out = {}
        for key, t in state.items():
            if isinstance(t, State):
                out[key] = fill(t, set())
            elif key in skip or not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
                out[key] = t
            else:
                out[key] = (std * torch.randn(t.shape, generator=generator, dtype=t.dtype)).to(device)
        return State(out)

    zeros = model.init_state(batch_size, device="cpu")
    return State({f"layer{i}": fill(zeros[f"layer{i}"], {k for k, _ in m.growing})
                  for i, m in enumerate(model.backbone.mixers)})


def _loss(logits: torch.Tensor, batch) -> torch.Tensor:
    mask = batch.mask
    if not mask.any():
        raise ValueError("a training batch has no supervised position (mask is all False)")
    return F.cross_entropy(logits[mask].float(), batch.targets[mask])


def _generator(seed: int, *salt: int) -> torch.Generator:
    # One independent stream per purpose (train data, test data per length, state noise).
    value = seed
    for s in salt:
        value = (value * 1_000_003 + s) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


@torch.no_grad()
def evaluate(model: CausalLM, task: Task, cfg: RunConfig, device) -> dict[str, dict[str, float]]:
    """Mean ``task.score`` over ``cfg.eval_batches`` test batches at every eval length (zero initial state)."""
    model.eval()
    metrics = {}
    for length in cfg.eval_lengths:
        gen = _generator(cfg.seed, 2, length)
        sums: dict[str, float] = {}
        for _ in range(cfg.eval_batches):
            batch = task.batch(cfg.batch_size, length, gen, split="test").to(device)
            logits, _ = model(batch.inputs)
            for k, v in task.score(logits, batch).items():
                sums[k] = sums.get(k, 0.0) + v
        metrics[str(length)] = {k: v / cfg.eval_batches for k, v in sums.items()}
    model.train()
    return metrics


def _progress(enabled: bool) -> Progress:
    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}"), TimeElapsedColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )


# ------------------------------------------------------------------ the loop
def train(cfg: RunConfig, progress: bool = True) -> RunResult:
    """Train ``cfg.model`` on ``cfg.task`` and evaluate it at every eval length."""
    start = time.perf_counter()
    device = resolve_device(cfg.device)
    task, model = build(cfg)
    model.to(device)
    opt, sched = make_optimizer(model, cfg)
    data_gen, noise_gen = _generator(cfg.seed, 1), _generator(cfg.seed, 3)
    window = deque(maxlen=cfg.early_stop_window)
    state, early, step = None, False, 0
    with _progress(progress) as bar:
        job = bar.add_task(f"{cfg.model_name} on {cfg.task}", total=cfg.steps, loss=float("nan"), acc=0.0)
        for step in range(1, cfg.steps + 1):
            batch = task.batch(cfg.batch_size, cfg.seq_len, data_gen, split="train").to(device)
            if cfg.state_passing and state is not None:
                init = state
            elif cfg.state_init == "noise":
                init = noise_state(model, cfg.batch_size, cfg.state_noise_std, noise_gen, device)
            else:
                init = None
            logits, state = model(batch.inputs, init)
            loss = _loss(logits, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss is {loss.item()} at step {step} "
                                         f"({cfg.model_name} on {cfg.task}, lr={cfg.lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            state = state.detach() if cfg.state_passing else None  # keep no graph alive between steps
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            acc = task.score(logits.detach(), batch)["accuracy"]
            window.append((loss.item(), acc))
            bar.update(job, advance=1, loss=loss.item(), acc=acc)
            if (cfg.early_stop is not None and len(window) == window.maxlen
                    and sum(a for _, a in window) / len(window) >= cfg.early_stop):
                early = True
                break
    metrics = evaluate(model, task, cfg, device)
    return RunResult(
        config=cfg,
        config_hash=config_hash(cfg),
        task=cfg.task,
        model=cfg.model_name,
        seed=cfg.seed,
        params=sum(p.numel() for p in model.parameters()),
        state_size=model.state_size(cfg.seq_len),
        train_seq_len=cfg.seq_len,
        steps=step,
        seconds=round(time.perf_counter() - start, 3),
        metrics=metrics,
        train_loss=sum(l for l, _ in window) / max(1, len(window)),
        train_accuracy=sum(a for _, a in window) / max(1, len(window)),
        early_stopped=early,
    )

