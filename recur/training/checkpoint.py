"""Checkpoints of one run: everything its future depends on, so a resumed run ends bit-identical.

    train(cfg, checkpoint_dir="ckpt", checkpoint_every=100)     # ckpt/step-000100/, ckpt/LATEST
    train(cfg, checkpoint_dir="ckpt", resume=True)               # continues from ckpt/LATEST

A checkpoint holds the model's parameters, the optimiser's and scheduler's states, every random
stream (the data streams' positions: the generators' states, and torch's global one), the step,
the early-stop window, the loss curve so far and each training method's memory (e.g. the carried
state). Tensors go to ``tensors.safetensors``, the rest to ``meta.json``. It is written to a
temporary folder that is renamed into place, then ``LATEST`` is replaced atomically, so a process
killed at any moment leaves the previous checkpoint intact.

In a data-parallel run (``recur.training.distributed``) rank 0 writes the checkpoint and every rank
reads it. Its contents are those of the global batch (the data streams, initial and carried states
are the same on every rank, or gathered), so it resumes at any world size, one process included;
``meta.json`` records the world size that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from recur.config import config_hash
from recur.state import State

LATEST = "LATEST"
_FORMAT = 1


def _flatten_state(prefix: str, state: State, out: dict[str, torch.Tensor]) -> dict:
    """Tensors of a (nested) State under ``prefix.key.subkey``; returns its structure."""
    layout = {}
    for key, value in state.items():
        if isinstance(value, State):
            layout[key] = _flatten_state(f"{prefix}.{key}", value, out)
        else:
            out[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
            layout[key] = None
    return layout


def _unflatten_state(prefix: str, layout: dict, tensors: dict[str, torch.Tensor], device) -> State:
    return State({key: _unflatten_state(f"{prefix}.{key}", sub, tensors, device) if sub is not None
                  else tensors[f"{prefix}.{key}"].to(device) for key, sub in layout.items()})


def save(trainer, directory: str | Path) -> Path:
    """Write the trainer's checkpoint at its current step; returns its folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    # Tied weights (embedding and head) are one tensor under two names: safetensors wants copies.
    for k, v in trainer.model.state_dict().items():
        tensors[f"model.{k}"] = v.detach().cpu().clone().contiguous()
    opt = trainer.opt.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for idx, entry in opt["state"].items():
        opt_meta["state"][str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().clone().contiguous()
                opt_meta["state"][str(idx)][key] = None
            else:
                opt_meta["state"][str(idx)][key] = value
    for name, gen in trainer.generators.items():
        tensors[f"rng.{name}"] = gen.get_state()
    tensors["rng.torch_global"] = torch.get_rng_state()
    methods = []
    for i, m in enumerate(trainer.methods):
        entries = {}
        for key, value in m.state_dict().items():
            if isinstance(value, State):
                entries[key] = {"state": _flatten_state(f"method{i}.{key}", value, tensors)}
            elif isinstance(value, torch.Tensor):
                tensors[f"method{i}.{key}"] = value.detach().cpu().contiguous()
                entries[key] = {"tensor": True}
            else:
                entries[key] = {"value": value}
        methods.append({"name": m.name, "entries": entries})
    meta = {
        "format": _FORMAT, "config_hash": config_hash(trainer.cfg), "config": json.loads(trainer.cfg.full_json()),
        "step": trainer.step, "window": list(trainer.window), "early_stopped": trainer.early_stopped,
        "saturated_at": trainer.saturated_at,
        "seq_len": trainer.seq_len, "optimizer": opt_meta, "scheduler": trainer.sched.state_dict(), "methods": methods,
        "curve": trainer.curve_state(),
        "world_size": 1 if getattr(trainer, "dist", None) is None else trainer.dist.world_size,  # informational
    }
    name = f"step-{trainer.step:08d}"
    tmp = directory / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / "tensors.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, default=_jsonable))
    final = directory / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    marker = directory / f".{LATEST}.tmp"
    marker.write_text(name + "\n")
    os.replace(marker, directory / LATEST)
    for old in directory.glob("step-*"):  # keep only the newest
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    for stale in directory.glob(".step-*.tmp"):  # half-written by a killed process, at a step not written again
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _jsonable(value):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to a checkpoint's meta.json")


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``directory``, or None."""
    marker = Path(directory) / LATEST
    if not marker.exists():
        return None
    path = Path(directory) / marker.read_text().strip()
    return path if (path / "meta.json").exists() else None


def load(trainer, directory: str | Path) -> None:
    """Restore the trainer (built from the same config) to the newest checkpoint under ``directory``."""
    from recur.training.trainer import ConfigError

    path = latest(directory)
    if path is None:
        raise ConfigError(f"no checkpoint to resume from in {directory}")
    meta = json.loads((path / "meta.json").read_text())
    if meta["config_hash"] != config_hash(trainer.cfg):
        raise ConfigError(f"the checkpoint in {path} is of run {meta['config_hash']}, not of this run "
                          f"({config_hash(trainer.cfg)})")
    tensors = load_file(str(path / "tensors.safetensors"))
    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    trainer.model.load_state_dict(model_state)
    opt_meta = meta["optimizer"]
    state = {}
    for idx, entry in opt_meta["state"].items():
        state[int(idx)] = {key: tensors[f"optim.{idx}.{key}"].to(trainer.device) if value is None else value
                           for key, value in entry.items()}
    trainer.opt.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    trainer.sched.load_state_dict(meta["scheduler"])
    for key, value in tensors.items():
        if key.startswith("rng.") and key != "rng.torch_global":
            trainer.rng(key.removeprefix("rng.")).set_state(value)
    torch.set_rng_state(tensors["rng.torch_global"])
    for i, (m, saved) in enumerate(zip(trainer.methods, meta["methods"], strict=True)):
        restored = {}
        for key, entry in saved["entries"].items():
            if "state" in entry:
                restored[key] = _unflatten_state(f"method{i}.{key}", entry["state"], tensors, trainer.device)
            elif "tensor" in entry:
                restored[key] = tensors[f"method{i}.{key}"].to(trainer.device)
            else:
                restored[key] = entry["value"]
        m.load_state_dict(restored)
    trainer.step = meta["step"]
    trainer.seq_len = meta["seq_len"]
    trainer.window = deque((tuple(w) for w in meta["window"]), maxlen=trainer.cfg.optim.early_stop_window)
    trainer.early_stopped = meta["early_stopped"]
    trainer.saturated_at = meta.get("saturated_at")  # absent in checkpoints from before the patience rule
    trainer.load_curve_state(meta.get("curve"))
