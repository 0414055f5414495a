"""A stage: one `fit` of a recipe, and the public pieces it is made of.

`fit_stage` sets what trains (`apply_stage`), compiles the stage's optimizer
(`stage_optimizer`: AdamW with warm-up + cosine, layer-wise LRs) and loss per
head (`training.compile_arguments`) under the model's strategy, and runs `fit`
with the stage's callbacks (`stage_callbacks`). With `cache_features`, a stage
whose backbone stays frozen (`Stage.frozen_backbone`) trains the head on
features computed once (`keras_transfer.feature_cache`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_transfer.callbacks import CallbackRelay, ProgressiveUnfreezing
from keras_transfer.class_weights import format_class_weights, resolve_class_weight
from keras_transfer.feature_cache import (
    FeatureCache,
    as_feature_cache,
    cached_features,
    check_cacheable,
    split_at_head,
)
from keras_transfer.freezing import freeze_backbone, resolve_bn_policy, unfreeze
from keras_transfer.heads import DEFAULT_LABEL_SMOOTHING
from keras_transfer.optimizers import (
    DEFAULT_LR_SPREAD,
    DEFAULT_WEIGHT_DECAY,
    discriminative_optimizer,
    layerwise_optimizer,
    warmup_cosine,
)
from keras_transfer.techniques import lora
from keras_transfer.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PATIENCE,
    check_number,
    compile_arguments,
    positive_number,
    prepare_training,
)

# "progressive" starts at `learning_rate` for the head and shrinks the LR by
# this at each unfreezing step (ULMFiT-style gradual unfreezing, Howard &
# Ruder 2018).
PROGRESSIVE_LR_FACTOR = 0.5
WARMUP_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class Stage:
    """One `fit` of a recipe.

    Args:
        name: a label for the stage (`"head"`, `"fine_tune"`, ...).
        epochs: epochs of this stage (>= 1).
        learning_rate: peak LR (warm-up then cosine decay over the stage).
        train_blocks: what of the backbone trains: 0 (frozen, head only), a
            number of top blocks, or `"all"`.
        discriminative: LRs fall down the backbone (`lr_spread` from head
            to stem); otherwise every variable gets `learning_rate`.
        progressive: the backbone starts frozen and one more block unfreezes
            each epoch inside the `fit` (`ProgressiveUnfreezing`), the LR
            shrinking by `PROGRESSIVE_LR_FACTOR` at each step.
        lora_rank: when set, LoRA adapters of this rank are added to the
            backbone (`kt.lora.enable`, unless it has them already) and only
            they train in it, with the head; `train_blocks` must be 0.
        lora_alpha: LoRA scale numerator (None: the rank).
        lora_targets: `"auto"` or layer names / path regexes (`kt.lora.enable`).

    Example:

    >>> Stage("head", epochs=3, learning_rate=1e-3).train_blocks
    0
    """

    name: str
    epochs: int
    learning_rate: float
    train_blocks: int | str = 0
    discriminative: bool = False
    progressive: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: str | tuple[str, ...] = lora.AUTO

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={self.epochs!r}")
        if not positive_number(self.learning_rate):
            raise ValueError(
                f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate!r}"
            )
        if self.train_blocks != "all" and (
            isinstance(self.train_blocks, bool)
            or not isinstance(self.train_blocks, int)
            or self.train_blocks < 0
        ):
            raise ValueError(
                "`train_blocks` must be 'all' or an integer >= 0. "
                f"Received: train_blocks={self.train_blocks!r}"
            )
        if self.lora_rank is not None:
            targets = lora.check_options(
                self.lora_rank, self.lora_alpha, self.lora_targets, prefix="lora_"
            )
            object.__setattr__(
                self, "lora_targets", targets if targets != (lora.AUTO,) else lora.AUTO
            )
            if self.train_blocks != 0 or self.progressive:
                raise ValueError(
                    "A LoRA stage trains adapters on a frozen backbone: `train_blocks` must be 0 "
                    f"and `progressive` False. Received: train_blocks={self.train_blocks!r}, "
                    f"progressive={self.progressive!r}"
                )
        if self.progressive and self.train_blocks != 0:
            raise ValueError(
                "A progressive stage starts from a frozen backbone: `train_blocks` must be 0. "
                f"Received: train_blocks={self.train_blocks!r}"
            )

    @property
    def frozen_backbone(self) -> bool:
        """Whether nothing in the backbone trains in this stage (its features can be cached).

        False when blocks, LoRA adapters or progressive unfreezing train it.
        """
        return self.train_blocks == 0 and not self.progressive and self.lora_rank is None


def stage_optimizer(
    model: keras.Model,
    stage: Stage,
    steps: int,
    *,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    lr_spread: float = DEFAULT_LR_SPREAD,
    lr_scale: float = 1.0,
    optimizer: str = "adamw",
    **optimizer_kwargs,
) -> keras.optimizers.Optimizer:
    """The optimizer a stage compiles: AdamW, warm-up + cosine, layer-wise LRs.

    Args:
        model: the model (its backbone blocks set the discriminative LRs).
        stage: the `Stage`.
        steps: training steps per epoch.
        weight_decay: AdamW decoupled weight decay.
        lr_spread: head LR / stem LR for discriminative stages.
        lr_scale: multiplies the stage's peak LR (linear scaling rule).
        optimizer: the Keras optimizer's name; the recipes use `"adamw"`
            (`techniques.dann` uses `"sgd"`).
        **optimizer_kwargs: more arguments of that optimizer (`momentum`).

    Returns:
        An unbuilt layer-wise optimizer (AdamW by default).

    Example:

    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3))
    >>> opt = stage_optimizer(model, Stage("head", 1, 1e-3), steps=10)
    >>> type(opt).__name__
    'LayerwiseAdamW'
    """
    total_steps = max(steps * stage.epochs, 1)
    schedule = warmup_cosine(stage.learning_rate * lr_scale, total_steps, WARMUP_FRACTION)
    # A fixed name: saved optimizer variables are found by path on resume.
    options = {
        "learning_rate": schedule,
        "weight_decay": weight_decay,
        "name": optimizer,
        **optimizer_kwargs,
    }
    if stage.discriminative:
        return discriminative_optimizer(model, optimizer, spread=lr_spread, **options)
    return layerwise_optimizer(optimizer, **options)


def stage_callbacks(
    stage: Stage,
    *,
    validation=None,
    patience: int | None = DEFAULT_PATIENCE,
    bn_policy: str | None = None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one stage: progressive unfreezing, the caller's, early stopping.

    Args:
        stage: the `Stage`.
        validation: the validation data (early stopping needs it).
        patience: early-stopping patience on `val_loss`; None: off.
        bn_policy: BatchNorm policy for blocks unfrozen during the stage.
        callbacks: the caller's callbacks (after progressive unfreezing).

    Returns:
        A new list of callbacks.

    Example:

    >>> [type(c).__name__ for c in stage_callbacks(Stage("p", 2, 1e-3, progressive=True))]
    ['ProgressiveUnfreezing']
    """
    # Unfreezing comes first: the callbacks after it see the stage's trainable
    # variables and its optimizer built over every candidate.
    result = []
    if stage.progressive:
        result.append(
            ProgressiveUnfreezing(1, lr_factor=PROGRESSIVE_LR_FACTOR, bn_policy=bn_policy)
        )
    result.extend(callbacks or [])
    if validation is not None and patience is not None:
        result.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=patience, restore_best_weights=True
            )
        )
    return result


def apply_stage(model: keras.Model, stage: Stage, bn_policy: str | None = None) -> None:
    """Freezes or unfreezes the backbone as the stage says.

    Args:
        model: a model with a `"backbone"` layer.
        stage: the `Stage`.
        bn_policy: BatchNorm policy of unfrozen blocks (see `kt.unfreeze`).

    Returns:
        None.

    Example:

    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3))
    >>> apply_stage(model, Stage("all", 1, 1e-4, train_blocks="all"))
    >>> model.get_layer("backbone").trainable
    True
    """
    policy = resolve_bn_policy(model, bn_policy)
    if stage.lora_rank is not None:
        if not lora.lora_layers(model):
            lora.enable(model, stage.lora_rank, stage.lora_alpha, stage.lora_targets)
        lora.train_adapters_only(model)
        return
    if stage.train_blocks == "all":
        unfreeze(model, "all", bn_policy=policy)
        return
    freeze_backbone(model)
    if stage.train_blocks:
        unfreeze(model, blocks=stage.train_blocks, bn_policy=policy)


def fit_stage(
    model: keras.Model,
    train,
    validation=None,
    stage: Stage | None = None,
    *,
    initial_epoch: int = 0,
    completed_epochs: int = 0,
    loss=None,
    metrics=None,
    loss_weights=None,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    lr_spread: float = DEFAULT_LR_SPREAD,
    lr_scaling: str | None = None,
    bn_policy: str | None = None,
    patience: int | None = DEFAULT_PATIENCE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps_per_epoch: int | None = None,
    callbacks: list | None = None,
    strategy: tf.distribute.Strategy | None = None,
    seed: int = 0,
    jit_compile="auto",
    cache_features: bool | str | FeatureCache = False,
    class_weight=None,
    verbose="auto",
) -> keras.callbacks.History:
    """Runs one stage of a recipe: set what trains, compile, `fit`.

    With `cache_features`, a stage whose backbone stays frozen
    (`Stage.frozen_backbone`) runs the frozen part of the model (input ->
    [preprocessing] -> backbone -> pooling, see
    `keras_transfer.feature_cache`) once per example in inference mode, and
    trains the head (dropout + head layers) on the features with the same
    optimizer, schedule, loss, metrics and callbacks; the callbacks see the
    whole model, whose head is the one trained. Arrays keep the order and
    batches of an uncached run. The features are the inference-mode ones:
    keras.applications EfficientNet / EfficientNetV2 backbones keep their
    stochastic-depth dropout active in an uncached `fit` even when frozen
    (Keras passes `training=True` down; only BatchNorm follows `trainable`),
    so there a cached head sees the features `predict` computes instead of
    noisy ones.

    Args:
        model: a model with a `"backbone"` layer and named output layer(s).
        train: a batched `tf.data.Dataset` or a tuple of arrays (shuffled
            every epoch, seeded).
        validation: the same for validation, or None.
        stage: the `Stage` to run.
        initial_epoch: epoch number the stage starts at (its history's epochs
            and the schedule of a progressive stage count from it).
        completed_epochs: epochs of this stage already done (when resuming
            an interrupted stage whose variables a callback restores): `fit`
            runs the remaining `stage.epochs - completed_epochs`.
        loss: None (the default of each head's kind), a loss, or a dict by
            output name for several heads.
        metrics: None (defaults per head), a list, or a dict by output name.
        loss_weights: weights of the heads' losses (several heads).
        weight_decay: AdamW decoupled weight decay.
        label_smoothing: for the default softmax and multi-label losses.
        lr_spread: head LR / stem LR in discriminative stages.
        lr_scaling: None, or `"linear"`: the LR times the number of replicas.
        bn_policy: see `kt.unfreeze`; None infers it from the model.
        patience: early-stopping patience when `validation` is given.
        batch_size: global batch size for arrays (divisible by the replicas).
        steps_per_epoch: needed when `train` has unknown length.
        callbacks: extra Keras callbacks.
        strategy: a `tf.distribute.Strategy` the model was built under; None:
            the model's own.
        seed: seed of the array shuffle.
        jit_compile: passed to `compile` (True also compiles the feature
            pass with XLA).
        cache_features: False, True (`"auto"`: in memory up to
            `FEATURE_CACHE_MEMORY_BUDGET`, else on disk), `"memory"`,
            `"disk"`, or a `FeatureCache` (mode, folder, memory budget).
        class_weight: None, `"balanced"` (computed from `train`'s labels,
            printed when `verbose`) or `{class index: weight}`; see
            `kt.class_weights.resolve_class_weight`. Cached or not.
        verbose: passed to `fit`; not 0 also prints the feature cache's
            estimated size.

    Returns:
        The stage's `keras.callbacks.History` (the same keys with or without
        caching).

    Raises:
        ValueError: a bad value; or `cache_features` with a stage that
            trains the backbone, a model with random augmentation, or an
            infinite dataset.

    Example:

    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> data = (np.random.rand(8, 32, 32, 3) * 255, np.arange(8) % 2)
    >>> history = kt.fit_stage(model, data, stage=kt.Stage("head", 1, 1e-3), verbose=0)
    >>> len(history.epoch)
    1
    """
    if not isinstance(stage, Stage):
        raise TypeError(f"`stage` must be a Stage. Received: {type(stage).__name__}")
    check_number("completed_epochs", completed_epochs, 0, stage.epochs, integer=True)
    cache = as_feature_cache(cache_features)
    if cache is not None:
        if not stage.frozen_backbone:
            raise ValueError(
                "`cache_features` needs a stage whose backbone stays frozen (its features do "
                f"not change); stage {stage.name!r} trains it. Received: "
                f"train_blocks={stage.train_blocks!r}, progressive={stage.progressive!r}, "
                f"lora_rank={stage.lora_rank!r}"
            )
        check_cacheable(model)
    inputs = prepare_training(
        model,
        train,
        validation,
        loss=loss,
        metrics=metrics,
        loss_weights=loss_weights,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        lr_spread=lr_spread,
        lr_scaling=lr_scaling,
        patience=patience,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        strategy=strategy,
        seed=seed,
    )
    weights = resolve_class_weight(model, train, class_weight)
    if isinstance(class_weight, str) and verbose:
        print(format_class_weights(weights))
    policy = resolve_bn_policy(model, bn_policy)
    losses = {
        "loss": loss,
        "metrics": metrics,
        "loss_weights": loss_weights,
        "label_smoothing": label_smoothing,
    }
    with inputs.strategy.scope():
        # Under the scope: a LoRA stage makes its adapter variables here.
        apply_stage(model, stage, policy)
        optimizer = stage_optimizer(
            model,
            stage,
            inputs.steps,
            weight_decay=weight_decay,
            lr_spread=lr_spread,
            lr_scale=inputs.lr_scale,
        )
        model.compile(
            optimizer=optimizer, jit_compile=jit_compile, **compile_arguments(model, **losses)
        )
    stage_list = stage_callbacks(
        stage,
        validation=inputs.validation,
        patience=patience,
        bn_policy=policy,
        callbacks=callbacks,
    )
    fit_options = {
        "epochs": initial_epoch + stage.epochs,
        "initial_epoch": initial_epoch + completed_epochs,
        "steps_per_epoch": steps_per_epoch,
        "verbose": verbose,
        "shuffle": False,
        "class_weight": weights,
    }
    if cache is None:
        return model.fit(
            inputs.train,
            validation_data=inputs.validation,
            callbacks=stage_list,
            **fit_options,
        )
    with inputs.strategy.scope():
        frozen, head = split_at_head(model)
        if getattr(model, "learns_loss_weights", False):
            head = model.view_of(head)  # the same learned loss weights (uncertainty)
        # The model's optimizer (loss-scaled under mixed_float16): one state,
        # saved with the model by checkpoints.
        head.compile(
            optimizer=model.optimizer, jit_compile=jit_compile, **compile_arguments(head, **losses)
        )
    with cached_features(
        frozen,
        train,
        validation,
        cache,
        batch_size=batch_size,
        seed=seed,
        jit_compile=jit_compile,
        verbose=verbose,
    ) as (features, validation_features):
        return head.fit(
            features,
            validation_data=validation_features,
            callbacks=[CallbackRelay(stage_list, model)],
            **fit_options,
        )
