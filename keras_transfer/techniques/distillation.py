"""Knowledge distillation: a small student learns from a large teacher's soft predictions.

`distill` trains the student on `alpha * CE(labels, student) + (1 - alpha) *
T^2 * KL(softmax(teacher / T) || softmax(student / T))` (Hinton, Vinyals and
Dean 2015, "Distilling the Knowledge in a Neural Network"): the hard-label
cross-entropy plus the match of the two temperature-softened distributions.
The `T^2` keeps the soft term's gradients the same size as `T` changes (they
shrink as `1 / T^2`).

Logits: our classifiers end in a softmax `Dense` named `"head"`. The loss reads
the head's pre-activation, `features @ kernel + bias`, computed with the
head's own variables from the tensor the head reads: the exact logits. Taking
the log of the softmax output would be exact in theory (it differs from the
logits by a constant per example, which softmax ignores), but float32
probabilities of a confident teacher underflow to 0 and their log to `-inf`.

Training: a small `keras.Model` made for training only (`_Distiller`) holds
the student's layers and overrides `compute_loss` and `compute_metrics`; it
compiles the recipes' optimizer (`stages.stage_optimizer`: AdamW, warm-up and
cosine decay) and callbacks (`stages.stage_callbacks`, relayed so that they
see the student) under the student's `tf.distribute` strategy, on data
prepared by `training.prepare_training`. `distill` returns the student
itself: a plain functional model, ready for `kt.export`.

The teacher runs in inference mode (no dropout, no augmentation, BatchNorm on
its moving statistics) and never trains; its logits for an example are fixed,
so they are computed once (`cache_teacher`) rather than at every step: for
arrays by default. A `tf.data.Dataset` may augment at random or reshuffle
itself, which a cache would freeze at its first pass, so it is cached only on
request (read once into memory, reshuffled every epoch with `seed`). Random
augmentation inside the student (the builders' `augmentation=`) is fine
either way: the teacher sees the image before it.

Unlabelled examples (label `UNLABELLED`, -1) add the soft term only: the
teacher labels them. Few labels and many images is where distillation pays
(`benchmarks/effects/distillation.py`).

Example:
>>> import keras, numpy as np, keras_transfer as kt
>>> def classifier(width):
...     inputs = keras.Input((4,))
...     hidden = keras.layers.Dense(width, activation="relu")(inputs)
...     head = keras.layers.Dense(3, activation="softmax", name="head")
...     return keras.Model(inputs, head(hidden))
>>> teacher, student = classifier(64), classifier(4)
>>> data = (np.random.rand(16, 4), np.arange(16) % 3)
>>> kt.techniques.distill(student, teacher, data, epochs=1, verbose=0) is student
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_transfer import stages
from keras_transfer.callbacks import CallbackRelay
from keras_transfer.distribute import shard_by_data
from keras_transfer.heads import head_kind
from keras_transfer.missing_labels import MISSING_CLASS
from keras_transfer.optimizers import DEFAULT_WEIGHT_DECAY
from keras_transfer.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PATIENCE,
    check_number,
    compile_arguments,
    output_heads,
    positive_number,
    prepare_training,
)

# Hinton et al. 2015 weigh the hard-label term far below the soft one and use
# temperatures of a few units (2-20); alpha 0.1 and T = 4 are the common
# defaults of distillation guides (the Keras "Knowledge Distillation" example
# uses 0.1 and 10; T = 4 suits 10-class tasks, where T = 10 flattens too much).
DEFAULT_ALPHA = 0.1
DEFAULT_TEMPERATURE = 4.0
# The recipes' head LR (Adam's usual 1e-3): the student trains from its
# current weights, often random ones.
DEFAULT_LEARNING_RATE = 1e-3
DEFAULT_EPOCHS = 10
# The label of an example without one (the package's missing-class sentinel):
# the teacher still teaches on it, through the soft term.
UNLABELLED = MISSING_CLASS
CACHE_TEACHER = ("auto", True, False)


def check_distillation(alpha, temperature) -> None:
    """Checks `alpha` (in [0, 1]) and `temperature` (> 0).

    Args:
        alpha: weight of the hard-label loss.
        temperature: softmax temperature of the soft term.

    Returns:
        None.

    Raises:
        ValueError: a value out of range, named with `Received:`.

    Example:
    >>> check_distillation(1.5, 4.0)
    Traceback (most recent call last):
    ...
    ValueError: `alpha` must be a number in [0, 1]. Received: alpha=1.5
    """
    number = not isinstance(alpha, bool) and isinstance(alpha, (int, float, np.number))
    if not (number and 0 <= alpha <= 1):
        raise ValueError(f"`alpha` must be a number in [0, 1]. Received: alpha={alpha!r}")
    if not positive_number(temperature) or not np.isfinite(temperature):
        raise ValueError(
            f"`temperature` must be a finite number > 0. Received: temperature={temperature!r}"
        )


@keras.saving.register_keras_serializable(package="keras_transfer")
class DistillationLoss(keras.losses.Loss):
    """Hinton's distillation loss on labels, teacher logits and student logits.

    Per example: `alpha * CE(label, softmax(s)) + (1 - alpha) * T^2 *
    KL(softmax(t / T) || softmax(s / T))`, with `s` the student's logits and
    `t` the teacher's, both computed with log-softmax (no log of a
    probability that underflowed).

    Args:
        alpha: weight of the hard-label cross-entropy, in [0, 1].
        temperature: softening temperature `T` > 0.
        name: the loss's name.
        reduction: Keras loss reduction (`"sum_over_batch_size"`: the mean).
        dtype: computation dtype (None: floatx).

    Call arguments:
        y_true: `(labels, teacher_logits)`: class indices `[batch]`
            (`UNLABELLED`, -1: no hard term) or one-hot rows, and the
            teacher's `[batch, classes]` logits.
        y_pred: the student's logits `[batch, classes]`.

    Example:
    >>> import numpy as np
    >>> loss = DistillationLoss(alpha=1.0)  # hard labels only: plain cross-entropy
    >>> logits = np.log(np.array([[0.5, 0.25, 0.25]]))
    >>> round(float(loss((np.array([0]), logits), logits)), 4)  # -log(0.5)
    0.6931
    """

    def __init__(
        self,
        alpha: float = DEFAULT_ALPHA,
        temperature: float = DEFAULT_TEMPERATURE,
        name: str = "distillation",
        reduction: str = "sum_over_batch_size",
        dtype=None,
    ):
        check_distillation(alpha, temperature)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha = float(alpha)
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        labels, teacher_logits = y_true
        if len(labels.shape) == len(y_pred.shape) and labels.shape[-1] == y_pred.shape[-1]:
            hard = ops.categorical_crossentropy(labels, y_pred, from_logits=True)  # one-hot
        else:
            labels = ops.reshape(labels, ops.shape(y_pred)[:-1])
            labelled = labels != UNLABELLED  # the soft term only
            safe = ops.cast(ops.where(labelled, labels, ops.zeros_like(labels)), "int32")
            hard = ops.sparse_categorical_crossentropy(safe, y_pred, from_logits=True)
            hard = ops.where(labelled, hard, ops.zeros_like(hard))
        t = self.temperature
        teacher = ops.log_softmax(teacher_logits / t, axis=-1)
        student = ops.log_softmax(y_pred / t, axis=-1)
        soft = ops.sum(ops.exp(teacher) * (teacher - student), axis=-1) * (t * t)
        return self.alpha * hard + (1.0 - self.alpha) * soft

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha, "temperature": self.temperature}


def _softmax_head(model, argument: str) -> keras.layers.Dense:
    """The model's single output layer, checked to be a softmax `Dense`."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"`{argument}` must be a keras.Model. Received: {type(model).__name__}")
    heads = output_heads(model)
    layer = next(iter(heads.values()))
    kind = None
    if len(heads) == 1 and isinstance(layer, keras.layers.Dense):
        with contextlib.suppress(ValueError):
            kind = head_kind(layer)
    if kind != "softmax":
        raise ValueError(
            f"`{argument}` must be a classifier ending in one softmax Dense head (as "
            "kt.build_image_classifier makes): distillation reads its logits. Received: "
            f"outputs {list(heads)} ({type(layer).__name__}, kind {kind!r})"
        )
    return layer


def _logits(features: keras.Model, head: keras.layers.Dense, inputs, training):
    """The head's pre-activation: `features @ kernel + bias`, with the head's variables."""
    x = ops.cast(features(inputs, training=training), head.compute_dtype)
    x = ops.matmul(x, head.kernel)
    return x if head.bias is None else ops.add(x, head.bias)


def _logit_parts(model: keras.Model, head) -> tuple[keras.Model, keras.layers.Dense]:
    """`(features, head)`: a model to the tensor the head reads, sharing the layers."""
    return keras.Model(model.input, head.input, name=f"{model.name}_features"), head


class _Distiller(keras.Model):
    """Training-only model: the student's logits, the distillation loss, accuracy.

    Targets are labels (the teacher's logits are computed in the step) or
    `(labels, teacher_logits)` (cached). The teacher is held as a function,
    not a layer, so none of its variables is tracked, trained or saved.
    """

    def __init__(self, student, student_head, teacher_logits, loss, **kwargs):
        super().__init__(**kwargs)
        self.features, self.head = _logit_parts(student, student_head)
        self.teacher_logits = teacher_logits  # a callable (not tracked), or None
        self.distillation_loss = loss

    def call(self, inputs, training=False):
        return _logits(self.features, self.head, inputs, training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if isinstance(y, (tuple, list)):
            labels, teacher = y
        elif self.teacher_logits is None:  # alpha = 1: the soft term weighs nothing
            labels, teacher = y, ops.zeros_like(y_pred)
        else:
            labels, teacher = y, ops.stop_gradient(self.teacher_logits(x))
        loss = self.distillation_loss((labels, teacher), y_pred, sample_weight)
        for extra in self.losses:  # the student's regularisers
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        labels = y[0] if isinstance(y, (tuple, list)) else y
        if len(labels.shape) < len(y_pred.shape) or labels.shape[-1] != y_pred.shape[-1]:
            # Unlabelled examples count in no metric.
            labelled = ops.cast(
                ops.reshape(labels, ops.shape(y_pred)[:-1]) != UNLABELLED, "float32"
            )
            sample_weight = labelled if sample_weight is None else sample_weight * labelled
        return super().compute_metrics(x, labels, ops.softmax(y_pred), sample_weight)


def _teacher_function(teacher, head):
    features, head = _logit_parts(teacher, head)
    return lambda inputs: _logits(features, head, inputs, False)


def _with_teacher_logits(data, teacher_logits, *, batch_size, seed, name):
    """`(inputs, (targets, teacher_logits), ...)` batches; the teacher runs once per example.

    Arrays keep the order and per-epoch shuffle of `training.as_dataset`; a
    dataset is read once into memory (see the module docstring).
    """
    if isinstance(data, tf.data.Dataset):
        if int(data.cardinality()) == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                f"`cache_teacher=True` needs a finite `{name}` dataset (it is read once). "
                "Received: an infinite dataset (`.repeat()`?)"
            )
        chunks = [tf.nest.map_structure(np.asarray, tuple(element)) for element in data]
        if not chunks:
            raise ValueError(f"The `{name}` dataset is empty. Received: 0 batches")
        batch_size = len(tf.nest.flatten(chunks[0][0])[0])
        parts = tf.nest.map_structure(lambda *values: np.concatenate(values), *chunks)
        inputs, targets, *rest = parts
    else:
        (inputs, targets), rest = data, []
    count, parts = len(tf.nest.flatten(inputs)[0]), []
    for start in range(0, count, batch_size):
        batch = tf.nest.map_structure(lambda a, s=start: a[s : s + batch_size], inputs)
        parts.append(teacher_logits(batch).numpy())
    logits = np.concatenate(parts)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, (targets, logits), *rest))
    if name == "train":
        dataset = dataset.shuffle(len(logits), seed=seed, reshuffle_each_iteration=True)
    return shard_by_data(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE))


def _check_models(student, teacher):
    student_head = _softmax_head(student, "student")
    teacher_head = _softmax_head(teacher, "teacher")
    if student_head.units != teacher_head.units:
        raise ValueError(
            "The teacher and the student must predict the same classes. Received: a teacher "
            f"with {teacher_head.units} classes and a student with {student_head.units}"
        )
    shapes = [
        keras.tree.map_structure(lambda t: tuple(t.shape[1:]), m.input) for m in (student, teacher)
    ]
    if shapes[0] != shapes[1]:
        raise ValueError(
            "The teacher and the student must take the same inputs (one batch feeds both). "
            f"Received: student input shape {shapes[0]}, teacher input shape {shapes[1]}"
        )
    return student_head, teacher_head


def distill(
    student: keras.Model,
    teacher: keras.Model,
    train,
    validation=None,
    *,
    alpha: float = DEFAULT_ALPHA,
    temperature: float = DEFAULT_TEMPERATURE,
    epochs: int = DEFAULT_EPOCHS,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    patience: int | None = DEFAULT_PATIENCE,
    steps_per_epoch: int | None = None,
    cache_teacher: bool | str = "auto",
    strategy: tf.distribute.Strategy | None = None,
    seed: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    jit_compile="auto",
    steps_per_execution: int = 1,
    verbose="auto",
) -> keras.Model:
    """Trains `student` to match `teacher`'s softened predictions and the labels.

    The loss is `DistillationLoss(alpha, temperature)` on the two models'
    logits (see the module docstring). What is trainable in the student
    trains (build it with `freeze_backbone=False` to train all of it); the
    teacher runs in inference mode. The optimizer is a recipe stage's
    (AdamW, warm-up over 10% of the steps, then cosine decay); with
    `validation`, early stopping on the validation loss restores the best
    weights. `alpha=1` trains on the labels alone without running the
    teacher: the baseline a distillation is measured against.

    Args:
        student: a classifier ending in a softmax `Dense` head (e.g. from
            `kt.build_image_classifier`), built under `strategy` if one is
            given.
        teacher: a classifier with the same inputs and classes.
        train: a batched `tf.data.Dataset` of `(inputs, labels)` (or with
            sample weights), or a tuple of arrays (shuffled every epoch with
            `seed`). Labels are class indices (`UNLABELLED`, -1, where an
            example has none: the soft term alone) or one-hot rows.
        validation: the same for validation, or None.
        alpha: weight of the hard-label loss, in [0, 1].
        temperature: softening temperature, > 0.
        epochs: training epochs, >= 1.
        learning_rate: peak learning rate, > 0.
        batch_size: the global batch size for arrays.
        weight_decay: AdamW decoupled weight decay.
        patience: early-stopping patience on `val_loss` with `validation`;
            None: off.
        steps_per_epoch: needed when `train` has unknown length.
        cache_teacher: `"auto"` (cache for arrays, recompute for datasets),
            True (cache, reading a dataset once into memory) or False (run
            the teacher at every step).
        strategy: a `tf.distribute.Strategy` the student was built under;
            None: the student's own.
        seed: seed of the per-epoch shuffle.
        callbacks: Keras callbacks; they see the student as `self.model`.
        jit_compile: passed to `compile`.
        steps_per_execution: training steps per call of the compiled train
            function (Keras `compile`): more saves the per-step overhead of
            small students.
        verbose: passed to `fit`.

    Returns:
        The student (the same object), trained and compiled with its usual
        loss and metrics, so `student.evaluate` works at once; the training
        `History` is `student.history`, as after `student.fit`.

    Raises:
        ValueError: `alpha` outside [0, 1], `temperature` <= 0, models that
            do not end in a softmax head, teacher and student with different
            classes or inputs, or a bad training option.

    Example:
    >>> import keras, numpy as np, keras_transfer as kt
    >>> inputs = keras.Input((4,))
    >>> teacher = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(inputs))
    >>> student = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    >>> kt.techniques.distill(student, teacher, (np.zeros((4, 4)), np.zeros(4, "int32")))
    Traceback (most recent call last):
    ...
    ValueError: The teacher and the student must predict the same classes. Received: a teacher with 4 classes and a student with 3
    """
    check_distillation(alpha, temperature)
    check_number("epochs", epochs, 1, integer=True)
    check_number("steps_per_execution", steps_per_execution, 1, integer=True)
    if not positive_number(learning_rate):
        raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={learning_rate!r}")
    if not any(cache_teacher is value or cache_teacher == value for value in CACHE_TEACHER):
        raise ValueError(
            f"`cache_teacher` must be one of {CACHE_TEACHER}. Received: "
            f"cache_teacher={cache_teacher!r}"
        )
    student_head, teacher_head = _check_models(student, teacher)
    inputs = prepare_training(
        student,
        train,
        validation,
        weight_decay=weight_decay,
        patience=patience,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        strategy=strategy,
        seed=seed,
    )
    teacher_logits = _teacher_function(teacher, teacher_head)
    train_data, validation_data = inputs.train, inputs.validation
    cache = alpha < 1 and (
        cache_teacher is True
        or (cache_teacher == "auto" and not isinstance(train, tf.data.Dataset))
    )
    if cache:
        options = {"batch_size": batch_size, "seed": seed}
        run = tf.function(teacher_logits, reduce_retracing=True)
        train_data = _with_teacher_logits(train, run, name="train", **options)
        if validation is not None:
            validation_data = _with_teacher_logits(validation, run, name="validation", **options)
    stage = stages.Stage("distill", epochs, learning_rate)
    loss = DistillationLoss(alpha, temperature)
    with inputs.strategy.scope():
        trainer = _Distiller(
            student, student_head, teacher_logits if alpha < 1 else None, loss, name="distiller"
        )
        optimizer = stages.stage_optimizer(
            student, stage, inputs.steps, weight_decay=weight_decay, lr_scale=inputs.lr_scale
        )
        trainer.compile(
            optimizer=optimizer,
            metrics=compile_arguments(student)["metrics"],
            jit_compile=jit_compile,
            steps_per_execution=steps_per_execution,
        )
        # The student with the same optimizer: checkpoints save it whole.
        student.compile(optimizer=optimizer, **compile_arguments(student))
    stage_callbacks = stages.stage_callbacks(
        stage, validation=validation_data, patience=patience, callbacks=callbacks
    )
    student.history = trainer.fit(
        train_data,
        validation_data=validation_data,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=[CallbackRelay(stage_callbacks, student)],
        shuffle=False,
        verbose=verbose,
    )
    return student
