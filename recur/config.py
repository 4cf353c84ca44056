"""Run and sweep configs: a run is fully described by a serialisable config, and its hash names it.

    cfg = RunConfig(task="mqar", model="gla", d_model=64, task_args={"num_kv_pairs": 8})
    config_hash(cfg)                          # "3f2a9c0d1e4b5a67": sha256 of the canonical JSON
    sweep = SweepConfig.from_yaml("grid.yaml")
    configs = sweep.expand()                  # models x tasks x sizes x seeds x lrs

A sweep YAML names the grid axes and, beside them, any ``RunConfig`` field shared by every run::

    models: [lstm, mamba, {name: gla, args: {chunk_size: 16}, overrides: {lr: 3.0e-3}}]
    tasks: [parity, {name: mqar, args: {num_kv_pairs: 8}, overrides: {seq_len: 128}}]
    sizes: [{d_model: 32}, {d_model: 64, n_layers: 4}]
    seeds: [0, 1]
    lrs: [1.0e-3, 3.0e-3]
    steps: 1000                               # shared by every run
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class RunConfig(BaseModel):
    """One training run: task x model x size x seed x optimisation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: str = Field(description="registered task name (`recur tasks`)")
    task_args: dict[str, Any] = Field(default_factory=dict, description="task parameters")
    model: str | list[str] = Field(description="model name, pattern preset, or a list of model names (a layer pattern)")
    model_args: dict[str, Any] = Field(default_factory=dict,
                                       description="mixer options: flat keys for every mixer, {model: {...}} for one")
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    mlp: Literal["swiglu", "gelu"] | None = Field("swiglu", description="channel mixer after each mixer, or None")
    seq_len: int = Field(64, ge=1, description="training sequence length")
    eval_lengths: list[int] = Field(default_factory=list, description="default: [seq_len, 4 * seq_len]")
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.1, ge=0, description="warm-up: a fraction of steps if < 1, else a number of steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the cosine decays to lr * this")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm, None: no clipping")
    seed: int = 0
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    eval_batches: int = Field(4, ge=1, description="batches of batch_size test sequences per eval length")
    early_stop: float | None = Field(0.99, gt=0, le=1,
                                     description="stop when the mean training accuracy of the last "
                                                 "early_stop_window steps reaches this; None: never")
    early_stop_window: int = Field(20, ge=1)
    state_init: Literal["zeros", "noise"] = Field("zeros", description="initial state of every training sequence")
    state_noise_std: float = Field(1.0, ge=0, description="std of the Gaussian initial state (state_init='noise')")
    state_passing: bool = Field(False, description="start each training batch from the previous batch's final state")

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("a layer pattern needs at least one model name")
        return v

    @field_validator("eval_lengths")
    @classmethod
    def _positive_lengths(cls, v):
        if any(n < 1 for n in v):
            raise ValueError(f"eval lengths must be >= 1, got {v}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _default_eval_lengths(self):
        if not self.eval_lengths:
            # frozen model: fill the derived default once, so the dump (and the hash) shows it
            object.__setattr__(self, "eval_lengths", [self.seq_len, 4 * self.seq_len])
        return self

    @property
    def model_name(self) -> str:
        """A display name: the model or preset name, or the pattern joined by '+'."""
        return self.model if isinstance(self.model, str) else "+".join(self.model)

    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else min(int(self.warmup), self.steps)

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def config_hash(cfg: RunConfig) -> str:
    """The run's name: first 16 hex digits of sha256 over the canonical JSON of the full config."""
    return hashlib.sha256(cfg.canonical_json().encode()).hexdigest()[:16]


def config_problems(e: ValidationError) -> str:
    """A pydantic error as one readable line: ``field: message; field: message``."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())


# ------------------------------------------------------------------ sweeps
class TaskSpec(BaseModel):
    """One task of a sweep: its name, parameters and any RunConfig fields it overrides (e.g. seq_len)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(BaseModel):
    """One model of a sweep: a name, preset or pattern, its mixer options and any RunConfig overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | list[str]
    args: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)


class Size(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    d_model: int | None = Field(None, ge=1)
    n_layers: int | None = Field(None, ge=1)


_GRID_KEYS = {"models", "tasks", "sizes", "seeds", "lrs", "shared", "imports"}


class SweepConfig(BaseModel):
    """A grid of runs: models x tasks x sizes x seeds x lrs, plus fields shared by every run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    sizes: list[Size] = Field(default_factory=lambda: [Size()])
    seeds: list[int] = Field(default_factory=lambda: [0])
    lrs: list[float] | None = Field(None, description="None: the shared lr")
    shared: dict[str, Any] = Field(default_factory=dict, description="RunConfig fields common to every run")
    imports: list[str] = Field(default_factory=list,
                               description="modules to import first (they register custom tasks or models)")

    @model_validator(mode="before")
    @classmethod
    def _collect_shared(cls, data):
        """Top-level RunConfig fields go to ``shared``; names as plain strings become specs."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        shared = dict(data.pop("shared", None) or {})
        for key in list(data):
            if key not in _GRID_KEYS:
                if key not in RunConfig.model_fields:
                    raise ValueError(f"unknown sweep key {key!r}: expected one of {sorted(_GRID_KEYS)} "
                                     f"or a run field ({', '.join(RunConfig.model_fields)})")
                shared[key] = data.pop(key)
        data["shared"] = shared
        for axis in ("models", "tasks"):
            if isinstance(data.get(axis), (str, dict)):
                data[axis] = [data[axis]]
            if isinstance(data.get(axis), list):
                data[axis] = [{"name": x} if isinstance(x, str) else x for x in data[axis]]
        for axis in ("seeds", "lrs"):
            if isinstance(data.get(axis), (int, float)) and not isinstance(data.get(axis), bool):
                data[axis] = [data[axis]]
        return data

    @field_validator("shared")
    @classmethod
    def _no_axes_in_shared(cls, v):
        bad = sorted(set(v) & {"task", "model", "task_args", "model_args"})
        if bad:
            raise ValueError(f"{bad} are grid axes: use 'tasks' and 'models' (with 'args')")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        text = Path(path).read_text()
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a sweep file is a YAML mapping with 'models' and 'tasks', got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(f"{path}: bad sweep config: {config_problems(e)}") from None

    def expand(self) -> list[RunConfig]:
        """Every run of the grid (duplicates removed), ordered task, size, model, seed, lr."""
        runs, seen = [], set()
        for task in self.tasks:
            for size in self.sizes:
                for model in self.models:
                    for seed in self.seeds:
                        for lr in self.lrs or [None]:
                            fields = {**self.shared, **task.overrides, **model.overrides}
                            fields.update(task=task.name, task_args=task.args, model=model.name, model_args=model.args,
                                          seed=seed)
                            fields.update({k: v for k, v in size.model_dump().items() if v is not None})
                            if lr is not None:
                                fields["lr"] = lr
                            try:
                                cfg = RunConfig(**fields)
                            except ValidationError as e:
                                raise ValueError(f"bad run in sweep (task {task.name!r}, model {model.name!r}): "
                                                 f"{config_problems(e)}") from None
                            h = config_hash(cfg)
                            if h not in seen:
                                seen.add(h)
                                runs.append(cfg)
        return runs
