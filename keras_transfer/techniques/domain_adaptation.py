"""Domain adaptation: labelled source data, unlabelled target data, one classifier for both.

Two methods, each a plain classifier in and out:

* `dann`: domain-adversarial training (Ganin et al. 2016, "Domain-Adversarial
  Training of Neural Networks", JMLR 17). A domain classifier (an MLP with
  `domain_hidden` ReLU units) reads the pooled features through a
  `GradientReversal` layer and learns to tell source from target images; the
  reversal multiplies its gradient by `-lambda` on the way back into the
  features, so the backbone learns features the domain classifier cannot
  separate while the label head keeps them discriminative. `lambda` follows
  `dann_lambda` over the training progress `p` in [0, 1]: `lambda_max * (2 /
  (1 + exp(-10 p)) - 1)`, 0 at the start (the paper's schedule: the early,
  noisy domain signal does not disturb the features).
* `mmd`: Deep Adaptation Networks (Long et al. 2015, "Learning Transferable
  Features with Deep Adaptation Networks", ICML): the source loss plus
  `weight * MK-MMD^2` between the pooled features of each batch's source and
  target images (`mmd_loss`: Gaussian kernels whose squared bandwidths are the
  median pairwise squared distance times `kernels`).

Each training step takes `batch_size` source images with their labels and
`batch_size` target images, both through the model in one forward pass
(concatenated: BatchNorm layers that train see both domains, as in Ganin et
al.); the source loss is the head's usual loss (`training.compile_arguments`)
on the source rows only. Target labels never reach the training loss:
`target` must be images alone (labelled target data is refused), and
`target_eval=(x, y)` only feeds a callback that reports `target_accuracy`
after each epoch. A training-only `keras.Model` shares the classifier's
layers and compiles a recipe stage's optimizer (`stages.stage_optimizer`:
warm-up then cosine decay, discriminative LRs) under the model's strategy:
SGD with momentum for DANN (as Ganin et al.), AdamW for MMD (as the
recipes). Adam-family optimizers scale each parameter's step to its
gradient's size, so once the source loss is small the reversed domain
gradient moves the features at the full step whatever `lambda` is: measured,
DANN under AdamW swung from +9 to -10 points of target accuracy across seeds
where SGD gained 6-10 on every seed. The classifier is returned without the
domain classifier. `lambda_max=0` / `weight=0` train the same model on the
same batches with the same optimizer on the source loss alone: the
source-only baseline.

Example:
>>> import keras, numpy as np, keras_transfer as kt
>>> backbone = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
...                              keras.layers.GlobalAveragePooling2D()])
>>> model = kt.build_image_classifier(backbone, 2, weights=None, freeze_backbone=False)
>>> source = (np.random.rand(8, 8, 8, 3) * 255, np.arange(8) % 2)
>>> target = 255 - source[0]  # images only
>>> trained = kt.techniques.dann(model, source, target, epochs=1, verbose=0)
>>> trained is model, sorted(model.history.history)
(True, ['domain_loss', 'lambda', 'loss', 'source_accuracy'])
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_transfer import stages
from keras_transfer.callbacks import CallbackRelay
from keras_transfer.heads import DEFAULT_LABEL_SMOOTHING
from keras_transfer.optimizers import DEFAULT_LR_SPREAD, DEFAULT_WEIGHT_DECAY
from keras_transfer.techniques.domain_alignment import (
    DEFAULT_DOMAIN_HIDDEN,
    DEFAULT_MMD_KERNELS,
    DANNTrainer,
    GradientReversal,
    MMDTrainer,
    ReversalSchedule,
    dann_lambda,
    mmd_loss,
    pooled_features,
)
from keras_transfer.techniques.domain_data import (
    TargetAccuracy,
    check_not_empty,
    evaluation_arrays,
    paired_batches,
    target_batches,
)
from keras_transfer.training import (
    DEFAULT_BATCH_SIZE,
    check_number,
    compile_arguments,
    positive_number,
    prepare_training,
)

__all__ = ["GradientReversal", "dann", "dann_lambda", "mmd", "mmd_loss"]

OPTIMIZERS = ("sgd", "adamw")
# Ganin et al. 2016 train DANN with SGD, momentum 0.9, LR 0.01 (annealed);
# MMD trains with the recipes' AdamW at their head LR, 1e-3. Both measured in
# benchmarks/effects/dann.py. The backbone's stem gets LR / `lr_spread`.
SGD_MOMENTUM = 0.9
DEFAULT_DANN_LEARNING_RATE = 1e-2
DEFAULT_MMD_LEARNING_RATE = 1e-3


def _adapt(model, source, target, make_trainer, schedule, **options):
    """Validates, pairs source and target batches, trains `make_trainer(...)`, returns `model`."""
    pooled_features(model)
    check_number("epochs", options["epochs"], 1, integer=True)
    if not positive_number(options["learning_rate"]):
        raise ValueError(
            f"`learning_rate` must be > 0. Received: learning_rate={options['learning_rate']!r}"
        )
    if options["optimizer"] not in OPTIMIZERS:
        raise ValueError(
            f"`optimizer` must be one of {OPTIMIZERS}. Received: optimizer={options['optimizer']!r}"
        )
    blocks = options["unfreeze_blocks"]
    if blocks != "all" and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
        raise ValueError(
            "`unfreeze_blocks` must be 'all' or an integer >= 1. "
            f"Received: unfreeze_blocks={blocks!r}"
        )
    check_not_empty("source", source)
    evaluation = evaluation_arrays(options["target_eval"])
    stage = stages.Stage(
        options["name"],
        options["epochs"],
        options["learning_rate"],
        train_blocks=options["unfreeze_blocks"],
        discriminative=True,
    )
    batch_size, seed = options["batch_size"], options["seed"]
    inputs = prepare_training(
        model,
        source,
        weight_decay=options["weight_decay"],
        label_smoothing=options["label_smoothing"],
        lr_spread=options["lr_spread"],
        patience=None,
        batch_size=batch_size,
        strategy=options["strategy"],
        seed=seed,
    )
    targets = target_batches(target, batch_size, seed=seed, rank=len(model.inputs[0].shape))
    paired = paired_batches(inputs.train, targets, model.inputs[0].dtype)
    stages.apply_stage(model, stage, options["bn_policy"])
    arguments = compile_arguments(model, label_smoothing=options["label_smoothing"])
    with inputs.strategy.scope():
        trainer = make_trainer(model, arguments["loss"])
        optimizer = stages.stage_optimizer(
            model,
            stage,
            inputs.steps,
            weight_decay=options["weight_decay"],
            lr_spread=options["lr_spread"],
            lr_scale=inputs.lr_scale,
            optimizer=options["optimizer"],
            **({"momentum": SGD_MOMENTUM} if options["optimizer"] == "sgd" else {}),
        )
        trainer.compile(
            optimizer=optimizer,
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="source_accuracy")],
            jit_compile=options["jit_compile"],
        )
        # The classifier with the same optimizer: checkpoints save it whole.
        model.compile(optimizer=optimizer, **arguments)
    callbacks = schedule(trainer, inputs.steps)
    if evaluation is not None:
        callbacks.append(TargetAccuracy(model, *evaluation, batch_size=batch_size))
    if options["callbacks"]:
        callbacks.append(CallbackRelay(options["callbacks"], model))
    model.history = trainer.fit(
        paired,
        epochs=options["epochs"],
        callbacks=callbacks,
        shuffle=False,
        verbose=options["verbose"],
    )
    return model


def dann(
    model: keras.Model,
    source,
    target,
    *,
    epochs: int,
    lambda_max: float = 1.0,
    learning_rate: float = DEFAULT_DANN_LEARNING_RATE,
    optimizer: str = "sgd",
    batch_size: int = DEFAULT_BATCH_SIZE,
    domain_hidden: int = DEFAULT_DOMAIN_HIDDEN,
    unfreeze_blocks: int | str = "all",
    lr_spread: float = DEFAULT_LR_SPREAD,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    bn_policy: str | None = None,
    target_eval=None,
    strategy: tf.distribute.Strategy | None = None,
    seed: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    jit_compile="auto",
    verbose="auto",
) -> keras.Model:
    """Trains `model` on labelled `source` data with a domain-adversarial loss on `target` images.

    See the module docstring: a domain classifier on the pooled features,
    behind a `GradientReversal` whose strength follows `dann_lambda` over the
    training steps. `lambda_max=0` is the source-only baseline (same model,
    batches, optimizer and epochs; the domain classifier trains but its
    gradient never reaches the features).

    Args:
        model: a classifier from `kt.build_image_classifier` (one image
            input, one softmax head; the backbone is the layer `"backbone"`).
        source: `(images, labels)` arrays (shuffled every epoch with `seed`)
            or a batched dataset of `(images, labels)`.
        target: target-domain images alone: an array or a batched dataset of
            image batches, cycled and shuffled as needed. Labelled data is
            refused (see `target_eval`).
        epochs: training epochs, >= 1 (an epoch is one pass over `source`).
        lambda_max: the final gradient-reversal strength, >= 0.
        learning_rate: peak LR of the heads (warm-up then cosine decay); the
            backbone's blocks get less, down to `learning_rate / lr_spread`
            at the stem.
        optimizer: `"sgd"` (momentum 0.9, as Ganin et al.) or `"adamw"`
            (see the module docstring).
        batch_size: source images per step (as many target images join them).
        domain_hidden: ReLU units of the domain classifier's hidden layer
            (0: a linear domain classifier).
        unfreeze_blocks: the backbone blocks that train: `"all"` or a number
            of top blocks.
        lr_spread: head LR / stem LR (>= 1; 1: one LR everywhere).
        weight_decay: decoupled weight decay.
        label_smoothing: of the source loss.
        bn_policy: BatchNorm of unfrozen blocks (see `kt.unfreeze`).
        target_eval: `(images, labels)` of the target domain, or a dataset of
            such batches, used only to report `target_accuracy` after each
            epoch (never in the loss); None: not reported.
        strategy: the `tf.distribute.Strategy` the model was built under.
        seed: seed of the shuffles and of the domain classifier's weights.
        callbacks: Keras callbacks; they see `model`.
        jit_compile: passed to `compile`.
        verbose: passed to `fit`.

    Returns:
        `model` itself, trained, compiled with its usual loss and metrics;
        `model.history` holds per epoch `loss`, `source_accuracy` (on the
        training batches), `domain_loss`, `lambda` and, with `target_eval`,
        `target_accuracy`.

    Raises:
        ValueError: `lambda_max` < 0, labelled or empty `target`, empty
            `source`, a model that is not a softmax classifier, or a bad
            training option.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> x = np.zeros((4, 32, 32, 3))
    >>> kt.techniques.dann(model, (x, np.arange(4) % 2), (x, np.arange(4) % 2), epochs=1)
    Traceback (most recent call last):
    ...
    ValueError: `target` must be unlabelled images: an array `[n, height, width, channels]` or a batched tf.data.Dataset of images alone. Target labels never reach the training loss; to report target accuracy, pass them as `target_eval=(images, labels)`. Received: a tuple of 2
    """
    check_number("lambda_max", lambda_max, 0)
    check_number("domain_hidden", domain_hidden, 0, integer=True)

    def make_trainer(classifier, loss):
        return DANNTrainer(
            classifier, loss, domain_hidden=domain_hidden, seed=seed, name="dann_trainer"
        )

    def schedule(trainer, steps):
        return [ReversalSchedule(trainer.reversal, lambda_max, steps, epochs)]

    return _adapt(
        model,
        source,
        target,
        make_trainer,
        schedule,
        name="dann",
        epochs=epochs,
        learning_rate=learning_rate,
        optimizer=optimizer,
        batch_size=batch_size,
        unfreeze_blocks=unfreeze_blocks,
        lr_spread=lr_spread,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        bn_policy=bn_policy,
        target_eval=target_eval,
        strategy=strategy,
        seed=seed,
        callbacks=callbacks,
        jit_compile=jit_compile,
        verbose=verbose,
    )


def mmd(
    model: keras.Model,
    source,
    target,
    *,
    epochs: int,
    weight: float = 1.0,
    kernels: Sequence[float] = DEFAULT_MMD_KERNELS,
    learning_rate: float = DEFAULT_MMD_LEARNING_RATE,
    optimizer: str = "adamw",
    batch_size: int = DEFAULT_BATCH_SIZE,
    unfreeze_blocks: int | str = "all",
    lr_spread: float = DEFAULT_LR_SPREAD,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    label_smoothing: float = DEFAULT_LABEL_SMOOTHING,
    bn_policy: str | None = None,
    target_eval=None,
    strategy: tf.distribute.Strategy | None = None,
    seed: int = 0,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    jit_compile="auto",
    verbose="auto",
) -> keras.Model:
    """Trains `model` on labelled `source` data plus `weight` x MK-MMD to the `target` images.

    The loss of each step is the source loss plus `weight * mmd_loss(source
    features, target features, kernels)` on the pooled features of the
    step's source and target images (Long et al. 2015). `weight=0` is the
    source-only baseline (same model, batches, optimizer and epochs).

    Args:
        model: a classifier from `kt.build_image_classifier`.
        source: `(images, labels)` arrays or a batched dataset of them.
        target: target-domain images alone (an array or a batched dataset
            of image batches); labelled data is refused.
        epochs: training epochs, >= 1 (an epoch is one pass over `source`).
        weight: weight of the MMD term, >= 0.
        kernels: squared-bandwidth multipliers of the Gaussian kernels,
            relative to the median squared distance of each batch's features.
        learning_rate: peak LR of the head (the backbone gets less, down to
            `learning_rate / lr_spread` at the stem).
        optimizer: `"adamw"` (the recipes') or `"sgd"` (momentum 0.9).
        batch_size: source images per step (as many target images join them).
        unfreeze_blocks: `"all"` or a number of top backbone blocks to train.
        lr_spread: head LR / stem LR (>= 1).
        weight_decay: decoupled weight decay.
        label_smoothing: of the source loss.
        bn_policy: BatchNorm of unfrozen blocks (see `kt.unfreeze`).
        target_eval: `(images, labels)` of the target domain (or a dataset of
            such batches), only to report `target_accuracy` per epoch.
        strategy: the `tf.distribute.Strategy` the model was built under.
        seed: seed of the shuffles.
        callbacks: Keras callbacks; they see `model`.
        jit_compile: passed to `compile`.
        verbose: passed to `fit`.

    Returns:
        `model` itself, trained and compiled; `model.history` holds per epoch
        `loss`, `source_accuracy`, `mmd` (the unweighted estimate) and, with
        `target_eval`, `target_accuracy`.

    Raises:
        ValueError: `weight` < 0, `kernels` not all > 0, labelled or empty
            `target`, empty `source`, or a bad training option.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> x = np.zeros((4, 32, 32, 3))
    >>> kt.techniques.mmd(model, (x, np.arange(4) % 2), x, epochs=1, weight=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: `weight` must be a number >= 0. Received: weight=-1.0
    """
    check_number("weight", weight, 0)
    if not kernels or not all(positive_number(k) for k in kernels):
        raise ValueError(f"`kernels` must be numbers > 0. Received: kernels={kernels!r}")

    def make_trainer(classifier, loss):
        return MMDTrainer(classifier, loss, weight=weight, kernels=kernels, name="mmd_trainer")

    return _adapt(
        model,
        source,
        target,
        make_trainer,
        lambda trainer, steps: [],
        name="mmd",
        epochs=epochs,
        learning_rate=learning_rate,
        optimizer=optimizer,
        batch_size=batch_size,
        unfreeze_blocks=unfreeze_blocks,
        lr_spread=lr_spread,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        bn_policy=bn_policy,
        target_eval=target_eval,
        strategy=strategy,
        seed=seed,
        callbacks=callbacks,
        jit_compile=jit_compile,
        verbose=verbose,
    )
