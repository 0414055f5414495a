"""Missing labels: the sentinels, and the losses and metrics that skip them.

A multi-task dataset rarely has every label for every example. A missing
label is written as a sentinel in the targets of that head:

- class indices (softmax heads): `MISSING_CLASS`, -1;
- float targets (multi-label 0/1 columns, regression values, one-hot rows):
  NaN. For multi-label and regression heads each entry is masked on its own
  (an example may miss some of its labels); a one-hot row with a NaN is a
  missing example.

`MaskedLoss` wraps a head's loss so that a masked entry contributes exactly
zero loss and zero gradient; the loss is the mean over the entries that have
a label (as PyTorch's `CrossEntropyLoss(ignore_index=-1)` and Keras' own
masks do), and 0 for a batch with none. `MaskedMetric` does the same for a
metric (a masked entry gets sample weight 0). Multi-head models compile with
these by default (`training.compile_arguments`).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from keras_transfer.heads import DEFAULT_LABEL_SMOOTHING, default_loss, default_metrics

# The class index that marks a missing label (float targets use NaN).
MISSING_CLASS = -1
# Reductions for which the loss is the mean over the labelled entries.
_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")


def _labelled(y_true, y_pred, elementwise):
    """`(present, clean)`: which labels are present, and labels safe to compute on.

    Missing labels are replaced by 0 in `clean`, so the wrapped loss stays
    finite there (a NaN, even multiplied by 0, would poison the gradient).
    """
    y_true = ops.convert_to_tensor(y_true)
    if elementwise:
        present = ops.logical_not(ops.isnan(y_true))
        return present, ops.where(present, y_true, ops.zeros_like(y_true))
    if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1]:
        # One-hot rows: a NaN anywhere in the row marks the example missing.
        present = ops.logical_not(ops.any(ops.isnan(y_true), axis=-1))
        return present, ops.where(present[..., None], y_true, ops.zeros_like(y_true))
    labels = ops.reshape(y_true, ops.shape(y_pred)[:-1])
    present = labels >= 0  # False for NaN too
    return present, ops.where(present, labels, ops.zeros_like(labels))


@keras.saving.register_keras_serializable(package="keras_transfer")
class MaskedLoss(keras.losses.Loss):
    """A head's loss that skips missing labels (the module's sentinels).

    Args:
        loss: the wrapped loss: a `keras.losses.Loss`, or its class name
            (`"MeanSquaredError"`); its `call` must give one value per
            example (class heads) or per entry when called on `[..., 1]`
            columns (`elementwise`: binary cross-entropy, squared or
            absolute error, Huber, ...).
        elementwise: False for class heads (a class index, or a one-hot row,
            per example; -1 or a NaN row is missing); True for multi-label
            and regression heads (each NaN entry is missing).
        name: the loss name (default: `masked_<wrapped name>`).
        reduction: `"sum_over_batch_size"` (default: the mean over the
            labelled entries), `"sum"` or `"none"` (masked entries 0).

    Example:

    >>> import numpy as np
    >>> loss = MaskedLoss(keras.losses.SparseCategoricalCrossentropy())
    >>> p = np.array([[0.5, 0.5], [0.9, 0.1]])
    >>> round(float(loss(np.array([0, -1]), p)), 4)  # the second label is missing
    0.6931
    """

    def __init__(
        self,
        loss,
        elementwise: bool = False,
        name: str | None = None,
        reduction: str = "sum_over_batch_size",
        **kwargs,
    ):
        loss = keras.losses.get(loss)
        if not isinstance(loss, keras.losses.Loss):
            raise TypeError(
                "`loss` must be a keras.losses.Loss or its class name (e.g. 'MeanSquaredError'), "
                f"whose `call` gives unreduced values. Received: loss={loss!r}"
            )
        if isinstance(loss, MaskedLoss):
            raise ValueError(f"`loss` is masked already. Received: loss={loss.name!r}")
        if not isinstance(elementwise, bool):
            raise TypeError(
                f"`elementwise` must be True or False. Received: elementwise={elementwise!r}"
            )
        super().__init__(name=name or f"masked_{loss.name}", reduction=reduction, **kwargs)
        self.loss = loss
        self.elementwise = elementwise

    def call(self, y_true, y_pred):
        present, clean = _labelled(y_true, y_pred, self.elementwise)
        if self.elementwise:
            values = self.loss.call(clean[..., None], y_pred[..., None])
        else:
            values = self.loss.call(clean, y_pred)
        values = ops.where(present, values, ops.zeros_like(values))
        if self.reduction in _MEAN_REDUCTIONS:
            # The reduction divides by every entry; rescale so it divides by
            # the labelled ones only (Keras' `apply_mask` does the same).
            total = ops.cast(ops.size(present), values.dtype)
            count = ops.sum(ops.cast(present, values.dtype))
            values = values * ops.divide_no_nan(total, count)
        return values

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "loss": keras.saving.serialize_keras_object(self.loss),
                "elementwise": self.elementwise,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["loss"] = keras.saving.deserialize_keras_object(config["loss"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_transfer")
class MaskedMetric(keras.metrics.Metric):
    """A metric that skips missing labels: masked entries get sample weight 0.

    It keeps the wrapped metric's name, so a head's history keys stay
    `<head>_accuracy`, `<head>_auc`, ...

    Args:
        metric: the wrapped `keras.metrics.Metric`, or a name Keras knows.
        elementwise: as in `MaskedLoss` (True for multi-label and regression
            heads).
        name: default: the wrapped metric's name.

    Example:

    >>> import numpy as np
    >>> accuracy = MaskedMetric(keras.metrics.SparseCategoricalAccuracy())
    >>> accuracy.update_state(np.array([0, -1, 1]), np.array([[0.9, 0.1]] * 3))
    >>> float(accuracy.result())  # 1 right of 2 labelled
    0.5
    """

    def __init__(self, metric, elementwise: bool = False, name: str | None = None, **kwargs):
        metric = keras.metrics.get(metric)
        if not isinstance(metric, keras.metrics.Metric):
            raise TypeError(
                f"`metric` must be a keras.metrics.Metric (or a name of one). Received: {metric!r}"
            )
        if not isinstance(elementwise, bool):
            raise TypeError(
                f"`elementwise` must be True or False. Received: elementwise={elementwise!r}"
            )
        super().__init__(name=name or metric.name, **kwargs)
        self.metric = metric
        self.elementwise = elementwise

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.convert_to_tensor(y_pred)
        present, clean = _labelled(y_true, y_pred, self.elementwise)
        weight = ops.cast(present, y_pred.dtype)
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, y_pred.dtype)
            if self.elementwise and len(sample_weight.shape) < len(weight.shape):
                sample_weight = ops.expand_dims(sample_weight, -1)
            weight = weight * sample_weight
        if self.elementwise:
            clean, y_pred, weight = clean[..., None], y_pred[..., None], weight[..., None]
        self.metric.update_state(clean, y_pred, sample_weight=weight)

    def result(self):
        return self.metric.result()

    def reset_state(self):
        self.metric.reset_state()

    def get_config(self):
        return {
            "name": self.name,
            "dtype": self.dtype,
            "metric": keras.saving.serialize_keras_object(self.metric),
            "elementwise": self.elementwise,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["metric"] = keras.saving.deserialize_keras_object(config["metric"])
        return cls(**config)


def masked_default_loss(kind: str, label_smoothing: float = DEFAULT_LABEL_SMOOTHING) -> MaskedLoss:
    """The default loss of a head kind (`heads.default_loss`), skipping missing labels.

    Args:
        kind: `"softmax"`, `"multi_label"` or `"regression"`.
        label_smoothing: for the softmax and multi-label losses.

    Returns:
        A `MaskedLoss`.

    Example:

    >>> masked_default_loss("regression").elementwise
    True
    """
    return MaskedLoss(default_loss(kind, label_smoothing), elementwise=kind != "softmax")


def masked_default_metrics(kind: str) -> list:
    """The default metrics of a head kind (`heads.default_metrics`), skipping missing labels.

    Args:
        kind: `"softmax"`, `"multi_label"` or `"regression"`.

    Returns:
        A list of `MaskedMetric`.

    Example:

    >>> [metric.name for metric in masked_default_metrics("multi_label")]
    ['accuracy', 'auc']
    """
    return [MaskedMetric(metric, elementwise=kind != "softmax") for metric in default_metrics(kind)]


def check_missing_labels(name: str, kind: str, num_classes: int, labels) -> None:
    """Checks one head's target values, sentinels included; raises naming the bad value.

    Class indices must be in `[0, num_classes)` or `MISSING_CLASS` (-1).
    Float targets may be NaN (missing); multi-label entries must otherwise
    be in [0, 1] (integer multi-hot labels cannot hold NaN, so a -1 in them
    is refused: it would be read as a label), and regression values finite.

    Args:
        name: the head (task) name, for the error.
        kind: the head kind.
        num_classes: the head's outputs.
        labels: the head's targets, an array.

    Returns:
        None.

    Raises:
        ValueError: a value that is neither a label nor the head's sentinel.

    Example:

    >>> check_missing_labels("coarse", "softmax", 4, np.array([0, 3, -1]))
    >>> check_missing_labels("coarse", "softmax", 4, np.array([0, -2]))
    Traceback (most recent call last):
    ...
    ValueError: Targets of 'coarse' must be class indices in [0, 4), or -1 for a missing label. Received: -2
    """
    labels = np.asarray(labels)
    if kind == "softmax" and np.issubdtype(labels.dtype, np.integer):
        bad = labels[(labels != MISSING_CLASS) & ((labels < 0) | (labels >= num_classes))]
        if bad.size:
            raise ValueError(
                f"Targets of {name!r} must be class indices in [0, {num_classes}), or "
                f"{MISSING_CLASS} for a missing label. Received: {bad.flat[0]}"
            )
        return
    if not np.issubdtype(labels.dtype, np.floating):
        if kind == "multi_label" and np.any(labels == MISSING_CLASS):
            raise ValueError(
                f"Targets of {name!r} (a multi_label head) mark a missing entry with NaN, "
                f"not {MISSING_CLASS}: cast them to float32. Received: {MISSING_CLASS}"
            )
        return
    values = labels[~np.isnan(labels)]
    if kind == "multi_label":
        bad, allowed = values[(values < 0) | (values > 1)], "0 to 1"
    else:
        bad, allowed = values[np.isinf(values)], "finite"
    if bad.size:
        raise ValueError(
            f"Targets of {name!r} must be {allowed}, or NaN for a missing label. "
            f"Received: {float(bad.flat[0]):g}"
        )
