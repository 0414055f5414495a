"""Effect of multi-task learning: two heads on one backbone both learn, missing labels included.

Task `fine` is Fashion-MNIST's 10 classes; task `coarse` groups them into
`COARSE_GROUPS` (`COARSE_OF_CLASS`): tops (T-shirt/top, Pullover, Dress,
Coat, Shirt: garments worn on the upper body, the dress with them as the one
piece that covers it), bottoms (Trouser), footwear (Sandal, Sneaker, Ankle
boot) and bags (Bag). One EfficientNet-Lite0 (ImageNet weights, offline, 48
px, frozen) feeds both heads; `fine_tune` trains them on cached features
with uncertainty weighting, while a quarter of the training examples miss
their fine label (-1) and another quarter their coarse label. Each head's
test accuracy is compared with chance, the stricter of `1 / classes` and the
majority class's rate (the test set is class-balanced: 0.1 for `fine`, and
0.5 for `coarse`, whose tops hold half the classes); the issue asks for >= 30
points over it.

Also measured on the trained model: that a masked label changes neither the
loss nor its gradient (the loss with the masked example's image replaced by
noise, and the gradient with respect to that image, both exactly 0), and
that the exported SavedModel's `serving_default` returns
`<task>_probabilities`, `_classes` and `_scores` for both tasks, equal to
the Keras model's outputs.
"""

from __future__ import annotations

import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.data import load_dataset
from keras_transfer.evaluation import evaluate_classifier
from keras_transfer.export import saved_model
from keras_transfer.missing_labels import MISSING_CLASS, masked_default_loss
from keras_transfer.recipes import fine_tune
from keras_transfer.techniques.multitask import build_multitask_model

TARGETS = {"fine_over_chance": ">= 0.30", "coarse_over_chance": ">= 0.30"}
COARSE_GROUPS = ("tops", "bottoms", "footwear", "bags")
# The group of each Fashion-MNIST class, in `FASHION_MNIST_CLASSES` order.
COARSE_OF_CLASS = (0, 1, 0, 0, 0, 2, 0, 2, 3, 2)
# Measured over seeds 0-2 (see the report): 48 px and 60 images per class
# train both heads well past the margins in ~10 s of CPU; 50 test images per
# class keep the accuracies' standard error near 2 points.
FULL = {"size": 48, "per_class": 60, "test_per_class": 50, "epochs": 15}
QUICK = {"size": 32, "per_class": 4, "test_per_class": 2, "epochs": 1}
# The share of training examples missing their fine label, and (other
# examples) their coarse label.
MISSING_SHARE = 0.25
OUTPUTS = ("probabilities", "classes", "scores")


def _arrays(dataset):
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset), strict=True)
    return np.concatenate(images).astype("float32"), np.concatenate(labels).astype("int64")


def fashion_mnist_tasks(seed: int, *, size: int, per_class: int, test_per_class: int):
    """Fashion-MNIST as two tasks, `fine` (10 classes) and `coarse` (`COARSE_GROUPS`).

    Args:
        seed: picks the examples and the missing labels.
        size: image side in pixels.
        per_class: training images per fine class.
        test_per_class: test images per fine class.

    Returns:
        `(x_train, targets, x_test, test_targets, class_names)`: targets are
        dicts `{"fine": ..., "coarse": ...}` of int64 labels; in training,
        `MISSING_SHARE` of the examples have fine label -1 and as many others
        coarse label -1.

    Example:

    >>> x, y, xt, yt, names = fashion_mnist_tasks(0, size=32, per_class=4, test_per_class=1)
    >>> x.shape, int((y["fine"] == -1).sum()), sorted(yt), names["coarse"][3]
    ((40, 32, 32, 3), 10, ['coarse', 'fine'], 'bags')
    """
    splits = load_dataset(
        "fashion_mnist",
        image_size=(size, size),
        validation_split=0.0,
        seed=seed,
        max_per_class=per_class,
        max_test_per_class=test_per_class,
    )
    x, y = _arrays(splits.train)
    x_test, y_test = _arrays(splits.test)
    groups = np.asarray(COARSE_OF_CLASS)
    targets = {"fine": y.copy(), "coarse": groups[y]}
    order = np.random.default_rng(seed).permutation(len(y))
    missing = int(len(y) * MISSING_SHARE)
    targets["fine"][order[:missing]] = MISSING_CLASS
    targets["coarse"][order[missing : 2 * missing]] = MISSING_CLASS
    names = {"fine": list(splits.class_names), "coarse": list(COARSE_GROUPS)}
    return x, targets, x_test, {"fine": y_test, "coarse": groups[y_test]}, names


def chance(labels: np.ndarray, num_classes: int) -> float:
    """The stricter chance level: the larger of `1 / num_classes` and the majority rate.

    Example:

    >>> chance(np.array([0, 0, 0, 1]), 4)
    0.75
    """
    return max(1.0 / num_classes, float(np.bincount(labels).max() / len(labels)))


def _masked_label_effect(model, images):
    """(loss change, max |gradient|) from a masked example's image: both exactly 0 if masked."""
    loss = masked_default_loss("softmax")
    labels = np.arange(len(images)) % 10
    labels[0] = MISSING_CLASS
    noisy = images.copy()
    noisy[0] = np.random.default_rng(0).uniform(0, 255, images[0].shape)
    x = tf.Variable(images)
    with tf.GradientTape() as tape:
        value = loss(labels, model(x, training=False)["fine"])
    gradient = tape.gradient(value, x)[0]
    other = loss(labels, model(noisy, training=False)["fine"])
    return float(abs(value - other)), float(tf.reduce_max(tf.abs(gradient)))


def _export_check(model, images, names):
    """(1.0 when every `<task>_<output>` is served, max |served - Keras| probability)."""
    with tempfile.TemporaryDirectory() as folder:
        path = saved_model(model, f"{folder}/multitask", labels=names, models_config=False)
        served = tf.saved_model.load(path).signatures["serving_default"](image=tf.constant(images))
        expected = {f"{task}_{output}" for task in names for output in OUTPUTS}
        keras_outputs = model.predict(images, verbose=0)
        difference = max(
            float(np.abs(served[f"{task}_probabilities"].numpy() - keras_outputs[task]).max())
            for task in names
        )
    return float(expected <= set(served)), difference


def _smoke_backbone(shape):
    """Two small convolutions: a quick run's backbone (it traces in a fraction of a second)."""
    inputs = keras.Input(shape)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    return keras.Model(inputs, x, name="smoke_backbone")


def measure(seed: int, quick: bool = False) -> dict[str, float]:
    """Trains the two-task model for one seed; returns the margins over chance and checks.

    Args:
        seed: the data sample, missing labels and initialisation.
        quick: two random convolutions at 32 px on a few images (seconds;
            the effect need not show).

    Returns:
        `fine_accuracy`, `coarse_accuracy`, `fine_chance`, `coarse_chance`,
        `fine_over_chance`, `coarse_over_chance` (the `TARGETS`),
        `masked_loss_change` and `masked_gradient_max` (0 when masking is
        exact), `export_outputs_named` (1.0) and `export_max_abs_diff`.

    Example:

    >>> sorted(TARGETS)  # measure(0) trains for ~20 s; measure(0, quick=True) runs in seconds
    ['coarse_over_chance', 'fine_over_chance']
    """
    settings = QUICK if quick else FULL
    x, targets, x_test, test_targets, names = fashion_mnist_tasks(
        seed,
        size=settings["size"],
        per_class=settings["per_class"],
        test_per_class=settings["test_per_class"],
    )
    keras.utils.set_random_seed(seed)
    tasks = {"fine": len(names["fine"]), "coarse": len(names["coarse"])}
    shape = (settings["size"], settings["size"], 3)
    if quick:
        model = build_multitask_model(_smoke_backbone(shape), tasks, weights=None)
    else:
        model = build_multitask_model("efficientnet_lite0", tasks, input_shape=shape)
    fine_tune(
        model,
        (x, targets),
        recipe="feature_extraction",
        epochs=settings["epochs"],
        loss_weights="uncertainty",
        cache_features=True,
        seed=seed,
        verbose=0,
    )
    test = tf.data.Dataset.from_tensor_slices((x_test, test_targets)).batch(64)
    reports = evaluate_classifier(model, test, names, latency_batches=0)
    figures = {}
    for task in tasks:
        figures[f"{task}_accuracy"] = reports[task]["accuracy"]
        figures[f"{task}_chance"] = chance(test_targets[task], tasks[task])
        figures[f"{task}_over_chance"] = figures[f"{task}_accuracy"] - figures[f"{task}_chance"]
    change, gradient = _masked_label_effect(model, x_test[:8])
    named, difference = _export_check(model, x_test[:16], names)
    figures.update(
        masked_loss_change=change,
        masked_gradient_max=gradient,
        export_outputs_named=named,
        export_max_abs_diff=difference,
    )
    return figures
