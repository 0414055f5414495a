"""Effect of magnitude pruning at 50% sparsity: the accuracy stays, the gzip size falls.

Fashion-MNIST at its own 28 px (10 classes, offline) and a small CNN built
with `build_image_classifier`: a 5x5 convolution, a depthwise-separable block
(DepthwiseConv2D + 1x1 Conv2D) and a 128-unit Dense layer, whose Dense, Conv
and DepthwiseConv kernels are pruned (`PRUNED_LAYERS`: all but the first
convolution and the head, 99% of the kernel weights). From the same initial
weights it is fine-tuned with `fine_tune(recipe="full")`, then trained on
twice from those weights with the same data, epochs, optimizer and shuffle:
once plain, once through `techniques.prune(sparsity=0.5)` (each kernel's
sparsity rises over the first 2/3 of the steps, the last third trains with
the final masks): pruning a fine-tuned model while fine-tuning it further.
Figures: both test accuracies and their difference (the issue: within 2
points), the gzip-compressed size of the `.keras` and LiteRT files of both
models and how much pruning saves (the issue: >= 30%), the measured
sparsity, and whether every masked weight is exactly zero after training.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_transfer.builders import build_image_classifier
from keras_transfer.data.catalog import fashion_mnist_arrays
from keras_transfer.recipes import fine_tune
from keras_transfer.techniques.pruning import prune
from keras_transfer.techniques.sparsity import pruning_report

TARGETS = {
    "accuracy_change": ">= -0.02",
    "keras_gzip_reduction": ">= 0.30",
    "tflite_gzip_reduction": ">= 0.30",
}
SPARSITY = 0.5
# The hidden layers are pruned (99% of the kernel weights); the first
# convolution (2.4 k weights) and the head (1.3 k) stay dense, as pruning
# studies often keep the first and last layers: pruning them too cost
# 1.5-2.5 points here instead of 1.0-1.5 (seeds 0-2).
PRUNED_LAYERS = ("depthwise", "pointwise", "dense")
# Measured over seeds 0-2: accuracy 0.826 / 0.822 / 0.821 plain, 0.811 /
# 0.812 / 0.806 pruned (-1.5 / -1.0 / -1.5 points); gzip size -40.0% (.keras)
# and -40.6% (LiteRT) on every seed.
FULL = {"per_class": 300, "test_per_class": 200, "epochs": 4}
QUICK = {"per_class": 4, "test_per_class": 2, "epochs": 1}
# `fine_tune(recipe="full")` trains at learning_rate / 10: 1e-3, Adam's usual
# LR for a network trained from scratch; one LR for every layer.
LEARNING_RATE = 1e-2
BATCH_SIZE = 64


def fashion_mnist_28(seed: int, *, per_class: int, test_per_class: int):
    """Fashion-MNIST as RGB float arrays at 28 px: a seeded subset per class.

    Args:
        seed: picks the training images.
        per_class: training images per class.
        test_per_class: test images per class (the first ones of the test set).

    Returns:
        `((x_train, y_train), (x_test, y_test))`, pixels 0..255.

    Example:

    >>> (x, y), (x_test, _) = fashion_mnist_28(0, per_class=2, test_per_class=1)
    >>> x.shape, x_test.shape
    ((20, 28, 28, 3), (10, 28, 28, 3))
    """
    (x_train, y_train), (x_test, y_test) = fashion_mnist_arrays()
    rng = np.random.default_rng(seed)
    train = np.concatenate(
        [rng.permutation(np.flatnonzero(y_train == c))[:per_class] for c in range(10)]
    )
    test = np.concatenate([np.flatnonzero(y_test == c)[:test_per_class] for c in range(10)])

    def rgb(images):
        return np.repeat(images[..., None].astype("float32"), 3, axis=-1)

    return (rgb(x_train[train]), y_train[train]), (rgb(x_test[test]), y_test[test])


def small_cnn_classifier(seed: int) -> keras.Model:
    """The CNN classifier both runs train, seeded (Dense, Conv and DepthwiseConv kernels).

    Args:
        seed: seed of the initial weights.

    Returns:
        A model from `build_image_classifier`, everything trainable.

    Example:

    >>> small_cnn_classifier(0).output_shape
    (None, 10)
    """
    keras.utils.set_random_seed(seed)
    backbone = keras.Sequential(
        [
            keras.Input((28, 28, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(32, 5, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(),
            keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise"),
            keras.layers.Conv2D(64, 1, activation="relu", name="pointwise"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu", name="dense"),
        ],
        name="cnn",
    )
    return build_image_classifier(backbone, 10, weights=None, freeze_backbone=False)


def _accuracy(model, data) -> float:
    images, labels = data
    scores = model.predict(images, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(scores, axis=-1) == labels))


def measure(seed: int, quick: bool = False) -> dict[str, float]:
    """Fine-tunes the CNN, then trains it on plain and pruned to 50%; every figure.

    Args:
        seed: initial weights, training subset and shuffle.
        quick: a smoke run (4 images per class, one epoch).

    Returns:
        `accuracy_dense`, `accuracy_pruned`, `accuracy_change` (pruned -
        dense), `sparsity` (measured zeros over the pruned kernels),
        `pruned_weights_zero` (1.0 when every masked weight is exactly 0),
        the `.keras` and LiteRT gzip sizes of both models
        (`keras_gzip_bytes_dense`, ...) and `keras_gzip_reduction`,
        `tflite_gzip_reduction` (1 - pruned / dense).

    Example:

    >>> figures = measure(seed=0, quick=True)
    >>> set(TARGETS) <= set(figures), figures["pruned_weights_zero"]
    (True, 1.0)
    """
    settings = QUICK if quick else FULL
    train, test = fashion_mnist_28(
        seed, per_class=settings["per_class"], test_per_class=settings["test_per_class"]
    )
    options = {
        "recipe": "full",
        "epochs": settings["epochs"],
        "learning_rate": LEARNING_RATE,
        "lr_spread": 1.0,
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "verbose": 0,
    }
    fine_tuned = small_cnn_classifier(seed)
    fine_tune(fine_tuned, train, **options)
    # Both continue from the fine-tuned weights for the same epochs, one pruned.
    dense, pruned = small_cnn_classifier(seed), small_cnn_classifier(seed)
    for model in (dense, pruned):
        model.set_weights(fine_tuned.get_weights())
    fine_tune(dense, train, **options)
    prune(pruned, train, sparsity=SPARSITY, layers=PRUNED_LAYERS, **options)
    kernels = pruned.pruning.kernels
    zero = all(
        np.all(keras.ops.convert_to_numpy(kernels[path])[mask == 0] == 0)
        for path, mask in pruned.pruning.masks.items()
    )
    report = pruning_report(pruned, dense)
    figures = {
        "accuracy_dense": _accuracy(dense, test),
        "accuracy_pruned": _accuracy(pruned, test),
        "sparsity": report.sparsity,
        "pruned_weights_zero": float(zero),
        "keras_gzip_bytes_dense": float(report.baseline.keras_gzip_bytes),
        "keras_gzip_bytes_pruned": float(report.sizes.keras_gzip_bytes),
        "tflite_gzip_bytes_dense": float(report.baseline.tflite_gzip_bytes),
        "tflite_gzip_bytes_pruned": float(report.sizes.tflite_gzip_bytes),
        "keras_gzip_reduction": report.reduction("keras_gzip_bytes"),
        "tflite_gzip_reduction": report.reduction("tflite_gzip_bytes"),
    }
    figures["accuracy_change"] = figures["accuracy_pruned"] - figures["accuracy_dense"]
    return figures
