"""The registries: one Registry class, explicit module lists, close-name errors, a leaf module."""

from __future__ import annotations

import ast
import pkgutil
import sys
from pathlib import Path

import pytest

import recur
import recur.layers
import recur.models
import recur.tasks
import recur.training.methods
from recur.registry import ARCHITECTURES, CHANNEL_MIXERS, METHODS, MIXERS, NORMS, PATTERNS, TASKS, Registry, load_modules


def test_register_list_get_and_describe():
    reg = Registry("widget")

    @reg.register("knob", family="dial", paper="Somebody 2024")
    class Knob:
        """A knob."""

        def __init__(self, size: int = 3, *, colour: str = "red"):
            pass

    assert reg.names() == ["knob"] and "knob" in reg and len(reg) == 1 and Knob.name == "knob"
    assert reg.get("knob").cls is Knob
    d = reg.describe("knob")
    assert d == {"name": "knob", "kind": "widget", "family": "dial", "paper": "Somebody 2024",
                 "description": "A knob.", "options": {"size": 3, "colour": "red"}}
    with pytest.raises(ValueError, match=r"unknown widget 'knbo'\. Did you mean 'knob'\? Known widgets: knob"):
        reg.get("knbo")
    with pytest.raises(ValueError, match="already registered"):
        reg.add("knob", object())
    with pytest.raises(ValueError, match="lower-case"):
        reg.add("Knob", Knob)


@pytest.mark.parametrize("package", [recur.layers, recur.models, recur.tasks, recur.training.methods])
def test_every_module_of_a_package_is_listed_in_its_one_place(package):
    # parts the registering modules share, and functions over registered models (CoLa search, samplers, conversions)
    shared = {"base", "common", "blocks", "packing", "segments", "loops", "lora", "deep_supervision", "cola",
              "parallel_sampler", "retrofit", "transducer_loss"}
    files = {m.name for m in pkgutil.iter_modules(package.__path__)} - shared
    assert files == set(package.MODULES), f"{package.__name__}.MODULES must list every module that registers"


def test_a_broken_module_names_itself(tmp_path, monkeypatch):
    pkg = tmp_path / "brokenpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text("X = 1\n")
    (pkg / "bad.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match=r"brokenpkg\.bad .*RuntimeError: boom"):
        load_modules("brokenpkg", ("good", "bad"))


def test_the_registry_module_is_a_leaf():
    tree = ast.parse(Path(sys.modules["recur.registry"].__file__).read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m == "recur" or m.startswith("recur.")]


def test_import_recur_fills_every_registry():
    assert len(MIXERS) >= 43 and {"causal_lm", "looped_lm", "encoder"} <= set(ARCHITECTURES)
    assert {"state_noise", "state_passing", "tbptt", "gradient_noise", "curriculum"} <= set(METHODS)
    assert {"swiglu", "gelu", "rwkv4"} <= set(CHANNEL_MIXERS) and {"rmsnorm", "layernorm"} <= set(NORMS)
    assert "samba" in PATTERNS and "mqar" in TASKS
    assert recur.list_archs() == ARCHITECTURES.names() and recur.list_models() == MIXERS.names()


def test_mixer_lookups_keep_their_messages():
    with pytest.raises(ValueError, match="unknown model 'glaa'. Did you mean 'gla'"):
        recur.model_info("glaa")
    with pytest.raises(ValueError, match="unknown model or pattern 'sambaa'"):
        recur.models.Backbone(16, 1, "sambaa")


def test_registry_rejects_duplicates_and_bad_names():
    with pytest.raises(ValueError, match="lower-case"):
        recur.register("Bad", family="x", paper="y")
    with pytest.raises(ValueError, match="already registered"):
        recur.register("elman", family="x", paper="y")(type("Other", (), {}))
    with pytest.raises(ValueError, match="clashes"):
        recur.register_pattern("elman", ["elman"])
