"""Multi-task learning: one shared backbone, one named head per task.

`build_multitask_model` builds `image -> [augmentation] -> [preprocessing] ->
backbone -> pooling -> dropout -> {task: head}` (the trunk of
`build_image_classifier`), a plain functional model whose outputs are a dict
keyed by task name. The recipes train it as they train any model: `fine_tune`
compiles a loss per head (the head kind's default, skipping missing labels:
-1 for a class, NaN for a float target, see `keras_transfer.missing_labels`),
reads dict targets `{task: labels}`, reports `<task>_loss` and
`<task>_accuracy` (or `_auc`, `_mae`) per epoch, and weights the heads'
losses by `loss_weights`: a dict by task, or `"uncertainty"`.

Uncertainty weighting (Kendall, Gal and Cipolla 2018, "Multi-Task Learning
Using Uncertainty to Weigh Losses") learns one `s_i = log(sigma_i^2)` per
task and minimises

    total = sum_i exp(-s_i) * L_i + s_i

where `L_i` is task i's loss (its mean over the labelled examples). The paper
derives `1/2 * exp(-s) * L + 1/2 * s` for a Gaussian (regression) task and
`exp(-s) * L + 1/2 * s` for a softmax one; we use the same form for every
task, as most implementations do: at the optimum `exp(-s_i) = 1 / L_i`
either way (the paper's classification form gives `1 / (2 L_i)`), and it
does not make one kind of task count twice as much as another. `s_i` starts
at 0 (weight 1) and is excluded from weight decay. `fine_tune(...,
loss_weights="uncertainty")` trains through `UncertaintyWeighting(model)`, a
training-only view that shares every layer with `model` and holds the `s_i`;
the model itself never carries them, so `.keras` files and `kt.export` get
the plain multi-head model. The history reports each `<task>_log_variance`.

Exports name each task's outputs `<task>_probabilities` and, with
`labels={task: [names]}`, `<task>_classes` and `<task>_scores`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_transfer.builders import (
    AUGMENTATION_NAME,
    INPUT_NAME,
    build_scope,
    image_features,
)
from keras_transfer.heads import make_head, validate_head
from keras_transfer.training import UNCERTAINTY, output_heads

# Task names become layer, output and signature names (`<task>_probabilities`).
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Layer names of the trunk, which a task (a head layer) may not take.
RESERVED_NAMES = (
    INPUT_NAME,
    AUGMENTATION_NAME,
    "backbone",
    "preprocessing",
    "dropout",
    "avg_pool",
    "max_pool",
    "class_token_pool",
)
# Suffix of the learned `s_i` variables (matched to exclude them from weight decay).
LOG_VARIANCE = "log_variance"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task's head: its kind and its number of outputs.

    Args:
        head: `"softmax"` (one class per example), `"multi_label"`
            (independent 0/1 labels, sigmoid) or `"regression"` (linear).
        num_classes: classes, labels or regression targets.

    Example:

    >>> TaskSpec("softmax", 4)
    TaskSpec(head='softmax', num_classes=4)
    """

    head: str
    num_classes: int

    def __post_init__(self):
        validate_head(self.head, self.num_classes)
        object.__setattr__(self, "num_classes", int(self.num_classes))


def task_specs(tasks: Mapping) -> dict[str, TaskSpec]:
    """Reads `{name: head spec}` into `{name: TaskSpec}`, checking every name and spec.

    A head spec is a `TaskSpec`, a dict `{"head": kind, "num_classes": n}`,
    a pair `(kind, n)`, or an int `n` (a softmax over `n` classes).

    Args:
        tasks: a non-empty mapping of task names (letters, digits and `_`,
            starting with a letter; not a name in `RESERVED_NAMES`) to head
            specs.

    Returns:
        A dict of `TaskSpec` in the given order.

    Raises:
        ValueError: no tasks, a bad name, or a bad spec (named).

    Example:

    >>> task_specs({"fine": 10, "coarse": ("softmax", 4),
    ...             "tags": {"head": "multi_label", "num_classes": 3}})["tags"]
    TaskSpec(head='multi_label', num_classes=3)
    """
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(
            "`tasks` must be a non-empty dict of task name -> head spec, e.g. "
            '{"fine": {"head": "softmax", "num_classes": 10}}. '
            f"Received: tasks={tasks!r}"
        )
    specs = {}
    for name, spec in tasks.items():
        if not isinstance(name, str) or not _TASK_NAME.match(name) or name in RESERVED_NAMES:
            raise ValueError(
                "Task names must start with a letter, hold only letters, digits and '_', "
                f"and not be one of {RESERVED_NAMES}. Received: {name!r}"
            )
        specs[name] = _task_spec(name, spec)
    return specs


def _task_spec(name, spec):
    if isinstance(spec, TaskSpec):
        return spec
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        return TaskSpec("softmax", spec)
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - {"head", "num_classes"})
        if unknown or "num_classes" not in spec:
            raise ValueError(
                f"The spec of task {name!r} takes the keys 'head' (default 'softmax') and "
                f"'num_classes'. Received: {dict(spec)!r}"
            )
        return TaskSpec(spec.get("head", "softmax"), spec["num_classes"])
    if isinstance(spec, Sequence) and not isinstance(spec, str) and len(spec) == 2:
        return TaskSpec(*spec)
    raise ValueError(
        f"The spec of task {name!r} must be a TaskSpec, a dict with 'head' and "
        f"'num_classes', a (head, num_classes) pair or a number of classes. Received: {spec!r}"
    )


def build_multitask_model(
    backbone: str | os.PathLike | keras.Model,
    tasks: Mapping,
    *,
    weights: str | os.PathLike | None = "imagenet",
    input_shape: Sequence[int] | None = None,
    pooling: str = "avg",
    dropout: float = 0.2,
    augmentation=None,
    bn_policy: str = "frozen",
    freeze_backbone: bool = True,
    preprocessing: str | keras.layers.Layer | None = None,
    name: str | None = None,
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds a functional image model with a shared backbone and one head per task.

    The graph is `image (raw 0-255 RGB) -> augmentation (training only) ->
    preprocessing -> backbone -> pooling -> dropout -> {task: head}`, the
    trunk of `build_image_classifier`; every head reads the same (dropped
    out) features, so `fine_tune(..., cache_features=True)` trains all the
    heads on features computed once. The backbone is a nested layer named
    `"backbone"` (freezing, recipes and progressive unfreezing work as for a
    classifier); each head is a layer named after its task, and the outputs
    are a dict keyed by task (`model.predict` returns one).

    Args:
        backbone: a registry name, a KerasHub image preset or a
            `keras.Model` (see `build_image_classifier`).
        tasks: `{task name: head spec}` (see `task_specs`): e.g.
            `{"fine": {"head": "softmax", "num_classes": 10},
            "coarse": ("softmax", 4), "price": ("regression", 1)}`.
        weights: see `build_image_classifier`.
        input_shape: `(height, width, 3)`; defaults to the backbone's size.
        pooling: `"avg"` or `"max"`.
        dropout: dropout rate before the heads, in [0, 1).
        augmentation: see `make_augmentation`.
        bn_policy: see `build_image_classifier`.
        freeze_backbone: start with the backbone frozen.
        preprocessing: see `build_image_classifier`.
        name: model name; defaults to `"<backbone>_multitask"`.
        strategy: a `tf.distribute.Strategy` to build (and train) under.
        mixed_precision: see `build_scope`; heads output float32.
        **backbone_kwargs: passed to the backbone constructor.

    Returns:
        A `keras.Model` (functional, uncompiled) with one output per task.

    Raises:
        ValueError: no tasks, a bad task name or head spec, a bad dropout.

    Example:

    >>> import numpy as np
    >>> model = build_multitask_model(
    ...     "mobilenet_v3_small", {"fine": 10, "coarse": ("softmax", 4)},
    ...     weights=None, input_shape=(32, 32, 3))
    >>> model.output_names, model.get_layer("backbone").trainable
    (['coarse', 'fine'], False)
    >>> outputs = model.predict(np.zeros((2, 32, 32, 3)), verbose=0)
    >>> outputs["fine"].shape, outputs["coarse"].shape
    ((2, 10), (2, 4))
    """
    specs = task_specs(tasks)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    with build_scope(strategy, mixed_precision):
        inputs, x, base, label = image_features(
            backbone,
            weights=weights,
            input_shape=input_shape,
            pooling=pooling,
            augmentation=augmentation,
            bn_policy=bn_policy,
            preprocessing=preprocessing,
            backbone_kwargs=backbone_kwargs,
        )
        if dropout:
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        outputs = {
            task: make_head(spec.head, spec.num_classes, name=task)(x)
            for task, spec in specs.items()
        }
        base.trainable = not freeze_backbone
        return keras.Model(inputs, outputs, name=name or f"{label}_multitask")


@keras.saving.register_keras_serializable(package="keras_transfer")
class TaskUncertainty(keras.layers.Layer):
    """Learned per-task loss weights: `s_i = log(sigma_i^2)` (Kendall et al. 2018).

    Called on `{task: loss}` (scalar tensors or arrays), returns
    `sum_i exp(-s_i) * L_i + regularizer_scale * s_i` (see the module
    docstring for the form).

    Args:
        tasks: the task names, one `s_i` each (initialised to 0).
        **kwargs: standard layer arguments (`name`, ...).

    Example:

    >>> layer = TaskUncertainty(["a", "b"])
    >>> layer.build()
    >>> _ = layer.log_variances["b"].assign(np.log(2.0))
    >>> round(float(layer({"a": np.array(3.0), "b": np.array(4.0)})), 4)  # 3 + 4 / 2 + log 2
    5.6931
    """

    def __init__(self, tasks: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ValueError(
                f"`tasks` must be a non-empty list of task names. Received: tasks={tasks!r}"
            )
        self.tasks = list(tasks)
        self.log_variances = {}

    def build(self, input_shape=None):
        for task in self.tasks:
            self.log_variances[task] = self.add_weight(
                name=f"{task}_{LOG_VARIANCE}", shape=(), initializer="zeros"
            )
        self.built = True

    def call(self, losses, regularizer_scale=1.0):
        total = 0.0
        for task in self.tasks:
            log_variance = self.log_variances[task]
            loss = ops.cast(losses[task], log_variance.dtype)
            total = total + ops.exp(-log_variance) * loss + regularizer_scale * log_variance
        return total

    def get_config(self):
        config = super().get_config()
        config.update({"tasks": list(self.tasks)})
        return config


class UncertaintyWeighting(keras.Model):
    """A training view of a multi-head model that learns its loss weights.

    It shares every layer (the `"backbone"` included) with `model`, so the
    recipes freeze, unfreeze and train `model` through it, and holds one
    `TaskUncertainty` layer of its own: `compute_loss` combines the heads'
    compiled losses as `sum_i exp(-s_i) * L_i + s_i` (divided over the
    replicas of a strategy like every loss). It is made under `model`'s
    strategy, compiles with `loss_weights="uncertainty"` (or None), and
    reports `<task>_loss` (unweighted) and `<task>_log_variance` per epoch.
    It is for training only: save and export `model`. `fine_tune(...,
    loss_weights="uncertainty")` makes one; with `fit_stage`, make it once
    and pass it to every stage so the weights carry over.

    Args:
        model: a functional model with several named output layers (e.g.
            from `build_multitask_model`).
        name: default `"<model name>_uncertainty"`.
        uncertainty: a `TaskUncertainty` to share (see `view_of`); None
            makes a new one, every `s_i` at 0.

    Example:

    >>> model = build_multitask_model("mobilenet_v3_small", {"a": 3, "b": 2},
    ...                               weights=None, input_shape=(32, 32, 3))
    >>> trainer = UncertaintyWeighting(model)
    >>> trainer.get_layer("backbone") is model.get_layer("backbone")
    True
    >>> sorted(trainer.uncertainty.log_variances)
    ['a', 'b']
    """

    # What `training.compile_arguments` looks for before it accepts "uncertainty".
    learns_loss_weights = True

    def __init__(
        self,
        model: keras.Model,
        name: str | None = None,
        uncertainty: TaskUncertainty | None = None,
    ):
        if not isinstance(model, keras.Model) or not getattr(model, "output_names", None):
            raise TypeError(
                "`model` must be a functional keras.Model with named outputs. "
                f"Received: {type(model).__name__}"
            )
        heads = list(output_heads(model))
        if len(heads) < 2:
            raise ValueError(
                "Uncertainty weighting weighs several heads' losses. "
                f"Received: model {model.name!r} with the one head {heads}"
            )
        if uncertainty is not None and sorted(uncertainty.tasks) != sorted(heads):
            raise ValueError(
                f"`uncertainty` must weigh the model's heads {heads}. "
                f"Received: one for {uncertainty.tasks}"
            )
        with model.distribute_strategy.scope():
            super().__init__(model.input, model.output, name=name or f"{model.name}_uncertainty")
            if uncertainty is None:
                uncertainty = TaskUncertainty(heads, name="task_uncertainty")
                uncertainty.build()
            self.uncertainty = uncertainty
            self.task_loss_trackers = {
                task: keras.metrics.Mean(name=f"{task}_loss") for task in heads
            }
            self.log_variance_trackers = {
                task: keras.metrics.Mean(name=f"{task}_{LOG_VARIANCE}") for task in heads
            }
        self._task_losses = None

    def compile(self, optimizer="rmsprop", loss=None, loss_weights=None, **kwargs):
        if loss_weights not in (None, UNCERTAINTY):
            raise ValueError(
                "This model learns its loss weights: `loss_weights` must be None or "
                f"{UNCERTAINTY!r}. Received: loss_weights={loss_weights!r}"
            )
        names = list(self.uncertainty.tasks)
        given = loss if isinstance(loss, Mapping) else dict.fromkeys(names, loss)
        missing = [task for task in names if given.get(task) is None]
        if missing:
            raise ValueError(f"Every head needs a loss. Received: none for {missing}")
        self._task_losses = {task: keras.losses.get(given[task]) for task in names}
        if isinstance(optimizer, keras.optimizers.Optimizer) and not optimizer.built:
            optimizer.exclude_from_weight_decay(var_names=[LOG_VARIANCE])
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self._task_losses is None:
            raise ValueError("Compile the model first (fine_tune and fit_stage do).")
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        losses = {}
        for task, loss in self._task_losses.items():
            weight = (
                sample_weight.get(task) if isinstance(sample_weight, Mapping) else sample_weight
            )
            # Each loss is divided over the replicas already (Keras' reduction).
            losses[task] = loss(y[task], y_pred[task], weight)
            self.task_loss_trackers[task].update_state(losses[task] * replicas)
            self.log_variance_trackers[task].update_state(self.uncertainty.log_variances[task])
        total = self.uncertainty(losses, regularizer_scale=1.0 / replicas)
        for extra in self.losses:  # regularizers, add_loss
            total = total + ops.sum(ops.cast(extra, total.dtype))
        return total

    def view_of(self, model: keras.Model) -> UncertaintyWeighting:
        """A view of `model` (the same heads) that learns with these `s_i`.

        `fit_stage` trains a cached stage's head model through it.

        Args:
            model: a model whose outputs are this view's heads.

        Returns:
            An `UncertaintyWeighting` sharing this one's `TaskUncertainty`.
        """
        return UncertaintyWeighting(model, name=self.name, uncertainty=self.uncertainty)

    def weights_by_task(self) -> dict[str, float]:
        """The learned loss weights `exp(-s_i)` by task (1.0 before training)."""
        return {
            task: float(np.exp(-float(ops.convert_to_numpy(value))))
            for task, value in self.uncertainty.log_variances.items()
        }


def uncertainty_training_view(model: keras.Model) -> keras.Model:
    """`model` itself when it learns its loss weights, else `UncertaintyWeighting(model)`.

    Args:
        model: a model with several heads (or an `UncertaintyWeighting`).

    Returns:
        A model that compiles with `loss_weights="uncertainty"`.

    Example:

    >>> model = build_multitask_model("mobilenet_v3_small", {"a": 3, "b": 2},
    ...                               weights=None, input_shape=(32, 32, 3))
    >>> view = uncertainty_training_view(model)
    >>> uncertainty_training_view(view) is view
    True
    """
    if getattr(model, "learns_loss_weights", False):
        return model
    return UncertaintyWeighting(model)
