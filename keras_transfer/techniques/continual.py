"""Continual learning: learn a new task on a shared backbone without forgetting the old one.

`add_task` gives a model a second named head on the same pooled features
(the old head is kept as it is); `learn_new_task` trains the backbone and
both heads on the new task's data with one of three methods, under the same
stage (unfrozen blocks, optimizer, schedule, epochs, LR) so that only the
method differs:

* `"naive"`: the new task's loss alone (the baseline; the backbone drifts and
  the old head, which reads it, forgets).
* `"lwf"`: Learning without Forgetting (Li and Hoiem 2016). The old heads'
  outputs on the new data are recorded once before training; the loss adds
  `lwf_weight * KL(soft(recorded, T) || soft(current, T))` for each old head,
  `soft(p, T) = softmax(log(p) / T)` (`LwFLoss`). Only the new data is used.
* `"ewc"`: Elastic Weight Consolidation (Kirkpatrick et al. 2017). The
  diagonal Fisher of the old task's log-likelihood (`estimate_fisher`, on
  `old_data`) weighs an L2 pull to the old weights: the loss adds
  `ewc_lambda / 2 * sum_i F_i (theta_i - theta*_i) ** 2` over every weight
  that trains except the new head's.

Training goes through `fit_stage` on a small training-only `keras.Model`
(`kt.techniques.ewc.EWCTrainer`, sharing the model's layers) that adds the
EWC penalty (none for the other methods); the plain two-head functional model
is what is returned, saved and exported.

Example:
>>> import keras, numpy as np
>>> import keras_transfer as kt
>>> from keras_transfer.techniques import continual
>>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
>>> model = kt.build_image_classifier(backbone, 2, weights=None, freeze_backbone=False)
>>> two_heads = continual.add_task(model, "task_b", 3)
>>> two_heads.output_names
['head', 'task_b']
>>> x = np.random.rand(6, 8)
>>> result = continual.learn_new_task(two_heads, (x, np.arange(6) % 3), task="task_b",
...                                   epochs=1, old_test=(x, np.arange(6) % 2), verbose=0)
>>> sorted(result.old_accuracy_after)
['head']
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import stages
from keras_transfer.freezing import resolve_bn_policy
from keras_transfer.heads import head_kind, make_head
from keras_transfer.optimizers import DEFAULT_LR_SPREAD, DEFAULT_WEIGHT_DECAY
from keras_transfer.techniques.ewc import FISHER_METHODS, EWCTrainer, estimate_fisher
from keras_transfer.techniques.lwf import DEFAULT_TEMPERATURE, LwFLoss
from keras_transfer.training import (
    DEFAULT_BATCH_SIZE,
    check_number,
    output_heads,
    resolve_strategy,
)

METHODS = ("lwf", "ewc", "naive")
# Li and Hoiem 2016: loss balance lambda_o = 1 (and T = 2, `DEFAULT_TEMPERATURE`).
DEFAULT_LWF_WEIGHT = 1.0
# Measured on split digits (0-4 then 5-9, an MLP backbone trained at 1e-2;
# keras_transfer/benchmarks/effects/continual.py), old-task accuracy kept over
# seeds 0-2: 0.87-0.96 at 10, 0.95-0.98 at 100, 0.99-1.0 at 1e3, where the new
# task lost up to 2.2 points to naive fine-tuning (1.1 at 100).
DEFAULT_EWC_LAMBDA = 100.0
DEFAULT_EPOCHS = 5
# The LR at which recipes train a pretrained backbone (1e-3 head LR / 10).
DEFAULT_LEARNING_RATE = 1e-4


@dataclasses.dataclass(frozen=True)
class ContinualResult:
    """What `learn_new_task` returns.

    Args:
        model: the trained two-head model (the one passed in, trained in place).
        method: `"lwf"`, `"ewc"` or `"naive"`.
        history: the `fit` history (per-head losses and metrics).
        old_accuracy_before: old-task accuracy per old head on `old_test`
            before training (None without `old_test`).
        old_accuracy_after: the same after training.
        new_accuracy: the new head's accuracy on `validation` (None without).
    """

    model: keras.Model
    method: str
    history: keras.callbacks.History
    old_accuracy_before: dict[str, float] | None
    old_accuracy_after: dict[str, float] | None
    new_accuracy: float | None

    @property
    def forgetting(self) -> dict[str, float] | None:
        """Old-task accuracy lost per old head (before - after)."""
        if self.old_accuracy_before is None:
            return None
        return {k: v - self.old_accuracy_after[k] for k, v in self.old_accuracy_before.items()}


def _head_input(model: keras.Model):
    tensors = [layer.input for layer in output_heads(model).values()]
    if any(tensor is not tensors[0] for tensor in tensors):
        raise ValueError(
            "`add_task` puts the new head on the features the old heads read; these heads read "
            f"different tensors. Received: heads {list(output_heads(model))}"
        )
    return tensors[0]


def add_task(model: keras.Model, name: str, num_classes: int, *, head: str = "softmax"):
    """A model with one more named head on the features the existing head(s) read.

    The existing heads are kept as they are (same layers, same weights); the
    new head reads the same tensor (after dropout, for a model of
    `build_image_classifier`). Outputs are a dict by head name.

    Args:
        model: a functional model, e.g. from `build_image_classifier`.
        name: the new head's (and output's) name, an identifier not yet used
            by a layer of `model`.
        num_classes: outputs of the new head.
        head: its kind: `"softmax"`, `"multi_label"` or `"regression"`.

    Returns:
        A new functional `keras.Model` sharing `model`'s layers, with outputs
        `{old head names..., name}`.

    Raises:
        ValueError: a bad or taken name, a bad head, or heads that read
            different tensors.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> add_task(model, "shoes", 4).output_names
    ['head', 'shoes']
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"`name` must be an identifier such as 'task_b'. Received: name={name!r}")
    taken = [layer.name for layer in model.layers]
    if name in taken:
        raise ValueError(
            f"`name` must not be a layer name of the model {taken}. Received: name={name!r}"
        )
    features = _head_input(model)
    outputs = dict(zip(output_heads(model), model.outputs, strict=True))
    with resolve_strategy(model).scope():
        outputs[name] = make_head(head, num_classes, name=name)(features)
        return keras.Model(model.inputs, outputs, name=model.name)


def _as_arrays(data, argument: str):
    """`(x, y)` as arrays; a dataset is read once into memory."""
    if isinstance(data, tf.data.Dataset):
        batches = [keras.tree.map_structure(np.asarray, batch) for batch in data]
        if not batches or len(batches[0]) != 2:
            raise ValueError(
                f"`{argument}` must yield (inputs, targets) batches. Received: {data.element_spec}"
            )
        return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *batches)
    if isinstance(data, tuple) and len(data) == 2:
        x, y = keras.tree.map_structure(np.asarray, data)
        if len(keras.tree.flatten(x)[0]) != len(keras.tree.flatten(y)[0]):
            raise ValueError(
                f"`{argument}` inputs and targets must have the same length. Received: "
                f"{len(keras.tree.flatten(x)[0])} inputs, {len(keras.tree.flatten(y)[0])} targets"
            )
        return x, y
    raise TypeError(
        f"`{argument}` must be a tuple (inputs, targets) of arrays or a batched "
        f"tf.data.Dataset of them. Received: {type(data).__name__}"
    )


def _by_head(targets, heads: list[str], argument: str) -> dict:
    """Targets keyed by old head name: labels for one old head, or a dict."""
    if not isinstance(targets, dict):
        if len(heads) != 1:
            raise ValueError(
                f"`{argument}` targets must be a dict keyed by the old heads {heads}. "
                f"Received: {type(targets).__name__}"
            )
        return {heads[0]: targets}
    unknown = sorted(set(targets) - set(heads))
    if unknown or not targets:
        raise ValueError(f"`{argument}` target keys must be old heads {heads}. Received: {unknown}")
    return targets


def _classes(labels):
    labels = np.asarray(labels)
    return labels.argmax(-1) if labels.ndim > 1 and labels.shape[-1] > 1 else labels.reshape(-1)


def _outputs(model, x, batch_size) -> dict:
    outputs = model.predict(x, batch_size=batch_size, verbose=0)
    return outputs if isinstance(outputs, dict) else {next(iter(output_heads(model))): outputs}


def old_task_accuracy(model: keras.Model, data, heads=None, batch_size=DEFAULT_BATCH_SIZE):
    """Accuracy of each old head on its labelled data.

    Args:
        model: a model with named softmax heads.
        data: `(x, labels)` (one head) or `(x, {head: labels})`, or a dataset.
        heads: the heads the labels belong to (default: all outputs).
        batch_size: prediction batch size.

    Returns:
        `{head name: accuracy}`.

    Example:
    >>> import keras, numpy as np
    >>> inputs = keras.Input((2,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inputs))
    >>> old_task_accuracy(model, (np.zeros((4, 2)), np.zeros(4, int)))
    {'head': 1.0}
    """
    x, y = _as_arrays(data, "old_test")
    labels = _by_head(y, list(heads or output_heads(model)), "old_test")
    outputs = _outputs(model, x, batch_size)
    return {
        name: float(np.mean(outputs[name].argmax(-1) == _classes(value)))
        for name, value in labels.items()
    }


def _record(model, data, old_heads, task, batch_size, argument):
    """`(x, {old head: its outputs now, task: labels})`, the old outputs recorded once."""
    x, y = _as_arrays(data, argument)
    outputs = _outputs(model, x, batch_size)
    return x, {**{name: outputs[name] for name in old_heads}, task: y}


def learn_new_task(
    model: keras.Model,
    train,
    validation=None,
    *,
    task: str,
    method: str = "lwf",
    old_data=None,
    old_test=None,
    epochs: int = DEFAULT_EPOCHS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    train_blocks: int | str = "all",
    lr_spread: float = DEFAULT_LR_SPREAD,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    lwf_weight: float = DEFAULT_LWF_WEIGHT,
    temperature: float = DEFAULT_TEMPERATURE,
    ewc_lambda: float = DEFAULT_EWC_LAMBDA,
    fisher_labels: str = "sampled",
    fisher_examples: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    patience: int | None = None,
    callbacks: list | None = None,
    strategy: tf.distribute.Strategy | None = None,
    seed: int = 0,
    verbose="auto",
) -> ContinualResult:
    """Trains a model's new head and its backbone on a new task, keeping the old head(s).

    Every method trains the same way (one `fit_stage` stage: the top
    `train_blocks` blocks of the backbone and every head, AdamW with warm-up
    and cosine decay, discriminative LRs with `lr_spread`, the same epochs,
    LR, batches and shuffle); they differ only in the loss (see the module
    docstring). `train` (and `validation`) are read once into memory, with
    the old heads' outputs on them recorded before any step.

    Args:
        model: a model with two or more heads, the new one named `task`
            (from `add_task`); the others are the old task's, softmax.
        train: the new task's `(x, labels)` arrays or a batched dataset.
        validation: the same for validation (early stopping with `patience`,
            `new_accuracy`), or None.
        task: the new head's name (the `name` given to `add_task`).
        method: `"lwf"`, `"ewc"` or `"naive"`.
        old_data: the old task's `(x, labels)` for the Fisher estimate
            (`"ewc"` only; LwF uses only the new data).
        old_test: the old task's held-out `(x, labels)` for the accuracies
            before and after (labels, or a dict by old head), or None.
        epochs: epochs on the new task.
        learning_rate: peak LR of the heads and the top of the backbone.
        train_blocks: backbone blocks that train: `"all"` or the top N.
        lr_spread: head LR / stem LR (1: one LR everywhere).
        weight_decay: AdamW decoupled weight decay.
        lwf_weight: weight of each old head's distillation loss (`"lwf"`).
        temperature: distillation temperature T (`"lwf"`).
        ewc_lambda: EWC penalty strength (`"ewc"`).
        fisher_labels: `"sampled"` or `"empirical"` (see `estimate_fisher`).
        fisher_examples: at most this many `old_data` examples for the
            Fisher (None: all).
        batch_size: batch size (the global batch under a strategy).
        patience: early stopping on `val_loss` (needs `validation`); None: off.
        callbacks: extra Keras callbacks.
        strategy: the `tf.distribute.Strategy` the model was built under.
        seed: seed of the shuffle and of the Fisher's label draws.
        verbose: passed to `fit`.

    Returns:
        A `ContinualResult`: the model (trained in place), the history and
        the old task's accuracy before and after.

    Raises:
        ValueError: a bad value, a model without an old softmax head, or
            `old_data` missing for `"ewc"` (or given to another method).

    Example:
    >>> import keras, numpy as np, keras_transfer as kt
    >>> backbone = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, name="dense")])
    >>> model = add_task(kt.build_image_classifier(backbone, 2, weights=None), "b", 2)
    >>> x = np.random.rand(4, 8)
    >>> result = learn_new_task(model, (x, np.arange(4) % 2), task="b", method="ewc",
    ...                         epochs=1, old_data=(x, np.arange(4) % 2), fisher_examples=2,
    ...                         verbose=0)
    >>> result.method, result.old_accuracy_before
    ('ewc', None)
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}. Received: method={method!r}")
    if fisher_labels not in FISHER_METHODS:
        raise ValueError(
            f"`fisher_labels` must be one of {FISHER_METHODS}. "
            f"Received: fisher_labels={fisher_labels!r}"
        )
    check_number("lwf_weight", lwf_weight, 0)
    check_number("ewc_lambda", ewc_lambda, 0)
    distillation = LwFLoss(temperature)  # checks `temperature`
    check_number("fisher_examples", fisher_examples, 1, optional=True, integer=True)
    if (method == "ewc") != (old_data is not None):
        raise ValueError(
            "`old_data` (the old task's examples for the Fisher estimate) is needed by "
            f"method='ewc' and used by no other method. Received: method={method!r}, "
            f"old_data={'given' if old_data is not None else None}"
        )
    heads = output_heads(model)
    names = list(heads)
    if task not in names or len(names) < 2:
        raise ValueError(
            "`task` must name the new head of a model with two or more heads (see add_task). "
            f"Received: task={task!r}, heads {names}"
        )
    old_heads = [name for name in names if name != task]
    kinds = {name: head_kind(heads[name]) for name in old_heads}
    if any(kind != "softmax" for kind in kinds.values()):
        raise ValueError(f"The old heads must be softmax heads. Received: {kinds}")
    stage = stages.Stage(
        "new_task", epochs, learning_rate, train_blocks=train_blocks, discriminative=True
    )
    strategy = resolve_strategy(model, strategy)
    train = _record(model, train, old_heads, task, batch_size, "train")
    if validation is not None:
        validation = _record(model, validation, old_heads, task, batch_size, "validation")
    before = None if old_test is None else old_task_accuracy(model, old_test, old_heads, batch_size)
    variables, fisher = [], []
    if method == "ewc":
        with strategy.scope():
            stages.apply_stage(model, stage, resolve_bn_policy(model))
        new_head = {id(v) for v in heads[task].weights}
        variables = [v for v in model.trainable_variables if id(v) not in new_head]
        x_old, y_old = _as_arrays(old_data, "old_data")
        labels = {k: _classes(v) for k, v in _by_head(y_old, old_heads, "old_data").items()}
        fisher = estimate_fisher(
            model,
            x_old,
            labels,
            variables=variables,
            method=fisher_labels,
            max_examples=fisher_examples,
            seed=seed,
        )
    with strategy.scope():
        trainer = EWCTrainer(model, variables, fisher, ewc_lambda)
    history = stages.fit_stage(
        trainer,
        train,
        validation,
        stage,
        loss=dict.fromkeys(old_heads, distillation),
        loss_weights={
            **dict.fromkeys(old_heads, lwf_weight if method == "lwf" else 0.0),
            task: 1.0,
        },
        metrics={name: [] for name in old_heads},
        weight_decay=weight_decay,
        lr_spread=lr_spread,
        patience=patience,
        batch_size=batch_size,
        callbacks=callbacks,
        strategy=strategy,
        seed=seed,
        verbose=verbose,
    )
    after = None if old_test is None else old_task_accuracy(model, old_test, old_heads, batch_size)
    new_accuracy = None
    if validation is not None:
        new_accuracy = float(
            np.mean(
                _outputs(model, validation[0], batch_size)[task].argmax(-1)
                == _classes(validation[1][task])
            )
        )
    return ContinualResult(model, method, history, before, after, new_accuracy)
