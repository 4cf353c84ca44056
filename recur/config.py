"""Run and sweep configs: a run is fully described by a nested, serialisable config, and its hash names it.

    cfg = RunConfig(task={"name": "mqar", "args": {"num_kv_pairs": 8}}, model={"mixer": "gla", "d_model": 64})
    cfg = RunConfig(task="mqar", model="gla", d_model=64, task_args={"num_kv_pairs": 8})   # the flat shape, same config
    cfg.optim.lr, cfg.task.seq_len, cfg.model.block.mlp, cfg.training   # task / model / optim / training / eval
    config_hash(cfg)                          # "3f2a9c0d1e4b5a67", stable across upgrades (below)
    configs = SweepConfig.from_yaml("grid.yaml").expand()

``RunConfig`` = ``task`` (name, args, training length) + ``model`` (architecture, mixer pattern,
sizes, per-mixer options, block parts, architecture options) + ``optim`` + ``training`` (a list of
training methods with their options) + ``eval`` + ``seed`` and ``device``. Every field a user can
write is validated, and an error names its key and the value it got (``optim.lr: Input should be
greater than 0, got -1.0``); a boolean is never a number (``seed: true`` is an error, not seed 1) and
floats are finite.
The flat keys of earlier versions (``seq_len``, ``lr``, ``mlp``, ``state_init``, ...) are still
accepted anywhere a config is written (Python, sweep YAML, stored runs) and mean the nested key
in ``LEGACY_KEYS``.

Run hashes survive upgrades. The hash is sha256 over the canonical JSON of the config in which a
field is left out when it equals its *frozen* value: the value it had when the field was
introduced (``FROZEN`` of each section, checked at import: a field without one cannot be added).
So adding an option with a default leaves every existing hash unchanged, and changing a default
later does not make an old run and a new run with different values share a hash (the new
default differs from the frozen value, so it is written out). Task, mixer and architecture
options are free dicts and are hashed as written; training-method options are validated by the
method's own ``Params`` and omitted at their frozen values likewise.

A sweep YAML names grid axes and, beside them, any field shared by every run::

    models: [lstm, mamba, {name: gla, args: {chunk_size: 16}, overrides: {optim.lr: 3.0e-3}}]
    tasks: [parity, {name: mqar, args: {num_kv_pairs: 8}, overrides: {seq_len: 128}}]
    sizes: [{d_model: 32}, {d_model: 64, n_layers: 4}]
    seeds: [0, 1]
    lrs: [1.0e-3, 3.0e-3]
    axes: {model.block.mlp: [swiglu, gelu], training: [[], [state_noise]]}   # any nested key
    optim: {steps: 1000}                      # shared by every run (or `steps: 1000`, or `optim.steps: 1000`)

``load_yaml`` reads it: a key given twice is an error (not last-wins), ``1e-3`` is a float (YAML 1.2),
and every error names the file, line and column.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from recur.registry import CHANNEL_MIXERS, METHODS, NORMS


# ------------------------------------------------------------------ numbers are numbers
def _kinds(annotation: Any) -> set[str]:
    """What a field's annotation admits, coarsely: "int", "float", "bool", "list" (with its element
    annotation checked apart) or "other" (str, dicts, models, Any...)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _kinds(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if annotation is bool:
        return {"bool"}
    if annotation is int:
        return {"int"}
    if annotation is float:
        return {"float"}
    if origin in (list, tuple):
        return {"list"}
    if annotation is type(None):
        return set()
    return {"other"}


def _elements(annotation: Any) -> list[Any]:
    """The element annotations of a list / tuple annotation (every arm of a union)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _elements(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [e for a in typing.get_args(annotation) for e in _elements(a)]
    if origin in (list, tuple):
        return [a for a in typing.get_args(annotation) if a is not Ellipsis]
    return []


def check_number(value: Any, annotation: Any) -> None:
    """Raise a ValueError where ``value`` would be silently converted into a number it does not
    mean: a boolean where an int or float is expected (``seeds: [true]`` is not seed 1), or an
    infinite or NaN float (``lr: inf``); recurses into lists and tuples."""
    kinds = _kinds(annotation)
    numeric = kinds & {"int", "float"}
    if isinstance(value, bool):
        if numeric and not kinds & {"bool", "other"}:
            what = "an integer" if numeric == {"int"} else "a number"
            raise ValueError(f"Input should be {what}, got the boolean {value!r}")
        return
    if "float" in kinds and not kinds & {"other"} and isinstance(value, (float, str)):
        try:
            number = float(value)
        except ValueError:
            return  # not a number at all: pydantic says so
        if not math.isfinite(number):
            raise ValueError(f"Input should be a finite number, got {value!r}")
        return
    if isinstance(value, (list, tuple)) and "list" in kinds:
        elements = _elements(annotation)
        if len(elements) == 1:  # list[X], tuple[X, ...]
            for item in value:
                check_number(item, elements[0])
        elif len(elements) == len(value):  # tuple[X, Y]
            for item, element in zip(value, elements):
                check_number(item, element)


class StrictNumbers:
    """Mixin of the config models: a boolean is never an int or a float, and floats are finite
    (pydantic's lax mode would read ``true`` as 1 and accept ``inf``)."""

    @field_validator("*", mode="before")
    @classmethod
    def _strict_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None:
            check_number(value, field.annotation)
        return value


class Section(StrictNumbers, BaseModel):
    """A config section: unknown keys are errors, values are validated (a boolean is not a number,
    floats are finite), instances are frozen.

    ``FROZEN`` maps every field that has a default to its value when it was introduced, in its
    canonical (JSON) form: the hash leaves the field out when it equals that. Never edit an entry;
    a new field adds one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    FROZEN: ClassVar[dict[str, Any]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs):
        super().__pydantic_init_subclass__(**kwargs)
        missing = [n for n, f in cls.model_fields.items() if not f.is_required() and n not in cls.FROZEN]
        if missing:
            raise TypeError(f"{cls.__name__}: fields {missing} have defaults but no FROZEN value (the value each "
                            "had when introduced, which the run hash omits); add them to FROZEN")


def canonical(value: Any) -> Any:
    """The JSON form the hash is taken over: sections without their frozen-valued fields."""
    if isinstance(value, MethodConfig):
        args = canonical(value.params())  # the method's options at their frozen values drop out
        return {"name": value.name, **({"args": args} if args else {})}
    if isinstance(value, Section):
        out = {}
        for name in type(value).model_fields:
            v = canonical(getattr(value, name))
            if name in type(value).FROZEN and v == type(value).FROZEN[name]:
                continue
            out[name] = v
        return out
    if isinstance(value, BaseModel):
        return canonical(value.model_dump())
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


# ------------------------------------------------------------------ sections
class TaskConfig(Section):
    """Which task, its parameters and the training sequence length."""

    FROZEN: ClassVar[dict[str, Any]] = {"args": {}, "seq_len": 64}
    name: str = Field(description="registered task name (`recur tasks`)")
    args: dict[str, Any] = Field(default_factory=dict, description="task parameters (`recur tasks`)")
    seq_len: int = Field(64, ge=1, description="training sequence length")


class BlockConfig(Section):
    """The parts of every block besides its token mixer."""

    FROZEN: ClassVar[dict[str, Any]] = {"mlp": "swiglu", "ratio": 4.0, "norm": "rmsnorm", "mlp_args": {}}
    mlp: str | None = Field("swiglu", description="the channel mixer after each token mixer (swiglu, gelu, rwkv4) or None")
    ratio: float = Field(4.0, gt=0, description="channel mixer hidden width / d_model")
    norm: str = Field("rmsnorm", description="norm before each part (rmsnorm, layernorm)")
    mlp_args: dict[str, Any] = Field(default_factory=dict, description="further channel mixer options")

    @field_validator("mlp")
    @classmethod
    def _known_channel(cls, v):
        if v is not None and v not in CHANNEL_MIXERS:
            raise CHANNEL_MIXERS.unknown(v)
        return v

    @field_validator("norm")
    @classmethod
    def _known_norm(cls, v):
        if v not in NORMS:
            raise NORMS.unknown(v)
        return v


class ModelConfig(Section):
    """The architecture, its token mixers (a pattern), sizes, block parts and own options."""

    FROZEN: ClassVar[dict[str, Any]] = {"arch": "causal_lm", "d_model": 64, "n_layers": 2, "mixer_args": {},
                                        "block": {}, "args": {}, "tie_embeddings": True}
    arch: str = Field("causal_lm", description="registered architecture (`recur archs`)")
    mixer: str | list[str] = Field(description="model name, pattern preset, or a list of model names (a layer pattern)")
    d_model: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=1)
    mixer_args: dict[str, Any] = Field(default_factory=dict,
                                       description="mixer options: flat keys for every mixer, {model: {...}} for one")
    block: BlockConfig = Field(default_factory=BlockConfig)
    args: dict[str, Any] = Field(default_factory=dict, description="options of the architecture (e.g. n_loops)")
    # Untied by default since 0.4: with a tied head, recur's attention LM learned MQAR at lr 1e-3 to 0.17
    # where the untied one reached 0.99 (docs/results.md, "causes"); runs before it were tied (frozen
    # value True), so their hashes still name what they ran.
    tie_embeddings: bool = Field(False, description="share the token embedding with the output head "
                                                    "(architectures with both)")

    @field_validator("mixer")
    @classmethod
    def _mixer_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("a layer pattern needs at least one model name")
        return v

    @property
    def name(self) -> str:
        """A display name: the mixer or preset name, or the pattern joined by '+' (and the architecture
        when it is not causal_lm)."""
        mixer = self.mixer if isinstance(self.mixer, str) else "+".join(self.mixer)
        return mixer if self.arch == "causal_lm" else f"{self.arch}:{mixer}"


class OptimConfig(Section):
    """AdamW with warm-up and cosine decay, clipping, the step budget and the early-stop rule."""

    FROZEN: ClassVar[dict[str, Any]] = {"steps": 2000, "batch_size": 64, "lr": 0.001, "weight_decay": 0.1,
                                        "warmup": 0.1, "min_lr_ratio": 0.0, "grad_clip": 1.0, "early_stop": 0.99,
                                        "early_stop_window": 20, "early_stop_patience": 0.0}
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.1, ge=0)
    warmup: float = Field(0.1, ge=0, description="warm-up: a fraction of steps if < 1, else a number of steps")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the cosine decays to lr * this")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm, None: no clipping")
    early_stop: float | None = Field(0.99, gt=0, le=1,
                                     description="stop when the mean training accuracy of the last "
                                                 "early_stop_window steps reaches this; None: never")
    early_stop_window: int = Field(20, ge=1)
    # Why not stop at once: a 1-layer LSTM on parity that saturates at step 530 of 3000 keeps 0.96 at 4x
    # the training length (0.80 at 16x) when stopped there, 0.80 when stopped at a training loss of 1e-3
    # (step 795), and 1.000 at 4x and 16x when it trains 20% of its budget longer (docs/results.md,
    # "causes"): generalising solutions form after the training length is already solved.
    early_stop_patience: float = Field(0.2, ge=0, description="steps to keep training once the early-stop "
                                                                "rule holds: a fraction of steps if < 1, else a number")

    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else min(int(self.warmup), self.steps)

    def patience_steps(self) -> int:
        p = self.early_stop_patience
        return int(round(p * self.steps)) if p < 1 else int(p)


class MethodConfig(Section):
    """One training method (``recur methods``) and its options (validated by the method's Params)."""

    FROZEN: ClassVar[dict[str, Any]] = {"args": {}}
    name: str
    args: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data):
        """``"tbptt"`` and ``{name: tbptt, k1: 16}`` mean ``{name: tbptt, args: {k1: 16}}``."""
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, dict) and "name" in data and set(data) - {"name", "args"}:
            rest = {k: v for k, v in data.items() if k not in ("name", "args")}
            return {"name": data["name"], "args": {**dict(data.get("args") or {}), **rest}}
        return data

    @model_validator(mode="after")
    def _known_method(self):
        entry = METHODS.get(self.name) if self.name in METHODS else None
        if entry is None:
            raise METHODS.unknown(self.name)
        params = entry.cls.Params
        try:
            checked = params(**self.args)
        except ValidationError as e:
            raise ValueError(f"bad options for training method {self.name!r}: {config_problems(e)}") from None
        # Every option, defaults filled in: the hash then omits those at their frozen values, so a
        # default that changes later cannot make two different runs share a name.
        object.__setattr__(self, "args", checked.model_dump(mode="json"))
        return self

    def params(self):
        """The method's validated options (a ``Params`` instance, defaults filled in)."""
        return METHODS.get(self.name).cls.Params(**self.args)


class EvalConfig(Section):
    """Where a run is evaluated: the lengths (default: the training length and 4x) and batches per length."""

    FROZEN: ClassVar[dict[str, Any]] = {"lengths": [], "batches": 4, "every": 0, "loops": []}
    lengths: list[int] = Field(default_factory=list, description="default: [seq_len, 4 * seq_len]")
    loops: list[int] = Field(default_factory=list, description="also evaluate at these numbers of iterations (the "
                                                                "depth option of a depth-recurrent architecture, "
                                                                "e.g. looped_lm's n_loops; more than trained: test-"
                                                                "time compute), at every eval length")
    batches: int = Field(4, ge=1, description="batches of batch_size test sequences per eval length")
    every: int = Field(0, ge=0, description="also evaluate every N steps (and at the end) at the training length "
                                            "on the validation split (test where the task has none): the "
                                            "run's eval curve; 0: only the final evaluation")

    @field_validator("lengths")
    @classmethod
    def _positive_lengths(cls, v):
        if any(n < 1 for n in v):
            raise ValueError(f"eval lengths must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("loops")
    @classmethod
    def _positive_loops(cls, v):
        if any(n < 1 for n in v):
            raise ValueError(f"eval loops must be >= 1, got {v}")
        return sorted(set(v))


# Flat keys of the first config shape -> their nested place (the training methods are handled apart).
LEGACY_KEYS = {
    "task_args": "task.args", "seq_len": "task.seq_len",
    "model_args": "model.mixer_args", "d_model": "model.d_model", "n_layers": "model.n_layers",
    "mlp": "model.block.mlp", "arch": "model.arch",
    **{k: f"optim.{k}" for k in ("steps", "batch_size", "lr", "weight_decay", "warmup", "min_lr_ratio", "grad_clip",
                                  "early_stop", "early_stop_window", "early_stop_patience")},
    "eval_lengths": "eval.lengths", "eval_batches": "eval.batches",
}
_LEGACY_METHOD_KEYS = ("state_init", "state_noise_std", "state_passing")


class RunConfig(Section):
    """One training run: task x model x optimisation x training methods x evaluation x seed."""

    FROZEN: ClassVar[dict[str, Any]] = {"optim": {}, "training": [], "eval": {}, "seed": 0, "device": "auto"}
    task: TaskConfig
    model: ModelConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    training: list[MethodConfig] = Field(default_factory=list, description="training methods, applied in order")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    seed: int = Field(0, ge=-2**63, lt=2**64, description="seeds the model's initialisation and every random stream")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data):
        return to_nested(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _default_eval_lengths(self):
        if not self.eval.lengths:
            # frozen model: fill the derived default once, so the dump (and the hash) shows it
            n = self.task.seq_len
            object.__setattr__(self, "eval", self.eval.model_copy(update={"lengths": [n, 4 * n]}))
        return self

    @property
    def model_name(self) -> str:
        return self.model.name

    def warmup_steps(self) -> int:
        return self.optim.warmup_steps()

    def method(self, name: str) -> MethodConfig | None:
        """The training method ``name`` of this run, if it has one."""
        return next((m for m in self.training if m.name == name), None)

    def canonical_json(self) -> str:
        """The JSON the hash is taken over (frozen-valued fields left out)."""
        return json.dumps(canonical(self), sort_keys=True, separators=(",", ":"))

    def full_json(self) -> str:
        """Every field, defaults included: what the results store keeps for reading."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def config_hash(cfg: RunConfig) -> str:
    """The run's name: first 16 hex digits of sha256 over the canonical JSON of the config."""
    return hashlib.sha256(cfg.canonical_json().encode()).hexdigest()[:16]


# errors whose input says nothing more (or is already in the message)
_NO_INPUT = {"missing", "extra_forbidden", "value_error", "assertion_error", "too_short", "too_long"}


def config_problems(e: ValidationError) -> str:
    """A pydantic error as one readable line: ``key.path: message, got VALUE; key: message``."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-")) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        given = err.get("input")
        if (err["type"] not in _NO_INPUT and "input" in err
                and (given is None or isinstance(given, (str, int, float, list))) and len(repr(given)) <= 80):
            if err["type"] == "int_from_float":  # "... got a number with a fractional part"
                msg += f" ({given!r})"
            elif "got" not in msg:
                msg += f", got {given!r}"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


# ------------------------------------------------------------------ nested keys
def deep_merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``; nested dicts merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def set_path(data: dict, path: str, value: Any) -> None:
    """``set_path(d, "model.block.mlp", "gelu")``; sections given as names become dicts."""
    keys = path.split(".")
    if not all(keys):
        raise ValueError(f"bad config key {path!r}: expected dotted names such as model.block.mlp")
    node = data
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        elif isinstance(child, str) and i == 0 and k in _NAMED:
            child = node[k] = {_NAMED[k]: child}
        elif not isinstance(child, dict):
            raise ValueError(f"bad config key {path!r}: {'.'.join(keys[:i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = copy.deepcopy(value)


_NAMED = {"task": "name", "model": "mixer"}  # a section written as a plain name
_SECTIONS = set(RunConfig.model_fields)


def to_nested(data: dict | list[tuple[str, Any]]) -> dict:
    """A config in any accepted shape (nested sections, dotted keys, the flat keys of the first
    version; a dict or a list of (key, value) pairs) as nested dicts. Keys are applied in order: a
    later key wins, and a later section merges into an earlier one key by key."""
    out: dict[str, Any] = {}
    legacy_methods: dict[str, Any] = {}
    for key, value in (data.items() if isinstance(data, dict) else data):
        if key in _LEGACY_METHOD_KEYS:
            legacy_methods[key] = value
        elif key in _NAMED and (isinstance(value, str) or (key == "model" and isinstance(value, list))):
            set_path(out, f"{key}.{_NAMED[key]}", value)
        elif key in _SECTIONS and isinstance(value, dict):
            out[key] = deep_merge(out.get(key) if isinstance(out.get(key), dict) else {}, copy.deepcopy(value))
        elif key in _SECTIONS:
            out[key] = copy.deepcopy(value)
        elif key in LEGACY_KEYS:
            set_path(out, LEGACY_KEYS[key], value)
        elif "." in key:
            set_path(out, key, value)
        else:
            out[key] = value  # unknown: validation names it
    if legacy_methods:
        methods = list(out.get("training") or [])
        names = {m if isinstance(m, str) else m.get("name") for m in methods}
        if legacy_methods.get("state_passing") and "state_passing" not in names:
            methods.append({"name": "state_passing"})
        init = legacy_methods.get("state_init", "zeros")
        if init not in ("zeros", "noise"):
            raise ValueError(f"state_init: expected 'zeros' or 'noise', got {init!r}")
        if init == "noise" and "state_noise" not in names:
            std = legacy_methods.get("state_noise_std", 1.0)
            methods.append({"name": "state_noise", "args": {} if std == 1.0 else {"std": std}})
        out["training"] = methods
    return out


# ------------------------------------------------------------------ YAML files
class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key given twice in one mapping is an error (not last-wins),
    and ``1e-3`` is a float (YAML 1.2; YAML 1.1 reads it as a string)."""


def _no_duplicate_keys(loader: YamlLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, yaml.Mark] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": merged keys may be overridden
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.get(key)
        except TypeError:  # an unhashable key: construct_mapping says so
            continue
        if first is not None:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given at line {first.line + 1}); a key may appear "
                "only once in a mapping", key_node.start_mark)
        seen[key] = key_node.start_mark
    return loader.construct_mapping(node, deep=deep)


YamlLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(path: str | Path) -> Any:
    """The content of a YAML file, with errors that name the file (and the line and column)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a YAML file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if b"\x00" in raw[:8192]:
        raise ValueError(f"{path} is not a text file (it holds binary data); a sweep file is UTF-8 YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}, line {line}, column {column}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                         "save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - YamlLoader is a SafeLoader
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = e.context or ""
        if context and e.context_mark is not None and e.context_mark is not mark:
            context += f" (from line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        problem = ": ".join(str(x) for x in (context, e.problem) if x)
        if "\t" in (e.problem or "") or (mark is not None and text.splitlines()[mark.line:mark.line + 1]
                                          and "\t" in text.splitlines()[mark.line]):
            problem += " (a tab character: YAML indents with spaces only)"
        raise ValueError(f"{path}{where}: bad YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: bad YAML: {e}") from None


# ------------------------------------------------------------------ sweeps
class TaskSpec(StrictNumbers, BaseModel):
    """One task of a sweep: its name, parameters and any run fields it overrides (e.g. seq_len)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    args: dict[str, Any] = Field(default_factory=dict)
    overrides: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(StrictNumbers, BaseModel):
    """One model of a sweep: a mixer name, preset or pattern, its options, an architecture, any overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str | list[str]
    args: dict[str, Any] = Field(default_factory=dict)
    arch: str | None = Field(None, description="architecture (default: the shared one, else causal_lm)")
    overrides: dict[str, Any] = Field(default_factory=dict)


class Size(StrictNumbers, BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    d_model: int | None = Field(None, ge=1)
    n_layers: int | None = Field(None, ge=1)


_GRID_KEYS = {"models", "tasks", "sizes", "seeds", "lrs", "axes", "shared", "imports"}


def _is_run_key(key: str) -> bool:
    return key in _SECTIONS or key in LEGACY_KEYS or key in _LEGACY_METHOD_KEYS or key.split(".")[0] in _SECTIONS


class SweepConfig(StrictNumbers, BaseModel):
    """A grid of runs: models x tasks x sizes x seeds x lrs x axes, plus fields shared by every run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelSpec] = Field(min_length=1)
    tasks: list[TaskSpec] = Field(min_length=1)
    sizes: list[Size] = Field(default_factory=lambda: [Size()])
    seeds: list[Annotated[int, Field(ge=-2**63, lt=2**64)]] = Field(default_factory=lambda: [0])
    lrs: list[float] | None = Field(None, description="None: the shared lr")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="any nested key -> the values it takes")
    shared: dict[str, Any] = Field(default_factory=dict, description="run fields common to every run")
    imports: list[str] = Field(default_factory=list,
                               description="modules to import first (they register custom tasks or models)")

    @model_validator(mode="before")
    @classmethod
    def _collect_shared(cls, data):
        """Top-level run fields go to ``shared``; names as plain strings become specs."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        shared = dict(data.pop("shared", None) or {})
        for key in list(data):
            if key not in _GRID_KEYS:
                if not _is_run_key(key):
                    raise ValueError(f"unknown sweep key {key!r}: expected one of {sorted(_GRID_KEYS)} or a run "
                                     f"field ({', '.join(sorted(_SECTIONS))}, a dotted key such as optim.lr, or "
                                     f"one of {', '.join(LEGACY_KEYS)})")
                shared[key] = data.pop(key)
        data["shared"] = shared
        for axis in ("models", "tasks"):
            if isinstance(data.get(axis), (str, dict)):
                data[axis] = [data[axis]]
            if isinstance(data.get(axis), list):
                data[axis] = [{"name": x} if isinstance(x, str) else x for x in data[axis]]
        for axis in ("seeds", "lrs"):
            if isinstance(data.get(axis), (int, float)) and not isinstance(data.get(axis), bool):
                data[axis] = [data[axis]]
        return data

    @field_validator("shared")
    @classmethod
    def _no_axes_in_shared(cls, v):
        bad = sorted(k for k in v if k in {"task", "model", "task_args", "model_args"} and not isinstance(v[k], dict))
        if bad:
            raise ValueError(f"{bad} are grid axes: use 'tasks' and 'models' (with 'args')")
        return v

    @field_validator("axes")
    @classmethod
    def _axes_are_run_keys(cls, v):
        for key, values in v.items():
            if not _is_run_key(key):
                raise ValueError(f"axis {key!r} is not a run field (a dotted key such as model.block.mlp)")
            if not values:
                raise ValueError(f"axis {key!r} has no values")
        return v

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepConfig:
        """The sweep of a YAML file; every problem (a missing or binary file, bad YAML, a duplicate
        key, a bad value) is a ValueError (FileNotFoundError for a missing file) naming the file."""
        data = load_yaml(path)
        if data is None:
            raise ValueError(f"{path}: the file is empty; a sweep file is a YAML mapping with 'models' and 'tasks'")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a sweep file is a YAML mapping with 'models' and 'tasks', got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ValueError(f"{path}: bad sweep config: {config_problems(e)}") from None

    def expand(self) -> list[RunConfig]:
        """Every run of the grid (duplicates removed), ordered task, size, model, seed, lr, axes. A
        ValueError lists every run whose config is invalid (up to ``MAX_LISTED``), numbered in that order."""
        runs, seen, problems, index = [], set(), [], 0
        axis_values = list(itertools.product(*self.axes.values())) if self.axes else [()]
        for task in self.tasks:
            for size in self.sizes:
                for model in self.models:
                    for seed in self.seeds:
                        for lr in self.lrs or [None]:
                            for point in axis_values:
                                grid = {"task.name": task.name, "task.args": task.args, "model.mixer": model.name,
                                        "model.mixer_args": model.args, "seed": seed}
                                if model.arch is not None:
                                    grid["model.arch"] = model.arch
                                grid.update({f"model.{k}": v for k, v in size.model_dump().items() if v is not None})
                                if lr is not None:
                                    grid["optim.lr"] = lr
                                grid.update(zip(self.axes, point))
                                fields = to_nested([*self.shared.items(), *task.overrides.items(),
                                                    *model.overrides.items(), *grid.items()])
                                index += 1
                                try:
                                    cfg = RunConfig.model_validate(fields)
                                except (ValidationError, ValueError) as e:
                                    text = config_problems(e) if isinstance(e, ValidationError) else str(e)
                                    problems.append(f"run {index} (task {task.name!r}, model {model.name!r}, seed "
                                                    f"{seed}{'' if lr is None else f', lr {lr!r}'}): {text}")
                                    continue
                                h = config_hash(cfg)
                                if h not in seen:
                                    seen.add(h)
                                    runs.append(cfg)
        if problems:
            raise ValueError(list_problems(problems, index, "is invalid", "are invalid"))
        return runs


MAX_LISTED = 10  # problems listed in one error (then "... and N more")


def list_problems(problems: list[str], total: int, one: str, many: str) -> str:
    """``"2 of 5 runs <many>:"`` (``one`` for a single problem) and one indented line per problem
    (at most MAX_LISTED of them)."""
    head = f"{len(problems)} of {total} run{'s' if total != 1 else ''} {one if len(problems) == 1 else many}:"
    lines = [head] + [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    return "\n".join(lines)
