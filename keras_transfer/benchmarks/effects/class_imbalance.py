"""Effect of `class_weight="balanced"` on a 10:1 imbalance: the minority class's recall rises.

Four Fashion-MNIST classes that look alike (T-shirt/top, Pullover, Coat,
Shirt); Shirt, the hardest Fashion-MNIST class, keeps a tenth of its training
images (`per_class // 10` against `per_class`), the test set stays balanced.
EfficientNet-Lite0 (ImageNet weights, offline, 64 px) computes the pooled
features once, and a softmax head (dropout 0.2, as the builder puts it)
trains on them with `fine_tune(recipe="feature_extraction")` twice from the
same initialisation, without class weights and with `class_weight="balanced"`
(what `cache_features=True` does on the whole classifier, without computing
the features twice). The figures are Shirt's test recall in each run, its
gain (the issue asks for >= 10 points), and both accuracies.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.builders import build_feature_extractor, build_image_classifier
from keras_transfer.data import load_dataset
from keras_transfer.evaluation import evaluate_classifier
from keras_transfer.recipes import fine_tune

TARGETS = {"minority_recall_gain": ">= 0.10"}
# Fashion-MNIST indices: T-shirt/top, Pullover, Coat, Shirt (the minority).
CLASSES = (0, 2, 4, 6)
CLASS_NAMES = ("t_shirt", "pullover", "coat", "shirt")
MINORITY = 3
IMBALANCE = 10
# Measured over seeds 0-2: at 64 px and 20 epochs Shirt's recall rose by
# 12-21 points (0.10-0.13 -> 0.24-0.31). With 50 epochs the gain was 10-14
# points (the unweighted head learns more of Shirt as it converges); end to
# end (`cache_features=True` on the whole classifier), 13-26.
FULL = {"size": 64, "per_class": 200, "test_per_class": 100, "epochs": 20}
QUICK = {"size": 32, "per_class": 10, "test_per_class": 2, "epochs": 1}


def _arrays(dataset):
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset), strict=True)
    return np.concatenate(images).astype("float32"), np.concatenate(labels).astype("int64")


def imbalanced_fashion_mnist(seed: int, *, size: int, per_class: int, test_per_class: int):
    """`CLASSES` of Fashion-MNIST (labels 0-3), the minority at 1/`IMBALANCE` in training.

    Args:
        seed: picks the minority examples kept.
        size: image side in pixels.
        per_class: training images of each majority class.
        test_per_class: test images per class (balanced).

    Returns:
        `((x_train, y_train), (x_test, y_test))`.

    Example:

    >>> (x, y), _ = imbalanced_fashion_mnist(0, size=32, per_class=10, test_per_class=1)
    >>> np.bincount(y).tolist()
    [10, 10, 10, 1]
    """
    splits = load_dataset(
        "fashion_mnist",
        image_size=(size, size),
        validation_split=0.0,
        seed=0,
        max_per_class=per_class,
        max_test_per_class=test_per_class,
    )

    def pick(data):
        x, y = data
        keep = np.isin(y, CLASSES)
        return x[keep], np.searchsorted(CLASSES, y[keep])

    (x, y), test = pick(_arrays(splits.train)), pick(_arrays(splits.test))
    minority = np.flatnonzero(y == MINORITY)
    kept = np.random.default_rng(seed).choice(
        minority, max(len(minority) // IMBALANCE, 1), replace=False
    )
    rows = np.sort(np.concatenate([np.flatnonzero(y != MINORITY), kept]))
    return (x[rows], y[rows]), test


def _feature_extractor(size: int, quick: bool) -> keras.Model:
    if quick:
        return build_feature_extractor(
            "mobilenet_v3_small",
            weights=None,
            input_shape=(size, size, 3),
            alpha=0.75,
            minimalistic=True,
        )
    return build_feature_extractor("efficientnet_lite0", input_shape=(size, size, 3))


def head_classifier(feature_dim: int) -> keras.Model:
    """`build_image_classifier` on precomputed features: dropout and a softmax head.

    The backbone is an identity on `[feature_dim]` vectors, so the model is
    the head of a classifier whose frozen part ran once.

    Args:
        feature_dim: width of the feature vectors.

    Returns:
        A `keras.Model` from `build_image_classifier`.

    Example:

    >>> head_classifier(8).output_shape
    (None, 4)
    """
    identity = keras.Sequential(
        [keras.Input((feature_dim,)), keras.layers.Identity()], name="features"
    )
    return build_image_classifier(identity, len(CLASSES), weights=None)


def measure(seed: int, quick: bool = False) -> dict[str, float]:
    """Trains without and with `class_weight="balanced"`; returns every figure.

    EfficientNet-Lite0's pooled features (the frozen part that
    `cache_features` would compute) are computed once; the head trains on
    them with `fine_tune(recipe="feature_extraction")` in both runs, from the
    same initialisation, shuffle and epochs.

    Args:
        seed: initialisation, shuffle and minority-subset seed.
        quick: a smoke run (a tiny random model, 10 images per class, 1 epoch).

    Returns:
        `minority_recall_unweighted`, `minority_recall_balanced`,
        `minority_recall_gain`, `accuracy_unweighted`, `accuracy_balanced`
        and `minority_weight` (the balanced weight of the minority class).

    Example:

    >>> figures = measure(seed=0, quick=True)
    >>> set(TARGETS) <= set(figures)
    True
    """
    # The loaders' order of examples follows the global seed: fix it first.
    keras.utils.set_random_seed(seed)
    settings = QUICK if quick else FULL
    size = settings["size"]
    (x, y), (x_test, y_test) = imbalanced_fashion_mnist(
        seed,
        size=size,
        per_class=settings["per_class"],
        test_per_class=settings["test_per_class"],
    )
    extractor = _feature_extractor(size, quick)
    features = extractor.predict(x, batch_size=64, verbose=0)
    test = tf.data.Dataset.from_tensor_slices(
        (extractor.predict(x_test, batch_size=64, verbose=0), y_test)
    ).batch(64)
    figures = {}
    for name, class_weight in (("unweighted", None), ("balanced", "balanced")):
        keras.utils.set_random_seed(seed)
        model = head_classifier(features.shape[-1])
        history = fine_tune(
            model,
            (features, y),
            recipe="feature_extraction",
            epochs=settings["epochs"],
            class_weight=class_weight,
            seed=seed,
            verbose=0,
        )
        report = evaluate_classifier(model, test, list(CLASS_NAMES))
        figures[f"minority_recall_{name}"] = report["per_class"][MINORITY]["recall"]
        figures[f"accuracy_{name}"] = report["accuracy"]
        if class_weight:
            figures["minority_weight"] = history.params["class_weight"][MINORITY]
    figures["minority_recall_gain"] = (
        figures["minority_recall_balanced"] - figures["minority_recall_unweighted"]
    )
    return figures
