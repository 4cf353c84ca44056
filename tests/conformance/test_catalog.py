"""The zoo table (``recur models``, ``docs/models.md``) is read from the registry and checked
against the code: every mixer states its state size as a formula, and the formula must equal
``state_size`` at several widths and lengths."""

from __future__ import annotations

from pathlib import Path

import pytest

import recur
from recur import catalog
from recur.cli import main

DOCS = Path(__file__).resolve().parents[2] / "docs" / "models.md"


@pytest.mark.parametrize("name", recur.list_models())
def test_state_formula_equals_state_size(name):
    for d_model in (16, 64):
        mixer = recur.build(name, d_model=d_model)
        for seq_len in (0, 1, 37, 1000):
            assert catalog.evaluate_formula(mixer, seq_len) == mixer.state_size(seq_len), (
                f"{name} at d_model={d_model}, T={seq_len}: state_formula {mixer.state_formula!r} "
                f"gives {catalog.evaluate_formula(mixer, seq_len)}, state_size gives {mixer.state_size(seq_len)}"
            )


def test_formula_with_unknown_name_is_a_clear_error():
    mixer = recur.build("gla", d_model=16)
    mixer.state_formula = "n_heads * no_such_attribute"
    with pytest.raises(ValueError, match="unknown name"):
        catalog.evaluate_formula(mixer, 1)


def test_docs_models_page_is_generated_from_the_registry():
    assert DOCS.read_text() == catalog.markdown(), (
        "docs/models.md is out of date: run `recur models --markdown > docs/models.md`"
    )


def test_models_command_prints_the_same_page(capsys):
    assert main(["models", "--markdown"]) == 0
    assert capsys.readouterr().out == catalog.markdown()
    assert main(["models"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in recur.list_models())


def test_every_architecture_is_in_the_table_with_its_state_size():
    rows = {r["name"]: r for r in catalog.architectures()}
    assert set(rows) == set(recur.ARCHITECTURES.names())
    for name, row in rows.items():
        assert row["state_size"] is not None, f"{name}: the default build failed: {row.get('error')}"
        assert row["paper"] and row["description"]
    assert rows["causal_lm"]["grows"] and not rows["rmt"]["grows"]  # attention's cache grows; RMT's memory does not
    assert "## Architectures" in catalog.markdown() and "| `rmt` |" in catalog.markdown()
