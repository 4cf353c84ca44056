"""The results store: one SQLite table of finished runs, keyed by config hash.

    store = ResultStore("recur-results.sqlite")
    store.put(result)                 # one transaction: the run is in, whole, or not at all
    store.has(config_hash(cfg))       # a sweep skips finished runs
    store.all_runs(task="mqar")       # [{"hash", "config", "task", "model", "metrics", ...}, ...]
    store.leaderboard("mqar")         # seeds averaged, best lr per (model, size)
    store.curves()                    # {hash: [(step, loss, seconds), ...]}: the training-loss curves
    store.evals()                     # {hash: [(step, tokens, metrics), ...]}: the eval curves (eval.every)
    store.depth_evals()               # {hash: {iterations: {length: metrics}}}: evaluations at other depths (eval.loops)
    store.records()                   # whole runs as rows, every table; put_records writes them (store merge)

Each run (its row in ``runs``, its loss curve in ``curves``, its eval curve in ``evals`` and its
data's facts in ``run_info``, e.g. a corpus's sha256, read back as each run's ``info``) is written in its own transaction
(WAL journal), so a process killed at any moment (SIGKILL included) leaves every finished run
intact and no partial one: an interrupted sweep resumes where it stopped. Reports are built from here, never from memory.

Schema versions: 1 kept the flat config of recur's first release and its hash over every field;
2 keeps the nested config and the upgrade-stable hash (``recur.config``). A store of an older
schema is migrated when opened, in one transaction: every run's config is read in the flat shape,
rewritten nested, and renamed by its new hash, so a sweep over it skips its finished runs.

Claims (the ``claims`` table) let several sweeps (or executors on several hosts) share one store
without training a run twice. Before training a run, its trainer claims it for a lease:

    owner = new_owner()                          # "host:pid:uuid"
    if store.claim(owner, h, lease=60):          # one transaction: False if finished or claimed by a live owner
        ...train, calling store.renew(owner, lease=60) every few seconds...
        store.put(result)                        # stores the run and drops its claim, in one transaction
    store.release(owner, h)                      # a failed run: its claim goes, another trainer may retry it

A claim is live until its lease expires; a claim whose owner is a process of this host that no
longer exists is taken over at once (a killed sweep's runs are not held for a lease).

Opening checks what it is given before it writes anything, and raises ``StoreError`` (a ValueError)
with a one-line message naming what was expected and what was found: a directory, a file that is
not SQLite, a truncated or corrupted store, another application's SQLite database (left unchanged),
a store of a newer schema (upgrade recur), a read-only file or directory where runs are to be
written. ``ResultStore(path, readonly=True)`` never writes (SQLite ``mode=ro``, or ``immutable=1``
where the directory is read-only too and SQLite could not make its ``-shm`` file: read-only media);
``readonly=None`` opens read-only only when the file or its directory is not writable, which is how
``recur report`` reads a store it may not write.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import stat
import threading
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator
from urllib.parse import quote

if TYPE_CHECKING:
    from recur.training import RunResult


class StoreError(ValueError):
    """The results store cannot be used as asked: the message names what was expected and what was found."""

DEFAULT_PATH = "recur-results.sqlite"
DEFAULT_LEASE = 60.0  # seconds a claim of a run lives unless renewed (a sweep renews it every 10 s)
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    hash           TEXT PRIMARY KEY,   -- config_hash(config)
    config         TEXT NOT NULL,      -- JSON of the (nested) RunConfig, every field
    task           TEXT NOT NULL,
    model          TEXT NOT NULL,      -- model name, preset, or pattern joined by '+'
    seed           INTEGER NOT NULL,
    d_model        INTEGER NOT NULL,
    n_layers       INTEGER NOT NULL,
    lr             REAL NOT NULL,
    params         INTEGER NOT NULL,
    state_size     INTEGER NOT NULL,   -- floats per sequence at the training length
    train_seq_len  INTEGER NOT NULL,
    steps          INTEGER NOT NULL,   -- steps actually run
    seconds        REAL NOT NULL,
    metrics        TEXT NOT NULL,      -- JSON {eval length: {"accuracy", "exact_match"}}
    train_loss     REAL,
    train_accuracy REAL,
    early_stopped  INTEGER NOT NULL,
    created        TEXT NOT NULL,      -- ISO 8601, UTC
    recur_version  TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_task_model ON runs (task, model);
CREATE TABLE IF NOT EXISTS curves (    -- each run's training-loss curve (RunResult.curve), written with it
    hash           TEXT NOT NULL,      -- the run's hash in runs
    step           INTEGER NOT NULL,
    loss           REAL NOT NULL,      -- mean training loss over the steps since the previous point
    seconds        REAL NOT NULL,      -- training seconds at the end of this step (step 1: the warm-up)
    PRIMARY KEY (hash, step)
);
CREATE TABLE IF NOT EXISTS evals (     -- each run's eval curve (RunResult.evals, eval.every), written with it
    hash           TEXT NOT NULL,      -- the run's hash in runs
    step           INTEGER NOT NULL,
    tokens         INTEGER NOT NULL,   -- training tokens seen by then
    metrics        TEXT NOT NULL,      -- JSON {"bits_per_byte", "accuracy", ...} at the training length
    PRIMARY KEY (hash, step)
);
CREATE TABLE IF NOT EXISTS depth_evals ( -- each run's evaluation at other numbers of iterations (eval.loops)
    hash           TEXT NOT NULL,      -- the run's hash in runs
    loops          INTEGER NOT NULL,   -- the depth option's value (e.g. n_loops) at this evaluation
    metrics        TEXT NOT NULL,      -- JSON {eval length: {"accuracy", "exact_match", ...}}
    PRIMARY KEY (hash, loops)
);
CREATE TABLE IF NOT EXISTS run_info (  -- facts about a run's data its config does not fix (Task.info)
    hash           TEXT PRIMARY KEY,   -- the run's hash in runs
    info           TEXT NOT NULL       -- JSON, e.g. {"corpus_sha256": ...}
);
CREATE TABLE IF NOT EXISTS claims (    -- runs being trained now, by whom (ResultStore.claim)
    hash           TEXT PRIMARY KEY,   -- the run's hash (not yet in runs)
    owner          TEXT NOT NULL,      -- who trains it: "host:pid:uuid" (new_owner())
    expires        REAL NOT NULL       -- Unix time at which the lease ends unless renewed
);
"""

# The first bytes of every SQLite 3 database file.
_SQLITE_MAGIC = b"SQLite format 3\x00"

# Tables of one row or more per run, keyed by its hash: written with the run (put), deleted with it
# (delete) and carried with it when stores are merged (recur.store_merge).
PER_RUN_TABLES = ("curves", "evals", "run_info", "depth_evals")

_COLUMNS = ("hash", "config", "task", "model", "seed", "d_model", "n_layers", "lr", "params", "state_size",
            "train_seq_len", "steps", "seconds", "metrics", "train_loss", "train_accuracy", "early_stopped",
            "created", "recur_version")


class ResultStore:
    """Finished runs in one SQLite file (created on first use), and the claims of runs being trained.

    ``readonly``: False (default) reads and writes, creating the store if it is absent and migrating an
    older schema; True never writes (nothing is created or migrated); None reads and writes where the
    file and its directory are writable, else reads only. Opening raises ``StoreError`` for a path
    that is not a usable store (see the module docstring), before anything is written to it.
    """

    def __init__(self, path: str | Path = DEFAULT_PATH, readonly: bool | None = False):
        self.path = Path(path)
        exists = _check_file(self.path)
        if readonly is None:
            readonly = exists and not (_writable(self.path) and _writable(self.path.parent))
        self.readonly = bool(readonly)
        if self.readonly:
            if not exists:
                raise StoreError(f"results store {self.path}: expected an existing store to read, got no such file")
            raw = _connect_readonly(self.path)
        else:
            _check_writable(self.path, exists)
            raw = _connect(self.path, self.path)
        self._lock = threading.RLock()  # one transaction at a time: the sweep's heartbeat thread renews claims
        self._conn = _Connection(raw, self.path, self._lock)
        try:
            self._open()
        except BaseException:  # a newer store, a failed migration: let go of the file, not only at GC
            self._conn.close()
            raise

    def _open(self) -> None:
        """Check what the file holds (nothing written yet), then create or migrate the schema."""
        conn = self._conn
        try:  # reads every page (milliseconds for thousands of runs): a damaged store is refused here
            problems = [r[0] for r in conn.raw.execute("PRAGMA quick_check(3)")]
        except sqlite3.DatabaseError as e:  # not a database, malformed, truncated
            raise StoreError(_corrupted(self.path, str(e))) from None
        if problems != ["ok"]:
            detail = "; ".join(line.strip() for p in problems for line in p.splitlines() if "***" not in line)
            raise StoreError(_corrupted(self.path, detail))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        if version > SCHEMA_VERSION:
            raise StoreError(f"results store {self.path}: expected schema {SCHEMA_VERSION} or older, got schema "
                             f"{version}, written by a newer recur: upgrade recur (pip install -U recur) to use it")
        if "runs" in tables:
            have = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
            missing = [c for c in _COLUMNS if c not in have]
            if missing:
                shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
                raise StoreError(f"results store {self.path}: expected a recur results store, got a SQLite database "
                                 f"whose runs table lacks recur's columns ({shown}), another application's table; "
                                 "it was left unchanged")
        elif tables:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise StoreError(f"results store {self.path}: expected a recur results store (a runs table), got a SQLite "
                             f"database of another application (tables: {shown}); it was left unchanged")
        if self.readonly:
            if version == 1 and tables:
                raise StoreError(f"results store {self.path}: expected schema {SCHEMA_VERSION}, got schema 1 (recur's "
                                 "first release), which is migrated when the store is opened for writing; it is "
                                 "read-only here: migrate a writable copy (any recur command that writes it)")
            self._temp_tables(set(tables))
            return
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process in WAL mode
        with self._transaction():
            for statement in _SCHEMA.split(";"):  # executescript would commit on its own
                if statement.strip():
                    conn.execute(statement)
            if version == 1:
                self.migrated = self._migrate_v1()
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _temp_tables(self, tables: set[str]) -> None:
        """Read-only: each table of the schema that this store lacks (it predates the table) as an empty
        TEMP table (temp tables live in memory, not in the file), so every query reads it as empty."""
        for statement in _SCHEMA.split(";"):
            words = statement.split()
            if words[:5] == ["CREATE", "TABLE", "IF", "NOT", "EXISTS"] and words[5] not in tables:
                self._conn.execute(statement.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))

    migrated = 0  # runs renamed by the migration that opening this store ran

    def _migrate_v1(self) -> int:
        """Schema 1 -> 2 (inside the opening transaction): nested configs, upgrade-stable hashes.

        Two old runs can become one (the old hash counted a field that had no effect, such as the
        noise std of a run without state noise): the newer one is kept, as a rerun would replace it."""
        from pydantic import ValidationError

        from recur.config import RunConfig, config_hash, config_problems

        rows = [dict(r) for r in self._conn.execute("SELECT * FROM runs ORDER BY created, hash")]
        self._conn.execute("DELETE FROM runs")
        for row in rows:
            try:
                cfg = RunConfig.model_validate(json.loads(row["config"]))
            except (ValueError, TypeError) as e:
                detail = config_problems(e) if isinstance(e, ValidationError) else str(e)
                raise StoreError(f"{self.path}: cannot migrate run {row['hash']} to schema {SCHEMA_VERSION} "
                                 f"(nothing was changed): {detail}") from e
            row.update(hash=config_hash(cfg), config=cfg.full_json(), lr=cfg.optim.lr, d_model=cfg.model.d_model,
                       n_layers=cfg.model.n_layers, model=cfg.model_name)
            self._conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) "
                               f"VALUES ({', '.join(':' + c for c in _COLUMNS)})", row)
        return len(rows)

    def _transaction(self):
        """``with self._transaction():`` one write transaction (BEGIN IMMEDIATE: the write lock is taken
        first, so two processes never both read-then-write), committed or rolled back; one thread at a time."""
        if self.readonly:
            raise StoreError(f"results store {self.path}: expected a store opened for writing, got one opened "
                             "read-only (readonly=True, or a file or directory that is not writable)")
        conn, lock = self._conn, self._lock

        class _Tx:
            def __enter__(self):
                lock.acquire()
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except BaseException:
                    lock.release()
                    raise

            def __exit__(self, kind, value, tb):
                try:
                    if kind is None:
                        try:
                            conn.execute("COMMIT")
                        except BaseException:  # the disk is full, the file went read-only: nothing is kept
                            if conn.raw.in_transaction:
                                conn.raw.execute("ROLLBACK")
                            raise
                    elif conn.raw.in_transaction:
                        try:
                            conn.raw.execute("ROLLBACK")
                        except sqlite3.Error:  # a broken connection: SQLite rolls back when the file is next opened
                            pass
                finally:
                    lock.release()
                return False

        return _Tx()

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- writing
    def put(self, result: RunResult) -> None:
        """Record a finished run (replacing an earlier run of the same config) and drop its claim, in one
        transaction."""
        cfg = result.config
        row = {
            "hash": result.config_hash, "config": cfg.full_json(), "task": result.task, "model": result.model,
            "seed": result.seed, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "lr": cfg.optim.lr,
            "params": result.params, "state_size": result.state_size, "train_seq_len": result.train_seq_len,
            "steps": result.steps, "seconds": result.seconds, "metrics": json.dumps(result.metrics, sort_keys=True),
            "train_loss": result.train_loss, "train_accuracy": result.train_accuracy,
            "early_stopped": int(result.early_stopped),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recur_version": result.recur_version,
        }
        with self._transaction():
            self._conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) "
                               f"VALUES ({', '.join(':' + c for c in _COLUMNS)})", row)
            self._conn.execute("DELETE FROM curves WHERE hash = ?", (result.config_hash,))
            self._conn.executemany("INSERT INTO curves (hash, step, loss, seconds) VALUES (?, ?, ?, ?)",
                                   [(result.config_hash, *point) for point in result.curve])
            self._conn.execute("DELETE FROM evals WHERE hash = ?", (result.config_hash,))
            self._conn.executemany("INSERT INTO evals (hash, step, tokens, metrics) VALUES (?, ?, ?, ?)",
                                   [(result.config_hash, step, tokens, json.dumps(m, sort_keys=True))
                                    for step, tokens, m in result.evals])
            self._conn.execute("DELETE FROM depth_evals WHERE hash = ?", (result.config_hash,))
            self._conn.executemany("INSERT INTO depth_evals (hash, loops, metrics) VALUES (?, ?, ?)",
                                   [(result.config_hash, int(n), json.dumps(m, sort_keys=True))
                                    for n, m in result.depth_metrics.items()])
            self._conn.execute("DELETE FROM run_info WHERE hash = ?", (result.config_hash,))
            if result.info:
                self._conn.execute("INSERT INTO run_info (hash, info) VALUES (?, ?)",
                                   (result.config_hash, json.dumps(result.info, sort_keys=True)))
            self._conn.execute("DELETE FROM claims WHERE hash = ?", (result.config_hash,))  # stored: nobody trains it

    def delete(self, config_hash: str) -> bool:
        with self._transaction():
            for table in PER_RUN_TABLES:
                self._conn.execute(f"DELETE FROM {table} WHERE hash = ?", (config_hash,))
            return self._conn.execute("DELETE FROM runs WHERE hash = ?", (config_hash,)).rowcount > 0

    # -------------------------------------------------------------- whole runs as rows (merging stores)
    def records(self, hashes: set[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each run as stored, by hash: ``(hash, {"runs": {column: value}, "curves": [{column: value}, ...],
        ...})`` with every table of ``PER_RUN_TABLES``, its rows in key order; what ``put_records`` writes."""
        for h in sorted(self.hashes() if hashes is None else hashes):
            row = self._conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE hash = ?", (h,)).fetchone()
            if row is None:
                continue
            record: dict[str, Any] = {"runs": dict(row)}
            for table in PER_RUN_TABLES:
                columns = self._columns(table)
                record[table] = [dict(r) for r in self._conn.execute(
                    f"SELECT {', '.join(columns)} FROM {table} WHERE hash = ? ORDER BY {', '.join(columns)}", (h,))]
            yield h, record

    def put_records(self, records: Iterable[dict[str, Any]]) -> int:
        """Write whole runs as ``records`` gives them, each replacing the run of its hash (and dropping its
        claim), all in one transaction: every one is stored, or none. Returns how many."""
        n = 0
        with self._transaction():
            for record in records:
                h = record["runs"]["hash"]
                for table in PER_RUN_TABLES:
                    self._conn.execute(f"DELETE FROM {table} WHERE hash = ?", (h,))
                self._conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) "
                                   f"VALUES ({', '.join(':' + c for c in _COLUMNS)})", record["runs"])
                for table in PER_RUN_TABLES:
                    columns = self._columns(table)
                    if any(r["hash"] != h for r in record[table]):
                        raise ValueError(f"run {h}: a row of {table} names another run")
                    self._conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) "
                                           f"VALUES ({', '.join(':' + c for c in columns)})", record[table])
                self._conn.execute("DELETE FROM claims WHERE hash = ?", (h,))
                n += 1
        return n

    def _columns(self, table: str) -> list[str]:
        return [r[1] for r in self._conn.execute(f"PRAGMA table_info({table})")]

    # -------------------------------------------------------------- claims of runs being trained
    def claim(self, owner: str, config_hash: str, lease: float = DEFAULT_LEASE) -> bool:
        """Claim a run for ``owner`` for ``lease`` seconds, in one transaction; False if the run is finished
        or claimed by another owner whose claim is live (see ``claim_is_live``). Claiming a run one already
        holds renews it. Whoever trains a run claims it first: two sweeps (or a Ray executor's tasks on
        several hosts) over one store then never train a run twice."""
        now = time.time()
        with self._transaction():
            if self._conn.execute("SELECT 1 FROM runs WHERE hash = ?", (config_hash,)).fetchone() is not None:
                return False
            row = self._conn.execute("SELECT owner, expires FROM claims WHERE hash = ?", (config_hash,)).fetchone()
            if row is not None and row["owner"] != owner and claim_is_live(row["owner"], row["expires"], now):
                return False
            self._conn.execute("INSERT OR REPLACE INTO claims (hash, owner, expires) VALUES (?, ?, ?)",
                               (config_hash, owner, now + lease))
            return True

    def renew(self, owner: str, lease: float = DEFAULT_LEASE) -> set[str]:
        """Extend every claim ``owner`` holds to ``lease`` seconds from now (a trainer's heartbeat, every
        few seconds while it trains); returns the hashes it still holds (one another owner took over
        after the lease ran out is not among them)."""
        with self._transaction():
            self._conn.execute("UPDATE claims SET expires = ? WHERE owner = ?", (time.time() + lease, owner))
            return {r[0] for r in self._conn.execute("SELECT hash FROM claims WHERE owner = ?", (owner,))}

    def release(self, owner: str, config_hash: str | None = None) -> int:
        """Drop ``owner``'s claim of one run (a failed or cancelled run: another trainer may take it), or
        every claim it holds (``config_hash=None``: a sweep that stops); returns how many were dropped."""
        if self.readonly:
            return 0
        with self._transaction():
            if config_hash is None:
                return self._conn.execute("DELETE FROM claims WHERE owner = ?", (owner,)).rowcount
            return self._conn.execute("DELETE FROM claims WHERE owner = ? AND hash = ?", (owner, config_hash)).rowcount

    def claims(self) -> dict[str, dict[str, Any]]:
        """The claims in the store, live or not: ``{hash: {"owner", "expires", "live"}}``."""
        now = time.time()
        with self._lock:
            rows = self._conn.execute("SELECT hash, owner, expires FROM claims").fetchall()
        return {r["hash"]: {"owner": r["owner"], "expires": r["expires"],
                            "live": claim_is_live(r["owner"], r["expires"], now)} for r in rows}

    # -------------------------------------------------------------- reading
    def has(self, config_hash: str) -> bool:
        return self._conn.execute("SELECT 1 FROM runs WHERE hash = ?", (config_hash,)).fetchone() is not None

    def hashes(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT hash FROM runs")}

    def get(self, config_hash: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT * FROM runs WHERE hash = ?", (config_hash,)).fetchone()
        if row is None:
            return None
        run = _decode(row)
        info = self._conn.execute("SELECT info FROM run_info WHERE hash = ?", (config_hash,)).fetchone()
        run["info"] = {} if info is None else json.loads(info[0])  # as all_runs gives it
        return run

    def __len__(self) -> int:
        return self._conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    def all_runs(self, task: str | None = None, model: str | None = None,
                 hashes: set[str] | None = None) -> list[dict[str, Any]]:
        """Every run as a dict (config and metrics decoded), oldest first; optionally filtered."""
        where, args = [], []
        if task is not None:
            where.append("task = ?")
            args.append(task)
        if model is not None:
            where.append("model = ?")
            args.append(model)
        sql = "SELECT * FROM runs" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY created, hash"
        runs = [_decode(r) for r in self._conn.execute(sql, args)]
        runs = runs if hashes is None else [r for r in runs if r["hash"] in hashes]
        info = {r[0]: json.loads(r[1]) for r in self._conn.execute("SELECT hash, info FROM run_info")}
        for run in runs:
            run["info"] = info.get(run["hash"], {})
        return runs

    def curves(self, hashes: set[str] | None = None) -> dict[str, list[tuple[int, float, float]]]:
        """Each run's loss curve, ``{hash: [(step, loss, seconds), ...]}`` by step (runs without one: absent)."""
        out: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for r in self._conn.execute("SELECT hash, step, loss, seconds FROM curves ORDER BY hash, step"):
            if hashes is None or r[0] in hashes:
                out[r[0]].append((r[1], r[2], r[3]))
        return dict(out)

    def evals(self, hashes: set[str] | None = None) -> dict[str, list[tuple[int, int, dict[str, float]]]]:
        """Each run's eval curve, ``{hash: [(step, tokens, metrics), ...]}`` by step (runs without one: absent)."""
        out: dict[str, list[tuple[int, int, dict[str, float]]]] = defaultdict(list)
        for r in self._conn.execute("SELECT hash, step, tokens, metrics FROM evals ORDER BY hash, step"):
            if hashes is None or r[0] in hashes:
                out[r[0]].append((r[1], r[2], json.loads(r[3])))
        return dict(out)

    def depth_evals(self, hashes: set[str] | None = None) -> dict[str, dict[int, dict[str, dict[str, float]]]]:
        """Each run's evaluation at other numbers of iterations (``eval.loops``), ``{hash: {iterations:
        {eval length: metrics}}}`` (runs without one: absent)."""
        out: dict[str, dict[int, dict[str, dict[str, float]]]] = defaultdict(dict)
        for r in self._conn.execute("SELECT hash, loops, metrics FROM depth_evals ORDER BY hash, loops"):
            if hashes is None or r[0] in hashes:
                out[r[0]][r[1]] = json.loads(r[2])
        return dict(out)

    def tasks(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT DISTINCT task FROM runs ORDER BY task")]

    def models(self) -> list[str]:
        return [r[0] for r in self._conn.execute("SELECT DISTINCT model FROM runs ORDER BY model")]

    def leaderboard(self, task: str | None = None, hashes: set[str] | None = None) -> list[dict[str, Any]]:
        """See ``leaderboard``: the runs of this store (optionally one task or a set of hashes)."""
        return leaderboard(self.all_runs(task=task, hashes=hashes))


def _decode(row: sqlite3.Row) -> dict[str, Any]:
    run = dict(row)
    run["config"] = json.loads(run["config"])
    run["metrics"] = json.loads(run["metrics"])
    run["early_stopped"] = bool(run["early_stopped"])
    return run


# ------------------------------------------------------------------ claims' owners
def new_owner() -> str:
    """A claim owner unique to this call: ``"host:pid:uuid"`` (the host and pid tell whether it is alive)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def claim_is_live(owner: str, expires: float, now: float | None = None) -> bool:
    """Whether a claim still holds: until its lease expires, except that the claim of a process of this
    host that no longer exists (a sweep killed with SIGKILL, a crashed executor) is dead at once. An owner
    on another host is trusted until its lease ends (its liveness cannot be seen from here)."""
    if expires <= (time.time() if now is None else now):
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host == socket.gethostname() and pid.isdigit():
        return _pid_alive(int(pid))
    return True


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, another user's
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead too
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
    except OSError:  # no /proc (macOS): kill(0) is the answer
        return True


# ------------------------------------------------------------------ opening: checks and connections
def _check_file(path: Path) -> bool:
    """Whether ``path`` exists; StoreError if it is there but cannot be a store (a directory, a file that
    is not SQLite or too short to be one, a path below a regular file, an unreadable file)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        above = next((p for p in path.parents if p.is_file()), path.parent)
        raise StoreError(f"results store {path}: expected a path in a directory, got one below {above}, "
                         "which is a file") from None
    except OSError as e:
        raise StoreError(f"results store {path}: expected a readable path, got {_reason(e)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise StoreError(f"results store {path}: expected a SQLite file, got a directory "
                         f"(pass a file path such as {path / DEFAULT_PATH})")
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"results store {path}: expected a SQLite file, got something that is not a regular file")
    if st.st_size == 0:
        return True  # an empty file is an empty database: SQLite writes its header with the first table
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError as e:
        raise StoreError(f"results store {path}: expected a readable file, got {_reason(e)}") from None
    if head[:16] != _SQLITE_MAGIC and not (len(head) < 16 and _SQLITE_MAGIC.startswith(head)):
        try:
            head.decode("utf-8")
            kind = "a text file"
        except UnicodeDecodeError:
            kind = "a binary file"
        raise StoreError(f"results store {path}: expected a SQLite file, got {kind} that is not SQLite "
                         f"(it starts with {head[:24]!r})")
    if len(head) < 100:
        raise StoreError(_corrupted(path, f"{len(head)} bytes, shorter than a SQLite header"))
    return True


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK)  # False on read-only media for root too (EROFS)


def _check_writable(path: Path, exists: bool) -> None:
    """StoreError unless runs can be written at ``path``: the file (if there) and its directory writable
    (SQLite keeps ``NAME-wal`` and ``NAME-shm`` beside the store); a missing directory is created."""
    parent = path.parent
    if not exists:
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"results store {path}: expected {parent} to be a directory, got a file") from None
        except OSError as e:
            raise StoreError(f"results store {path}: expected a directory it can be created in, got "
                             f"{parent}, which cannot be made ({_reason(e)})") from None
        if not _writable(parent):
            raise StoreError(f"results store {path}: expected a writable directory to create it in, got "
                             f"read-only {parent}")
        return
    if not _writable(path):
        raise StoreError(f"results store {path}: expected a writable store to record runs in, got a read-only "
                         "file (recur report can still read it)")
    sidecars = [path.with_name(path.name + s) for s in ("-wal", "-shm")]
    if not _writable(parent) and not all(p.exists() and _writable(p) for p in sidecars):
        raise StoreError(f"results store {path}: expected a writable directory (SQLite keeps {path.name}-wal and "
                         f"{path.name}-shm beside the store), got read-only {parent} (recur report can still read it)")


def _connect(target: str | Path, path: Path, uri: bool = False) -> sqlite3.Connection:
    try:
        # Transactions explicit (isolation_level None); one connection shared with the sweep's heartbeat
        # thread, its transactions serialised by the store's lock.
        conn = sqlite3.connect(target, timeout=60.0, isolation_level=None, check_same_thread=False, uri=uri)
    except sqlite3.Error as e:
        raise StoreError(f"results store {path}: expected a file SQLite can open, got an error: {e}") from None
    conn.row_factory = sqlite3.Row
    return conn


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes: ``mode=ro``; where SQLite cannot open that (a WAL store on
    read-only media: it has no ``-shm`` file and cannot make one), ``immutable=1``, which reads the file
    alone and is exact when nothing waits in a ``-wal`` file (SQLite merges it when the last writer closes)."""
    uri = "file:" + quote(str(path.resolve()))
    conn = _connect(uri + "?mode=ro", path, uri=True)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
    except sqlite3.DatabaseError as e:
        conn.close()
        raise StoreError(_corrupted(path, str(e))) from None
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(f"results store {path}: expected a store that can be read here, got one with writes still "
                         f"in {wal.name}, which SQLite cannot read without a {path.name}-shm file, and this directory "
                         "is read-only: copy the store and its -wal file to a writable place")
    return _connect(uri + "?immutable=1", path, uri=True)


def _corrupted(path: Path, detail: str) -> str:
    return (f"results store {path}: expected an intact SQLite store, got a truncated or corrupted one ({detail}): "
            f"restore it from a backup, or recover what is left with `sqlite3 {path} .recover`")


def _explain(path: Path, e: sqlite3.Error) -> str:
    """SQLite's error while the store is open, as a StoreError message naming the store."""
    name, text = getattr(e, "sqlite_errorname", "") or "", str(e)
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return (f"results store {path}: expected a writable store, got one that cannot be written here ({text}); "
                "recur report can still read it")
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text:
        return _corrupted(path, text)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        return f"results store {path}: expected to get its write lock, got it held by another process for 60 s ({text})"
    if name.startswith("SQLITE_FULL"):
        return f"results store {path}: expected room to write, got a full disk ({text})"
    return f"results store {path}: {text}"


class _Connection:
    """The store's sqlite3 connection: every statement under the store's lock (the sweep's heartbeat
    thread shares it), and SQLite's errors raised as StoreError naming the store."""

    def __init__(self, raw: sqlite3.Connection, path: Path, lock: threading.RLock):
        self.raw, self._path, self._lock = raw, path, lock

    def execute(self, sql: str, args=()) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self.raw.execute(sql, args)
            except sqlite3.DatabaseError as e:
                raise StoreError(_explain(self._path, e)) from e

    def executemany(self, sql: str, rows) -> sqlite3.Cursor:
        with self._lock:
            try:
                return self.raw.executemany(sql, rows)
            except sqlite3.DatabaseError as e:
                raise StoreError(_explain(self._path, e)) from e

    def close(self) -> None:
        self.raw.close()


# ------------------------------------------------------------------ aggregation
def _grouping(config: dict) -> dict:
    """The config without what the leaderboard averages (seed) or picks the best of (lr), nor the device."""
    out = {k: v for k, v in config.items() if k not in ("seed", "device")}
    out["optim"] = {k: v for k, v in config.get("optim", {}).items() if k != "lr"}
    return out


def _args_label(args: dict) -> str:
    return ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in sorted(args.items()))


def task_label(config: dict) -> str:
    """``mqar`` or ``mqar(num_kv_pairs=8)``."""
    task = config["task"]
    args = _args_label(task.get("args", {}))
    return f"{task['name']}({args})" if args else task["name"]


def model_label(config: dict) -> str:
    """The model name with its options, block parts that differ from the default, and training methods."""
    from recur.config import BlockConfig, RunConfig, canonical
    from recur.registry import METHODS

    cfg = RunConfig.model_validate(config)
    m = cfg.model
    args = _args_label(m.mixer_args)
    label = f"{m.name}({args})" if args else m.name
    extras = {**canonical(m.block), **m.args} if m.block != BlockConfig() or m.args else {}
    if extras:
        label += f" {{{_args_label(extras)}}}"  # braces: square brackets are rich markup
    for method in cfg.training:
        cls = METHODS.get(method.name).cls
        instance = cls(method.params())
        label += " " + (instance.label or f"+{method.name}")
    return label


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _merit(metrics: dict[str, float]) -> float:
    """Higher is better: minus the bits per byte where a run has them (text), minus the squared error
    on a regression task, else the accuracy."""
    for lower in ("bits_per_byte", "mse"):
        if lower in metrics:
            return -metrics[lower]
    return metrics.get("accuracy", 0.0)


def leaderboard(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, model, size, other settings): seeds averaged, the best learning rate kept.

    The best lr is the one with the highest mean accuracy at the training length (Zoology's
    protocol: each model is tuned, then compared); for a task scored in bits per byte (text), the
    lowest mean bits per byte. Rows are sorted by task, then that score at the training length
    (best first), then state size.
    """
    groups: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        key = json.dumps(_grouping(run["config"]), sort_keys=True)
        groups[key][run["lr"]].append(run)
    rows = []
    for by_lr in groups.values():
        def score(item):
            lr, rs = item
            return (_mean(_merit(r["metrics"].get(str(r["train_seq_len"]), {})) for r in rs), -lr)

        lr, rs = max(by_lr.items(), key=score)
        cfg = rs[0]["config"]
        lengths = sorted({int(n) for r in rs for n in r["metrics"]})
        metrics = {}
        for n in lengths:
            have = [r["metrics"][str(n)] for r in rs if str(n) in r["metrics"]]
            metrics[str(n)] = {k: _mean(m[k] for m in have) for k in have[0]}
        rows.append({
            "task": cfg["task"]["name"], "task_label": task_label(cfg), "model": rs[0]["model"],
            "model_label": model_label(cfg), "d_model": cfg["model"]["d_model"], "n_layers": cfg["model"]["n_layers"],
            "lr": lr, "seeds": len(rs),
            "params": rs[0]["params"], "state_size": rs[0]["state_size"], "train_seq_len": rs[0]["train_seq_len"],
            "steps": _mean(r["steps"] for r in rs), "seconds": _mean(r["seconds"] for r in rs),
            "metrics": metrics, "hashes": sorted(r["hash"] for r in rs),
        })

    def order(row):
        return (row["task_label"], -_merit(row["metrics"].get(str(row["train_seq_len"]), {})), row["state_size"],
                row["model_label"])

    return sorted(rows, key=order)
