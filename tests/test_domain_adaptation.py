"""Domain adaptation: the gradient-reversal layer, the schedule, MMD, DANN and MMD training."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_round_trip

import keras_transfer as kt
from keras_transfer.benchmarks.effects import dann as effect
from keras_transfer.techniques import domain_adaptation as da


def _toy():
    """A tiny CNN classifier from the builder (backbone ends in a 16-unit feature layer)."""
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu"),
        ],
        name="toy",
    )
    return kt.build_image_classifier(backbone, 3, weights=None, freeze_backbone=False)


def _images(n, seed):
    return np.random.default_rng(seed).uniform(0, 255, (n, 8, 8, 3)).astype("float32")


SOURCE = (_images(24, 0), np.arange(24) % 3)
TARGET = 255.0 - _images(24, 1)
TARGET_LABELS = np.arange(24) % 3
FAST = {"epochs": 2, "batch_size": 8, "lr_spread": 1.0, "verbose": 0, "jit_compile": False}


def test_gradient_reversal_is_the_identity_forward_and_scales_gradients_by_minus_lambda():
    layer = da.GradientReversal(0.7)
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 5)), tf.float32)
    weights = tf.constant(np.random.default_rng(1).normal(size=(4, 5)), tf.float32)

    @tf.function
    def forward_and_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * weights)
        return y, tape.gradient(loss, x)

    y, gradient = forward_and_gradient(x)
    np.testing.assert_array_equal(y.numpy(), x.numpy())
    np.testing.assert_allclose(gradient.numpy(), -0.7 * weights.numpy(), rtol=1e-6)
    layer.set_lambda(2.0)  # a variable: the traced function sees the new value
    _, gradient = forward_and_gradient(x)
    np.testing.assert_allclose(gradient.numpy(), -2.0 * weights.numpy(), rtol=1e-6)


def test_gradient_reversal_round_trips_with_safe_mode(tmp_path):
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(2)(da.GradientReversal(0.25, name="reverse")(inputs))
    model = keras.Model(inputs, outputs)
    loaded = assert_round_trip(model, np.ones((2, 3)), tmp_path)
    assert loaded.get_layer("reverse").get_config()["lambda_"] == 0.25
    with pytest.raises(ValueError, match="Received: lambda_=-1"):
        da.GradientReversal(-1)


def test_the_lambda_schedule_at_the_start_middle_and_end():
    assert da.dann_lambda(0.0) == 0.0
    assert da.dann_lambda(0.5) == pytest.approx(2 / (1 + np.exp(-5)) - 1)  # 0.9866
    assert da.dann_lambda(1.0) == pytest.approx(2 / (1 + np.exp(-10)) - 1)  # 0.99991
    assert da.dann_lambda(0.5, lambda_max=0.3) == pytest.approx(0.3 * 0.98661, rel=1e-4)
    with pytest.raises(ValueError, match="Received: progress=1.5"):
        da.dann_lambda(1.5)


def test_mmd_is_about_zero_for_one_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(256, 8))
    assert abs(float(da.mmd_loss(source, rng.normal(size=(256, 8))))) < 0.01
    values = [float(da.mmd_loss(source, rng.normal(size=(256, 8)) + s)) for s in (0.25, 0.5, 1, 2)]
    assert values == sorted(values) and values[0] > 0.01, values
    with pytest.raises(ValueError, match="Received: kernels=\\(1.0, 0\\)"):
        da.mmd_loss(source, source, kernels=(1.0, 0))


@pytest.fixture(scope="module")
def dann_runs():
    """DANN trained twice: target labels given for evaluation, true ones, then garbage."""
    runs = []
    for labels in (TARGET_LABELS, np.full_like(TARGET_LABELS, 2)):
        model = _toy()
        kt.techniques.dann(model, SOURCE, TARGET, target_eval=(TARGET, labels), **FAST)
        runs.append(model)
    return runs


def test_target_labels_never_reach_the_training_loss(dann_runs):
    true_labels, garbage = dann_runs
    for ours, theirs in zip(true_labels.get_weights(), garbage.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    # The labels were used, for the report only.
    reports = [model.history.history["target_accuracy"] for model in dann_runs]
    assert reports[0] != reports[1]


def test_dann_returns_the_plain_classifier_and_reports_per_epoch(dann_runs, tmp_path):
    model = dann_runs[0]
    assert [layer.name for layer in model.layers] == [layer.name for layer in _toy().layers]
    history = model.history.history
    assert set(history) == {"loss", "source_accuracy", "domain_loss", "lambda", "target_accuracy"}
    assert 0 < history["lambda"][0] < history["lambda"][1] <= 1.0
    assert_round_trip(model, TARGET[:4], tmp_path)
    assert model.evaluate(*SOURCE, verbose=0)  # compiled as a plain classifier


def test_a_labelled_dataset_of_source_and_target_images_trains():
    source = tf.data.Dataset.from_tensor_slices(SOURCE).batch(8)
    target = tf.data.Dataset.from_tensor_slices(TARGET.astype("uint8")).batch(8)
    model = _toy()
    assert kt.techniques.mmd(model, source, target, weight=0.5, **FAST) is model
    assert len(model.history.history["mmd"]) == 2


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("dann", {"lambda_max": -0.5}, "`lambda_max` must be a number >= 0. Received: lambda_max"),
        ("mmd", {"weight": -1.0}, "`weight` must be a number >= 0. Received: weight=-1.0"),
        ("mmd", {"kernels": ()}, "Received: kernels=\\(\\)"),
        ("dann", {"target": (TARGET, TARGET_LABELS)}, "target_eval=.*Received: a tuple of 2"),
        ("mmd", {"target": [TARGET]}, "unlabelled images.*Received: a list of 1"),
        (
            "dann",
            {"target": tf.data.Dataset.from_tensor_slices((TARGET, TARGET_LABELS)).batch(4)},
            "unlabelled images.*Received: a dataset of \\(TensorSpec",
        ),
        ("mmd", {"target": TARGET[:0]}, "`target` must hold at least one example"),
        ("dann", {"source": (TARGET[:0], TARGET_LABELS[:0])}, "`source` must hold at least one"),
        ("dann", {"target_eval": (TARGET, TARGET_LABELS[:3])}, "24 images, 3 labels"),
        ("mmd", {"epochs": 0}, "Received: epochs=0"),
        ("dann", {"unfreeze_blocks": 0}, "Received: unfreeze_blocks=0"),
        ("dann", {"optimizer": "adam"}, "Received: optimizer=.adam."),
    ],
)
def test_bad_input_is_refused_before_training(method, kwargs, match):
    model = _toy()
    before = model.get_weights()
    arguments = {"source": SOURCE, "target": TARGET, **FAST, **kwargs}
    source, target = arguments.pop("source"), arguments.pop("target")
    with pytest.raises(ValueError, match=match):
        getattr(kt.techniques, method)(model, source, target, **arguments)
    for ours, theirs in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_a_model_that_is_not_a_softmax_classifier_is_refused():
    inputs = keras.Input((8, 8, 3))
    regressor = keras.Model(
        inputs, keras.layers.Dense(1, name="head")(keras.layers.Flatten()(inputs))
    )
    with pytest.raises(ValueError, match="one softmax head"):
        kt.techniques.dann(regressor, SOURCE, TARGET, **FAST)


@pytest.mark.slow  # three small CNNs trained on Fashion-MNIST
def test_dann_and_mmd_raise_target_accuracy_over_source_only_training():
    figures = effect.compare(seed=0, methods=("dann", "mmd"))
    assert figures["dann_margin"] >= 0.03, figures
    assert figures["mmd_margin"] >= 0.03, figures
