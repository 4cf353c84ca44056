"""Run a grid of configs into the results store, resumably, in worker processes, beside other sweeps.

    summary = run_sweep(SweepConfig.from_yaml("grid.yaml").expand(), ResultStore("runs.sqlite"), workers=2)

Finished hashes are skipped; each run is written by this (the parent) process in its own
transaction as soon as it finishes, so killing the sweep loses no finished run. A failed
run is reported and not written; the sweep goes on. A worker process that dies (killed, out of
memory) fails the run it was training and is replaced.

Claims. Runs are picked lazily: each time a worker is free, the sweep claims the next run of the
grid that is neither finished nor claimed by a live owner (``ResultStore.claim``: a lease of
``lease`` seconds, 60 by default, renewed every ``heartbeat`` seconds, 10, by a thread of this
process, and dropped when the run is stored or fails). Two sweeps over one store therefore split
the grid: no run is trained twice and none is lost. When the runs left are all claimed by another
sweep, this one waits for them, looking again every ``poll`` seconds, and takes over any whose
owner stops (a claim of a dead process of this host at once, one of another host when its lease
expires); so when ``run_sweep`` returns, every run of the grid is stored or has failed. With
``wait_for_others=False`` it returns instead, counting those runs in ``summary.elsewhere``.

Ctrl-C. A terminal sends SIGINT to the whole process group; the workers ignore it and the parent
decides. The first SIGINT cancels: no run is started, the running ones are stopped at once (their
worker processes are terminated; in-process, the run is aborted) and not recorded, every run that
had finished is already in the store, the claims are released, and ``SweepInterrupted`` (a
KeyboardInterrupt carrying the summary) is raised, within about a second. A second SIGINT
exits the process at once (status 130); a run being written then is rolled back by SQLite, never
half-written, and the claims left behind die with the process.

Threads. Each worker trains with ``max(1, cores // workers)`` threads for torch, numba and OpenMP:
NUMBA_NUM_THREADS and OMP_NUM_THREADS are set in the environment the workers start with (numba
reads them when it is imported) so that workers do not oversubscribe the cores.

Executors. ``executor="local"`` (the default) trains in this process or in worker processes, as
above; ``executor="ray"`` submits each run as a Ray task (``recur.ray_executor``: a local Ray, or
the cluster at ``address``), with the same claims, records and Ctrl-C. Either way the workers only
return results and this process alone writes the store.

Shards. Without Ray, n machines split a grid with ``shard(configs, i, n)`` (``recur sweep --shard
i/n``), each into its own store, merged afterwards with ``recur.store_merge.merge_stores``.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from recur.config import RunConfig, config_hash
from recur.results import DEFAULT_LEASE, ResultStore, StoreError, claim_is_live, new_owner
from recur.training import RunResult, train

LEASE_SECONDS = DEFAULT_LEASE  # a claim lives this long unless renewed
HEARTBEAT_SECONDS = 10.0  # the sweep renews its claims this often
POLL_SECONDS = 2.0  # a sweep waiting on runs that another sweep trains looks again this often

THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")  # read by numba and OpenMP when they start
EXECUTORS = ("local", "ray")  # run_sweep(executor=...): worker processes here, or Ray tasks (recur.ray_executor)


@dataclass
class SweepSummary:
    total: int
    skipped: int  # already in the store when the sweep started
    done: list[str] = field(default_factory=list)  # hashes trained and written by this sweep
    failed: list[tuple[RunConfig, str]] = field(default_factory=list)  # (config, error message)
    seconds: float = 0.0
    by_others: list[str] = field(default_factory=list)  # stored by another sweep while this one ran
    elsewhere: int = 0  # still being trained by another sweep when this one returned (wait_for_others=False)
    not_run: int = 0  # not trained because the sweep was interrupted (the cancelled ones included)
    cancelled: int = 0  # running when the sweep was interrupted: stopped, not recorded
    interrupted: bool = False


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep: every run it had finished is stored; ``summary`` says how many."""

    def __init__(self, summary: SweepSummary):
        super().__init__()
        self.summary = summary

    def __str__(self) -> str:
        s = self.summary
        stopped = f" ({s.cancelled} stopped while running)" if s.cancelled else ""
        return (f"interrupted: {_runs(len(s.done))} stored, {s.not_run} not run{stopped}, {len(s.failed)} failed; "
                "run the sweep again to resume")


def _runs(n: int) -> str:
    return f"{n} run{'' if n == 1 else 's'}"


class SweepError(RuntimeError):
    """The sweep cannot go on: a worker process could not start."""


def import_modules(names) -> None:
    """Import user modules that register extra tasks or models."""
    for name in names:
        importlib.import_module(name)


def describe(cfg: RunConfig) -> str:
    m = cfg.model
    return f"{cfg.task.name} {cfg.model_name} d={m.d_model} L={m.n_layers} lr={cfg.optim.lr:g} seed={cfg.seed}"


def _result_line(result: RunResult) -> str:
    accs = "  ".join((f"bpb@{n} {m['bits_per_byte']:.3f}" if "bits_per_byte" in m else
                      f"mse@{n} {m['mse']:.3f}" if "mse" in m else f"acc@{n} {m['accuracy']:.3f}")
                     for n, m in result.metrics.items())
    return f"{accs}  ({result.steps} steps, {result.seconds:.1f} s)"


def _error_text(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    at = f" (at {where[0].filename.rsplit('/', 1)[-1]}:{where[0].lineno})" if where else ""
    return f"{type(e).__name__}: {e}{at}"


# ------------------------------------------------------------------ shards: one part of the grid per machine
def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> ``(2, 4)``: shard 2 of 4. Shards are numbered from 1 to n, as ``--shard i/n`` is in
    Jest and Playwright; a ValueError says what is wrong with any other text."""
    index, slash, count = text.strip().partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f"bad shard {text!r}: expected I/N with whole numbers, e.g. 1/4 (the first of 4 shards)")
    index, count = int(index), int(count)
    if count < 1:
        raise ValueError(f"bad shard {text!r}: expected at least 1 shard, got {count}")
    if not 1 <= index <= count:
        hint = f" (shards are numbered from 1: the first is 1/{count})" if index == 0 else ""
        raise ValueError(f"bad shard {text!r}: expected a shard from 1/{count} to {count}/{count}, got {index}{hint}")
    return index, count


def shard(configs: list[RunConfig], index: int, count: int) -> list[RunConfig]:
    """The runs of shard ``index`` of ``count`` (1-based): those whose config hash, read as a number, is
    ``index - 1`` modulo ``count``, in their order in ``configs``. The ``count`` shards of a grid are
    disjoint and together are the whole grid.

    By hash, not by position: a run's shard depends on its config alone, so reordering the sweep file,
    adding a seed or a model, or a recur release that expands the grid in another order never moves a
    finished run to another shard: each machine's store keeps matching its shard, and rerunning the
    shards after an edit trains only the new runs. The price is balance: shard sizes are equal only on
    average (N runs give each shard about N/count, give or take sqrt(N/count)); where that matters, use
    ``--executor ray``, or sweeps sharing one store on a local disk (claims split a grid evenly)."""
    if not 1 <= index <= count:
        raise ValueError(f"expected a shard from 1 to {count}, got {index}")
    return [c for c in configs if int(config_hash(c), 16) % count == index - 1]


# ------------------------------------------------------------------ worker processes
def _watch_parent(parent: int) -> None:
    # A worker whose sweep was killed (SIGKILL leaves no chance to stop the workers) exits
    # instead of waiting forever on its pipe.
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def worker_thread_count(workers: int) -> int:
    """Threads per worker process: the cores shared out, at least one each."""
    return max(1, (os.cpu_count() or 1) // workers)


def _init_worker(threads: int, imports: list[str], parent: int) -> None:
    torch.set_num_threads(threads)
    from recur.ops.kernels import numba

    if numba is not None:  # also limited by NUMBA_NUM_THREADS, set before numba was imported here
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    import_modules(imports)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def worker_threads() -> dict:
    """What this process trains with: its torch and numba thread counts, the thread variables of its
    environment, and whether it ignores SIGINT (a sweep worker reports this when it is ready)."""
    from recur.ops.kernels import numba

    return {"pid": os.getpid(), "torch": torch.get_num_threads(),
            "numba": numba.get_num_threads() if numba is not None else None,
            "numba_max": numba.config.NUMBA_NUM_THREADS if numba is not None else None,
            "env": {k: os.environ.get(k) for k in THREAD_VARIABLES},
            "sigint_ignored": signal.getsignal(signal.SIGINT) == signal.SIG_IGN}


def _run_one(config: dict) -> tuple[str, dict | str]:
    """In a worker: train one config; ("ok", result as JSON) or ("error", message)."""
    try:
        cfg = RunConfig.model_validate(config)
        return "ok", train(cfg, progress=False).model_dump(mode="json")
    except Exception as e:  # noqa: BLE001 - the parent reports it and the sweep goes on
        return "error", _error_text(e)


def _worker_main(conn, threads: int, imports: list[str], parent: int) -> None:
    """A worker process: train the configs the parent sends, one at a time, and send back each outcome.

    It ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the parent decides
    (it terminates the workers on the first). The parent started it with SIGINT ignored already, so
    a Ctrl-C while it was starting (importing torch) does not kill it either."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _init_worker(threads, imports, parent)
    except Exception as e:  # noqa: BLE001 - the parent stops the sweep with this message
        conn.send(("init-error", _error_text(e)))
        return
    conn.send(("ready", worker_threads()))
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            job = None
        if job is None:
            break
        conn.send(_run_one(job))
    # Done: exit now. The worker holds nothing to clean up (the parent writes the store), and tearing
    # down torch and numba at interpreter exit takes seconds that the sweep would wait for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def _worker_environment(threads: int):
    """The thread variables set to ``threads`` (or lower, where the user set them lower) for the
    processes started inside, and restored after: a spawned process gets a copy of os.environ."""
    saved = {k: os.environ.get(k) for k in THREAD_VARIABLES}
    for k, old in saved.items():
        n = threads
        if old is not None and old.strip().isdigit() and int(old) >= 1:
            n = min(n, int(old))
        os.environ[k] = str(n)
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old


@contextmanager
def _sigint_ignored_by_children():
    """Processes started inside begin with SIGINT ignored (an ignored signal stays ignored across exec,
    and Python keeps it so), so a Ctrl-C while a worker imports torch does not kill it with a traceback.
    Meanwhile SIGINT is blocked here, not lost: Linux keeps a blocked signal pending even while it is
    ignored, and delivers it to the sweep's handler when the block is lifted."""
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    main = threading.current_thread() is threading.main_thread()  # elsewhere handlers cannot be set
    old_handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGINT, old_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    def __init__(self, process, conn):
        self.process, self.conn = process, conn
        self.info: dict | None = None  # its worker_threads(), once it is ready
        self.job: RunConfig | None = None


class _Processes:
    """``n`` spawned worker processes, each training one run at a time, sent over its own pipe.

    Not a ProcessPoolExecutor: one worker that dies breaks such a pool for every run, and its workers
    cannot be stopped in the middle of a run; here a dead worker fails only its run and is replaced,
    and ``cancel`` terminates the workers at once."""

    def __init__(self, n: int, threads: int, imports, stopping: threading.Event | None = None):
        self.ctx = mp.get_context("spawn")
        self.threads, self.imports = threads, list(imports)
        self.stopping = stopping  # set: the sweep is stopping, a worker that dies starting is no error
        self.workers = [self._spawn() for _ in range(n)]

    def _spawn(self) -> _Worker:
        here, there = self.ctx.Pipe()
        with _worker_environment(self.threads), _sigint_ignored_by_children():
            process = self.ctx.Process(target=_worker_main, args=(there, self.threads, self.imports, os.getpid()),
                                       name="recur-sweep-worker", daemon=True)
            process.start()
        there.close()
        return _Worker(process, here)

    def free(self) -> int:
        """Workers ready and idle: a run is claimed only for one of these (not for a worker still
        importing torch, which can take seconds while another sweep could train the run)."""
        return sum(w.job is None and w.info is not None for w in self.workers)

    def starting(self) -> bool:
        return any(w.info is None for w in self.workers)

    def running(self) -> list[RunConfig]:
        return [w.job for w in self.workers if w.job is not None]

    def start(self, cfg: RunConfig) -> None:
        i = next(i for i, w in enumerate(self.workers) if w.job is None and w.info is not None)
        try:
            self.workers[i].conn.send(cfg.model_dump(mode="json"))
        except OSError:  # it died while idle: a fresh one takes the run
            self._replace(i)
            self.workers[i].conn.send(cfg.model_dump(mode="json"))
        self.workers[i].job = cfg

    def _replace(self, i: int) -> None:
        old = self.workers[i]
        old.conn.close()
        old.process.join(timeout=1.0)
        self.workers[i] = self._spawn()

    def ready(self, timeout: float = 120.0) -> list[dict]:
        """Wait until every worker is ready; their ``worker_threads()`` reports."""
        deadline = time.monotonic() + timeout
        while any(w.info is None for w in self.workers):
            if time.monotonic() > deadline:
                raise SweepError(f"sweep workers not ready after {timeout:.0f} s")
            self.poll(0.5)
        return [w.info for w in self.workers]

    def poll(self, timeout: float) -> list[tuple[RunConfig, str, dict | str]]:
        """Wait up to ``timeout`` s for outcomes: (config, "ok", result JSON) or (config, "error", message)."""
        waits = {}
        for w in self.workers:
            waits[w.conn] = w
            waits[w.process.sentinel] = w
        touched = {id(waits[r]): waits[r] for r in mp.connection.wait(list(waits), timeout)}
        out = []
        for w in touched.values():
            while True:  # messages first: a result sent just before the worker died counts
                try:
                    if not w.conn.poll():
                        break
                    message = w.conn.recv()
                except (EOFError, OSError):
                    break
                if message[0] == "ready":
                    w.info = message[1]
                elif message[0] == "init-error":
                    raise SweepError(f"a sweep worker process could not start: {message[1]}")
                else:
                    out.append((w.job, *message))
                    w.job = None
            if not w.process.is_alive():
                w.process.join(timeout=1.0)
                code = w.process.exitcode
                stopping = self.stopping is not None and self.stopping.is_set()
                if w.info is None and (code is None or code >= 0) and not stopping:
                    raise SweepError(
                        f"a sweep worker process exited while starting ({_exit_text(code)}; its error is above). "
                        "Workers are spawned and import the main module: a script that calls run_sweep with "
                        "workers > 1 must do so under `if __name__ == \"__main__\":`")
                if w.job is not None:
                    why = f"its worker process died ({_exit_text(code)}); the run was not recorded"
                    out.append((w.job, "error", why))
                    w.job = None
                if not stopping:
                    self._replace(self.workers.index(w))
        return out

    def cancel(self) -> list[RunConfig]:
        """Stop every worker now (SIGTERM, then SIGKILL after 2 s); the runs they were training."""
        stopped = self.running()
        for w in self.workers:
            w.job = None
            if w.process.is_alive():
                w.process.terminate()
        self._reap(2.0)
        return stopped

    def kill(self) -> None:
        """SIGKILL every worker, waiting for nothing (a second Ctrl-C)."""
        for w in self.workers:
            try:
                os.kill(w.process.pid, signal.SIGKILL)
            except (OSError, TypeError):
                pass

    def close(self) -> None:
        """Ask idle workers to exit, terminate busy ones, and reap them all."""
        for w in self.workers:
            if w.job is not None:
                w.process.terminate()
            else:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        self._reap(5.0)

    def _reap(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=2.0)
            w.conn.close()


class _InProcess:
    """Trains in this process, one run at a time, when polled. The first Ctrl-C aborts the run (the
    sweep's SIGINT handler raises KeyboardInterrupt in it while ``interrupt.abortable``)."""

    def __init__(self, imports, interrupt: _Interrupt):
        import_modules(imports)
        self.interrupt = interrupt
        self.job: RunConfig | None = None
        self.aborted: list[RunConfig] = []

    def free(self) -> int:
        return 0 if self.job is not None else 1

    def starting(self) -> bool:
        return False

    def running(self) -> list[RunConfig]:
        return [self.job] if self.job is not None else []

    def start(self, cfg: RunConfig) -> None:
        self.job = cfg

    def poll(self, timeout: float) -> list[tuple[RunConfig, str, RunResult | str]]:
        cfg, self.job = self.job, None
        if cfg is None:
            return []
        result = None
        try:
            self.interrupt.abortable = True
            if self.interrupt.requested.is_set():  # Ctrl-C came before the run could be aborted
                raise KeyboardInterrupt
            result = train(cfg, progress=False)
        except KeyboardInterrupt:
            if result is not None:  # it had finished: keep it
                return [(cfg, "ok", result)]
            if not self.interrupt.requested.is_set():  # not the sweep's Ctrl-C (no handler here): pass it on
                raise
            self.aborted.append(cfg)
            return []
        except Exception as e:  # noqa: BLE001 - reported, not written; the sweep goes on
            return [(cfg, "error", _error_text(e))]
        finally:
            self.interrupt.abortable = False
        return [(cfg, "ok", result)]

    def cancel(self) -> list[RunConfig]:
        return self.aborted

    def kill(self) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ Ctrl-C, heartbeat, the queue of runs
class _Interrupt:
    """The sweep's SIGINT handler (in the main thread only; elsewhere signals cannot be handled). The
    first SIGINT sets ``requested`` (and raises KeyboardInterrupt in an in-process run while it is
    ``abortable``); the second runs ``on_exit`` (kill the workers) and exits the process at once."""

    def __init__(self):
        self.requested = threading.Event()
        self.abortable = False
        self.on_exit: list = []
        self._previous = None
        self._installed = False

    def __enter__(self) -> _Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        if self.requested.is_set():
            os.write(2, b"\ninterrupted again: exiting now (every finished run is stored; rerun the sweep to resume)\n")
            for f in self.on_exit:
                try:
                    f()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
            os._exit(130)
        self.requested.set()
        if self.abortable:
            self.abortable = False
            raise KeyboardInterrupt


class _Heartbeat:
    """A thread renewing ``owner``'s claims every ``every`` seconds while the sweep runs."""

    def __init__(self, store: ResultStore, owner: str, lease: float, every: float):
        self.store, self.owner, self.lease, self.every = store, owner, lease, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recur-sweep-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.store.renew(self.owner, self.lease)
            except Exception:  # noqa: BLE001 - a busy store: the next beat tries again (a lease outlasts beats)
                pass

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)  # a daemon: one stuck on a busy store does not hold the sweep up


class _Queue:
    """The runs this sweep may still train, claimed one at a time as workers free up. A run claimed by
    another live owner waits in ``deferred`` and is looked at again every ``poll`` seconds."""

    def __init__(self, todo: list[RunConfig], store: ResultStore, owner: str, lease: float, poll: float, on_stored):
        self.fresh = deque((config_hash(c), c) for c in todo)
        self.deferred: list[tuple[str, RunConfig]] = []
        self.store, self.owner, self.lease, self.poll = store, owner, lease, poll
        self.on_stored = on_stored  # called with (hash, config) of a run another sweep stored
        self._next_look = 0.0

    def __len__(self) -> int:
        return len(self.fresh) + len(self.deferred)

    def next(self) -> RunConfig | None:
        """The next run claimed for this sweep, or None (none left that nobody else trains)."""
        while self.fresh:
            h, cfg = self.fresh.popleft()
            if self.store.claim(self.owner, h, self.lease):
                return cfg
            if self.store.has(h):
                self.on_stored(h, cfg)
            else:
                self.deferred.append((h, cfg))
        if not self.deferred or time.monotonic() < self._next_look:
            return None
        self._next_look = time.monotonic() + self.poll
        claims, now, keep = self.store.claims(), time.time(), []
        for h, cfg in self.deferred:
            if self.store.has(h):
                self.on_stored(h, cfg)
            else:
                keep.append((h, cfg))
        self.deferred = keep
        for i, (h, cfg) in enumerate(self.deferred):
            c = claims.get(h)
            free = c is None or not claim_is_live(c["owner"], c["expires"], now)
            if free and self.store.claim(self.owner, h, self.lease):
                del self.deferred[i]
                return cfg
        return None


# ------------------------------------------------------------------ the sweep
def run_sweep(configs: list[RunConfig], store: ResultStore, workers: int | None = None, imports=(),
              console: Console | None = None, progress: bool = True, *, lease: float = LEASE_SECONDS,
              heartbeat: float = HEARTBEAT_SECONDS, poll: float = POLL_SECONDS,
              wait_for_others: bool = True, executor: str = "local", address: str | None = None,
              retries: int | None = None) -> SweepSummary:
    """Train every config not yet in ``store`` and record each as it finishes.

    ``workers=1`` (or None) trains in this process; more start that many spawned processes, each with
    ``max(1, cores // workers)`` threads. ``executor="ray"`` runs each config as a Ray task instead,
    at most ``workers`` at a time (None: as many as the cluster has GPUs, else CPUs), on the Ray
    cluster at ``address`` (None: $RAY_ADDRESS, else a local Ray of ``workers`` or all cores' CPUs),
    a task whose worker dies retried ``retries`` times (None: ``recur.ray_executor.DEFAULT_RETRIES``).
    Runs are claimed in the store one at a time (``lease``, renewed every ``heartbeat`` s), so sweeps
    over one store share the grid; runs claimed by another sweep are waited for (looked at every
    ``poll`` s) unless ``wait_for_others=False``. Ctrl-C: see the module docstring (raises
    ``SweepInterrupted`` with the summary).
    """
    if not 0 < heartbeat < lease:
        raise ValueError(f"expected 0 < heartbeat < lease, got heartbeat={heartbeat} s and lease={lease} s")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if executor != "ray" and (address is not None or retries is not None):
        raise ValueError("address and retries are options of executor='ray'")
    if executor == "ray":
        from recur.ray_executor import require_ray

        require_ray()  # before anything is claimed: the message says how to install it
    console = console or Console(stderr=True, soft_wrap=True)
    start = time.perf_counter()
    seen, unique = set(), []
    for cfg in configs:
        h = config_hash(cfg)
        if h not in seen:
            seen.add(h)
            unique.append(cfg)
    finished = store.hashes()
    todo = [c for c in unique if config_hash(c) not in finished]
    summary = SweepSummary(total=len(unique), skipped=len(unique) - len(todo))
    if summary.skipped:
        console.print(f"{summary.skipped} of {summary.total} runs already in {escape(str(store.path))}: skipped")
    if not todo:
        return summary
    if executor == "local":
        workers = max(1, min(workers or 1, len(todo)))
        console.print(f"running {len(todo)} runs with {workers} worker{'s' if workers > 1 else ''}")
    owner = new_owner()

    bar = Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not (progress and console.is_terminal))
    job = bar.add_task("sweep", total=len(todo))

    def record(cfg: RunConfig, status: str, payload) -> None:
        h = config_hash(cfg)
        if status == "ok":
            result = payload if isinstance(payload, RunResult) else RunResult.model_validate(payload)
            store.put(result)  # its claim goes in the same transaction
            summary.done.append(result.config_hash)
            console.print(f"[green]done[/]   {escape(describe(cfg))}: {_result_line(result)}")
        else:
            store.release(owner, h)  # another sweep may try it
            summary.failed.append((cfg, payload))
            console.print(f"[red]failed[/] {escape(describe(cfg))}: {escape(payload)}")
        bar.advance(job)

    def stored_elsewhere(h: str, cfg: RunConfig) -> None:
        summary.by_others.append(h)
        console.print(f"[dim]stored by another sweep[/] {escape(describe(cfg))}")
        bar.advance(job)

    queue = _Queue(todo, store, owner, lease, poll, stored_elsewhere)
    interrupt = _Interrupt()
    pool = None  # _InProcess, _Processes or recur.ray_executor.RayTasks
    stopped: list[RunConfig] = []
    with bar, interrupt, _Heartbeat(store, owner, lease, heartbeat):
        try:
            if executor == "ray":
                from recur.ray_executor import DEFAULT_RETRIES, RayTasks

                pool = RayTasks(workers, imports, address, DEFAULT_RETRIES if retries is None else retries,
                                num_cpus=workers)
                pool.slots = min(pool.slots, len(todo))
                console.print(f"running {len(todo)} runs {pool.describe()}")
            elif workers == 1:
                pool = _InProcess(imports, interrupt)
            else:
                pool = _Processes(workers, worker_thread_count(workers), imports, interrupt.requested)
            interrupt.on_exit.append(pool.kill)
            said_waiting = False
            while not interrupt.requested.is_set():
                while pool.free() and not interrupt.requested.is_set():
                    cfg = queue.next()
                    if cfg is None:
                        break
                    pool.start(cfg)
                if interrupt.requested.is_set():
                    break
                if not pool.running() and not pool.starting():
                    if not queue.deferred or not wait_for_others:
                        break
                    if not said_waiting:
                        console.print(f"waiting for {_runs(len(queue.deferred))} being trained by another sweep "
                                      "(taken over if it stops)")
                        said_waiting = True
                    interrupt.requested.wait(poll)
                    continue
                for outcome in pool.poll(0.5):
                    record(*outcome)
            if interrupt.requested.is_set():
                if not isinstance(pool, _InProcess):
                    for outcome in pool.poll(0):  # finished just now: stored, not thrown away
                        record(*outcome)
                running = len(pool.running()) + len(getattr(pool, "aborted", ()))
                stopping = (f"stopping {_runs(running)} that {'was' if running == 1 else 'were'} running (not "
                            "recorded); " if running else "")
                console.print(f"interrupted: {stopping}every finished run is stored (Ctrl-C again to exit at once)")
                stopped = pool.cancel()
        finally:
            if pool is not None:
                pool.close()
            try:
                store.release(owner)  # whatever it still holds: interrupted, or an error
            except StoreError:
                pass
    summary.seconds = time.perf_counter() - start
    if interrupt.requested.is_set():
        summary.interrupted, summary.cancelled = True, len(stopped)
        summary.not_run = len(queue) + len(stopped)
        raise SweepInterrupted(summary)
    summary.elsewhere = len(queue.deferred)
    return summary
