import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from keras_transfer.callbacks import LRFinderResult
from keras_transfer.plots import plot_confusion_matrix, plot_lr_find, plot_training_curves
from keras_transfer.reports import save_history_json, write_run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A blank 100-dpi figure compresses to ~5 KB; drawn axes, text and lines add more.
MIN_PNG_BYTES = 10_000
HISTORY = {
    "loss": [1.2, 0.9, 0.7, 0.5, 0.4],
    "accuracy": [0.4, 0.55, 0.7, 0.8, 0.85],
    "val_loss": [1.1, 0.95, 0.8, 0.7, 0.65],
    "val_accuracy": [0.45, 0.5, 0.65, 0.75, 0.78],
    "stage": [1, 1, 2, 2, 2],
}
CLASS_NAMES = ["cat", "dog", "bird"]
EVALUATION = {
    "accuracy": 0.7142857,
    "num_examples": 7,
    "class_names": CLASS_NAMES,
    "per_class": [
        {"class": "cat", "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        {"class": "dog", "precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2},
        {"class": "bird", "precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3},
    ],
    "macro_avg": {"precision": 0.72, "recall": 0.72, "f1": 0.7},
    "confusion_matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 2]],
    "latency": {"batch_size": 4, "repeats": 3, "mean_ms_per_image": 0.25, "p95_ms_per_image": 0.4},
}


def assert_png(path, min_size=(300, 300)):
    with open(path, "rb") as file:
        data = file.read()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > MIN_PNG_BYTES
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        # Not a blank canvas: several distinct colours were drawn.
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 10
        return image.size


def test_training_curves_from_history_object(tmp_path):
    history = keras.callbacks.History()
    history.history = HISTORY
    path = str(tmp_path / "nested" / "curves.png")
    assert plot_training_curves(history, path, title="Run 1") == path
    width, height = assert_png(path)
    assert width > height  # two panels side by side


def test_training_curves_loss_only_has_one_panel(tmp_path):
    two = assert_png(plot_training_curves(HISTORY, str(tmp_path / "two.png")))
    one = assert_png(plot_training_curves({"loss": [1.0, 0.5]}, str(tmp_path / "one.png")))
    assert one[0] < two[0]


@pytest.mark.parametrize(
    "history, error, match",
    [
        ({"accuracy": [0.5]}, ValueError, "non-empty 'loss' list"),
        ({"loss": []}, ValueError, "non-empty 'loss' list"),
        ({"loss": [1.0, 0.5], "val_loss": [1.0]}, ValueError, r"len\(history\['val_loss'\]\)=1"),
        ([1.0, 0.5], TypeError, "Received: list"),
    ],
)
def test_training_curves_reject_bad_history(history, error, match, tmp_path):
    with pytest.raises(error, match=match):
        plot_training_curves(history, str(tmp_path / "x.png"))


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png(normalize, tmp_path):
    path = str(tmp_path / "cm" / "confusion.png")
    matrix = EVALUATION["confusion_matrix"]
    assert plot_confusion_matrix(matrix, CLASS_NAMES, path, normalize=normalize) == path
    assert_png(path)


def test_confusion_matrix_scales_with_classes(tmp_path):
    small = assert_png(plot_confusion_matrix(np.eye(2), ["a", "b"], str(tmp_path / "2.png")))
    names = [f"class {i}" for i in range(10)]
    large = assert_png(plot_confusion_matrix(np.eye(10) * 5, names, str(tmp_path / "10.png")))
    assert large[0] > small[0] and large[1] > small[1]


def test_confusion_matrix_row_without_examples(tmp_path):
    assert_png(plot_confusion_matrix([[0, 0], [1, 3]], ["a", "b"], str(tmp_path / "c.png")))


@pytest.mark.parametrize(
    "matrix, names, match",
    [
        ([[1, 2, 3]], ["a"], r"Received: shape=\(1, 3\)"),
        ([[1, 0], [0, 1]], ["a", "b", "c"], "Received: 3 names"),
    ],
)
def test_confusion_matrix_rejects_bad_input(matrix, names, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        plot_confusion_matrix(matrix, names, str(tmp_path / "x.png"))


def test_plot_lr_find_still_works(tmp_path):
    result = LRFinderResult([1e-4, 1e-3, 1e-2], [1.0, 0.5, 2.0], 1e-3)
    assert_png(plot_lr_find(result, str(tmp_path / "lr.png")))


def test_save_history_json(tmp_path):
    history = {"loss": [np.float32(0.5), np.float64(0.25), float("nan")], "stage": [1, 1, 2]}
    path = save_history_json(history, str(tmp_path / "out" / "history.json"))
    with open(path) as file:
        text = file.read()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded == {"loss": [0.5, 0.25, None], "stage": [1, 1, 2]}
    assert isinstance(loaded["stage"][0], int)


def test_run_report_contents(tmp_path):
    run_dir = tmp_path / "run"
    curves = plot_training_curves(HISTORY, str(run_dir / "figures" / "curves.png"))
    confusion = plot_confusion_matrix(
        EVALUATION["confusion_matrix"], CLASS_NAMES, str(run_dir / "confusion.png")
    )
    path = write_run_report(
        str(run_dir),
        config={"recipe": "two_stage", "epochs": [2, 3], "note": "a|b"},
        history=HISTORY,
        evaluation=EVALUATION,
        images={"training curves": curves, "confusion matrix": confusion},
        title="Flowers run",
    )
    assert path == str(run_dir / "report.md")
    text = (run_dir / "report.md").read_text()
    assert text.startswith("# Flowers run\n")
    assert "![training curves](figures/curves.png)" in text
    assert "![confusion matrix](confusion.png)" in text
    assert "| recipe | two_stage |" in text and "| epochs | [2, 3] |" in text
    assert "| note | a\\|b |" in text
    assert "| 1 (train head) | 1-2 | 0.9 | 0.55 | 0.95 | 0.5 |" in text
    assert "| 2 (fine-tune) | 3-5 | 0.4 | 0.85 | 0.65 | 0.78 |" in text
    assert "Accuracy: **0.7143** on 7 examples." in text
    assert "| dog | 0.6667 | 1 | 0.8 | 2 |" in text
    assert "mean 0.250 ms/image, p95 0.400 ms/image" in text


def test_run_report_image_relative_to_run_dir_and_no_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    plot_training_curves({"loss": [1.0, math.pi]}, str(run_dir / "curves.png"))
    path = write_run_report(
        str(run_dir),
        config={},
        history={"loss": [1.0, math.pi]},
        evaluation=None,
        images={"curves": "curves.png"},
        title="t",
    )
    text = Path(path).read_text()
    assert "![curves](curves.png)" in text
    assert "| all | 1-2 | 3.142 |" in text
    assert "_Not evaluated._" in text


def test_run_report_rejects_missing_image(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Received: images\['curves'\]='nope.png'"):
        write_run_report(
            str(tmp_path),
            config={},
            history=HISTORY,
            evaluation=None,
            images={"curves": "nope.png"},
            title="t",
        )


def test_run_report_one_stage_has_no_stage_name(tmp_path):
    history = {"accuracy": [0.5, 0.6], "loss": [1.0, 0.8], "stage": [1, 1]}
    path = write_run_report(
        str(tmp_path), config={}, history=history, evaluation=None, images={}, title="t"
    )
    text = Path(path).read_text()
    assert "| stage | epochs | loss | accuracy |" in text
    assert "| 1 | 1-2 | 0.8 | 0.6 |" in text
    assert "train head" not in text
