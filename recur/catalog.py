"""The zoo at a glance: one row per registered mixer (name, family, paper, modes, state size),
read from the registry. ``recur models`` prints it; ``docs/models.md`` is ``markdown()``.

Each mixer class states its memory as ``state_formula``, a Python expression over the built
mixer's integer attributes (``d_model``, ``n_heads``, ``d_state``, ...) and ``T`` (tokens
seen). The conformance suite checks the formula against ``state_size`` at several widths and
lengths, so the table cannot drift from the code.
"""

from __future__ import annotations

from typing import Any

from recur.registry import build, list_models, list_patterns, model_info

WIDTH, LENGTH = 64, 1024  # the configuration the table's numbers are for
_FUNCTIONS = {"min": min, "max": max}


def formula_namespace(mixer, seq_len: int) -> dict[str, Any]:
    """The names a ``state_formula`` may use: the mixer's int attributes, ``T`` and min/max."""
    names = {k: v for k, v in vars(mixer).items() if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_")}
    for attr in dir(type(mixer)):  # int-valued properties (e.g. a settable window)
        if isinstance(getattr(type(mixer), attr, None), property) and not attr.startswith("_"):
            try:
                value = getattr(mixer, attr)
            except Exception:  # noqa: BLE001 - a property that needs more context is not a formula name
                continue
            if isinstance(value, int) and not isinstance(value, bool):
                names[attr] = value
    return {**names, **_FUNCTIONS, "T": seq_len}


def evaluate_formula(mixer, seq_len: int) -> int:
    """The value of ``mixer.state_formula`` for this mixer after ``seq_len`` tokens."""
    formula = getattr(mixer, "state_formula", "")
    if not formula:
        raise ValueError(f"{mixer.name}: the mixer class must set state_formula (its state size as an expression)")
    try:
        value = eval(formula, {"__builtins__": {}}, formula_namespace(mixer, seq_len))  # noqa: S307 - our own class attribute
    except NameError as e:
        raise ValueError(f"{mixer.name}: state_formula {formula!r} uses an unknown name ({e})") from None
    return int(value)


def catalog(d_model: int = WIDTH, seq_len: int = LENGTH) -> list[dict[str, Any]]:
    """One dict per registered mixer: name, family, paper, modes, state_formula and its value."""
    rows = []
    for name in list_models():
        info = model_info(name)
        row: dict[str, Any] = {"name": name, "family": info.family, "paper": info.paper,
                               "modes": list(info.cls.modes), "causal": bool(getattr(info.cls, "causal", True)),
                               "state_formula": getattr(info.cls, "state_formula", "")}
        try:
            m = build(name, d_model=d_model)
            row["state_size"] = m.state_size(seq_len)
            row["grows"] = bool(m.growing)
        except Exception as e:  # noqa: BLE001 - a listing shows what it can
            row["state_size"], row["grows"], row["error"] = None, None, str(e)
        rows.append(row)
    return rows


ARCH_VOCAB, ARCH_LAYERS = 256, 2  # the build the architecture table's state sizes are for


def architectures(d_model: int = WIDTH, seq_len: int = LENGTH) -> list[dict[str, Any]]:
    """One dict per registered architecture: name, family, paper, description, autoregressive, and
    the state size of its default build after ``seq_len`` tokens (``grows``: larger at 2 * seq_len)."""
    from recur.registry import ARCHITECTURES

    rows = []
    for name in ARCHITECTURES.names():
        d = ARCHITECTURES.describe(name)
        cls = ARCHITECTURES.get(name).cls
        row: dict[str, Any] = {"name": name, "family": d["family"], "paper": d["paper"],
                               "description": d["description"], "autoregressive": bool(getattr(cls, "autoregressive", False))}
        try:
            import inspect

            params = inspect.signature(cls.__init__).parameters
            depth = {"n_layers": ARCH_LAYERS} if "n_layers" in params else {}
            # an encoder-decoder takes its separator from the task (model_io); here, the last token id
            sep = {"sep": ARCH_VOCAB - 1} if "sep" in params and params["sep"].default is None else {}
            model = cls(vocab_size=ARCH_VOCAB, d_model=d_model, **depth, **sep)  # the rest: the class's defaults
            row["state_size"] = model.state_size(seq_len)
            row["grows"] = model.state_size(2 * seq_len) > row["state_size"]
        except Exception as e:  # noqa: BLE001 - a listing shows what it can
            row["state_size"], row["grows"], row["error"] = None, None, str(e)
        rows.append(row)
    return rows


def size_text(row: dict[str, Any], seq_len: int) -> str:
    if row["state_size"] is None:
        return f"error: {row.get('error')}"
    return f"{row['state_size']:,}" + (f" at T={seq_len:,} (grows)" if row["grows"] else "")


def markdown(d_model: int = WIDTH, seq_len: int = LENGTH) -> str:
    """The ``docs/models.md`` page."""
    lines = [
        "# Models",
        "",
        "Generated from the registry by `recur models --markdown > docs/models.md`; "
        "a test keeps this page equal to that output.",
        "",
        f"Every model below is built with `recur.build(name, d_model)` and passes the conformance suite. "
        f"Modes list the default (fastest) first; `recurrent` is the sequential reference. "
        f"The state size is the number of floats carried per sequence (complex counted twice), given as a "
        f"formula over the layer's attributes (T = tokens seen) and evaluated at d_model={d_model} with the defaults. "
        f"Models marked *encoder only* are not causal (they read the future): a causal LM refuses them; "
        f"use them in `Encoder` (`recur run --arch encoder`).",
        "",
        f"| model | family | modes | state size formula | floats at d_model={d_model} | paper |",
        "|---|---|---|---|---|---|",
    ]
    for row in catalog(d_model, seq_len):
        only = "" if row.get("causal", True) else " (*encoder only*)"
        lines.append(f"| `{row['name']}`{only} | {row['family']} | {', '.join(row['modes'])} | "
                     f"`{row['state_formula']}` | {size_text(row, seq_len)} | {row['paper']} |")
    lines += ["", "## Architectures", "",
              f"Models above the mixer (`recur run --arch NAME`, options with `--set model.args.KEY=VALUE`; "
              f"`recur archs` lists every option). Each is registered and passes the architecture conformance "
              f"suite (float64 equality of its fast path with its sequential reference, state carry at odd "
              f"splits, stepping). The state is the floats carried per sequence by the default build "
              f"(vocabulary {ARCH_VOCAB}, d_model={d_model}, {ARCH_LAYERS} layers where it has layers, its own defaults otherwise) after T={seq_len:,} tokens; "
              f"*generates* marks the autoregressive ones (`generate`, streaming with that state).", "",
              "| architecture | family | what it is | state at T | generates | paper |", "|---|---|---|---|---|---|"]
    for row in architectures(d_model, seq_len):
        lines.append(f"| `{row['name']}` | {row['family']} | {row['description']} | {size_text(row, seq_len)} | "
                     f"{'yes' if row['autoregressive'] else 'no'} | {row['paper']} |")
    patterns = list_patterns()
    if patterns:
        lines += ["", "## Layer patterns", "",
                  "Presets for `CausalLM(pattern=...)`, repeated to `n_layers`.", "",
                  "| pattern | layers |", "|---|---|"]
        lines += [f"| `{name}` | {', '.join(layers)} |" for name, layers in patterns.items()]
    return "\n".join(lines) + "\n"
