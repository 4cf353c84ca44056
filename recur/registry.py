"""Registries: one ``Registry`` class for every kind of named component.

    @MIXERS.register("gla", family="matrix-state", paper="Gated Linear Attention Transformers ...")
    class GLA(Mixer): ...

    MIXERS.names()                 # ["aaren", "attention", ...]
    MIXERS.get("glaa")             # ValueError: unknown mixer 'glaa'. Did you mean 'gla'? ...
    MIXERS.describe("gla")         # {"name", "kind", "family", "paper", "description", "options"}
    recur.build("gla", d_model=64) # a GLA mixer

Kinds: mixers (token mixers), channel mixers and norms (the other parts of a block), layer
patterns (hybrid presets), architectures (models above the mixer), tasks, training methods and
speed cases. This module is a leaf: it imports nothing of recur. What gets registered is listed
explicitly, one module per line, in each package's ``__init__`` (``recur/layers``, ``recur/models``,
``recur/tasks``, ``recur/training/methods``), and ``import recur`` imports those packages, so a
lookup never imports upwards and a module that fails to import names itself (``load_modules``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: its name, the object (a class or a value) and what it is."""

    name: str
    obj: T
    kind: str
    family: str = ""
    paper: str = ""
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def cls(self) -> T:
        """The registered class (``model_info(name).cls``)."""
        return self.obj


def _options(obj: Any) -> dict[str, Any]:
    """Keyword options and defaults: a pydantic ``Params`` class if the object has one, else its
    constructor's (or function's) keyword parameters."""
    params = getattr(obj, "Params", None)
    if params is not None and hasattr(params, "model_fields"):
        return {k: REQUIRED if f.is_required() else f.default for k, f in params.model_fields.items()}
    target = obj.__init__ if inspect.isclass(obj) else obj
    if not callable(target):
        return {}
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return {}
    return {k: p.default for k, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD}


REQUIRED = "<required>"  # what `describe` shows for an option without a default


class Registry(Generic[T]):
    """Named components of one kind: register by decorator, list, look up with close-name hints."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, *, family: str = "", paper: str = "", description: str = "",
                 **meta: Any) -> Callable[[T], T]:
        """Decorator registering a class or function under the lower-case ``name``."""
        self._check_name(name)

        def decorate(obj: T) -> T:
            self.add(name, obj, family=family, paper=paper, description=description, **meta)
            if inspect.isclass(obj):
                obj.name = name
            return obj

        return decorate

    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name or name != name.lower():
            raise ValueError(f"{self.kind} names are non-empty lower-case strings, got {name!r}")

    def add(self, name: str, obj: T, *, family: str = "", paper: str = "", description: str = "", **meta: Any) -> None:
        self._check_name(name)
        old = self._entries.get(name)
        if old is not None and old.obj is not obj:
            # The same class re-registered (a module imported twice) is fine; another is a clash.
            same = inspect.isclass(obj) and inspect.isclass(old.obj) and obj.__qualname__ == old.obj.__qualname__ \
                and obj.__module__ == old.obj.__module__
            if not same:
                owner = getattr(old.obj, "__qualname__", repr(old.obj))
                raise ValueError(f"{self.kind} name {name!r} is already registered by {owner}")
        if not description and inspect.isclass(obj) and obj.__doc__:
            description = obj.__doc__.strip().splitlines()[0]
        self._entries[name] = Entry(name, obj, self.kind, family, paper, description, dict(meta))

    def names(self) -> list[str]:
        return sorted(self._entries)

    def in_order(self) -> list[str]:
        """Names in the order they were registered (speed cases run so)."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def unknown(self, name: Any, known: list[str] | None = None, what: str | None = None) -> ValueError:
        """The error for an unknown name: the closest names, then every known one."""
        known = self.names() if known is None else known
        what = what or self.kind
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return ValueError(f"unknown {what} {name!r}.{hint} Known {what}s: {', '.join(known) or '(none)'}")

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise self.unknown(name)
        return self._entries[name]

    def describe(self, name: str) -> dict[str, Any]:
        """What `recur archs` / `recur models` show: name, kind, family, paper, description, options."""
        e = self.get(name)
        return {"name": e.name, "kind": e.kind, "family": e.family, "paper": e.paper,
                "description": e.description, "options": _options(e.obj), **e.meta}


def load_modules(package: str, modules: tuple[str, ...] | list[str]) -> None:
    """Import ``package.module`` for each name (running their ``register`` decorators); a module
    that fails to import is named in the error instead of breaking every lookup anonymously."""
    for name in modules:
        try:
            importlib.import_module(f"{package}.{name}")
        except Exception as e:
            raise ImportError(f"recur could not import {package}.{name} (it registers components): "
                              f"{type(e).__name__}: {e}") from e


# ------------------------------------------------------------------ the registries
MIXERS: Registry[type] = Registry("model")  # token mixers; "model" in messages, as `recur models` calls them
CHANNEL_MIXERS: Registry[type] = Registry("channel mixer")
NORMS: Registry[type] = Registry("norm")
PATTERNS: Registry[tuple[str, ...]] = Registry("pattern")
ARCHITECTURES: Registry[type] = Registry("architecture")
TASKS: Registry[type] = Registry("task")
METHODS: Registry[type] = Registry("training method")
SPEED_CASES: Registry[Callable] = Registry("speed case")


# ------------------------------------------------------------------ mixers (the original API)
ModelInfo = Entry  # model_info(name) -> Entry with .cls, .family, .paper


def register(name: str, *, family: str, paper: str) -> Callable[[type], type]:
    """Class decorator registering a mixer under a unique lower-case ``name``."""
    if name in PATTERNS:
        raise ValueError(f"model name {name!r} clashes with a pattern name")
    return MIXERS.register(name, family=family, paper=paper)


def register_pattern(name: str, pattern: list[str] | tuple[str, ...]) -> None:
    """Register a named layer pattern (a hybrid preset such as ``samba``)."""
    if name in MIXERS:
        raise ValueError(f"pattern name {name!r} clashes with a model name")
    PATTERNS.add(name, tuple(pattern))


def list_models(causal: bool | None = None) -> list[str]:
    """Names of all registered mixers, sorted. They include encoder-only layers (``causal=False``,
    e.g. ``bidirectional``: they read the future, so a causal LM refuses them; use them in
    ``Encoder``); ``causal=True`` lists only the mixers a causal model can use, ``causal=False``
    only the encoder-only ones."""
    names = MIXERS.names()
    if causal is None:
        return names
    return [n for n in names if bool(getattr(MIXERS.get(n).obj, "causal", True)) == causal]


def list_patterns() -> dict[str, tuple[str, ...]]:
    """Named layer patterns (hybrid presets), e.g. ``{"samba": ("mamba", "swa")}``."""
    return {n: PATTERNS.get(n).obj for n in PATTERNS.names()}


def model_info(name: str) -> Entry:
    return MIXERS.get(name)


def hybrid(linear: str, ratio: int = 3, attention: str = "attention") -> tuple[str, ...]:
    """The layer pattern of a linear/full-attention hybrid: ``ratio`` ``linear`` layers, then one
    ``attention`` layer (repeated to the model's depth by Backbone).

    ``hybrid("gated_deltanet", 3)`` is ``(gated_deltanet x 3, attention)``, the 3:1 ratio that
    "A Systematic Analysis of Hybrid Linear Attention" (2025) recommends (with 6:1) for
    Transformer-level recall. As a string pattern: ``"hybrid:gated_deltanet:3"`` (and
    ``"hybrid:gla:6:swa"`` to choose the attention layer), usable from configs and the CLI.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"hybrid ratio (linear layers per attention layer) must be an int >= 1, got {ratio!r}")
    for name in (linear, attention):
        model_info(name)
    return (linear,) * ratio + (attention,)


def _parse_hybrid(pattern: str) -> tuple[str, ...]:
    parts = pattern.split(":")
    if len(parts) not in (2, 3, 4) or parts[0] != "hybrid":
        raise ValueError(f"a hybrid pattern is 'hybrid:LINEAR[:RATIO[:ATTENTION]]', e.g. 'hybrid:gla:3', got {pattern!r}")
    try:
        ratio = int(parts[2]) if len(parts) > 2 else 3
    except ValueError:
        raise ValueError(f"hybrid pattern {pattern!r}: the ratio must be an integer, got {parts[2]!r}") from None
    return hybrid(parts[1], ratio, *(parts[3:] or []))


def resolve_pattern(pattern: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A pattern given as a preset name, a single model name, a ``hybrid:LINEAR:RATIO`` string,
    or a list of model names."""
    if isinstance(pattern, str):
        if pattern in PATTERNS:
            return PATTERNS.get(pattern).obj
        if pattern.startswith("hybrid:"):
            return _parse_hybrid(pattern)
        if pattern in MIXERS:
            return (pattern,)
        raise MIXERS.unknown(pattern, MIXERS.names() + PATTERNS.names(), what="model or pattern")
    if not isinstance(pattern, (list, tuple)) or not all(isinstance(n, str) for n in pattern):
        raise TypeError(f"a pattern is a model name, a preset name, 'hybrid:LINEAR:RATIO' or a list of model "
                        f"names, got {pattern!r} ({type(pattern).__name__})")
    names = tuple(pattern)
    if not names:
        raise ValueError("a layer pattern needs at least one model name")
    for n in names:
        model_info(n)
    return names


def build(name: str, d_model: int, **config: Any):
    """Build the mixer registered as ``name`` with width ``d_model``; an option the mixer does not
    have, or a value of the wrong type (``n_heads="abc"``, ``n_heads=True``), is a clear error."""
    cls = model_info(name).cls
    check_options(cls, config, owner=name)
    return cls(d_model=d_model, **config)


# ------------------------------------------------------------------ option checks
def _expected(annotation: Any) -> set[type] | None:
    """The scalar types an annotation admits among int, float, bool, str (None: anything else too)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _expected(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        out: set[type] = set()
        for arm in typing.get_args(annotation):
            if arm is type(None):
                out.add(type(None))
                continue
            sub = _expected(arm)
            if sub is None:
                return None
            out |= sub
        return out
    if origin is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    if annotation in (int, float, bool, str):
        return {annotation}
    return None


def _type_words(expected: set[type]) -> str:
    words = {int: "an int", float: "a number", bool: "a boolean (true or false)", str: "a string"}
    parts = [words[t] for t in (int, float, bool, str) if t in expected and not (t is int and float in expected)]
    return " or ".join(parts) + (" or None" if type(None) in expected else "")


def _type_ok(value: Any, expected: set[type]) -> bool:
    if value is None:
        return type(None) in expected
    if isinstance(value, bool):
        return bool in expected
    if isinstance(value, numbers.Integral):
        return int in expected or float in expected
    if isinstance(value, numbers.Real):
        return float in expected
    return str in expected and isinstance(value, str)


def check_options(cls: type, options: dict[str, Any], owner: str | None = None) -> None:
    """Check keyword ``options`` against ``cls.__init__``: an unknown option (where the constructor
    takes no ``**kwargs``) and a value whose type its annotation (or default) rules out raise a
    ValueError / TypeError naming the option, what it expects and what it got. A float must be finite."""
    owner = owner or getattr(cls, "name", cls.__name__)
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return
    params = {k: p for k, p in sig.parameters.items() if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: fall back on the defaults
        hints = {}
    for key, value in options.items():
        if key not in params:
            if open_ended:
                continue
            close = difflib.get_close_matches(key, list(params), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(k for k in params if k != "d_model") or "(none)"
            raise TypeError(f"{owner} got an unexpected keyword argument {key!r} (no such option).{hint} "
                            f"Options of {owner}: {known}")
        expected = _expected(hints[key]) if key in hints else None
        default = params[key].default
        if expected is None and key not in hints and default is not inspect.Parameter.empty and default is not None \
                and type(default) in (int, float, bool, str):
            expected = {type(default), type(None)} if default is None else {type(default)}
        if expected is None or str in expected:  # names and choices: the mixer's own message is the clearer
            continue
        if not _type_ok(value, expected):
            shown = f"{value!r} ({type(value).__name__})" if not isinstance(value, str) else repr(value)
            raise TypeError(f"{owner}: option {key} must be {_type_words(expected)}, got {shown}")
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral) and not math.isfinite(value):
            raise ValueError(f"{owner}: option {key} must be a finite number, got {value!r}")
