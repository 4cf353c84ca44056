"""The typed state container every mixer returns and accepts.

A ``State`` is an ordered set of named, batch-first tensors: the whole memory of a
layer (hidden vectors, matrix states, conv tails, KV caches, position counters).
It detaches (truncated BPTT), moves, indexes by batch and saves/loads with
safetensors. States nest: a ``CausalLM`` state holds one child ``State`` per layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import load_file, save_file

Entry = Union[torch.Tensor, "State"]


def _kind(v: Entry) -> str:
    return "State" if isinstance(v, State) else f"Tensor{tuple(v.shape)}"


def _cat(states: list[State], prefix: str) -> State:
    first = states[0]
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(first):
            where = f" of entry {prefix[:-1]!r}" if prefix else ""
            raise ValueError(f"State.cat: state {i} has entries {sorted(s)}{where}, state 0 has {sorted(first)}")
    out = {}
    for k, v in first.items():
        name = prefix + k
        kinds = [isinstance(s[k], State) for s in states]
        if any(kinds) and not all(kinds):
            i = next(j for j, s in enumerate(states) if isinstance(s[k], State) != kinds[0])
            raise TypeError(f"State.cat: entry {name!r} is a {_kind(v)} in state 0 but a {_kind(states[i][k])} "
                            f"in state {i}")
        if kinds[0]:
            out[k] = _cat([s[k] for s in states], name + ".")
            continue
        for i, s in enumerate(states[1:], 1):
            t = s[k]
            if t.ndim != v.ndim or t.shape[1:] != v.shape[1:]:
                raise ValueError(f"State.cat: entry {name!r} has shape {tuple(t.shape)} in state {i} but "
                                 f"{tuple(v.shape)} in state 0 (all but the batch dimension must match)")
            if t.dtype != v.dtype:
                raise TypeError(f"State.cat: entry {name!r} has dtype {t.dtype} in state {i} but {v.dtype} in state 0")
            if t.device != v.device:
                raise ValueError(f"State.cat: entry {name!r} is on {t.device} in state {i} but on {v.device} in state 0")
        out[k] = torch.cat([s[k] for s in states], dim=0)
    return State(out)


class State(Mapping):
    """Named batch-first tensors (or nested States). Immutable mapping; methods return new States."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Entry] | None = None, /, **kwargs: Entry):
        entries = dict(items or {}, **kwargs)
        for key, value in entries.items():
            if not isinstance(key, str) or "." in key or "/" in key:
                raise ValueError(f"state keys are plain strings without '.' or '/', got {key!r}")
            if not isinstance(value, (torch.Tensor, State)):
                raise TypeError(f"state entry {key!r} must be a tensor or State, got {type(value).__name__}")
        self._items: dict[str, Entry] = entries

    # Mapping interface -------------------------------------------------
    def __getitem__(self, key: str) -> Entry:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __getattr__(self, key: str) -> Entry:
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return self._items[key]
        except KeyError:
            raise AttributeError(f"State has no entry {key!r}; entries: {list(self._items)}") from None

    def __repr__(self) -> str:
        def show(v: Entry) -> str:
            return f"Tensor{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" if isinstance(v, torch.Tensor) else repr(v)

        return "State(" + ", ".join(f"{k}={show(v)}" for k, v in self._items.items()) + ")"

    # Structure ----------------------------------------------------------
    def replace(self, **kwargs: Entry) -> State:
        return State({**self._items, **kwargs})

    def map(self, fn) -> State:
        """Apply ``fn`` to every tensor (recursing into nested States)."""
        return State({k: v.map(fn) if isinstance(v, State) else fn(v) for k, v in self._items.items()})

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Flattened (dotted name, tensor) pairs."""
        for k, v in self._items.items():
            if isinstance(v, State):
                for sub, t in v.tensors():
                    yield f"{k}.{sub}", t
            else:
                yield k, v

    # Operations ----------------------------------------------------------
    def detach(self) -> State:
        return self.map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> State:
        """Like ``Tensor.to``; a floating dtype applies to floating tensors only (complex follow)."""
        dtype = kwargs.pop("dtype", None)
        rest = []
        for a in args:
            if isinstance(a, torch.dtype):
                dtype = a
            else:
                rest.append(a)

        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(*rest, **kwargs)
            if dtype is not None:
                if t.is_complex():
                    t = t.to(torch.complex128 if dtype == torch.float64 else torch.complex64)
                elif t.is_floating_point():
                    t = t.to(dtype)
            return t

        return self.map(move)

    def select(self, index) -> State:
        """Rows of the batch: an int keeps the batch dimension (size 1); slices/index tensors as usual."""
        if isinstance(index, int) and not isinstance(index, bool):
            n = next((t.shape[0] for _, t in self.tensors()), None)
            if n is not None and not -n <= index < n:
                raise IndexError(f"State.select: row {index} is out of range for a batch of {n}")
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(states: list[State]) -> State:
        """Concatenate states along the batch dimension. They must have the same entries, with the
        same shapes (but the batch), dtypes and devices; a mismatch names the entry."""
        if isinstance(states, (State, torch.Tensor)) or not hasattr(states, "__iter__"):
            raise TypeError(f"State.cat takes a list of States, got a {type(states).__name__}")
        states = list(states)
        if not states:
            raise ValueError("State.cat needs at least one State, got an empty list")
        for i, s in enumerate(states):
            if not isinstance(s, State):
                raise TypeError(f"State.cat takes a list of States; item {i} is a {type(s).__name__}")
        return _cat(states, "")

    @property
    def batch_size(self) -> int:
        for _, t in self.tensors():
            return t.shape[0]
        raise ValueError("an empty State has no batch size")

    @property
    def batch_size(self) -> int:
        for _, t in self.tensors():
            return t.shape[0]
        raise ValueError("an empty State has no batch size")

    def num_floats(self, per_sequence: bool = True) -> int:
        """Floats held (complex counts twice); integer counters are not memory of the model."""
        total = 0
        for _, t in self.tensors():
            if t.is_complex():
                total += 2 * t.numel()
            elif t.is_floating_point():
                total += t.numel()
        if per_sequence and len(self):
            total //= self.batch_size
        return total

    # Persistence -----------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write to a safetensors file (complex tensors are stored as their real view)."""
        flat, complex_keys = {}, []
        for name, t in self.tensors():
            if t.is_complex():
                complex_keys.append(name)
                t = torch.view_as_real(t)
            flat[name] = t.detach().contiguous().cpu()
        save_file(flat, str(path), metadata={"recur_state": "1", "complex": json.dumps(complex_keys)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> State:
        """A State written by ``save`` (FileNotFoundError if there is no such file, ValueError if it
        is not a safetensors file)."""
        from safetensors import safe_open

        if not Path(path).is_file():
            if Path(path).exists():
                raise ValueError(f"State.load: {path} is not a file")
            raise FileNotFoundError(f"State.load: no such file: {path}")
        try:
            flat = load_file(str(path), device=str(device) if device is not None else "cpu")
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except (OSError, RuntimeError, ValueError, TypeError) as e:
            raise ValueError(f"State.load: {path} is not a State file (a safetensors file written by "
                             f"State.save): {e}") from None
        except Exception as e:  # noqa: BLE001 - safetensors' own SafetensorError derives from Exception only
            if type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(f"State.load: {path} is not a State file (a safetensors file written by "
                             f"State.save): {e}") from None
        complex_keys = set(json.loads(meta.get("complex", "[]")))
        tree: dict = {}
        for name, t in flat.items():
            if name in complex_keys:
                t = torch.view_as_complex(t)
            node = tree
            *parents, leaf = name.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = t

        def build(node: dict) -> State:
            return State({k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

        return build(tree)
