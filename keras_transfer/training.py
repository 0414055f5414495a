"""What every training stage is made of: checked options, data, strategy, losses per head.

The pieces `fit_stage` and `fine_tune` share, public so that a technique with
its own train step (distillation, domain adaptation) checks and prepares its
inputs the same way: `prepare_training` validates every option and turns
arrays into a shuffled `tf.data` pipeline; `compile_arguments` fills in the
loss and metrics of each head; `resolve_strategy` finds the
`tf.distribute.Strategy` a model belongs to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.distribute import shard_by_data
from keras_transfer.heads import (
    DEFAULT_LABEL_SMOOTHING,
    check_labels,
    default_loss,
    default_metrics,
    head_kind,
)
from keras_transfer.missing_labels import (
    check_missing_labels,
    masked_default_loss,
    masked_default_metrics,
)
from keras_transfer.optimizers import DEFAULT_LR_SPREAD, DEFAULT_WEIGHT_DECAY

DEFAULT_PATIENCE = 3
DEFAULT_BATCH_SIZE = 32
LR_SCALING = (None, "linear")
# `loss_weights` that are learned, not given: Kendall et al. 2018's
# uncertainty weighting (`techniques.multitask.UncertaintyWeighting`).
UNCERTAINTY = "uncertainty"


def check_number(name, value, low, high=None, *, optional=False, integer=False) -> None:
    """Checks that `value` is a number in `[low, high)` (or None when optional).

    Args:
        name: the argument's name, for the error.
        value: the value.
        low: the smallest value allowed.
        high: the bound above (excluded), or None.
        optional: None is allowed.
        integer: only integers are allowed.

    Returns:
        None.

    Example:

    >>> check_number("batch_size", 0, 1, integer=True)
    Traceback (most recent call last):
    ...
    ValueError: `batch_size` must be an integer >= 1. Received: batch_size=0
    """
    if value is None and optional:
        return
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    ok = not isinstance(value, bool) and isinstance(value, kinds) and value >= low
    if ok and high is not None:
        ok = value < high
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        allowed = f"None or {kind} {bound}" if optional else f"{kind} {bound}"
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")


def positive_number(value) -> bool:
    """Whether `value` is a real number > 0 (bools excluded).

    Args:
        value: anything.

    Returns:
        True for a positive int or float.

    Example:

    >>> positive_number(1e-3), positive_number(True), positive_number(0)
    (True, False, False)
    """
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


def resolve_strategy(model: keras.Model, strategy=None) -> tf.distribute.Strategy:
    """The strategy a model trains under; checks that its variables belong to it.

    Args:
        model: a Keras model.
        strategy: a `tf.distribute.Strategy`, or None for the one the model
            was built under (the current one when it was built outside any).

    Returns:
        The strategy.

    Raises:
        ValueError: the model was built under another strategy (or none):
            build it with `strategy=` (or inside `strategy.scope()`).

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> resolve_strategy(model) is tf.distribute.get_strategy()
    True
    """
    built_under = model.distribute_strategy
    if strategy is None:
        return built_under
    if not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            f"`strategy` must be a tf.distribute.Strategy. Received: {type(strategy).__name__}"
        )
    if built_under is not strategy:
        raise ValueError(
            f"The model was built outside `strategy.scope()` of the {type(strategy).__name__} "
            "given, so its variables are not distributed: build it with `strategy=` "
            "(kt.build_image_classifier(..., strategy=strategy)) or inside the scope."
        )
    return strategy


def _global_batch(batch_size, strategy):
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(
            f"`batch_size` is the global batch and must divide evenly over the {replicas} "
            f"replicas of the strategy. Received: batch_size={batch_size}"
        )


def as_dataset(data, batch_size: int = DEFAULT_BATCH_SIZE, *, seed: int = 0, name: str = "train"):
    """A batched `tf.data.Dataset` from a dataset (kept) or a tuple of arrays.

    Arrays are shuffled every epoch with a seeded shuffle when `name` is
    `"train"` (as Keras `fit` shuffles arrays); other splits keep their order.

    Args:
        data: a batched `tf.data.Dataset`, a tuple `(x, y)` of arrays (`y` may
            be a dict keyed by output name), or None.
        batch_size: the global batch size for arrays.
        seed: seed of the shuffle.
        name: `"train"`, `"validation"`, ...: named in errors.

    Returns:
        The dataset, or None for None.

    Example:

    >>> import numpy as np
    >>> data = as_dataset((np.arange(6.0), np.arange(6) % 2), batch_size=4)
    >>> [int(x.shape[0]) for x, _ in data]
    [4, 2]
    """
    if data is None:
        return None
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        count = len(data[0])
        dataset = tf.data.Dataset.from_tensor_slices(data)
        if name == "train":
            dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
        return dataset.batch(batch_size)
    raise TypeError(
        f"`{name}` must be a batched tf.data.Dataset of (inputs, targets) or a tuple "
        f"(inputs, targets) of arrays. Received: {type(data).__name__}"
    )


def output_heads(model: keras.Model) -> dict[str, keras.layers.Layer]:
    """The model's output layers by output name (one entry for a single head).

    Args:
        model: a functional model.

    Returns:
        `{output name: layer}` in output order.

    Example:

    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, {"color": keras.layers.Dense(3, name="color")(inputs),
    ...                              "size": keras.layers.Dense(1, name="size")(inputs)})
    >>> list(output_heads(model))
    ['color', 'size']
    """
    names = getattr(model, "output_names", None) or [model.layers[-1].name]
    return {name: model.get_layer(name) for name in names}


def compile_arguments(
    model: keras.Model,
    targets_spec=None,
    *,
    loss=None,
    metrics=None,
    loss_weights=None,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
) -> dict:
    """`loss`, `metrics` and `loss_weights` for `compile`, defaults per head filled in.

    A head whose loss is not given gets the loss of its kind (softmax:
    sparse cross-entropy with label smoothing; multi-label: binary
    cross-entropy; regression: mean squared error) and its targets are
    checked against that kind. With several heads, `loss` and `metrics` may
    be dicts keyed by output name (missing heads get their defaults), and
    the default losses and metrics skip missing labels (-1 for a class, NaN
    for a float target: `keras_transfer.missing_labels`).

    Args:
        model: the model to compile.
        targets_spec: the dataset's target `element_spec` (a `TensorSpec`, or
            a dict of them for several heads); None skips the checks.
        loss: None, a loss for every head, or a dict by output name.
        metrics: None (defaults), a list, or a dict by output name.
        loss_weights: None, a dict by output name / a list, or
            `"uncertainty"` for a model that learns them
            (`techniques.multitask.UncertaintyWeighting`).
        label_smoothing: for the default softmax and multi-label losses.

    Returns:
        `{"loss": ..., "metrics": ..., "loss_weights": ...}`.

    Example:

    >>> import keras
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    >>> type(compile_arguments(model)["loss"]).__name__
    'SparseCategoricalCrossentropyWithSmoothing'
    """
    heads = output_heads(model)
    single = len(heads) == 1
    if single:
        name = next(iter(heads))
        given_loss = {name: loss} if loss is not None else {}
        given_metrics = {name: metrics} if metrics is not None else {}
        specs = {name: targets_spec}
    else:
        given_loss = _by_output("loss", loss, heads)
        given_metrics = _by_output("metrics", metrics, heads)
        specs = dict(targets_spec) if isinstance(targets_spec, Mapping) else {}
        if targets_spec is not None and not isinstance(targets_spec, Mapping):
            raise ValueError(
                f"A model with several heads {list(heads)} needs targets as a dict keyed by "
                f"output name. Received: targets of spec {targets_spec}"
            )
        missing = [name for name in heads if targets_spec is not None and name not in specs]
        if missing:
            raise ValueError(
                f"Targets are missing for heads {missing}. Received: targets for {list(specs)}"
            )
    losses, metric_lists = {}, {}
    for name, layer in heads.items():
        if name in given_loss:
            losses[name] = given_loss[name]
            # Any output layer may take a given loss; default metrics need a known kind.
            try:
                kind = head_kind(layer)
            except ValueError:
                kind = None
        else:
            kind = head_kind(layer)
            spec = specs.get(name)
            if spec is not None:
                check_labels(kind, layer.units, spec.shape, spec.dtype.as_numpy_dtype)
            losses[name] = (
                default_loss(kind, label_smoothing)
                if single
                else masked_default_loss(kind, label_smoothing)
            )
        if name in given_metrics:
            metric_lists[name] = given_metrics[name]
        elif kind:
            metric_lists[name] = default_metrics(kind) if single else masked_default_metrics(kind)
        else:
            metric_lists[name] = []
    if loss_weights is not None:
        if single:
            raise ValueError(
                "`loss_weights` is for models with several heads. "
                f"Received: loss_weights={loss_weights!r}"
            )
        if isinstance(loss_weights, str):
            _check_learned_weights(model, loss_weights)
        else:
            _by_output("loss_weights", loss_weights, heads)
    if single:
        name = next(iter(heads))
        return {"loss": losses[name], "metrics": metric_lists[name], "loss_weights": None}
    return {"loss": losses, "metrics": metric_lists, "loss_weights": loss_weights}


def _check_learned_weights(model, loss_weights):
    if loss_weights != UNCERTAINTY:
        raise ValueError(
            f"`loss_weights` must be a dict by output name, a list, or {UNCERTAINTY!r}. "
            f"Received: loss_weights={loss_weights!r}"
        )
    if not getattr(model, "learns_loss_weights", False):
        raise ValueError(
            f"loss_weights={UNCERTAINTY!r} learns a weight per head while training: "
            "`fine_tune` trains through kt.techniques.multitask.UncertaintyWeighting(model); "
            "with `fit_stage`, make that wrapper once and pass it to every stage. "
            f"Received: model {model.name!r} of type {type(model).__name__}"
        )


def _check_target_values(model, data):
    """Targets given as arrays, several heads: each holds labels or its missing-label sentinel."""
    heads = output_heads(model)
    if len(heads) < 2 or not isinstance(data, tuple) or not isinstance(data[1], Mapping):
        return
    for name, layer in heads.items():
        if name in data[1]:
            try:
                kind = head_kind(layer)
            except ValueError:  # a custom output layer: nothing known to check
                continue
            check_missing_labels(name, kind, layer.units, data[1][name])


def _by_output(argument, value, heads):
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        if argument == "loss_weights" and isinstance(value, Sequence):
            if len(value) != len(heads):
                raise ValueError(
                    f"`loss_weights` needs one weight per head {list(heads)}. "
                    f"Received: loss_weights={value!r}"
                )
            return dict(zip(heads, value, strict=True))
        return dict.fromkeys(heads, value)
    unknown = sorted(set(value) - set(heads))
    if unknown:
        raise ValueError(
            f"`{argument}` keys must be output names {list(heads)}. Received: {unknown}"
        )
    return dict(value)


def _steps(dataset, steps_per_epoch):
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    cardinality = int(dataset.cardinality())
    if cardinality < 1:
        raise ValueError(
            "The training dataset has unknown or infinite length; pass "
            f"`steps_per_epoch`. Received: cardinality={cardinality}"
        )
    return cardinality


@dataclasses.dataclass(frozen=True)
class TrainingInputs:
    """What `prepare_training` returns: data, strategy and step counts, all checked.

    Args:
        train: the batched training dataset.
        validation: the batched validation dataset, or None.
        strategy: the `tf.distribute.Strategy` to train under.
        steps: training steps per epoch.
        lr_scale: the LR multiplier of the linear scaling rule (1: off).
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    strategy: tf.distribute.Strategy
    steps: int
    lr_scale: float


def prepare_training(
    model: keras.Model,
    train,
    validation=None,
    *,
    loss=None,
    metrics=None,
    loss_weights=None,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    lr_spread: float = DEFAULT_LR_SPREAD,
    lr_scaling: str | None = None,
    patience: int | None = DEFAULT_PATIENCE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps_per_epoch: int | None = None,
    strategy: tf.distribute.Strategy | None = None,
    seed: int = 0,
) -> TrainingInputs:
    """Checks every training option and prepares the data, before any step runs.

    Args:
        model: the model to train.
        train: a batched `tf.data.Dataset` or a tuple of arrays (shuffled
            every epoch with `seed`).
        validation: the same, or None.
        loss, metrics, loss_weights: see `compile_arguments`.
        weight_decay: >= 0.
        label_smoothing: in [0, 1).
        lr_spread: >= 1.
        lr_scaling: one of `LR_SCALING`.
        patience: None or an integer >= 0.
        batch_size: the global batch, an integer >= 1 that divides over the
            strategy's replicas.
        steps_per_epoch: None or an integer >= 1 (needed for data of unknown
            length).
        strategy: see `resolve_strategy`.
        seed: seed of the array shuffle.

    Returns:
        A `TrainingInputs`.

    Raises:
        ValueError: a bad value, named with `Received:`.

    Example:

    >>> import numpy as np
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    >>> inputs = prepare_training(model, (np.zeros((10, 3)), np.arange(10) % 2), batch_size=4)
    >>> inputs.steps, inputs.lr_scale
    (3, 1.0)
    """
    check_number("weight_decay", weight_decay, 0)
    check_number("label_smoothing", label_smoothing, 0, 1)
    check_number("lr_spread", lr_spread, 1)
    check_number("patience", patience, 0, optional=True, integer=True)
    check_number("batch_size", batch_size, 1, integer=True)
    check_number("steps_per_epoch", steps_per_epoch, 1, optional=True, integer=True)
    if lr_scaling not in LR_SCALING:
        raise ValueError(
            f"`lr_scaling` must be one of {LR_SCALING}. Received: lr_scaling={lr_scaling!r}"
        )
    strategy = resolve_strategy(model, strategy)
    _global_batch(batch_size, strategy)
    _check_target_values(model, train)
    _check_target_values(model, validation)
    train = shard_by_data(as_dataset(train, batch_size, seed=seed, name="train"))
    validation = as_dataset(validation, batch_size, seed=seed, name="validation")
    if validation is not None:
        validation = shard_by_data(validation)
    compile_arguments(
        model,
        train.element_spec[1],
        loss=loss,
        metrics=metrics,
        loss_weights=loss_weights,
        label_smoothing=label_smoothing,
    )
    return TrainingInputs(
        train=train,
        validation=validation,
        strategy=strategy,
        steps=_steps(train, steps_per_epoch),
        lr_scale=float(strategy.num_replicas_in_sync) if lr_scaling == "linear" else 1.0,
    )
