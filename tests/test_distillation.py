"""kt.techniques.distill: Hinton's loss, the cached teacher, the seam, the effect."""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_round_trip, image_batch, sharpen_head, weights_by_path

import keras_transfer as kt
from keras_transfer.benchmarks.effects import distillation as distillation_effect
from keras_transfer.techniques.distillation import UNLABELLED, DistillationLoss

SIZE = 16


def _tiny(seed, num_classes=3, size=SIZE, name="tiny", head="softmax", strategy=None):
    """A tiny CNN through the builder (preprocessing, conv backbone, head), all trainable."""
    keras.utils.set_random_seed(seed)
    with strategy.scope() if strategy else contextlib.nullcontext():
        body = keras.Sequential(
            [
                keras.Input((size, size, 3)),
                keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
                keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            ],
            name="tiny_cnn",
        )
    return kt.build_image_classifier(
        body,
        num_classes,
        weights=None,
        preprocessing="tf",
        dropout=0.0,
        head=head,
        freeze_backbone=False,
        name=name,
        strategy=strategy,
    )


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _by_hand(labels, student, teacher, alpha, temperature):
    """The loss per example, in float64 numpy, from the formula of Hinton et al. 2015."""
    hard = -_log_softmax(student)[np.arange(len(labels)), np.maximum(labels, 0)]
    hard = np.where(labels == UNLABELLED, 0.0, hard)
    p_teacher = np.exp(_log_softmax(teacher / temperature))
    kl = np.sum(
        p_teacher * (_log_softmax(teacher / temperature) - _log_softmax(student / temperature)), -1
    )
    return alpha * hard + (1 - alpha) * temperature**2 * kl, kl


@pytest.fixture(scope="module")
def data():
    x = image_batch(24, size=SIZE)
    return x, np.arange(24) % 3


@pytest.fixture(scope="module")
def teacher():
    return sharpen_head(_tiny(1, name="teacher"), std=2.0)


def test_loss_matches_hand_computation_with_t_squared():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(0, 3, (6, 5)), rng.normal(0, 3, (6, 5))
    labels = np.array([0, 4, 2, UNLABELLED, 1, 3])
    for alpha, temperature in ((0.1, 4.0), (0.7, 2.5), (0.0, 1.0), (1.0, 3.0)):
        expected, kl = _by_hand(labels, student, teacher, alpha, temperature)
        loss = DistillationLoss(alpha, temperature, reduction="none")
        per_example = np.asarray(loss((labels, teacher), student))
        np.testing.assert_allclose(per_example, expected, rtol=1e-5, atol=1e-6)
        mean = float(DistillationLoss(alpha, temperature)((labels, teacher), student))
        assert mean == pytest.approx(expected.mean(), rel=1e-5)
    # The soft term is T^2 times the KL divergence: T = 3 weighs it 9x.
    soft = np.asarray(DistillationLoss(0.0, 3.0, reduction="none")((labels, teacher), student))
    np.testing.assert_allclose(soft, 9.0 * _by_hand(labels, student, teacher, 0.0, 3.0)[1], 1e-5)
    # An unlabelled example (-1) gets the soft term only; identical logits give zero KL.
    same = np.asarray(DistillationLoss(0.5, 2.0, reduction="none")((labels, student), student))
    assert same[3] == pytest.approx(0.0, abs=1e-6) and same[0] > 0


def test_loss_is_finite_for_a_confident_teacher():
    teacher = np.array([[200.0, -200.0, 0.0]])  # softmax underflows to exact zeros
    loss = DistillationLoss(0.1, 1.0)((np.array([0]), teacher), np.zeros((1, 3)))
    assert np.isfinite(float(loss))


def test_loss_config_round_trips():
    loss = DistillationLoss(alpha=0.3, temperature=2.0)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, DistillationLoss)
    assert (again.alpha, again.temperature) == (0.3, 2.0)


def _distill(data, teacher, validation=None, **options):
    student = _tiny(0, name="student")
    kt.techniques.distill(
        student,
        teacher,
        data,
        validation,
        epochs=2,
        batch_size=8,
        patience=None,
        verbose=0,
        **options,
    )
    return student


@pytest.fixture(scope="module")
def distilled(data, teacher):
    """Arrays: the teacher's logits cached by default."""
    teacher_before = weights_by_path(teacher)
    return _distill(data, teacher, data), teacher_before


@pytest.fixture(scope="module")
def recomputed(data, teacher):
    return _distill(data, teacher, data, cache_teacher=False)


def _assert_same_run(a, b, keys=("loss",)):
    for key in keys:
        np.testing.assert_allclose(
            a.history.history[key], b.history.history[key], rtol=0, atol=1e-6, err_msg=key
        )
    for u, v in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_allclose(u, v, rtol=0, atol=1e-5)


def test_distill_returns_the_trained_student_and_leaves_the_teacher(
    distilled, teacher, data, tmp_path
):
    student, teacher_before = distilled
    assert type(student).__name__ == "Functional" and student.name == "student"
    assert student.history.history.keys() >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    after = weights_by_path(teacher)
    assert all(np.array_equal(after[path], value) for path, value in teacher_before.items())
    assert student.evaluate(*data, verbose=0, return_dict=True).keys() >= {"loss", "accuracy"}
    assert_round_trip(student, data[0], tmp_path)


def test_cached_teacher_logits_give_the_same_loss(distilled, recomputed):
    _assert_same_run(distilled[0], recomputed, keys=("loss", "val_loss"))


def test_datasets_recompute_by_default_and_cache_on_request(data, teacher, distilled, recomputed):
    # The batches `as_dataset` makes of the arrays: the teacher runs in each step.
    shuffled = kt.training.as_dataset(data, 8, seed=0)
    _assert_same_run(_distill(shuffled, teacher, data), recomputed)
    # Cached on request: read once in order, then reshuffled with `seed` as arrays are.
    in_order = tf.data.Dataset.from_tensor_slices(data).batch(8)
    _assert_same_run(_distill(in_order, teacher, data, cache_teacher=True), distilled[0])


def test_distill_trains_under_a_strategy(data, teacher):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    student = _tiny(0, name="student", strategy=strategy)
    kt.techniques.distill(student, teacher, data, epochs=1, batch_size=8, verbose=0)
    assert student.distribute_strategy is strategy
    assert np.isfinite(student.history.history["loss"][0])
    outside = _tiny(0, name="student")
    with pytest.raises(ValueError, match="build it with `strategy=`"):
        kt.techniques.distill(outside, teacher, data, epochs=1, strategy=strategy, verbose=0)


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        ({"alpha": 1.5}, ValueError, "`alpha` must be a number in [0, 1]. Received: alpha=1.5"),
        ({"alpha": -0.1}, ValueError, "Received: alpha=-0.1"),
        ({"temperature": 0}, ValueError, "Received: temperature=0"),
        ({"temperature": -2.0}, ValueError, "Received: temperature=-2.0"),
        ({"cache_teacher": "yes"}, ValueError, "Received: cache_teacher='yes'"),
        ({"epochs": 0}, ValueError, "Received: epochs=0"),
        ({"teacher": "classes"}, ValueError, "a teacher with 4 classes and a student with 3"),
        ({"teacher": "size"}, ValueError, "teacher input shape (20, 20, 3)"),
        ({"teacher": "regression"}, ValueError, "one softmax Dense head"),
        ({"teacher": "not_a_model"}, TypeError, "`teacher` must be a keras.Model"),
    ],
)
def test_bad_input_is_refused_by_name(data, teacher, change, error, fragment):
    options = {"epochs": 1, "verbose": 0, **change}
    options["teacher"] = {
        "classes": lambda: _tiny(2, num_classes=4),
        "size": lambda: _tiny(2, size=20),
        "regression": lambda: _tiny(2, head="regression"),
        "not_a_model": lambda: "teacher",
    }.get(change.get("teacher"), lambda: teacher)()
    with pytest.raises(error) as caught:
        kt.techniques.distill(_tiny(0, name="student"), train=data, **options)
    assert fragment in str(caught.value)


@pytest.mark.slow
def test_distilled_student_beats_the_student_alone():
    """Seed 0 of the benchmark: the distilled student gains >= 2 points over hard labels."""
    figures = distillation_effect.measure(seed=0)
    print(figures)
    assert figures["gain"] >= 0.02
