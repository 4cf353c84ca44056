"""Merge results stores into one, one run per hash: how the shards of a sweep run on machines without
Ray (``recur sweep --shard i/n``, each into its own store) come together.

    summary = merge_stores(["part-1.sqlite", "part-2.sqlite"], "all.sqlite")
    print(summary.line())      # all.sqlite: 12 runs: 7 from part-1.sqlite, 6 from part-2.sqlite, 1 duplicate ...
    recur store merge part-*.sqlite -o all.sqlite

Each run moves whole: its row in ``runs`` and its rows in every per-run table (``PER_RUN_TABLES``:
its loss curve, its eval curve, its data's facts), and the merge is one transaction: the output
gets every run it should, or (an error, a killed process) is left as it was. Claims are not carried:
they belong to sweeps running now, on the inputs.

Inputs are opened read-only and never changed. The output may exist already: its runs take part as
an input's do, so merging again as the shards grow adds the new runs. It must not be one of the
inputs (the same file under any path is refused), nor may an input be given twice.

Duplicates. A hash held by several stores is kept once. Where the copies are identical (every column
of every table) it does not matter which. Where they differ (two machines trained the same config:
their timings differ at least), the newest copy (``created``) is kept, as rerunning a config
replaces its run; a tie goes to the copy whose content hashes higher. The rule reads only the copies,
so the output is the same whatever the order of the inputs. Each such conflict is reported with the
fields in which the copies differ.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recur.results import PER_RUN_TABLES, ResultStore, StoreError


@dataclass
class Conflict:
    """One hash held by several stores with different content."""

    hash: str
    kept: str  # the store whose copy is in the output
    dropped: list[str]  # the stores whose copies were not kept
    fields: list[str]  # what differs: columns of runs, or names of per-run tables
    created: str  # the kept copy's creation time

    def line(self) -> str:
        return (f"run {self.hash} differs between {', '.join([self.kept, *self.dropped])} "
                f"({', '.join(self.fields)}): kept {self.kept}'s, the newest (created {self.created})")


@dataclass
class MergeSummary:
    output: str
    held: dict[str, int]  # runs each input holds, by its path as given
    already: int  # runs the output held before the merge (0: it was new)
    runs: int  # runs in the output after the merge
    written: int  # runs written into the output by this merge
    duplicates: int  # copies not kept: sum over hashes of (copies - 1), so runs = already + sum(held) - duplicates
    identical: int  # hashes held by several stores in identical copies
    conflicts: list[Conflict] = field(default_factory=list)  # hashes held in different copies

    def line(self) -> str:
        parts = ([f"{self.already} already there"] if self.already else []) + \
            [f"{n} from {name}" for name, n in self.held.items()]
        dup = f"{self.duplicates} duplicate{'' if self.duplicates == 1 else 's'}"
        shared = self.identical + len(self.conflicts)
        detail = (f" of {shared} run{'' if shared == 1 else 's'} ({self.identical} identical, "
                  f"{len(self.conflicts)} differing: newest kept)") if shared else ""
        return f"{self.output}: {self.runs} runs: {', '.join(parts)}; {dup}{detail}"

    def as_json(self) -> dict[str, Any]:
        return {"output": self.output, "runs": self.runs, "written": self.written, "already": self.already,
                "held": self.held,
                "duplicates": self.duplicates, "identical": self.identical,
                "conflicts": [vars(c) for c in self.conflicts]}


def _digest(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=repr).encode()).hexdigest()


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    cols = [c for c in a["runs"] if a["runs"][c] != b["runs"].get(c)]
    return cols + [t for t in PER_RUN_TABLES if a[t] != b[t]]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist
        return a.resolve() == b.resolve()


def merge_stores(inputs: list[str | Path], output: str | Path) -> MergeSummary:
    """Merge the runs of ``inputs`` (and of ``output``, if it exists) into ``output``, one per hash.
    See the module docstring for duplicates; StoreError for an input that is not a readable store,
    one given twice, or an output that is one of the inputs."""
    inputs, output = [Path(p) for p in inputs], Path(output)
    if not inputs:
        raise StoreError("store merge: expected at least one store to merge, got none")
    for i, p in enumerate(inputs):
        if _same_file(p, output):
            raise StoreError(f"store merge: the output {output} is also an input ({p}); inputs are only read: "
                             "write the merge to a new file")
        twice = next((q for q in inputs[:i] if _same_file(p, q)), None)
        if twice is not None:
            raise StoreError(f"store merge: {p} is given twice" + (f" (as {twice})" if str(twice) != str(p) else ""))
    sources = [ResultStore(p, readonly=True) for p in inputs]  # each checked before anything is written
    try:
        existed = output.exists()
        out = ResultStore(output)
        try:
            return _merge([(str(p), s) for p, s in zip(inputs, sources)], out, str(output), existed)
        finally:
            out.close()
    finally:
        for s in sources:
            s.close()


def _merge(sources: list[tuple[str, ResultStore]], out: ResultStore, name: str, existed: bool) -> MergeSummary:
    stores = ([(name, out)] if existed else []) + sources
    copies: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # hash -> (created, digest, source)
    held = {}
    for source, store in stores:
        held[source] = 0
        for h, record in store.records():
            copies[h].append((record["runs"]["created"], _digest(record), source))
            held[source] += 1
    by_name = dict(stores)
    winners: dict[str, str] = {}  # hash -> the source whose copy is kept
    identical, conflicts = 0, []
    for h, cs in copies.items():
        best = max(cs, key=lambda c: (c[0], c[1]))
        winners[h] = next(c[2] for c in cs if c[1] == best[1])  # identical copies: the first source's
        if len(cs) > 1:
            if all(c[1] == best[1] for c in cs):
                identical += 1
                continue
            kept = _record(by_name[winners[h]], h)
            losers = [c[2] for c in cs if c[1] != best[1]]
            fields = sorted({f for s in losers for f in _differences(kept, _record(by_name[s], h))})
            conflicts.append(Conflict(h, winners[h], losers, fields, best[0]))
    conflicts.sort(key=lambda c: c.hash)

    def to_write():
        for source, store in sources:
            mine = {h for h, s in winners.items() if s == source}
            if mine:
                for _, record in store.records(mine):
                    yield record

    written = out.put_records(to_write())
    already = held.pop(name) if existed else 0
    return MergeSummary(output=name, held=held, already=already, runs=len(out), written=written,
                        duplicates=sum(len(cs) - 1 for cs in copies.values()), identical=identical,
                        conflicts=conflicts)


def _record(store: ResultStore, h: str) -> dict[str, Any]:
    return next(r for _, r in store.records({h}))
