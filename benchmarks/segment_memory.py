"""Peak memory of evaluation against length for the segment-memory architectures (issue 15).

    python benchmarks/segment_memory.py [--segments 4,16,64] [--batch 8]

Every architecture of the "segment memory" family, built at d_model 64, 2 layers, segments (or
windows) of 32 tokens, reads a batch of sequences of 4 to 64 segments in one call without autograd,
the head only at the last position (what a passkey or retrieval evaluation asks for). A memory model
holds one memory and one segment whatever the length, so its peak is flat; the causal LM of
attention, whose key-value cache grows with the length, is run beside them for contrast. Measured as
the resident-memory high-water mark above the level before the call (``recur.speed.peak_extra_memory_mb``,
Linux), each in a fresh process so that one model's freed memory cannot hide another's peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SEGMENT = 32
VOCAB = 256


def build(name: str):
    import torch

    from recur.registry import ARCHITECTURES

    torch.manual_seed(0)
    cls = ARCHITECTURES.get(name).cls
    if name == "causal_lm":
        return cls(vocab_size=VOCAB, d_model=64, n_layers=2, pattern="attention")
    if name == "block_recurrent":
        return cls(vocab_size=VOCAB, d_model=64, n_layers=2, window=SEGMENT)
    return cls(vocab_size=VOCAB, d_model=64, n_layers=2, segment_len=SEGMENT)


def measure_one(name: str, segments: int, batch: int) -> float | None:
    """Peak extra MB of one no-grad call on ``segments`` segments (run in this process)."""
    import torch

    from recur.speed import peak_extra_memory_mb

    model = build(name).eval()
    T = segments * SEGMENT
    tokens = torch.randint(VOCAB, (batch, T), generator=torch.Generator().manual_seed(1))
    last = torch.zeros(batch, T, dtype=torch.bool)
    last[:, -1] = True
    with torch.no_grad():
        model(tokens[:, :2 * SEGMENT], positions=last[:, :2 * SEGMENT])  # warm-up: lazy allocations happen here
        return peak_extra_memory_mb(lambda: model(tokens, positions=last))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--segments", default="4,16,64")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # name:segments, run in a child process
    args = parser.parse_args(argv)
    if args.one:
        name, segments = args.one.split(":")
        print(json.dumps(measure_one(name, int(segments), args.batch)))
        return 0
    from recur.registry import ARCHITECTURES

    names = [n for n in ARCHITECTURES.names() if ARCHITECTURES.describe(n)["family"] == "segment memory"]
    names.append("causal_lm")
    counts = [int(s) for s in args.segments.split(",")]
    print(f"peak extra memory (MB) of one no-grad call, batch {args.batch}, segments of {SEGMENT} tokens")
    print("| architecture | " + " | ".join(f"{n} segments ({n * SEGMENT} tokens)" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for name in names:
        cells = []
        for n in counts:
            out = subprocess.run([sys.executable, __file__, "--one", f"{name}:{n}", "--batch", str(args.batch)],
                                 capture_output=True, text=True, check=True)
            value = json.loads(out.stdout.strip().splitlines()[-1])
            cells.append("n/a" if value is None else f"{value:.1f}")
        label = "causal_lm (attention)" if name == "causal_lm" else name
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
