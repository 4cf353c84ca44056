"""How long each task takes to generate a training and a test batch (64 x 256).

    python benchmarks/task_generation.py

Generation runs inside the training loop, so it must stay far below a model step. Figures
are medians of repeated runs; timings live here, never in tests.
"""

from __future__ import annotations

import statistics
import time

import torch

from recur.tasks import get_task, list_tasks


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up (caches such as group tables)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    print(f"{'task':<18}{'train ms':>10}{'test ms':>10}")
    for name in list_tasks():
        task = get_task(name)
        seq_len = max(256, task.min_seq_len())
        row = []
        for split in ("train", "test"):
            g = torch.Generator().manual_seed(0)
            row.append(1e3 * median_seconds(lambda: task.batch(64, seq_len, g, split)))
        print(f"{name:<18}{row[0]:>10.1f}{row[1]:>10.1f}")


if __name__ == "__main__":
    main()
