"""Sampling from a trained checkpoint: what ``recur generate`` runs.

    model, task, cfg = load_checkpoint("checkpoints/<run hash>")      # a run's folder, or one step-* folder
    for piece in generate_text(model, task, "def ", max_new_tokens=200):
        print(piece, end="")

A checkpoint (``recur run --checkpoint-every N``) holds the run's full config, so the model is
rebuilt from it exactly as the run built it and its trained weights are loaded over it. Text
tasks (``encode`` / ``decode``) take a prompt string: it becomes a document start (BOS + its
UTF-8 bytes), and the output is decoded incrementally, so a multi-byte character split across
tokens prints whole, and a generated BOS (the model ending the document) ends the sample. Other
tasks take token ids and give token ids.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file

from recur.config import RunConfig
from recur.training.checkpoint import LATEST, latest
from recur.training.trainer import ConfigError, build, resolve_device


def resolve_checkpoint(path: str | Path) -> Path:
    """The step folder of ``path``: a step folder itself, a run folder (with LATEST), or a folder
    holding exactly one run folder (``--checkpoint-dir`` of a single run)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}")
    if (path / "meta.json").exists() and (path / "tensors.safetensors").exists():
        return path
    if (path / LATEST).exists():
        step = latest(path)
        if step is None:
            raise ConfigError(f"{path / LATEST} names a checkpoint that is not there (an interrupted write?)")
        return step
    runs = sorted(p for p in path.iterdir() if p.is_dir() and (p / LATEST).exists()) if path.is_dir() else []
    if len(runs) == 1:
        return resolve_checkpoint(runs[0])
    if runs:
        names = ", ".join(p.name for p in runs[:5]) + (" ..." if len(runs) > 5 else "")
        raise ConfigError(f"{path} holds {len(runs)} runs' checkpoints ({names}): pass one of them")
    raise ConfigError(f"{path} is not a checkpoint: expected a run's folder with {LATEST} (written by "
                      "`recur run --checkpoint-every N`) or one of its step-* folders")


def load_checkpoint(path: str | Path, device: str = "auto"):
    """``(model, task, cfg)`` of the checkpoint at ``path``, the model in eval mode on ``device``."""
    step = resolve_checkpoint(path)
    meta = json.loads((step / "meta.json").read_text())
    cfg = RunConfig.model_validate(meta["config"])
    task, model = build(cfg)
    weights = {k.removeprefix("model."): v for k, v in load_file(str(step / "tensors.safetensors")).items()
               if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.to(resolve_device(device)).eval(), task, cfg


def is_text_task(task) -> bool:
    return callable(getattr(task, "encode", None)) and callable(getattr(task, "decode", None))


def prompt_tokens(task, prompt: str | None = None, tokens: list[int] | None = None) -> list[int]:
    """The prompt as token ids: ``prompt`` encoded by a text task, or ``tokens`` as given (checked)."""
    if (prompt is None) == (tokens is None):
        raise ValueError("give a prompt (text tasks) or tokens (token ids), not both and not neither")
    if prompt is not None:
        if not is_text_task(task):
            raise ValueError(f"task {task.name!r} has no text encoding: give the prompt as token ids (--tokens 1,2,3)")
        return list(task.encode(prompt))
    if not tokens:
        raise ValueError("the prompt must hold at least one token")
    bad = [t for t in tokens if not 0 <= t < task.vocab_size]
    if bad:
        raise ValueError(f"token ids must lie in [0, {task.vocab_size}) for task {task.name!r}, got {bad[:5]}")
    return list(tokens)


def generate_tokens(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
                    top_k: int | None = None, seed: int = 0, stop: int | None = None) -> Iterator[int]:
    """The generated token ids one by one (the prompt excluded), ending early at ``stop``
    (which is not yielded). Seeded: the same call gives the same sample."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs = torch.tensor([prompt], dtype=torch.int64, device=device)
    with torch.no_grad():
        for token in model.stream(inputs, max_new_tokens, temperature, top_k, generator=generator):
            t = int(token[0])
            if t == stop:
                return
            yield t


def generate_text(model, task, prompt: str, max_new_tokens: int, temperature: float = 0.0,
                  top_k: int | None = None, seed: int = 0) -> Iterator[str]:
    """The continuation of ``prompt`` as text pieces, decoded incrementally (UTF-8 across tokens);
    a generated document start (the task's BOS) ends it."""
    stop = task.encode("")[0] if task.encode("") else None  # the token a document starts with
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for t in generate_tokens(model, prompt_tokens(task, prompt=prompt), max_new_tokens, temperature, top_k, seed,
                             stop=stop):
        piece = decoder.decode(bytes([t])) if t < 256 else ""
        if piece:
            yield piece
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail
