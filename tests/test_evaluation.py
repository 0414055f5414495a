import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_transfer.evaluation import confusion_matrix, evaluate_classifier, format_report

# Hand example: 7 examples, 3 classes.
HAND_LABELS = np.array([0, 0, 1, 1, 2, 2, 2])
HAND_PREDICTIONS = np.array([0, 1, 1, 1, 2, 0, 2])
HAND_MATRIX = [[1, 1, 0], [0, 2, 0], [1, 0, 2]]


def tiny_model(units=3, activation="softmax"):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(units, activation=activation)])


def oracle_model():
    """Predicts the index of the largest of the first three input features."""
    model = tiny_model()
    kernel = np.zeros((4, 3), "float32")
    kernel[:3, :3] = 10 * np.eye(3)
    model.layers[-1].set_weights([kernel, np.zeros(3, "float32")])
    return model


def dataset(x, y, batch_size=3):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def hand_dataset(**kwargs):
    x = np.eye(4, dtype="float32")[HAND_PREDICTIONS]
    return dataset(x, HAND_LABELS, **kwargs)


def test_confusion_matrix_hand_example():
    matrix = confusion_matrix(HAND_LABELS, HAND_PREDICTIONS, 3)
    assert matrix.tolist() == HAND_MATRIX
    assert matrix.dtype == np.int64


@pytest.mark.parametrize(
    "labels, predictions, num_classes, match",
    [
        ([0, 3], [0, 1], 3, r"Received: labels value 3"),
        ([0, 1], [0, -1], 3, r"Received: predictions value -1"),
        ([0, 1], [0], 3, r"len\(labels\)=2, len\(predictions\)=1"),
        ([[0, 1]], [[0, 1]], 3, r"Received: labels.shape=\(1, 2\)"),
        ([0.5], [0], 3, r"must hold integers"),
        ([0], [0], 0, r"Received: num_classes=0"),
    ],
)
def test_confusion_matrix_rejects_bad_input(labels, predictions, num_classes, match):
    with pytest.raises(ValueError, match=match):
        confusion_matrix(labels, predictions, num_classes)


def test_evaluate_hand_example_per_class_metrics():
    report = evaluate_classifier(
        oracle_model(), hand_dataset(), ["cat", "dog", "bird"], latency_batches=2
    )
    assert report["confusion_matrix"] == HAND_MATRIX
    assert report["accuracy"] == pytest.approx(5 / 7)
    assert report["num_examples"] == 7
    assert report["class_names"] == ["cat", "dog", "bird"]
    by_class = {row["class"]: row for row in report["per_class"]}
    assert by_class["cat"]["precision"] == pytest.approx(1 / 2)
    assert by_class["cat"]["recall"] == pytest.approx(1 / 2)
    assert by_class["dog"]["precision"] == pytest.approx(2 / 3)
    assert by_class["dog"]["recall"] == pytest.approx(1.0)
    assert by_class["dog"]["f1"] == pytest.approx(0.8)
    assert by_class["bird"]["precision"] == pytest.approx(1.0)
    assert by_class["bird"]["recall"] == pytest.approx(2 / 3)
    assert [row["support"] for row in report["per_class"]] == [2, 2, 3]
    assert report["macro_avg"]["recall"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    json.dumps(report)  # JSON-serialisable as is


def test_accuracy_matches_numpy():
    model = tiny_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4)).astype("float32")
    y = rng.integers(0, 3, 20)
    report = evaluate_classifier(model, dataset(x, y, batch_size=6), latency_batches=0)
    expected = np.mean(np.argmax(model.predict(x, verbose=0), axis=-1) == y)
    assert report["accuracy"] == pytest.approx(expected)
    assert report["class_names"] == ["0", "1", "2"]
    assert np.sum(report["confusion_matrix"]) == 20
    assert report["latency"] is None


def test_one_pass_keeps_labels_aligned_under_reshuffling():
    shuffled = hand_dataset(batch_size=7).unbatch().shuffle(7, seed=1).batch(2)
    report = evaluate_classifier(oracle_model(), shuffled, latency_batches=0)
    assert report["confusion_matrix"] == HAND_MATRIX


def test_class_without_predictions_has_zero_precision():
    x = np.eye(4, dtype="float32")[[0, 0, 1]]
    report = evaluate_classifier(oracle_model(), dataset(x, np.array([0, 2, 1])), latency_batches=0)
    bird = report["per_class"][2]
    assert (bird["precision"], bird["recall"], bird["f1"], bird["support"]) == (0.0, 0.0, 0.0, 1)


def test_binary_sigmoid_head():
    model = tiny_model(units=1, activation="sigmoid")
    x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    y = np.arange(8) % 2
    report = evaluate_classifier(model, dataset(x, y), ["no", "yes"], latency_batches=0)
    expected = np.mean((model.predict(x, verbose=0)[:, 0] >= 0.5).astype(int) == y)
    assert report["accuracy"] == pytest.approx(expected)
    assert len(report["confusion_matrix"]) == 2


def test_latency_keys_positive():
    report = evaluate_classifier(oracle_model(), hand_dataset(batch_size=4), latency_batches=3)
    latency = report["latency"]
    assert latency["batch_size"] == 4
    assert latency["repeats"] == 3
    assert latency["mean_ms_per_image"] > 0
    assert latency["p95_ms_per_image"] > 0


def test_format_report_lists_classes_and_latency():
    report = evaluate_classifier(
        oracle_model(), hand_dataset(), ["T-shirt/top", "dog", "bird"], latency_batches=1
    )
    text = format_report(report)
    assert text.startswith("accuracy: 0.7143 (7 examples)")
    assert "T-shirt/top" in text and "macro avg" in text and "ms/image" in text


def test_format_report_rejects_other_dicts():
    with pytest.raises(ValueError, match="with key 'accuracy'"):
        format_report({"loss": 1.0})


def test_empty_dataset_is_rejected():
    empty = dataset(np.zeros((0, 4), "float32"), np.zeros((0,), "int64"))
    with pytest.raises(ValueError, match="Received: an empty dataset"):
        evaluate_classifier(oracle_model(), empty)


def test_class_names_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"one name per class \(3 for this model\)"):
        evaluate_classifier(oracle_model(), hand_dataset(), ["a", "b"])


def test_labels_outside_classes_are_rejected():
    x = np.eye(4, dtype="float32")[[0, 1]]
    with pytest.raises(ValueError, match="Received: labels value 5"):
        evaluate_classifier(oracle_model(), dataset(x, np.array([0, 5])), latency_batches=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"latency_batches": -1}, ValueError, "Received: latency_batches=-1"),
        ({"latency_batches": 1.5}, ValueError, "Received: latency_batches=1.5"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate_classifier(oracle_model(), hand_dataset(), **kwargs)


def test_non_dataset_is_rejected():
    with pytest.raises(TypeError, match="Received: tuple"):
        evaluate_classifier(oracle_model(), (np.zeros((2, 4)), np.zeros(2)))


def test_expected_calibration_error_matches_a_hand_computation():
    from keras_transfer.evaluation import expected_calibration_error

    probabilities = np.array(
        [[0.95, 0.05], [0.85, 0.15], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55], [0.1, 0.9]]
    )
    labels = np.array([0, 1, 0, 1, 0, 1])
    ece, bins = expected_calibration_error(probabilities, labels, num_bins=4)
    # Bins (0.5, 0.75]: confidences 0.6, 0.7, 0.55 -> mean 0.6167, correct 1, 1, 0 -> 0.6667.
    #      (0.75, 1.0]: confidences 0.95, 0.85, 0.9 -> mean 0.9, correct 1, 0, 1 -> 0.6667.
    hand = 3 / 6 * abs(2 / 3 - (0.6 + 0.7 + 0.55) / 3) + 3 / 6 * abs(2 / 3 - 0.9)
    assert ece == pytest.approx(hand)
    assert [b["count"] for b in bins] == [0, 0, 3, 3]
    assert bins[0]["accuracy"] is None
    with pytest.raises(ValueError, match="Received: num_bins=0"):
        expected_calibration_error(probabilities, labels, num_bins=0)


def test_report_has_top_k_calibration_and_the_most_confident_mistakes():
    from keras_transfer.evaluation import top_k_accuracy

    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.9, 0.04, 0.06]])
    labels = np.array([0, 1, 2, 1])
    assert top_k_accuracy(probabilities, labels, k=1) == 0.25
    assert top_k_accuracy(probabilities, labels, k=2) == 0.75
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Activation("linear")(inputs))
    data = tf.data.Dataset.from_tensor_slices((probabilities.astype("float32"), labels)).batch(3)
    paths = ["a.png", "b.png", "c.png", "d.png"]
    report = evaluate_classifier(
        model, data, ["x", "y", "z"], latency_batches=0, top_k=2, paths=paths
    )
    assert report["top_k_accuracy"] == {"k": 2, "accuracy": 0.75}
    assert report["misclassified_count"] == 3
    assert [row["path"] for row in report["misclassified"]] == ["d.png", "b.png", "c.png"]
    assert report["misclassified"][0] == {
        "index": 3,
        "true": "y",
        "predicted": "x",
        "confidence": pytest.approx(0.9),
        "path": "d.png",
    }
    assert "expected calibration error" in format_report(report)
    with pytest.raises(ValueError, match="Received: 2 paths"):
        evaluate_classifier(model, data, ["x", "y", "z"], latency_batches=0, paths=paths[:2])
