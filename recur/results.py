"""The results store: one SQLite table of finished runs, keyed by config hash.

    store = ResultStore("recur-results.sqlite")
    store.put(result)                 # one transaction: the run is in, whole, or not at all
    store.has(config_hash(cfg))       # a sweep skips finished runs
    store.all_runs(task="mqar")       # [{"hash", "config", "task", "model", "metrics", ...}, ...]
    store.leaderboard("mqar")         # seeds averaged, best lr per (model, size)

Each run is written in its own transaction (WAL journal), so a process killed at any
moment (SIGKILL included) leaves every finished run intact and no partial one: an
interrupted sweep resumes where it stopped. Reports are built from here, never from memory.

Schema versions: 1 kept the flat config of recur's first release and its hash over every field;
2 keeps the nested config and the upgrade-stable hash (``recur.config``). A store of an older
schema is migrated when opened, in one transaction: every run's config is read in the flat shape,
rewritten nested, and renamed by its new hash, so a sweep over it skips its finished runs.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from recur.training import RunResult

DEFAULT_PATH = "recur-results.sqlite"
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
"""

_COLUMNS = ("hash", "config", "task", "model", "seed", "d_model", "n_layers", "lr", "params", "state_size",
            "train_seq_len", "steps", "seconds", "metrics", "train_loss", "train_accuracy", "early_stopped",
            "created", "recur_version")


class ResultStore:
    """Finished runs in one SQLite file (created on first use)."""

    def __init__(self, path: str | Path = DEFAULT_PATH):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)  # transactions explicit
        self._conn.row_factory = sqlite3.Row
        try:
            self._open()
        except BaseException:  # a newer store, a failed migration: let go of the file, not only at GC
            self._conn.close()
            raise

    def _open(self) -> None:
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process in WAL mode
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} was written by a newer recur (schema {version} > {SCHEMA_VERSION})")
        with self._transaction():
            for statement in _SCHEMA.split(";"):  # executescript would commit on its own
                if statement.strip():
                    self._conn.execute(statement)
            if version == 1:
                self.migrated = self._migrate_v1()
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

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
                raise ValueError(f"{self.path}: cannot migrate run {row['hash']} to schema {SCHEMA_VERSION} "
                                 f"(nothing was changed): {detail}") from e
            row.update(hash=config_hash(cfg), config=cfg.full_json(), lr=cfg.optim.lr, d_model=cfg.model.d_model,
                       n_layers=cfg.model.n_layers, model=cfg.model_name)
            self._conn.execute(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) "
                               f"VALUES ({', '.join(':' + c for c in _COLUMNS)})", row)
        return len(rows)

    def _transaction(self):
        conn = self._conn

        class _Tx:
            def __enter__(self):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, kind, value, tb):
                conn.execute("COMMIT" if kind is None else "ROLLBACK")
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
        """Record a finished run (replacing an earlier run of the same config) in one transaction."""
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

    def delete(self, config_hash: str) -> bool:
        with self._transaction():
            return self._conn.execute("DELETE FROM runs WHERE hash = ?", (config_hash,)).rowcount > 0

    # -------------------------------------------------------------- reading
    def has(self, config_hash: str) -> bool:
        return self._conn.execute("SELECT 1 FROM runs WHERE hash = ?", (config_hash,)).fetchone() is not None

    def hashes(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT hash FROM runs")}

    def get(self, config_hash: str) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT * FROM runs WHERE hash = ?", (config_hash,)).fetchone()
        return None if row is None else _decode(row)

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
        return runs if hashes is None else [r for r in runs if r["hash"] in hashes]

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


def leaderboard(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, model, size, other settings): seeds averaged, the best learning rate kept.

    The best lr is the one with the highest mean accuracy at the training length (Zoology's
    protocol: each model is tuned, then compared). Rows are sorted by task, then accuracy
    at the training length (best first), then state size.
    """
    groups: dict[str, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        key = json.dumps(_grouping(run["config"]), sort_keys=True)
        groups[key][run["lr"]].append(run)
    rows = []
    for by_lr in groups.values():
        def score(item):
            lr, rs = item
            return (_mean(r["metrics"].get(str(r["train_seq_len"]), {}).get("accuracy", 0.0) for r in rs), -lr)

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
        acc = row["metrics"].get(str(row["train_seq_len"]), {}).get("accuracy", 0.0)
        return (row["task_label"], -acc, row["state_size"], row["model_label"])

    return sorted(rows, key=order)
