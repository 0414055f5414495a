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


def test_multitask_example_trains_two_heads_and_serves_both(tmp_path, monkeypatch, capsys):
    _run_example("multitask.py", "--quick", f"--output={tmp_path}", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "fine: test accuracy" in out and "coarse: test accuracy" in out
    assert "'coarse_classes'" in out and "'fine_probabilities'" in out
    assert (tmp_path / "fashion" / "1" / "saved_model.pb").is_file()


def test_continual_example_compares_the_three_methods(tmp_path, monkeypatch, capsys):
    _run_example("continual.py", "--quick", f"--output={tmp_path}", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert all(f"\n{method} " in out for method in ("naive", "lwf", "ewc")), out
    assert (tmp_path / "digits_lwf.keras").is_file()
    assert (tmp_path / "digits" / "1" / "saved_model.pb").is_file()


def test_class_imbalance_example_prints_weights_and_per_class_recall(monkeypatch, capsys):
    _run_example("class_imbalance.py", "--quick", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "class_weight='balanced': {0: " in out and "shirt" in out and "recall" in out


def test_distillation_example_exports_the_distilled_student(tmp_path, monkeypatch, capsys):
    _run_example("distillation.py", "--quick", f"--output={tmp_path}", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "teacher (" in out and "alone " in out and "distilled " in out
    assert (tmp_path / "student.keras").is_file()
    assert (tmp_path / "export" / "student" / "1" / "saved_model.pb").is_file()


def test_ensemble_example_exports_one_model(tmp_path, monkeypatch, capsys):
    _run_example("ensemble.py", "--quick", f"--output={tmp_path}", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "members: " in out and "ensemble " in out and "LiteRT " in out
    assert (tmp_path / "ensemble.tflite").is_file()
    assert (tmp_path / "export" / "ensemble" / "1" / "saved_model.pb").is_file()


def test_domain_adaptation_example_compares_source_only_dann_and_mmd(tmp_path, monkeypatch, capsys):
    _run_example("domain_adaptation.py", "--quick", f"--output={tmp_path}", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "source only " in out and "DANN " in out and "MMD " in out
    assert (tmp_path / "adapted" / "1" / "saved_model.pb").is_file()


def test_pruning_example_reports_sparsity_and_exports(tmp_path, monkeypatch, capsys):
    _run_example("pruning.py", "--quick", f"--output={tmp_path}", monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "keras_gzip" in out and "pruned: test accuracy" in out
    assert (tmp_path / "pruned.keras").is_file()
    assert (tmp_path / "pruned" / "1" / "saved_model.pb").is_file()
