"""``import recur`` never imports transformers; ``import recur.hf`` registers the model type with
the Auto classes, and says how to install transformers when it is missing."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from hf_util import make
from transformers import AutoConfig, AutoModelForCausalLM

from recur.hf import RecurConfig, RecurForCausalLM


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_recur_does_not_import_transformers_and_recur_hf_names_the_extra():
    r = run("import sys, recur, recur.speed, recur.generate\n"
            "print('transformers' in sys.modules)\n"
            "sys.modules['transformers'] = None  # as if not installed\n"
            "try:\n    import recur.hf\nexcept ImportError as e:\n    print(e)")
    assert r.returncode == 0, r.stderr
    imported, message = r.stdout.strip().split("\n")
    assert imported == "False"
    assert message == "recur.hf needs Hugging Face transformers, which is not installed: pip install 'recur[hf]'"


def test_an_unsupported_transformers_version_is_named(monkeypatch):
    import transformers

    import recur.hf

    monkeypatch.setattr(transformers, "__version__", "4.57.0")
    expected = "needs transformers>=5.23,<6, found 4.57.0: pip install 'recur[hf]'"
    with pytest.raises(ImportError, match=re.escape(expected)):
        recur.hf._check_transformers()
    monkeypatch.setattr(transformers, "__version__", "5.23.0")
    recur.hf._check_transformers()


def test_the_auto_classes_know_the_recur_model_type(tmp_path):
    assert isinstance(AutoConfig.for_model("recur"), RecurConfig)
    model = make("lstm")
    model.save_pretrained(tmp_path)
    assert type(AutoModelForCausalLM.from_config(model.config)) is RecurForCausalLM
    # a fresh process: importing recur.hf is all it takes to load a saved folder offline
    r = run(f"import recur.hf, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, local_files_only=True)\n"
            f"print(type(m).__name__, type(m.lm).__name__, m.lm.mixers[0].name)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["RecurForCausalLM", "CausalLM", "lstm"]
