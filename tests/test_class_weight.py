"""Class weights: the balanced formula, the checks, every training path, the CLI, and the effect."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SIZE, assert_user_error, run_cli

import keras_transfer as kt
from keras_transfer.benchmarks.effects import class_imbalance as effect
from keras_transfer.benchmarks.effects.continual import mlp_classifier
from keras_transfer.class_weights import class_weights, resolve_class_weight


def test_balanced_weights_are_sklearns_formula_from_labels_one_hot_or_a_dataset():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 30 + [1] * 12 + [2] * 3)
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    weights = class_weights(labels)
    np.testing.assert_allclose([weights[c] for c in range(3)], expected)
    assert weights[2] == pytest.approx(45 / (3 * 3))
    assert class_weights(np.eye(3)[labels]) == weights
    dataset = tf.data.Dataset.from_tensor_slices((np.zeros((45, 2)), labels)).batch(8)
    assert class_weights(dataset) == weights


def _dense_model(units=3, activation="softmax", heads=1):
    inputs = keras.Input((2,))
    outputs = {
        f"head{i}": keras.layers.Dense(units, activation=activation, name=f"head{i}")(inputs)
        for i in range(heads)
    }
    return keras.Model(inputs, outputs if heads > 1 else outputs["head0"])


@pytest.mark.parametrize(
    "model, class_weight, error, match",
    [
        (_dense_model(), {0: 1.0, 3: 2.0, "cat": 1.0}, ValueError, r"in \[0, 2\] .* \[3, 'cat'\]"),
        (_dense_model(), {1: 0.0}, ValueError, r"> 0. Received: \{1: 0.0\}"),
        (_dense_model(), {1: -2}, ValueError, r"Received: \{1: -2\}"),
        (_dense_model(), "balance", ValueError, "Did you mean 'balanced'"),
        (_dense_model(), [1.0, 2.0], TypeError, r"Received: class_weight=\[1.0, 2.0\]"),
        (_dense_model(heads=2), "balanced", ValueError, r"one head.*\['head0', 'head1'\]"),
        (_dense_model(activation="sigmoid"), {0: 2.0}, ValueError, "kind 'multi_label'"),
        (_dense_model(1, activation=None), "balanced", ValueError, "kind 'regression'"),
    ],
)
def test_bad_class_weights_are_refused_by_name(model, class_weight, error, match):
    train = (np.zeros((4, 2)), np.arange(4) % 3)
    with pytest.raises(error, match=match):
        resolve_class_weight(model, train, class_weight)


def test_balanced_weights_need_every_class_and_labels_in_range():
    model = _dense_model()
    with pytest.raises(ValueError, match=r"no labels of class\(es\) \[2\]"):
        resolve_class_weight(model, (np.zeros((4, 2)), np.array([0, 1, 0, 1])), "balanced")
    with pytest.raises(ValueError, match=r"in \[0, 2\]. Received: labels \[5\]"):
        resolve_class_weight(model, (np.zeros((3, 2)), np.array([0, 1, 5])), "balanced")
    assert resolve_class_weight(model, None, {2: 4}) == {0: 1.0, 1: 1.0, 2: 4.0}


@pytest.fixture(scope="module")
def data():
    images = np.random.default_rng(0).uniform(0, 255, (16, 8, 8, 3)).astype("float32")
    return images, np.arange(16) % 2


@pytest.mark.parametrize("cache", [False, True])
def test_every_stage_weighs_the_loss_cached_or_not(data, cache):
    # Adam's step ignores the gradient's scale: doubling every class weight
    # doubles the loss and leaves the trajectory, so the ratio shows the weights act.
    losses = []
    for class_weight in (None, {0: 2.0, 1: 2.0}):
        model = mlp_classifier(2, 8, seed=0)
        history = kt.fit_stage(
            model,
            data,
            stage=kt.Stage("head", 1, 1e-3),
            batch_size=8,
            cache_features=cache,
            class_weight=class_weight,
            verbose=0,
        )
        losses.append(history.history["loss"][0])
    assert losses[1] / losses[0] == pytest.approx(2.0, rel=1e-3)


def test_fine_tune_prints_and_returns_the_weights(data, capsys):
    x, y = data
    x, y = x[:10], np.array([0] * 8 + [1] * 2)
    history = kt.fine_tune(
        mlp_classifier(2, 8, seed=0),
        (x, y),
        recipe="two_stage",
        epochs=(1, 1),
        cache_features=True,
        class_weight="balanced",
        batch_size=5,
        verbose=1,
    )
    assert history.params["class_weight"] == {0: 0.625, 1: 2.5}
    assert "class_weight: 0=0.625, 1=2.5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Did you mean 'balanced'"):
        kt.fine_tune(mlp_classifier(2, 8, seed=0), (x, y), class_weight="Balanced", verbose=0)


def _image_folder(root, counts):
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        os.makedirs(root / name)
        for i in range(count):
            image = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
            keras.utils.save_img(root / name / f"{i}.png", image)
    return root


def test_cli_flag_reports_the_weights_and_per_class_recall(tmp_path):
    data = _image_folder(tmp_path / "data", {"common": 20, "rare": 5})
    tiny = ["--backbone=mobilenet_v3_small", "--weights=none", "--image_size=32", "--batch_size=4"]
    result = run_cli(
        "train",
        f"--data={data}",
        "--output_dir=run",
        "--recipe=feature_extraction",
        "--epochs=1",
        "--class_weight=balanced",
        *tiny,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "class_weight: 0=" in result.stdout
    report = (tmp_path / "run" / "report.md").read_text()
    assert "class_weights" in report and '"rare": ' in report
    assert "| rare |" in report and "recall" in report
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["class_weight"] == "balanced"
    bad = run_cli(
        "train",
        f"--data={data}",
        "--output_dir=other",
        "--class_weight=inverse",
        *tiny,
        cwd=tmp_path,
    )
    assert_user_error(bad, "Received: class_weight='inverse'")
    assert not (tmp_path / "other").exists()


def test_balanced_weights_raise_the_minority_recall():
    figures = effect.measure(seed=0)
    assert figures["minority_weight"] == pytest.approx(7.75)
    assert figures["minority_recall_gain"] >= 0.10, figures
