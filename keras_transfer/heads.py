"""Heads: the task-specific layer on top of pooled backbone features.

Each head kind knows its activation, its default loss and metrics, and what its
labels must look like, so recipes can compile a model from its head alone.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

# kind -> activation of the final Dense layer.
HEAD_ACTIVATIONS = {"softmax": "softmax", "multi_label": "sigmoid", "regression": None}
HEAD_TYPES = tuple(HEAD_ACTIVATIONS)
HEAD_NAME = "head"
# MediaPipe Model Maker's image classifier default; also in the Inception-v3
# paper ("Rethinking the Inception Architecture", Szegedy et al. 2016).
DEFAULT_LABEL_SMOOTHING = 0.1


def validate_head(head: str, num_classes: int) -> None:
    """Checks a head kind and its output size; raises `ValueError` naming the value."""
    if head not in HEAD_TYPES:
        raise ValueError(f"`head` must be one of {HEAD_TYPES}. Received: head={head!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(
            f"`num_classes` must be an integer >= 1. Received: num_classes={num_classes!r}"
        )
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    if head == "softmax" and num_classes < 2:
        raise ValueError(
            "`num_classes` must be >= 2 for a softmax head (use head='multi_label' "
            f"for one yes/no output). Received: num_classes={num_classes}"
        )


def make_head(head: str, num_classes: int, name: str = HEAD_NAME) -> keras.layers.Dense:
    """Returns the output layer for a head kind.

    The layer computes in float32 so mixed-precision models still output
    float32 probabilities.

    Args:
        head: one of `"softmax"`, `"multi_label"`, `"regression"`.
        num_classes: number of outputs (classes, labels or targets).
        name: layer name; `"head"` by default, the task name for multi-task.

    Returns:
        A `keras.layers.Dense`.

    Example:
    >>> from keras_transfer import make_head
    >>> make_head("multi_label", 4).activation.__name__
    'sigmoid'
    """
    validate_head(head, num_classes)
    return keras.layers.Dense(
        int(num_classes), activation=HEAD_ACTIVATIONS[head], dtype="float32", name=name
    )


def head_kind(layer: keras.layers.Layer) -> str:
    """Returns the head kind of an output `Dense` layer from its activation."""
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    for kind, name in HEAD_ACTIVATIONS.items():
        if activation == (name or "linear"):
            return kind
    raise ValueError(
        f"Cannot tell the head kind of layer {layer.name!r}: its activation must be "
        f"softmax, sigmoid or linear. Received: activation={activation!r}"
    )


@keras.saving.register_keras_serializable(package="keras_transfer")
class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
    """Categorical cross-entropy on integer labels, with label smoothing.

    Keras' `SparseCategoricalCrossentropy` has no `label_smoothing`; this loss
    one-hot encodes integer labels (one-hot labels are used as they are) and
    applies it.

    Args:
        label_smoothing: float in [0, 1); 0.1 spreads 10% of the target mass
            uniformly over the classes.
        **kwargs: standard loss arguments (`name`, `reduction`).

    Example:
    >>> import numpy as np
    >>> from keras_transfer import SparseCategoricalCrossentropyWithSmoothing
    >>> loss = SparseCategoricalCrossentropyWithSmoothing(label_smoothing=0.0)
    >>> round(float(loss(np.array([0]), np.array([[0.5, 0.5]]))), 4)
    0.6931
    """

    def __init__(
        self,
        label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
        name: str = "sparse_categorical_crossentropy_with_smoothing",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"`label_smoothing` must be in [0, 1). Received: label_smoothing={label_smoothing}"
            )
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        num_classes = y_pred.shape[-1]
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == num_classes:
            one_hot = ops.cast(y_true, y_pred.dtype)
        else:
            labels = ops.reshape(ops.cast(y_true, "int32"), ops.shape(y_pred)[:-1])
            one_hot = ops.one_hot(labels, num_classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        config = super().get_config()
        config.update({"label_smoothing": self.label_smoothing})
        return config


def default_loss(kind: str, label_smoothing: float = DEFAULT_LABEL_SMOOTHING):
    """Returns the loss a recipe compiles for a head kind."""
    if kind == "softmax":
        return SparseCategoricalCrossentropyWithSmoothing(label_smoothing)
    if kind == "multi_label":
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.MeanSquaredError()


def default_metrics(kind: str) -> list:
    """Returns the metrics a recipe compiles for a head kind."""
    if kind == "softmax":
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if kind == "multi_label":
        return [
            keras.metrics.BinaryAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
        ]
    return [keras.metrics.MeanAbsoluteError(name="mae")]


def check_labels(kind: str, num_classes: int, label_shape, label_dtype) -> None:
    """Checks that labels fit a head kind; raises `ValueError` naming what was seen.

    Args:
        kind: head kind.
        num_classes: number of head outputs.
        label_shape: shape of one batch of labels (first dim may be None).
        label_dtype: dtype of the labels (anything `np.dtype` accepts).
    """
    shape = tuple(label_shape)
    if kind == "multi_label" and (len(shape) < 2 or shape[-1] != num_classes):
        raise ValueError(
            "A multi_label head needs multi-hot labels of shape "
            f"(batch, {num_classes}) (one 0/1 column per label), not class indices. "
            f"Received: labels of shape {shape} and dtype {np.dtype(label_dtype).name}"
        )
    if kind == "softmax":
        one_hot = len(shape) >= 2 and shape[-1] == num_classes and num_classes > 1
        if not one_hot and not np.issubdtype(np.dtype(label_dtype), np.integer):
            raise ValueError(
                "A softmax head needs integer class indices (or one-hot rows of "
                f"length {num_classes}). Received: labels of shape {shape} and dtype "
                f"{np.dtype(label_dtype).name}"
            )
