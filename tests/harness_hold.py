"""``harness_hold``: harness_shift whose first training attempt stops and waits to be killed, for the
tests of executors whose workers die mid-run (imported by name in their workers: ``imports:
[harness_hold]``).

The first process to draw a training batch of a run creates ``HOLD_DIR/first`` (atomically, so only
one attempt ever holds), writes its pid into ``HOLD_DIR/pid`` and sleeps for up to a minute: the test
kills that pid. Any later attempt (a retry in a fresh worker) finds the file and trains normally. Its
``info`` names the directory, so the run also has a ``run_info`` row.

Only batches of more than ``PROBE_ROWS`` sequences hold: ``recur sweep`` checks every run first, in
its own process, with one training step on at most 2 sequences, and that check must not hold.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from pydantic import Field
from harness_tasks import HarnessShift, ShiftParams

from recur.tasks.base import Batch, register_task

HOLD_SECONDS = 60.0  # longer than any test waits before killing the holder
PROBE_ROWS = 2  # the batch size of the sweep's check of a run (recur.cli._probe_config)


class HoldParams(ShiftParams):
    hold_dir: str = Field(description="the directory of the first attempt's marker and pid files")


@register_task
class HarnessHold(HarnessShift):
    name = "harness_hold"
    Params = HoldParams
    description = "harness_shift whose first training attempt waits to be killed. Harness test task."

    def batch(self, n: int, seq_len: int, generator: torch.Generator, split: str = "train") -> Batch:
        if split == "train" and n > PROBE_ROWS:
            hold = Path(self.params.hold_dir)
            try:
                fd = os.open(hold / "first", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # not the first attempt: train
            else:
                os.close(fd)
                (hold / "pid.tmp").write_text(str(os.getpid()))
                os.replace(hold / "pid.tmp", hold / "pid")  # whole, never half-written, when the test reads it
                time.sleep(HOLD_SECONDS)
        return super().batch(n, seq_len, generator, split)

    def info(self) -> dict:
        return {"hold_dir": self.params.hold_dir}


def wait_for_holder(hold_dir: Path, timeout: float = 60.0) -> int:
    """The pid of the process holding the first attempt, once it has written it."""
    deadline = time.monotonic() + timeout
    while not (hold_dir / "pid").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no attempt wrote {hold_dir / 'pid'} in {timeout:.0f} s")
        time.sleep(0.05)
    return int((hold_dir / "pid").read_text())
