"""One-call fine-tuning recipes built from the public pieces.

Defaults (and where they come from):

* Head LR 1e-3 with AdamW: the Keras transfer-learning guide (Adam 1e-3 for
  the new head) and MediaPipe Model Maker (1e-3 at batch 256, warm-up +
  cosine). Each stage warms up for 10% of its steps, then decays (cosine).
* Backbone LR: stage 2 of `"two_stage"` and `"full"` train
  at `learning_rate / 10` for the head, and discriminative LRs below it: the
  stem learns 100x slower than the head (fastai's `slice(lr / 100, lr)`).
  The Keras guide's 1e-5 for the whole base is the same idea, uniformly.
* Weight decay 1e-4 (decoupled, scaled with each variable's LR), label
  smoothing 0.1 (MediaPipe Model Maker), dropout 0.2 in the builder.
* With validation data: early stopping on `val_loss` (patience 3) and the
  best weights restored at the end of each stage.
* BatchNorm stays in inference mode with frozen statistics (the Keras guide).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from keras_transfer.backbones import backbone_blocks
from keras_transfer.callbacks import ProgressiveUnfreezing
from keras_transfer.freezing import freeze_backbone, resolve_bn_policy, unfreeze
from keras_transfer.heads import (
    DEFAULT_LABEL_SMOOTHING,
    HEAD_NAME,
    check_labels,
    default_loss,
    default_metrics,
    head_kind,
)
from keras_transfer.optimizers import (
    DEFAULT_LR_SPREAD,
    DEFAULT_WEIGHT_DECAY,
    discriminative_optimizer,
    layerwise_optimizer,
    warmup_cosine,
)

RECIPES = ("feature_extraction", "two_stage", "full", "progressive")
DEFAULT_EPOCHS = {
    "feature_extraction": 5,
    "two_stage": (3, 3),
    "full": 5,
    "progressive": 5,
}
DEFAULT_LEARNING_RATE = 1e-3
# The backbone-training stage runs this much slower than the head stage.
FINE_TUNE_LR_RATIO = 0.1
# "progressive" starts at `learning_rate` for the head and halves the LR at
# each unfreezing step (ULMFiT-style gradual unfreezing, Howard & Ruder 2018).
PROGRESSIVE_LR_FACTOR = 0.5
DEFAULT_PATIENCE = 3
WARMUP_FRACTION = 0.1
DEFAULT_BATCH_SIZE = 32


def _as_dataset(data, batch_size, name):
    if data is None:
        return None
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
    raise TypeError(
        f"`{name}` must be a batched tf.data.Dataset of (images, labels) or a tuple "
        f"(images, labels) of arrays. Received: {type(data).__name__}"
    )


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


def _check_epochs(recipe, epochs):
    if epochs is None:
        return DEFAULT_EPOCHS[recipe]
    if recipe == "two_stage":
        pair = (epochs, epochs) if isinstance(epochs, int) else tuple(epochs)
        if len(pair) != 2 or min(pair) < 0 or sum(pair) < 1:
            raise ValueError(
                "For recipe='two_stage', `epochs` must be an int or (head_epochs, "
                f"fine_tune_epochs) with a positive total. Received: epochs={epochs!r}"
            )
        return tuple(int(e) for e in pair)
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={epochs!r}")
    return epochs


def _merge(histories):
    merged: dict[str, list] = {}
    for stage, history in enumerate(histories, start=1):
        count = len(history.epoch)
        for key, values in history.history.items():
            merged.setdefault(key, []).extend(values)
        merged.setdefault("stage", []).extend([stage] * count)
    result = keras.callbacks.History()
    result.history = merged
    result.epoch = list(range(len(merged.get("stage", []))))
    return result


def fine_tune(
    model: keras.Model,
    train,
    validation=None,
    *,
    recipe: str = "two_stage",
    epochs: int | tuple[int, int] | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    unfreeze_blocks: int | str = "all",
    lr_spread: float = DEFAULT_LR_SPREAD,
    bn_policy: str | None = None,
    patience: int | None = DEFAULT_PATIENCE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps_per_epoch: int | None = None,
    callbacks: list | None = None,
    jit_compile="auto",
    verbose="auto",
) -> keras.callbacks.History:
    """Fine-tunes a model built by `keras_transfer` with a named recipe.

    Recipes:
        `"feature_extraction"`: backbone frozen, head trained at
        `learning_rate`.
        `"two_stage"`: the head first (backbone frozen), then the top
        `unfreeze_blocks` blocks with the head at `learning_rate / 10` and
        discriminative LRs down the backbone.
        `"full"`: everything trains from the start at `learning_rate / 10`
        with discriminative LRs.
        `"progressive"`: one `fit`; the head trains alone for the first
        epoch at `learning_rate`, then one more block unfreezes each epoch
        (`ProgressiveUnfreezing`) and the LR halves at each step, with
        discriminative LRs down the backbone.

    Args:
        model: a model from `build_image_classifier` (or any model with a
            `"backbone"` layer and a `"head"` output layer).
        train: a batched `tf.data.Dataset` of `(images, labels)`, or a tuple
            of arrays.
        validation: the same for validation, or None (then no early stopping).
        recipe: one of `RECIPES`.
        epochs: an int, or `(head_epochs, fine_tune_epochs)` for
            `"two_stage"`; defaults in `DEFAULT_EPOCHS`.
        learning_rate: peak LR of the head stage.
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: for softmax and multi-label heads.
        unfreeze_blocks: blocks unfrozen in stage 2 of `"two_stage"` (an int
            or `"all"`).
        lr_spread: head LR / stem LR in the backbone-training stages.
        bn_policy: see `kt.unfreeze`; None infers it from the model.
        patience: early-stopping patience (epochs) when `validation` is
            given; None disables early stopping.
        batch_size: batch size when `train` is a tuple of arrays.
        steps_per_epoch: needed when `train` has unknown length.
        callbacks: extra Keras callbacks, used in every stage.
        jit_compile: passed to `compile`.
        verbose: passed to `fit`.

    Returns:
        A `keras.callbacks.History` whose `history` merges all stages, with
        a `"stage"` entry giving each epoch's stage (1 or 2).

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> data = (np.random.rand(8, 32, 32, 3) * 255, np.arange(8) % 2)
    >>> history = kt.fine_tune(model, data, recipe="two_stage", epochs=(1, 1),
    ...                        verbose=0)
    >>> history.history["stage"]
    [1, 2]
    """
    if recipe not in RECIPES:
        raise ValueError(f"`recipe` must be one of {RECIPES}. Received: recipe={recipe!r}")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={learning_rate}")
    epochs = _check_epochs(recipe, epochs)
    policy = resolve_bn_policy(model, bn_policy)
    num_blocks = len(backbone_blocks(model))
    if unfreeze_blocks != "all" and not (
        isinstance(unfreeze_blocks, int) and 1 <= unfreeze_blocks <= num_blocks
    ):
        raise ValueError(
            f"`unfreeze_blocks` must be 'all' or an integer in [1, {num_blocks}]. "
            f"Received: unfreeze_blocks={unfreeze_blocks!r}"
        )
    train = _as_dataset(train, batch_size, "train")
    validation = _as_dataset(validation, batch_size, "validation")
    head = model.get_layer(HEAD_NAME)
    kind = head_kind(head)
    label_spec = train.element_spec[1]
    check_labels(kind, head.units, label_spec.shape, label_spec.dtype.as_numpy_dtype)
    steps = _steps(train, steps_per_epoch)
    fine_lr = learning_rate * FINE_TUNE_LR_RATIO

    def compile_and_fit(optimizer_fn, stage_lr, stage_epochs, initial_epoch, extra):
        total_steps = max(steps * stage_epochs, 1)
        schedule = warmup_cosine(stage_lr, total_steps, WARMUP_FRACTION)
        optimizer = optimizer_fn(learning_rate=schedule, weight_decay=weight_decay)
        model.compile(
            optimizer=optimizer,
            loss=default_loss(kind, label_smoothing),
            metrics=default_metrics(kind),
            jit_compile=jit_compile,
        )
        stage_callbacks = list(callbacks or []) + extra
        if validation is not None and patience is not None:
            stage_callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor="val_loss", patience=patience, restore_best_weights=True
                )
            )
        return model.fit(
            train,
            validation_data=validation,
            epochs=initial_epoch + stage_epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=stage_callbacks,
            verbose=verbose,
            shuffle=False,
        )

    def head_optimizer(**kwargs):
        return layerwise_optimizer("adamw", **kwargs)

    def backbone_optimizer(**kwargs):
        return discriminative_optimizer(model, "adamw", spread=lr_spread, **kwargs)

    histories = []
    if recipe in ("feature_extraction", "two_stage"):
        head_epochs = epochs if recipe == "feature_extraction" else epochs[0]
        freeze_backbone(model)
        if head_epochs:
            histories.append(compile_and_fit(head_optimizer, learning_rate, head_epochs, 0, []))
    if recipe == "two_stage" and epochs[1]:
        if unfreeze_blocks == "all":
            unfreeze(model, "all", bn_policy=policy)
        else:
            unfreeze(model, blocks=unfreeze_blocks, bn_policy=policy)
        start = len(histories[0].epoch) if histories else 0
        histories.append(compile_and_fit(backbone_optimizer, fine_lr, epochs[1], start, []))
    if recipe == "full":
        unfreeze(model, "all", bn_policy=policy)
        histories.append(compile_and_fit(backbone_optimizer, fine_lr, epochs, 0, []))
    if recipe == "progressive":
        freeze_backbone(model)
        progressive = ProgressiveUnfreezing(1, lr_factor=PROGRESSIVE_LR_FACTOR, bn_policy=policy)
        histories.append(
            compile_and_fit(backbone_optimizer, learning_rate, epochs, 0, [progressive])
        )
    return _merge(histories)
