"""How much of a passkey a segment memory still holds after each segment: the measurement behind
``rmt-segments`` ("why does RMT trained on N segments fail beyond them?").

    python -m recur.findings.memory_decay --train-segments 4 [--arch rmt] [--curriculum] [--json]

With the key at the start of the input (passkey, ``depths=1``) every row is the same filler after its
key, so whatever differs between the rows' memories is information about their keys. After segment k
the *key information* is the variance of the memory across rows relative to its mean square,

    I_k = mean_j Var_rows(m_k[:, j]) / mean(m_k^2)          (m_k: the memory tokens after segment k)

1 if the memory were all key, 0 once it no longer depends on the key. A memory whose update over a
filler segment is a contraction loses a fixed fraction of it per segment: I_k ~ I_1 r^(k-1), and the
readout fails once I_k falls below what it can decode. The per-segment retention r is the geometric
mean of I_{k+1} / I_k over the segments while I_k is above 1e-4.

The command trains the ``rmt-segments`` finding's RMT run (attention cell, 2 layers, d_model 64, 4
memory tokens, segments of 32, 1500 steps) in process on ``--train-segments`` segments, then
measures I_k over 64 segments and the answer accuracy at 4 .. 32 segments.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from recur.findings.rmt_segments import SEGMENT
from recur.state import State


def key_information(model, tokens: torch.Tensor, segments: int) -> list[float]:
    """I_k for k = 1 .. ``segments`` of ``model`` (a segment-memory architecture whose memory is
    ``State(tokens=[batch, M, d])``, as rmt's and rate's) reading ``tokens`` [rows, >= segments *
    segment_len] segment by segment."""
    L = model.segment_len
    out, state = [], None
    with torch.no_grad():
        for k in range(segments):
            state = model(tokens[:, k * L:(k + 1) * L], state).state
            memory = state["memory"]
            m = memory["tokens"] if isinstance(memory, State) and "tokens" in memory else None
            if m is None:
                raise ValueError(f"{model.name}: key_information reads a memory of memory tokens (rmt, rate), "
                                 f"got state entries {sorted(memory)}")
            out.append(float(m.var(0).mean() / m.pow(2).mean().clamp_min(1e-30)))
    return out


def retention(info: list[float], floor: float = 1e-4) -> float:
    """The geometric mean of I_{k+1} / I_k while I_k > ``floor`` (NaN with fewer than two such)."""
    kept = [x for x in info if x > floor]
    if len(kept) < 2:
        return math.nan
    return (kept[-1] / kept[0]) ** (1 / (len(kept) - 1))


def measure(train_segments: int = 4, arch: str = "rmt", curriculum: bool = False, steps: int = 1500,
            seed: int = 0, progress: bool = False) -> dict:
    """Train the ``rmt-segments`` configuration on ``train_segments`` segments; its key information
    per segment over 64 segments, the retention per segment and the accuracy at 4 .. 32 segments."""
    from recur.config import RunConfig
    from recur.findings.rmt_segments import RMTSegments
    from recur.training.trainer import Trainer

    # the finding's own rmt run, at this number of training segments
    cfg = next(c for c in RMTSegments().configs() if c.model.arch == "rmt").model_dump(mode="json")
    cfg["task"]["seq_len"] = SEGMENT * train_segments
    cfg["eval"].update(lengths=[SEGMENT * train_segments], batches=1)
    cfg["model"]["arch"], cfg["optim"]["steps"], cfg["seed"], cfg["device"] = arch, steps, seed, "cpu"
    if curriculum:
        cfg["training"] = [{"name": "curriculum", "args": {"start": SEGMENT}}]
    trainer = Trainer(RunConfig.model_validate(cfg), progress=progress)
    trainer.fit()
    model, task = trainer.model.eval(), trainer.task
    g = torch.Generator().manual_seed(5)
    info = key_information(model, task.batch(256, SEGMENT * 64, g, split="test").inputs, 63)
    accuracy = {}
    with torch.no_grad():
        for n in (4, 6, 8, 12, 16, 32):
            b = task.batch(256, SEGMENT * n, g, split="test")
            pred = model(b.inputs).logits.argmax(-1)
            accuracy[n] = float(((pred == b.targets) & b.mask).sum() / b.mask.sum())
    return {"train_segments": train_segments, "arch": arch, "curriculum": curriculum,
            "key_information": info, "retention_per_segment": retention(info), "accuracy_at_segments": accuracy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-segments", type=int, default=4)
    parser.add_argument("--arch", default="rmt", choices=("rmt", "rate"))
    parser.add_argument("--curriculum", action="store_true", help="a curriculum from 1 segment up")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = measure(args.train_segments, args.arch, args.curriculum, args.steps, progress=not args.json)
    if args.json:
        print(json.dumps(out))
        return 0
    info = out["key_information"]
    print(f"{args.arch} trained on {args.train_segments} segments{' (curriculum)' if args.curriculum else ''}")
    print("key information after segment k: " + ", ".join(f"{k + 1}: {x:.3g}" for k, x in enumerate(info[:16])))
    print(f"retention per segment: {out['retention_per_segment']:.3f}")
    print("accuracy at n segments: " + ", ".join(f"{n}: {a:.3f}" for n, a in out["accuracy_at_segments"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
