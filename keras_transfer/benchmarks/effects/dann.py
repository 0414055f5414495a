"""Effect of DANN on a controlled domain shift: target accuracy over source-only training.

Source domain: Fashion-MNIST as it ships (grey garments on black, 28 px),
`per_class` labelled training images per class. Target domain: other
Fashion-MNIST training images of the same classes, their background blended
with a random smooth colour field (`colour_shift`: `0.5 x + 0.5 |b - x|`,
the MNIST-M construction of Ganin et al. 2016 at half strength, `b` a
bilinear upsampling of random 4x4 RGB noise), given to training as images
only; the shifted test images measure target accuracy (their labels never
reach training). The model is a small CNN in the spirit of Ganin et al.'s
digit network (5x5 convolutions of 32 and 48 filters with max pooling, a
100-unit ReLU layer: the pooled features both methods act on) with a softmax
head, built with `build_image_classifier`. Every run starts from the same
weights and sees the same batches, optimizer (a recipe stage's AdamW,
warm-up and cosine decay, one LR everywhere) and epochs; source-only is the
same call with `lambda_max=0` (DANN) or `weight=0` (MMD). `compare` runs the
baseline once and then each method; `measure` is DANN's figures
(`effects/mmd.py` has MMD's).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.builders import build_image_classifier
from keras_transfer.data.catalog import fashion_mnist_arrays
from keras_transfer.techniques.domain_adaptation import dann, mmd

TARGETS = {"dann_margin": ">= 0.03"}
# The colour field's resolution before upsampling: large, smooth blotches.
SHIFT_GRID = 4
# Measured over seeds 0-2: DANN (lambda_max 0.3) raised target accuracy by
# 6.3 / 6.8 / 7.7 points, MMD (weight 1) by 14.3 / 9.3 / 9.1; source accuracy
# moved -1.9..+0.2 points. With lambda_max = 1 (the paper's) DANN moved -23..+0.4
# points here (at 500 images per class), so this shift takes 0.3. DANN under
# AdamW instead of SGD was unstable: from +9 to -10 points across seeds and
# settings.
FULL = {
    "per_class": 200,
    "target_images": 2000,
    "test_per_class": 200,
    "epochs": 5,
    "lambda_max": 0.3,
    "mmd_weight": 1.0,
}
QUICK = {**FULL, "per_class": 4, "target_images": 40, "test_per_class": 2, "epochs": 1}
BATCH_SIZE = 64


def colour_shift(images: np.ndarray, seed: int) -> np.ndarray:
    """Grey images on a random smooth colour background: `0.5 x + 0.5 |b - x|` per channel.

    Args:
        images: uint8 or float grey images `[n, h, w]`, 0..255.
        seed: seed of the colour fields.

    Returns:
        float32 RGB images `[n, h, w, 3]`, 0..255.

    Example:

    >>> shifted = colour_shift(np.zeros((2, 28, 28)), seed=0)
    >>> shifted.shape, bool(shifted.std() > 10)
    ((2, 28, 28, 3), True)
    """
    images = np.asarray(images, "float32")
    grid = np.random.default_rng(seed).uniform(0, 255, (len(images), SHIFT_GRID, SHIFT_GRID, 3))
    background = tf.image.resize(grid.astype("float32"), images.shape[1:3], "bilinear").numpy()
    grey = np.repeat(images[..., None], 3, axis=-1)
    return 0.5 * grey + 0.5 * np.abs(background - grey)


def shifted_fashion_mnist(seed: int, *, per_class: int, target_images: int, test_per_class: int):
    """Labelled source images, unlabelled target images, and labelled test sets of both domains.

    Args:
        seed: picks the images and the colour fields.
        per_class: labelled source images per class.
        target_images: unlabelled target images (other training images).
        test_per_class: test images per class, in each domain.

    Returns:
        `{"source": (x, y), "target": x, "source_test": (x, y),
        "target_test": (x, y)}`, float32 RGB 0..255 at 28 px.

    Example:

    >>> data = shifted_fashion_mnist(0, per_class=2, target_images=5, test_per_class=1)
    >>> data["source"][0].shape, data["target"].shape, data["target_test"][0].shape
    ((20, 28, 28, 3), (5, 28, 28, 3), (10, 28, 28, 3))
    """
    (x_train, y_train), (x_test, y_test) = fashion_mnist_arrays()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y_train))
    source = np.concatenate([order[y_train[order] == c][:per_class] for c in range(10)])
    target = rng.choice(np.setdiff1d(order, source), target_images, replace=False)
    test = np.concatenate([np.flatnonzero(y_test == c)[:test_per_class] for c in range(10)])
    grey = np.repeat(x_test[test][..., None].astype("float32"), 3, axis=-1)
    return {
        "source": (np.repeat(x_train[source][..., None].astype("float32"), 3, -1), y_train[source]),
        "target": colour_shift(x_train[target], seed),
        "source_test": (grey, y_test[test]),
        "target_test": (colour_shift(x_test[test], seed + 1), y_test[test]),
    }


def small_cnn_classifier(seed: int) -> keras.Model:
    """The CNN classifier every run trains, seeded: features from a 100-unit ReLU layer.

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
            keras.layers.Conv2D(32, 5, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(48, 5, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(100, activation="relu"),
        ],
        name="cnn",
    )
    return build_image_classifier(backbone, 10, weights=None, dropout=0.0, freeze_backbone=False)


def _accuracy(model, data) -> float:
    images, labels = data
    scores = model.predict(images, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(scores, axis=-1) == labels))


def compare(seed: int, methods=("dann", "mmd"), quick: bool = False) -> dict[str, float]:
    """Each method against its source-only run, all from the same initial weights.

    A method's source-only run is the same call with `lambda_max=0` (DANN,
    SGD) or `weight=0` (MMD, AdamW): the same optimizer, batches and epochs.

    Args:
        seed: images, colour fields, initial weights and shuffles.
        methods: `"dann"` and/or `"mmd"`.
        quick: a smoke run (a few images, one epoch).

    Returns:
        For each method `m`: `target_accuracy_m`, `target_accuracy_m_source_only`,
        the same two `source_accuracy_...` (test images of each domain), and
        `m_margin` (target accuracy minus its source-only run's).

    Example:

    >>> figures = compare(0, ("mmd",), quick=True)
    >>> sorted(figures)[:2]
    ['mmd_margin', 'source_accuracy_mmd']
    """
    settings = QUICK if quick else FULL
    data = shifted_fashion_mnist(
        seed,
        per_class=settings["per_class"],
        target_images=settings["target_images"],
        test_per_class=settings["test_per_class"],
    )
    options = {
        "epochs": settings["epochs"],
        "lr_spread": 1.0,  # trained from scratch: one LR everywhere
        "batch_size": BATCH_SIZE,
        "seed": seed,
        "verbose": 0,
    }
    train = {
        "dann": lambda model, on: dann(
            model,
            data["source"],
            data["target"],
            lambda_max=settings["lambda_max"] if on else 0.0,
            **options,
        ),
        "mmd": lambda model, on: mmd(
            model,
            data["source"],
            data["target"],
            weight=settings["mmd_weight"] if on else 0.0,
            **options,
        ),
    }
    figures = {}
    for method in methods:
        for on, name in ((False, f"{method}_source_only"), (True, method)):
            model = train[method](small_cnn_classifier(seed), on)
            figures[f"target_accuracy_{name}"] = _accuracy(model, data["target_test"])
            figures[f"source_accuracy_{name}"] = _accuracy(model, data["source_test"])
        figures[f"{method}_margin"] = (
            figures[f"target_accuracy_{method}"] - figures[f"target_accuracy_{method}_source_only"]
        )
    return figures


def measure(seed: int, quick: bool = False) -> dict[str, float]:
    """DANN against source-only training (`compare(seed, ("dann",))`).

    Args:
        seed: see `compare`.
        quick: a smoke run.

    Returns:
        `dann_margin` and the accuracies behind it.

    Example:

    >>> set(TARGETS) <= set(measure(seed=0, quick=True))
    True
    """
    return compare(seed, ("dann",), quick)
