"""Class weights for imbalanced data: `fine_tune(..., class_weight="balanced" | dict)`.

A class weight multiplies the loss of every example of that class (Keras
`fit(class_weight=...)` turns it into per-example sample weights), so rare
classes count as much as common ones. `"balanced"` is scikit-learn's formula,
`n_samples / (n_classes * count_c)`: a class with a tenth of the examples of
the others gets ten times their weight, and a balanced set gets 1 everywhere.
Keras applies class weights to single-output models only, and a class weight
needs one class per example: one softmax head.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.heads import head_kind
from keras_transfer.training import output_heads

CLASS_WEIGHT_MODES = ("balanced",)


def _label_array(labels) -> np.ndarray:
    """Integer class labels from labels, one-hot rows, or a dataset's targets (read once)."""
    if isinstance(labels, tf.data.Dataset):
        parts = [np.asarray(y) for y in labels.map(lambda *batch: batch[1])]
        labels = np.concatenate(parts) if parts else np.zeros((0,), "int64")
    labels = np.asarray(labels)
    if labels.ndim > 1 and labels.shape[-1] > 1:
        return labels.argmax(-1).reshape(-1)
    return np.rint(labels).astype("int64").reshape(-1)


def class_weights(labels, mode: str = "balanced", num_classes: int | None = None):
    """Per-class weights from the training labels: `n_samples / (n_classes * count_c)`.

    scikit-learn's `compute_class_weight("balanced", ...)` formula.

    Args:
        labels: integer labels `[n]` (or `[n, 1]`), one-hot rows `[n, C]`,
            or a batched `tf.data.Dataset` of `(inputs, labels)` (its labels
            are read once).
        mode: `"balanced"`.
        num_classes: the number of classes (default: the largest label + 1).

    Returns:
        `{class index: weight}` for every class.

    Raises:
        ValueError: a label outside `[0, num_classes)`, or a class with no
            example (its weight would be infinite).

    Example:
    >>> class_weights([0] * 10 + [1] * 10 + [2] * 2)
    {0: 0.7333333333333333, 1: 0.7333333333333333, 2: 3.6666666666666665}
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"`mode` must be one of {CLASS_WEIGHT_MODES}. Received: mode={mode!r}")
    labels = _label_array(labels)
    if labels.size == 0:
        raise ValueError("`labels` must hold at least one label. Received: 0 labels")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    outside = sorted({int(v) for v in labels if not 0 <= v < num_classes})
    if outside:
        raise ValueError(
            f"Labels must be class indices in [0, {num_classes - 1}]. Received: labels {outside}"
        )
    counts = np.bincount(labels, minlength=num_classes)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        raise ValueError(
            f"class_weight='balanced' needs examples of every class (a class with none would "
            f"get an infinite weight); pass a dict instead. Received: no labels of class(es) "
            f"{missing}"
        )
    return {c: float(labels.size / (num_classes * counts[c])) for c in range(num_classes)}


def _check_model(model: keras.Model, class_weight) -> int:
    """The number of classes of the model's one softmax head."""
    heads = output_heads(model)
    if len(heads) != 1:
        raise ValueError(
            "`class_weight` needs a model with one head: Keras weighs the examples of "
            "single-output models only. For several heads, weigh each head's loss (`loss` "
            f"per head, `loss_weights`). Received: class_weight={class_weight!r} with heads "
            f"{list(heads)}"
        )
    name, layer = next(iter(heads.items()))
    try:
        kind = head_kind(layer)
    except ValueError:
        kind = None
    if kind != "softmax":
        raise ValueError(
            "`class_weight` weighs each example by its one class, which needs a softmax head "
            "(a multi-label or regression head has none). Received: "
            f"class_weight={class_weight!r} with head {name!r} of kind {kind!r}"
        )
    return int(layer.units)


def resolve_class_weight(model: keras.Model, train, class_weight) -> dict[int, float] | None:
    """Checks `class_weight` against a model and computes `"balanced"` weights from `train`.

    Args:
        model: a model with one softmax head.
        train: the training data: a tuple `(x, labels)` or a batched
            `tf.data.Dataset` (read once for `"balanced"`).
        class_weight: None, `"balanced"`, or `{class index: weight > 0}`
            (classes left out get 1, as in Keras).

    Returns:
        `{class index: weight}` for every class, or None.

    Raises:
        ValueError: an unknown mode, keys that are not classes, weights that
            are not > 0, or a model with several heads or a head without
            classes.

    Example:
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((2,)),
    ...                           keras.layers.Dense(3, activation="softmax", name="head")])
    >>> resolve_class_weight(model, None, {2: 5})
    {0: 1.0, 1: 1.0, 2: 5.0}
    """
    if class_weight is None:
        return None
    if isinstance(class_weight, str):
        if class_weight not in CLASS_WEIGHT_MODES:
            close = difflib.get_close_matches(class_weight, CLASS_WEIGHT_MODES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                "`class_weight` must be 'balanced', a dict {class index: weight > 0} or None."
                f"{hint} Received: class_weight={class_weight!r}"
            )
        num_classes = _check_model(model, class_weight)
        labels = train if isinstance(train, tf.data.Dataset) else train[1]
        return class_weights(labels, class_weight, num_classes)
    if not isinstance(class_weight, Mapping):
        raise TypeError(
            "`class_weight` must be 'balanced', a dict {class index: weight > 0} or None. "
            f"Received: class_weight={class_weight!r}"
        )
    num_classes = _check_model(model, class_weight)
    bad_keys = [
        key
        for key in class_weight
        if isinstance(key, bool)
        or not isinstance(key, (int, np.integer))
        or not 0 <= key < num_classes
    ]
    if bad_keys:
        raise ValueError(
            f"`class_weight` keys must be class indices in [0, {num_classes - 1}] (the head "
            f"has {num_classes} classes). Received: keys that are not classes {bad_keys}"
        )
    bad_values = {
        key: value
        for key, value in class_weight.items()
        if isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(value)
        or value <= 0
    }
    if bad_values:
        raise ValueError(
            f"`class_weight` values must be finite numbers > 0. Received: {bad_values}"
        )
    return {c: float(class_weight.get(c, 1.0)) for c in range(num_classes)}


def format_class_weights(weights: Mapping[int, float], class_names=None) -> str:
    """One line: `class_weight: 0=0.55, 1=0.55, 2=5.5` (names when given).

    Args:
        weights: `{class index: weight}`.
        class_names: optional names, `class_names[i]` for class `i`.

    Returns:
        The line.

    Example:
    >>> format_class_weights({0: 0.55, 1: 5.5}, ["cat", "dog"])
    'class_weight: cat=0.55, dog=5.5'
    """
    names = class_names or [str(c) for c in weights]
    return "class_weight: " + ", ".join(f"{names[c]}={w:.4g}" for c, w in weights.items())
