"""Multi-task models: shared backbone, named heads, missing labels, uncertainty weighting, export."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter
from conftest import SIZE, TINY, image_batch

import keras_transfer as kt
from keras_transfer.missing_labels import (
    MISSING_CLASS,
    MaskedLoss,
    MaskedMetric,
    masked_default_loss,
)
from keras_transfer.techniques.multitask import (
    TaskSpec,
    TaskUncertainty,
    UncertaintyWeighting,
    build_multitask_model,
)
from keras_transfer.training import compile_arguments

TASKS = {"fine": 6, "coarse": ("softmax", 3), "tags": {"head": "multi_label", "num_classes": 2}}


def _model(tasks=TASKS, **kwargs):
    keras.utils.set_random_seed(0)
    kwargs.setdefault("weights", None)
    return build_multitask_model(
        "mobilenet_v3_small", tasks, input_shape=(SIZE, SIZE, 3), **TINY, **kwargs
    )


def _small_model(tasks=TASKS, **kwargs):
    """Two convolutions as the backbone: traces, trains and exports in a fraction of a second."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_2")(x)
    return build_multitask_model(keras.Model(inputs, x), tasks, weights=None, **kwargs)


def _targets(n=24, missing=True):
    rng = np.random.default_rng(0)
    fine = np.arange(n) % 6
    targets = {
        "fine": fine.copy(),
        "coarse": fine // 2,
        "tags": rng.integers(0, 2, (n, 2)).astype("float32"),
    }
    if missing:
        targets["fine"][::4] = MISSING_CLASS
        targets["coarse"][1::4] = MISSING_CLASS
        targets["tags"][2::4, 0] = np.nan
    return targets


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny three-task model trained by fine_tune under a strategy, with learned weights."""
    strategy = tf.distribute.get_strategy()
    model = _small_model(strategy=strategy)
    data = (image_batch(24), _targets())
    history = kt.fine_tune(
        model,
        data,
        data,
        recipe="two_stage",
        epochs=(1, 1),
        loss_weights="uncertainty",
        cache_features=True,
        strategy=strategy,
        batch_size=8,
        verbose=0,
    )
    return model, history, data, tmp_path_factory.mktemp("multitask")


def test_builder_makes_one_named_head_per_task_on_a_shared_backbone():
    model = _model({**TASKS, "size": TaskSpec("regression", 1)}, dropout=0.1)
    assert model.output_names == ["coarse", "fine", "size", "tags"]
    assert dict(zip(model.output_names, model.output_shape, strict=True)) == {
        "coarse": (None, 3),
        "fine": (None, 6),
        "size": (None, 1),
        "tags": (None, 2),
    }
    kinds = {name: kt.heads.head_kind(model.get_layer(name)) for name in model.output_names}
    assert kinds == {
        "coarse": "softmax",
        "fine": "softmax",
        "size": "regression",
        "tags": "multi_label",
    }
    assert not model.get_layer("backbone").trainable
    # Every head reads the one dropout: the feature cache cuts there.
    frozen, head = kt.feature_cache.split_at_head(model)
    assert [layer.name for layer in head.layers[1:]][0] == "dropout"
    outputs = model.predict(image_batch(2), verbose=0)
    assert sorted(outputs) == model.output_names
    np.testing.assert_allclose(outputs["fine"].sum(-1), 1.0, rtol=1e-5)


def test_uncertainty_loss_is_the_documented_form():
    layer = TaskUncertainty(["a", "b"])
    layer.build()
    layer.log_variances["a"].assign(0.5)
    layer.log_variances["b"].assign(-1.0)
    total = float(layer({"a": np.array(2.0), "b": np.array(3.0)}))
    assert total == pytest.approx(np.exp(-0.5) * 2.0 + 0.5 + np.exp(1.0) * 3.0 - 1.0, rel=1e-6)
    # Through the view's compute_loss: the compiled heads' losses, weighted.
    model = _small_model()
    view = UncertaintyWeighting(model)
    view.uncertainty.log_variances["fine"].assign(0.3)
    view.compile(optimizer="adam", **compile_arguments(view, loss_weights="uncertainty"))
    x, targets = image_batch(8), _targets(8)
    predictions = model(x, training=False)
    with tf.GradientTape() as tape:
        total = view.compute_loss(x, targets, predictions)
    losses = {
        name: float(compile_arguments(model)["loss"][name](targets[name], predictions[name]))
        for name in TASKS
    }
    s = {name: float(v.numpy()) for name, v in view.uncertainty.log_variances.items()}
    expected = sum(np.exp(-s[name]) * losses[name] + s[name] for name in TASKS)
    assert float(total) == pytest.approx(expected, rel=1e-5)
    gradient = tape.gradient(total, view.uncertainty.log_variances["fine"])
    assert float(gradient) == pytest.approx(1.0 - np.exp(-0.3) * losses["fine"], rel=1e-5)


@pytest.mark.parametrize(
    "kind, labels, predictions, masked",
    [
        ("softmax", [2, MISSING_CLASS, 0], [[0.2, 0.3, 0.5]] * 3, [1]),
        ("softmax", [[0, 1.0, 0], [np.nan] * 3, [1.0, 0, 0]], [[0.2, 0.3, 0.5]] * 3, [1]),
        ("multi_label", [[1.0, 0], [np.nan, np.nan], [0, 1.0]], [[0.7, 0.2]] * 3, [1]),
        ("regression", [[1.5], [np.nan], [-1.0]], [[0.5], [2.0], [0.0]], [1]),
    ],
)
def test_a_missing_label_adds_exactly_zero_loss_and_gradient(kind, labels, predictions, masked):
    loss = masked_default_loss(kind)
    labels = np.asarray(labels)
    predictions = tf.Variable(np.asarray(predictions, "float32"))
    with tf.GradientTape() as tape:
        value = loss(labels, predictions)
    gradient = tape.gradient(value, predictions).numpy()
    assert np.all(gradient[masked] == 0.0) and np.any(gradient != 0.0)
    moved = predictions.numpy()
    moved[masked] = np.roll(moved[masked], 1, axis=-1) * 0.5 + 0.1
    assert float(loss(labels, moved)) == float(value)  # bit for bit
    kept = [i for i in range(len(labels)) if i not in masked]
    plain = kt.heads.default_loss(kind)(labels[kept], predictions.numpy()[kept])
    assert float(value) == pytest.approx(float(plain), rel=1e-6)  # the mean over the labelled
    integer = np.issubdtype(labels.dtype, np.integer)
    nothing = np.full_like(labels[masked], MISSING_CLASS if integer else np.nan)
    with tf.GradientTape() as tape:
        empty = loss(nothing, predictions[masked[0] : masked[0] + 1])
    assert float(empty) == 0.0 and not np.any(tape.gradient(empty, predictions).numpy())


def test_a_multi_label_entry_is_masked_on_its_own_and_metrics_skip_missing():
    loss = masked_default_loss("multi_label")
    labels = np.array([[1.0, np.nan], [0.0, 1.0]])
    p = tf.Variable([[0.9, 0.8], [0.3, 0.6]])
    with tf.GradientTape() as tape:
        value = loss(labels, p)
    gradient = tape.gradient(value, p).numpy()
    assert gradient[0, 1] == 0.0 and np.all(gradient[[0, 1, 1], [0, 0, 1]] != 0.0)
    accuracy = MaskedMetric(keras.metrics.SparseCategoricalAccuracy(name="accuracy"))
    accuracy.update_state(np.array([1, MISSING_CLASS, 0]), np.array([[0.1, 0.9]] * 3))
    assert accuracy.name == "accuracy" and float(accuracy.result()) == 0.5
    binary = MaskedMetric(keras.metrics.BinaryAccuracy(), elementwise=True)
    binary.update_state(labels, p.numpy())
    assert float(binary.result()) == 1.0  # 0.75 if the NaN entry counted as a 0


def test_masked_losses_and_metrics_serialise():
    for item in (masked_default_loss("softmax", 0.2), MaskedMetric("mae", elementwise=True)):
        copy = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(item))
        assert type(copy) is type(item) and copy.get_config() == item.get_config()
    assert masked_default_loss("softmax", 0.2).get_config()["loss"]["config"][
        "label_smoothing"
    ] == pytest.approx(0.2)


def test_fine_tune_learns_the_weights_through_a_view_and_reports_each_task(trained):
    model, history, _, _ = trained
    keys = set(history.history)
    for task in TASKS:
        assert {f"{task}_loss", f"{task}_log_variance", f"val_{task}_loss"} <= keys
    assert {"fine_accuracy", "coarse_accuracy", "tags_auc", "val_fine_accuracy"} <= keys
    assert history.history["stage"] == [1, 2]
    moved = [history.history[f"{task}_log_variance"][-1] for task in TASKS]
    assert all(value != 0.0 for value in moved)
    # The deployable model carries no training-only part.
    assert not any("log_variance" in v.path for v in model.weights)
    assert isinstance(model, keras.Model) and type(model).__name__ == "Functional"


def test_the_model_round_trips_through_keras_files_with_its_masked_losses(trained):
    model, _, (x, _), folder = trained
    model.compile(optimizer="adam", **compile_arguments(model))
    model.optimizer.build(model.trainable_variables)
    path = os.path.join(folder, "multitask.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    expected, actual = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for task in TASKS:
        np.testing.assert_allclose(actual[task], expected[task], atol=1e-6)
    assert all(isinstance(loss, MaskedLoss) for loss in loaded.loss.values())


def test_evaluation_reports_each_classification_task_without_missing_labels(trained):
    model, _, (x, targets), _ = trained
    data = tf.data.Dataset.from_tensor_slices((x, targets)).batch(8)
    names = {"coarse": ["a", "b", "c"]}
    reports = kt.evaluate_classifier(model, data, names, latency_batches=1)
    assert sorted(reports) == ["coarse", "fine"]  # a multi-label head is no single-label task
    assert reports["fine"]["num_examples"] == 18 and reports["coarse"]["num_examples"] == 18
    assert reports["coarse"]["class_names"] == ["a", "b", "c"]
    predicted = model.predict(x, verbose=0)["fine"].argmax(-1)
    labelled = targets["fine"] != MISSING_CLASS
    accuracy = np.mean(predicted[labelled] == targets["fine"][labelled])
    assert reports["fine"]["accuracy"] == pytest.approx(accuracy)
    assert reports["fine"]["latency"] is reports["coarse"]["latency"]
    json.dumps(reports)
    with pytest.raises(ValueError, match=r"heads \['coarse', 'fine'\]\. Received: \{'size'"):
        kt.evaluate_classifier(model, data, {"size": ["x"]}, latency_batches=0)


def test_exports_name_every_task_output(trained):
    model, _, (x, _), folder = trained
    labels = {"fine": [f"f{i}" for i in range(6)], "coarse": ["a", "b", "c"]}
    path = kt.export.saved_model(model, os.path.join(folder, "export"), labels=labels, top_k=2)
    assert sorted(os.listdir(os.path.join(path, "assets"))) == [
        "coarse_labels.txt",
        "fine_labels.txt",
    ]
    served = tf.saved_model.load(path).signatures["serving_default"](image=tf.constant(x[:4]))
    assert sorted(served) == [
        "coarse_classes",
        "coarse_probabilities",
        "coarse_scores",
        "fine_classes",
        "fine_probabilities",
        "fine_scores",
        "tags_probabilities",
    ]
    expected = model.predict(x[:4], verbose=0)
    for task in TASKS:
        np.testing.assert_allclose(served[f"{task}_probabilities"], expected[task], atol=1e-5)
    top = np.array(labels["coarse"])[np.argsort(-expected["coarse"], axis=-1)[:, :2]]
    assert served["coarse_classes"].numpy().astype(str).tolist() == top.tolist()
    lite = os.path.join(folder, "multitask.tflite")
    report = kt.export.tflite(model, lite, labels=labels, evaluation_data=x[:4], verbose=False)
    assert report.top1_agreement == 1.0 and report.max_abs_diff < 1e-5
    runner = Interpreter(model_path=lite).get_signature_runner("serving_default")
    outputs = runner.get_output_details()
    assert sorted(outputs) == ["coarse_probabilities", "fine_probabilities", "tags_probabilities"]
    assert os.path.isfile(os.path.join(folder, "multitask.coarse.labels.txt"))


@pytest.mark.parametrize(
    "tasks, message",
    [
        ({}, r"non-empty dict.*Received: tasks=\{\}"),
        ({"a": ("softmaxx", 3)}, r"Received: head='softmaxx'"),
        ({"a": {"head": "softmax", "classes": 3}}, r"Received: \{'head': 'softmax', 'classes'"),
        ({"backbone": 3}, r"Received: 'backbone'"),
        ({"a b": 3}, r"Received: 'a b'"),
        ({"a": 1}, r"Received: num_classes=1"),
    ],
)
def test_bad_tasks_are_named(tasks, message):
    with pytest.raises(ValueError, match=message):
        build_multitask_model("mobilenet_v3_small", tasks, weights=None)


def test_bad_targets_and_weights_are_named(trained):
    model, _, (x, targets), _ = trained
    no_tags = {key: value for key, value in targets.items() if key != "tags"}
    with pytest.raises(ValueError, match=r"Targets are missing for heads \['tags'\]"):
        kt.fine_tune(model, (x, no_tags), recipe="feature_extraction", epochs=1)
    bad_class = {**targets, "fine": targets["fine"] - 1}
    with pytest.raises(ValueError, match=r"'fine'.*in \[0, 6\), or -1.*Received: -2"):
        kt.fine_tune(model, (x, bad_class), recipe="feature_extraction", epochs=1)
    bad_tags = {**targets, "tags": np.where(np.isnan(targets["tags"]), -1, 0).astype("int64")}
    with pytest.raises(ValueError, match=r"'tags'.*NaN, not -1.*Received: -1"):
        kt.fine_tune(model, (x, bad_tags), recipe="feature_extraction", epochs=1)
    with pytest.raises(ValueError, match=r"UncertaintyWeighting.*Received: model"):
        kt.fit_stage(
            model, (x, targets), stage=kt.Stage("head", 1, 1e-3), loss_weights="uncertainty"
        )
    with pytest.raises(ValueError, match=r"or 'uncertainty'\. Received: loss_weights='learned'"):
        kt.fine_tune(model, (x, targets), loss_weights="learned")
    with pytest.raises(ValueError, match=r"is masked already"):
        MaskedLoss(masked_default_loss("softmax"))
    with pytest.raises(ValueError, match=r"labels\['fine'\].*\(6 for this model\)"):
        kt.export.saved_model(model, "unused", labels={"fine": ["a", "b"]})
    with pytest.raises(ValueError, match=r"keys must be output names.*\['size'\]"):
        kt.export.saved_model(model, "unused", labels={"size": ["a"]})


@pytest.mark.slow
def test_both_tasks_beat_chance_on_fashion_mnist_with_missing_labels():
    """The effect (seed 0): EfficientNet-Lite0, fine (10) and coarse (4) Fashion-MNIST tasks."""
    from keras_transfer.benchmarks.effects import multitask

    figures = multitask.measure(seed=0)
    assert figures["fine_over_chance"] >= 0.30, figures
    assert figures["coarse_over_chance"] >= 0.30, figures
    assert figures["coarse_chance"] == 0.5  # tops hold half the classes: the majority rate
    assert figures["masked_loss_change"] == 0.0 and figures["masked_gradient_max"] == 0.0
    assert figures["export_outputs_named"] == 1.0 and figures["export_max_abs_diff"] <= 1e-5
