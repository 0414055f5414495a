"""Ensembles: several classifiers averaged inside ONE functional model.

`ensemble` builds `input -> [member_1, ..., member_n] -> weighted mean of
their probabilities`: one shared input (named and shaped as the members'),
each member nested whole as a layer (its preprocessing and augmentation
kept, so the ensemble takes raw pixels like its members), and a
`WeightedAverage` layer with the weights in its config. It is a plain
`keras.Model`: it saves to `.keras` (loads with `safe_mode=True`), evaluates,
and exports through `kt.export` as one SavedModel or one LiteRT file.

Weights:

* `"mean"`: every member `1 / n`.
* `"validation"`: from each member's accuracy `a_i` on the validation data,
  measured above chance (`1 / K` for `K` classes): `w_i = max(a_i - 1/K, 0) /
  sum_j max(a_j - 1/K, 0)`. A member no better than chance gets no weight,
  and the better members get more than in plain proportion to accuracy.
  When no member beats chance the weights are equal (with a warning).
* a list: one weight >= 0 per member (not all zero), normalised to sum 1.

Members are wrapped in functional models sharing their layers (no copy),
named after the member (made unique with `_1`, `_2`, ... where two share a
name).

Example:
>>> import keras, numpy as np, keras_transfer as kt
>>> def classifier(seed):
...     keras.utils.set_random_seed(seed)
...     inputs = keras.Input((4,), name="features")
...     head = keras.layers.Dense(3, activation="softmax", name="head")
...     return keras.Model(inputs, head(inputs), name="linear")
>>> members = [classifier(0), classifier(1)]
>>> model = kt.techniques.ensemble(members)
>>> [layer.name for layer in model.layers]
['features', 'linear', 'linear_1', 'average']
>>> x = np.random.rand(2, 4)
>>> mean = (members[0].predict(x, verbose=0) + members[1].predict(x, verbose=0)) / 2
>>> bool(np.abs(model.predict(x, verbose=0) - mean).max() < 1e-6)
True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

from keras_transfer.data.splits import suggest
from keras_transfer.training import as_dataset

WEIGHTINGS = ("mean", "validation")
AVERAGE_NAME = "average"


@keras.saving.register_keras_serializable(package="keras_transfer")
class WeightedAverage(keras.layers.Layer):
    """Weighted mean of same-shaped inputs: `sum_i w_i * x_i` (weights sum to 1).

    Args:
        member_weights: one weight >= 0 per input, normalised to sum 1.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:
    >>> import numpy as np
    >>> layer = WeightedAverage([3, 1])
    >>> layer.member_weights
    [0.75, 0.25]
    >>> layer([np.ones((1, 2)), np.zeros((1, 2))]).numpy().tolist()
    [[0.75, 0.75]]
    """

    def __init__(self, member_weights: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.member_weights = _normalised(member_weights)

    def call(self, inputs):
        if len(inputs) != len(self.member_weights):
            raise ValueError(
                f"WeightedAverage has {len(self.member_weights)} weights. "
                f"Received: {len(inputs)} inputs"
            )
        total = None
        for weight, value in zip(self.member_weights, inputs, strict=True):
            term = ops.multiply(ops.cast(value, self.compute_dtype), weight)
            total = term if total is None else ops.add(total, term)
        return total

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self) -> dict:
        return {**super().get_config(), "member_weights": list(self.member_weights)}


def _normalised(weights) -> list[float]:
    """Checks a list of weights (numbers >= 0, not all zero); returns them summing to 1."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, np.ndarray)):
        raise TypeError(
            "`weights` must be 'mean', 'validation' or a list of numbers. "
            f"Received: weights={weights!r}"
        )
    values = list(weights)
    numbers = all(
        not isinstance(w, bool) and isinstance(w, (int, float, np.number)) and math.isfinite(w)
        for w in values
    )
    if not numbers or any(w < 0 for w in values) or not sum(values) > 0:
        raise ValueError(
            "`weights` must be finite numbers >= 0, not all zero. "
            f"Received: weights={[float(w) if numbers else w for w in values]!r}"
        )
    total = float(sum(values))
    return [float(w) / total for w in values]


def _signature(model, index):
    """`(input structure of (shape, dtype), number of classes)` of a member, checked."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"Ensemble members must be keras.Model objects. Received: member {index} of type "
            f"{type(model).__name__}"
        )
    try:
        inputs, output = model.input, model.output
    except (AttributeError, ValueError):
        raise ValueError(
            "Ensemble members must be functional or Sequential models with known inputs. "
            f"Received: member {index} ({model.name!r}), a {type(model).__name__} without them"
        ) from None
    if not hasattr(output, "shape") or len(output.shape) != 2:
        raise ValueError(
            "Ensemble members must have one `[batch, classes]` output of probabilities. "
            f"Received: member {index} ({model.name!r}) with output {output!r}"
        )
    shapes = keras.tree.map_structure(lambda t: (tuple(t.shape[1:]), str(t.dtype)), inputs)
    return shapes, int(output.shape[-1])


def _check_members(models) -> list[keras.Model]:
    if isinstance(models, keras.Model) or not isinstance(models, Sequence):
        raise TypeError(
            f"`models` must be a list of keras.Model objects. Received: {type(models).__name__}"
        )
    members = list(models)
    if len(members) < 2:
        raise ValueError(f"An ensemble needs at least 2 members. Received: {len(members)} model(s)")
    signatures = [_signature(model, i) for i, model in enumerate(members)]
    for index, (inputs, classes) in enumerate(signatures[1:], start=1):
        if inputs != signatures[0][0]:
            raise ValueError(
                "Ensemble members must take the same inputs (one input feeds all). Received: "
                f"member 0 takes {signatures[0][0]}, member {index} takes {inputs}"
            )
        if classes != signatures[0][1]:
            raise ValueError(
                "Ensemble members must predict the same classes. Received: member 0 has "
                f"{signatures[0][1]} outputs, member {index} has {classes}"
            )
    if len({id(model) for model in members}) < len(members):
        raise ValueError("Ensemble members must be different models. Received: a model twice")
    owner = {}
    for index, model in enumerate(members):
        for variable in model.weights:
            first = owner.setdefault(id(variable), index)
            if first != index:
                # Keras saves a shared layer once and reloads it in one member only.
                raise ValueError(
                    "Ensemble members must not share layers (such as one backbone object): "
                    "the ensemble could not be reloaded from a .keras file. Build each member "
                    f"on its own. Received: members {first} and {index} share {variable.path!r}"
                )
    return members


def _labels(targets, num_classes: int) -> np.ndarray:
    targets = np.asarray(targets)
    if targets.ndim == 2 and targets.shape[-1] == num_classes and num_classes > 1:
        return targets.argmax(-1)  # one-hot
    return targets.reshape(-1).astype("int64")


def validation_accuracies(models: Sequence[keras.Model], validation) -> list[float]:
    """Each model's top-1 accuracy on validation data, in one pass over it.

    Args:
        models: classifiers with the same inputs and classes.
        validation: a tuple `(inputs, labels)` of arrays or a batched
            `tf.data.Dataset` of `(inputs, labels)`; integer or one-hot labels.

    Returns:
        One accuracy per model, in order.

    Example:
    >>> import keras, numpy as np
    >>> inputs = keras.Input((2,))
    >>> model = keras.Model(inputs, keras.layers.Softmax()(inputs))
    >>> validation_accuracies([model], (np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0])))
    [0.5]
    """
    num_classes = int(models[0].output.shape[-1])
    correct, total = np.zeros(len(models)), 0
    for batch in as_dataset(validation, name="validation"):
        inputs, labels = batch[0], _labels(batch[1], num_classes)
        total += len(labels)
        for index, model in enumerate(models):
            predicted = np.asarray(model(inputs, training=False)).argmax(-1)
            correct[index] += int(np.sum(predicted == labels))
    if total == 0:
        raise ValueError("The validation data is empty. Received: 0 examples")
    return [float(c) / total for c in correct]


def _validation_weights(members, validation) -> list[float]:
    chance = 1.0 / int(members[0].output.shape[-1])
    accuracies = validation_accuracies(members, validation)
    above = [max(accuracy - chance, 0.0) for accuracy in accuracies]
    if not sum(above) > 0:
        warnings.warn(
            f"No ensemble member beats chance ({chance:.3f}) on the validation data "
            f"(accuracies {accuracies}): the members get equal weights.",
            stacklevel=3,
        )
        return [1.0] * len(members)
    return above


def _unique_names(members) -> list[str]:
    taken = {
        AVERAGE_NAME,
        *keras.tree.flatten(keras.tree.map_structure(lambda t: t.name, members[0].input)),
    }
    names = []
    for model in members:
        name, suffix = model.name, 0
        while name in taken:
            suffix += 1
            name = f"{model.name}_{suffix}"
        taken.add(name)
        names.append(name)
    return names


def ensemble(
    models: Sequence[keras.Model],
    weights: str | Sequence[float] = "mean",
    validation=None,
    name: str = "ensemble",
) -> keras.Model:
    """One functional model averaging the members' probabilities (see the module docstring).

    Args:
        models: 2 or more classifiers with the same inputs (shapes, dtypes,
            names) and the same number of classes, each with one
            `[batch, classes]` output of probabilities (softmax or sigmoid
            heads). They are used, not copied: training a member later
            changes the ensemble.
        weights: `"mean"`, `"validation"` (needs `validation`), or one
            number >= 0 per member, normalised to sum 1.
        validation: `(inputs, labels)` arrays or a batched dataset, for
            `weights="validation"` only.
        name: the ensemble model's name.

    Returns:
        A functional `keras.Model` (uncompiled); the normalised weights are
        `model.get_layer("average").member_weights`.

    Raises:
        TypeError: `models` is not a list of models, or `weights` is of the
            wrong type.
        ValueError: fewer than 2 members, members with different inputs or
            classes, a weights list of the wrong length, negative or all
            zero, `"validation"` without validation data (or validation data
            with other weights).

    Example:
    >>> import keras_transfer as kt
    >>> small = kt.build_image_classifier("mobilenet_v3_small", 3, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> kt.techniques.ensemble([small, small], weights=[1, 2, 3])
    Traceback (most recent call last):
    ...
    ValueError: Ensemble members must be different models. Received: a model twice
    """
    members = _check_members(models)
    if isinstance(weights, str):
        if weights not in WEIGHTINGS:
            raise ValueError(
                f"`weights` must be one of {WEIGHTINGS} or a list of numbers."
                f"{suggest(weights, WEIGHTINGS)} Received: weights={weights!r}"
            )
        if weights == "validation" and validation is None:
            raise ValueError(
                "weights='validation' needs `validation` data to measure each member on. "
                "Received: validation=None"
            )
    else:
        _normalised(weights)
        if len(weights) != len(members):
            raise ValueError(
                f"`weights` needs one weight per member ({len(members)} members). "
                f"Received: {len(weights)} weights {list(weights)!r}"
            )
    if validation is not None and weights != "validation":
        raise ValueError(
            "`validation` is used only with weights='validation'. "
            f"Received: weights={weights!r} and validation data"
        )
    if weights == "mean":
        weights = [1.0] * len(members)
    elif weights == "validation":
        weights = _validation_weights(members, validation)
    inputs = keras.tree.map_structure(
        lambda t: keras.Input(shape=t.shape[1:], dtype=t.dtype, name=t.name), members[0].input
    )
    outputs = [
        keras.Model(model.input, model.output, name=member_name)(inputs)
        for model, member_name in zip(members, _unique_names(members), strict=True)
    ]
    average = WeightedAverage(weights, dtype="float32", name=AVERAGE_NAME)(outputs)
    return keras.Model(inputs, average, name=name)
