"""Run a grid of configs into the results store, resumably, in worker processes.

    summary = run_sweep(SweepConfig.from_yaml("grid.yaml").expand(), ResultStore("runs.sqlite"), workers=2)

Finished hashes are skipped; each run is written by this (the parent) process in its own
transaction as soon as it finishes, so killing the sweep loses no finished run. A failed
run is reported and not written; the sweep goes on.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import threading
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from recur.config import RunConfig, config_hash
from recur.results import ResultStore
from recur.training import RunResult, train


@dataclass
class SweepSummary:
    total: int
    skipped: int  # already in the store
    done: list[str] = field(default_factory=list)  # hashes written by this sweep
    failed: list[tuple[RunConfig, str]] = field(default_factory=list)  # (config, error message)
    seconds: float = 0.0


def import_modules(names) -> None:
    """Import user modules that register extra tasks or models."""
    for name in names:
        importlib.import_module(name)


def describe(cfg: RunConfig) -> str:
    m = cfg.model
    return f"{cfg.task.name} {cfg.model_name} d={m.d_model} L={m.n_layers} lr={cfg.optim.lr:g} seed={cfg.seed}"


def _result_line(result: RunResult) -> str:
    accs = "  ".join(f"acc@{n} {m['accuracy']:.3f}" for n, m in result.metrics.items())
    return f"{accs}  ({result.steps} steps, {result.seconds:.1f} s)"


# ------------------------------------------------------------------ worker processes
def _watch_parent(parent: int) -> None:
    # A worker whose sweep was killed (SIGKILL leaves no chance to stop the pool) exits
    # instead of waiting forever on the pool's queue.
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def _init_worker(threads: int, imports: list[str], parent: int) -> None:
    torch.set_num_threads(threads)
    import_modules(imports)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _run_one(config: dict) -> tuple[str, dict | str]:
    """In a worker: train one config; ("ok", result as JSON) or ("error", message)."""
    cfg = RunConfig.model_validate(config)
    try:
        return "ok", train(cfg, progress=False).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001 - the parent reports it and the sweep goes on
        return "error", _error_text(e)


def _error_text(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    at = f" (at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno})" if where else ""
    return f"{type(e).__name__}: {e}{at}"


# ------------------------------------------------------------------ the sweep
def run_sweep(configs: list[RunConfig], store: ResultStore, workers: int = 1, imports=(),
              console: Console | None = None, progress: bool = True) -> SweepSummary:
    """Train every config not yet in ``store`` and record each as it finishes.

    ``workers=1`` trains in this process; more start that many spawned processes, each
    with ``max(1, cores // workers)`` torch threads.
    """
    console = console or Console(stderr=True, soft_wrap=True)
    start = time.perf_counter()
    seen, unique = set(), []
    for cfg in configs:
        h = config_hash(cfg)
        if h not in seen:
            seen.add(h)
            unique.append(cfg)
    todo = [c for c in unique if not store.has(config_hash(c))]
    summary = SweepSummary(total=len(unique), skipped=len(unique) - len(todo))
    if summary.skipped:
        console.print(f"{summary.skipped} of {summary.total} runs already in {escape(str(store.path))}: skipped")
    if not todo:
        return summary
    workers = max(1, min(workers, len(todo)))
    console.print(f"running {len(todo)} runs with {workers} worker{'s' if workers > 1 else ''}")

    def record(cfg: RunConfig, status: str, payload) -> None:
        if status == "ok":
            result = payload if isinstance(payload, RunResult) else RunResult.model_validate(payload)
            store.put(result)
            summary.done.append(result.config_hash)
            console.print(f"[green]done[/]   {escape(describe(cfg))}: {_result_line(result)}")
        else:
            summary.failed.append((cfg, payload))
            console.print(f"[red]failed[/] {escape(describe(cfg))}: {escape(payload)}")

    bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not (progress and console.is_terminal))
    with bar:
        job = bar.add_task("sweep", total=len(todo))
        if workers == 1:
            import_modules(imports)
            for cfg in todo:
                try:
                    outcome = ("ok", train(cfg, progress=False))
                except Exception as e:  # noqa: BLE001 - reported, not written; the sweep goes on
                    outcome = ("error", _error_text(e))
                record(cfg, *outcome)
                bar.advance(job)
        else:
            threads = max(1, (os.cpu_count() or 1) // workers)
            # A ProcessPoolExecutor, not a Pool: a worker that dies (killed, out of memory, a
            # main module without the __main__ guard) breaks the pool with an error instead
            # of a silent hang.
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(threads, list(imports), os.getpid())) as pool:
                futures = {pool.submit(_run_one, c.model_dump(mode="json")): c for c in todo}
                for future in as_completed(futures):
                    try:
                        outcome = future.result()
                    except BrokenProcessPool as e:
                        outcome = ("error", f"a worker process died ({e}); the run was not recorded")
                    record(futures[future], *outcome)
                    bar.advance(job)
    summary.seconds = time.perf_counter() - start
    return summary

