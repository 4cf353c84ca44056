"""The model registry: every mixer registers itself by name; the CLI, the docs table
and the conformance suite read it.

    @register("gla", family="matrix-state", paper="Gated Linear Attention Transformers ...")
    class GLA(Mixer): ...

    recur.list_models()            # ["attention", "deltanet", ...]
    recur.build("gla", d_model=64) # a GLA mixer
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ModelInfo:
    name: str
    cls: type
    family: str
    paper: str


_MODELS: dict[str, ModelInfo] = {}
_PATTERNS: dict[str, tuple[str, ...]] = {}


def register(name: str, *, family: str, paper: str) -> Callable[[type], type]:
    """Class decorator registering a mixer under a unique lower-case ``name``."""
    if name != name.lower():
        raise ValueError(f"model names are lower-case, got {name!r}")

    def decorate(cls: type) -> type:
        if name in _MODELS and _MODELS[name].cls is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name].cls.__qualname__}")
        _MODELS[name] = ModelInfo(name=name, cls=cls, family=family, paper=paper)
        cls.name = name
        return cls

    return decorate


def register_pattern(name: str, pattern: list[str] | tuple[str, ...]) -> None:
    """Register a named layer pattern (a hybrid preset such as ``samba``)."""
    if name in _MODELS:
        raise ValueError(f"pattern name {name!r} clashes with a model name")
    _PATTERNS[name] = tuple(pattern)


def _load_all() -> None:
    # Importing the layers package runs every @register decorator.
    import recur.layers  # noqa: F401


def list_models() -> list[str]:
    """Names of all registered mixers, sorted."""
    _load_all()
    return sorted(_MODELS)


def list_patterns() -> dict[str, tuple[str, ...]]:
    """Named layer patterns (hybrid presets), e.g. ``{"samba": ("mamba", "swa")}``."""
    _load_all()
    return dict(sorted(_PATTERNS.items()))


def _unknown(kind: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known)}")


def model_info(name: str) -> ModelInfo:
    _load_all()
    if name not in _MODELS:
        raise _unknown("model", name, sorted(_MODELS))
    return _MODELS[name]


def hybrid(linear: str, ratio: int = 3, attention: str = "attention") -> tuple[str, ...]:
    """The layer pattern of a linear/full-attention hybrid: ``ratio`` ``linear`` layers, then one
    ``attention`` layer (repeated to the model's depth by Backbone).

    ``hybrid("gated_deltanet", 3)`` is ``(gated_deltanet x 3, attention)``, the 3:1 ratio that
    "A Systematic Analysis of Hybrid Linear Attention" (2025) recommends (with 6:1) for
    Transformer-level recall. As a string pattern: ``"hybrid:gated_deltanet:3"`` (and
    ``"hybrid:gla:6:swa"`` to choose the attention layer), usable from configs and the CLI.
    """
    _load_all()
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
    _load_all()
    if isinstance(pattern, str):
        if pattern in _PATTERNS:
            return _PATTERNS[pattern]
        if pattern.startswith("hybrid:"):
            return _parse_hybrid(pattern)
        if pattern in _MODELS:
            return (pattern,)
        raise _unknown("model or pattern", pattern, sorted(_MODELS) + sorted(_PATTERNS))
    names = tuple(pattern)
    if not names:
        raise ValueError("a layer pattern needs at least one model name")
    for n in names:
        model_info(n)
    return names


def build(name: str, d_model: int, **config: Any):
    """Build the mixer registered as ``name`` with width ``d_model``."""
    info = model_info(name)
    return info.cls(d_model=d_model, **config)
