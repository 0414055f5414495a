"""The examples of the KerasHub issue run end to end (their --quick, tiny random-weight modes)."""

import os
import runpy
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")


def _run_example(name, *args, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *args])
    runpy.run_path(os.path.join(EXAMPLES, name), run_name="__main__")


@pytest.mark.slow
def test_text_classifier_example_serves_raw_strings(tmp_path, monkeypatch, capsys):
    _run_example(
        "text_classifier.py", "--quick", f"--output={tmp_path / 'm'}", monkeypatch=monkeypatch
    )
    out = capsys.readouterr().out
    assert "SavedModel on raw strings" in out and (tmp_path / "m" / "1").is_dir()


@pytest.mark.slow
def test_lora_example_saves_adapters_and_exports_merged_models(tmp_path, monkeypatch, capsys):
    _run_example("lora.py", "--quick", f"--output={tmp_path}", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "minilm: test accuracy" in out and "lite0: test accuracy" in out
    assert (tmp_path / "minilm_adapters.lora.npz").is_file()
    assert (tmp_path / "export" / "lite0" / "1" / "saved_model.pb").is_file()
