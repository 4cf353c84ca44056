"""Ray as a sweep executor: each run is one Ray task; the driver alone writes the store.

    run_sweep(configs, store, executor="ray")                      # a local Ray, one CPU per run
    run_sweep(configs, store, executor="ray", address="auto")      # the cluster started on this machine
    recur sweep grid.yaml --executor ray --address ray://head:10001

``RayTasks`` is the sweep's third pool beside the in-process one and the worker processes
(``recur.sweep``): the sweep claims a run, ``start`` submits it as a task, ``poll`` waits on the
tasks in flight (``ray.wait``) and hands back each outcome, and the sweep writes it, in this
process, in one transaction. A task returns its run's ``RunResult`` as JSON and writes nothing, so
resume (finished hashes are skipped), claims and the no-loss guarantee are the local executor's.

Resources. Each task asks for one CPU, and one GPU where the cluster has any (then only GPU nodes
train, one run per GPU, as zoology's Ray launcher does); it trains with one torch and numba thread
on CPU. At most ``slots`` tasks are in flight (default: the cluster's GPUs, else its CPUs), so runs
are claimed only when a slot frees up, as with local workers.

A worker that dies (killed, out of memory, its node lost) is retried by Ray ``retries`` times (Ray's
``max_retries``); when no attempt survives, the run is reported failed with Ray's reason and is not
recorded. A run that raises is not retried: it is reported, as locally. Ray's memory monitor may kill
a task when its node is short of memory (such a kill is retried like any other); set
``RAY_memory_monitor_refresh_ms=0`` before starting Ray to turn it off.

Without ``address`` (nor RAY_ADDRESS) a private local Ray is started with ``num_cpus`` CPUs (default:
the machine's cores), no dashboard and quiet logs, and shut down when the sweep ends; its processes
start with SIGINT ignored (the sweep decides what Ctrl-C does) and with this process's ``sys.path``,
so the modules a sweep imports resolve as they do here. On a cluster, install recur and those
modules on every node (or use a Ray runtime_env). A process already connected to Ray (``ray.init``
called first) keeps its connection: the sweep submits to it and leaves it up.

Ctrl-C: the first cancels the tasks in flight (``ray.cancel(force=True)``: their workers are killed)
and records none of them; every run that had finished is already stored.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import torch

from recur.config import RunConfig
from recur.sweep import _run_one, _sigint_ignored_by_children, _worker_environment, import_modules

DEFAULT_RETRIES = 1  # attempts after a worker dies; a run that kills its worker twice is likely at fault itself

INSTALL_HINT = "--executor ray needs Ray, which is not installed: pip install 'recur[ray]'"


def require_ray():
    """The ``ray`` module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return ray


def train_task(config: dict, imports: list[str], threads: int) -> tuple[str, dict | str]:
    """In a Ray worker: train one config; ("ok", RunResult JSON) or ("error", message), as a local worker."""
    torch.set_num_threads(threads)
    from recur.ops.kernels import numba

    if numba is not None:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        import_modules(imports)
    except Exception as e:  # noqa: BLE001 - reported with the run, like a run that raises
        return "error", f"{type(e).__name__}: {e} (importing the sweep's modules in a Ray worker)"
    return _run_one(config)


@contextmanager
def _local_path():
    """PYTHONPATH set to this process's ``sys.path`` for the Ray processes started inside (a local Ray:
    its workers then import the sweep's modules as this process does), restored after."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a private local Ray and connect to it: ``num_cpus`` CPUs (default: the machine's cores), no
    dashboard, quiet logs, one thread per worker, this process's ``sys.path``, SIGINT ignored by its
    processes. ``ray.shutdown()`` stops it (it also dies with this process)."""
    ray = require_ray()
    with _worker_environment(1), _local_path(), _sigint_ignored_by_children():
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.ERROR)


def _crash_text(e: BaseException, attempts: int) -> str:
    """Why a task produced no result, in one line: Ray's error class and the first line of its message."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    tries = f" on each of {attempts} attempts" if attempts > 1 else ""
    return f"its Ray worker died{tries} ({type(e).__name__}: {first}); the run was not recorded"


class RayTasks:
    """Runs as Ray tasks, at most ``slots`` in flight: the pool interface of ``recur.sweep.run_sweep``
    (free, starting, running, start, poll, cancel, kill, close)."""

    def __init__(self, slots: int | None = None, imports=(), address: str | None = None,
                 retries: int = DEFAULT_RETRIES, num_cpus: int | None = None):
        ray = self.ray = require_ray()
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.imports = list(imports)
        self.tasks: dict = {}  # ObjectRef -> the RunConfig it trains
        self.started = False  # this pool started the Ray it uses (and shuts it down)
        address = address or os.environ.get("RAY_ADDRESS") or None
        if ray.is_initialized():
            self.where = "the Ray this process is connected to"
        elif address is None:
            start_local_ray(num_cpus)
            self.started = True
            self.where = "a local Ray"
        else:
            with _sigint_ignored_by_children():
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            self.started = True  # our connection: dropped at the end (the cluster stays up)
            self.where = f"the Ray cluster at {address}"
        resources = ray.cluster_resources()
        self.gpus, self.cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        capacity = self.gpus or self.cpus
        if capacity < 1:
            self.close()
            raise RuntimeError(f"{self.where} has no {'GPU' if self.gpus else 'CPU'} to run tasks on")
        self.slots = max(1, slots if slots else capacity)
        self.remote = ray.remote(train_task).options(num_cpus=1, num_gpus=1 if self.gpus else 0,
                                                     max_retries=retries, name="recur-sweep-run")
        self.retries = retries

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}" if self.gpus else "no GPU"
        per = "1 GPU" if self.gpus else "1 CPU"
        return (f"as Ray tasks on {self.where} ({self.cpus} CPU{'s' if self.cpus > 1 else ''}, {gpus}), "
                f"{per} each, up to {self.slots} at a time")

    # ---------------------------------------------------------- the pool interface
    def free(self) -> int:
        return max(0, self.slots - len(self.tasks))

    def starting(self) -> bool:
        return False

    def running(self) -> list[RunConfig]:
        return list(self.tasks.values())

    def start(self, cfg: RunConfig) -> None:
        ref = self.remote.remote(cfg.model_dump(mode="json"), self.imports, 1)
        self.tasks[ref] = cfg

    def poll(self, timeout: float) -> list[tuple[RunConfig, str, dict | str]]:
        """Wait up to ``timeout`` s for tasks to end: (config, "ok", result JSON) or (config, "error", message)."""
        if not self.tasks:
            return []
        refs = list(self.tasks)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # every other one that has ended too
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            cfg = self.tasks.pop(ref)
            try:
                status, payload = self.ray.get(ref)
            except self.ray.exceptions.RayError as e:  # the worker died on every attempt, or the task was lost
                status, payload = "error", _crash_text(e, self.retries + 1)
            out.append((cfg, status, payload))
        return out

    def cancel(self) -> list[RunConfig]:
        """Stop every task in flight now (their workers are killed); the runs they were training."""
        stopped = self.running()
        for ref in list(self.tasks):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - it ended meanwhile
                pass
        self.tasks.clear()
        return stopped

    def kill(self) -> None:
        """A second Ctrl-C: cancel what runs, then the process exits (a local Ray dies with it)."""
        for ref in list(self.tasks):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass

    def close(self) -> None:
        """Cancel what still runs (an error stopped the sweep) and shut down the Ray this pool started."""
        if self.tasks:
            self.cancel()
        if self.started:
            self.ray.shutdown()
            self.started = False
