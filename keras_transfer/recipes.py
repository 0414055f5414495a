"""Fine-tuning recipes as plans of stages, and the public pieces that run them.

A recipe is a plan: a list of `Stage`s, each one `fit` (which blocks train,
at which peak LR, with or without discriminative LRs, for how many epochs).
`fit_stage` runs one stage; `fine_tune` validates every argument, asks the
registered recipe for its plan, runs the stages and merges their histories.
`register_recipe` adds a recipe of your own; options `fine_tune` does not know
(`fine_tune(..., recipe="mine", my_option=3)`) go to that recipe's planner.

The seams other techniques plug into: `loss=` / `metrics=` / `loss_weights=`
(a dict keyed by output name for models with several heads), `strategy=`
(variables and optimizer state made under `strategy.scope()`) and the stages
themselves (a technique with its own train step compiles the same optimizer,
schedule and callbacks through `stage_optimizer` and `stage_callbacks`).

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
* Arrays are shuffled every epoch (seeded), as Keras `fit` shuffles arrays.
* `batch_size` is the global batch: under a strategy with N replicas each
  replica sees `batch_size / N` examples. `lr_scaling="linear"` multiplies
  the LR by N (the linear scaling rule, Goyal et al. 2017); off by default.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.backbones import backbone_blocks
from keras_transfer.callbacks import ProgressiveUnfreezing
from keras_transfer.freezing import freeze_backbone, resolve_bn_policy, unfreeze
from keras_transfer.heads import (
    DEFAULT_LABEL_SMOOTHING,
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

DEFAULT_LEARNING_RATE = 1e-3
# The backbone-training stage runs this much slower than the head stage.
FINE_TUNE_LR_RATIO = 0.1
# "progressive" starts at `learning_rate` for the head and halves the LR at
# each unfreezing step (ULMFiT-style gradual unfreezing, Howard & Ruder 2018).
PROGRESSIVE_LR_FACTOR = 0.5
DEFAULT_PATIENCE = 3
WARMUP_FRACTION = 0.1
DEFAULT_BATCH_SIZE = 32
LR_SCALING = (None, "linear")


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

    def __post_init__(self):
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={self.epochs!r}")
        if not _positive_number(self.learning_rate):
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
        if self.progressive and self.train_blocks != 0:
            raise ValueError(
                "A progressive stage starts from a frozen backbone: `train_blocks` must be 0. "
                f"Received: train_blocks={self.train_blocks!r}"
            )


@dataclasses.dataclass(frozen=True)
class RecipeSettings:
    """What a recipe's planner is given: the validated common arguments.

    Args:
        epochs: an int, or a tuple with one value per stage for recipes with
            `epoch_values > 1`.
        learning_rate: the head stage's peak LR.
        unfreeze_blocks: `"all"` or a number of top blocks.
        num_blocks: how many blocks the model's backbone has.
    """

    epochs: int | tuple[int, ...]
    learning_rate: float
    unfreeze_blocks: int | str
    num_blocks: int


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named recipe: a planner that turns settings into stages.

    Args:
        name: the name `fine_tune(recipe=...)` takes.
        plan: `plan(settings, **options) -> list[Stage]`.
        default_epochs: epochs when `fine_tune(epochs=None)`.
        epoch_values: how many epoch values the recipe takes (1, or 2 for a
            `(head, fine_tune)` pair).
        options: names of the extra keyword options the planner accepts.
        description: one line for listings.

    Example:

    >>> recipe = Recipe("head_only", lambda s: [Stage("head", s.epochs, s.learning_rate)], 3)
    >>> [stage.name for stage in recipe.plan(RecipeSettings(3, 1e-3, "all", 5))]
    ['head']
    """

    name: str
    plan: Callable[..., list[Stage]]
    default_epochs: int | tuple[int, ...]
    epoch_values: int = 1
    options: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(
                f"`name` must be an identifier such as 'two_stage'. Received: name={self.name!r}"
            )
        if not callable(self.plan):
            raise TypeError(f"`plan` must be callable. Received: {type(self.plan).__name__}")
        if self.epoch_values not in (1, 2):
            raise ValueError(
                f"`epoch_values` must be 1 or 2. Received: epoch_values={self.epoch_values!r}"
            )


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Adds a recipe to the registry `fine_tune(recipe=...)` reads.

    Args:
        recipe: a `Recipe`.

    Returns:
        The recipe.

    Raises:
        ValueError: a recipe of that name is already registered.

    Example:

    >>> import keras_transfer as kt
    >>> _ = kt.register_recipe(kt.Recipe(
    ...     "doc_head_only", lambda s: [kt.Stage("head", s.epochs, s.learning_rate)], 2))
    >>> "doc_head_only" in kt.list_recipes()
    True
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"`recipe` must be a Recipe. Received: {type(recipe).__name__}")
    if recipe.name in _RECIPES:
        raise ValueError(f"A recipe named {recipe.name!r} is already registered.")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe called `name`.

    Args:
        name: a recipe name (see `list_recipes()`).

    Returns:
        The `Recipe`.

    Example:

    >>> get_recipe("two_stage").epoch_values
    2
    """
    if name not in _RECIPES:
        close = difflib.get_close_matches(str(name), list(_RECIPES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"`recipe` must be one of {list_recipes()}.{hint} Received: recipe={name!r}"
        )
    return _RECIPES[name]


def list_recipes() -> tuple[str, ...]:
    """Names of the registered recipes, built-in ones first.

    Returns:
        A tuple of names.

    Example:

    >>> list_recipes()[:4]
    ('feature_extraction', 'two_stage', 'full', 'progressive')
    """
    return tuple(_RECIPES)


def _plan_feature_extraction(s):
    return [Stage("head", s.epochs, s.learning_rate)]


def _plan_two_stage(s):
    head, tune = s.epochs
    stages = [Stage("head", head, s.learning_rate)] if head else []
    if tune:
        blocks = s.unfreeze_blocks
        lr = s.learning_rate * FINE_TUNE_LR_RATIO
        stages.append(Stage("fine_tune", tune, lr, train_blocks=blocks, discriminative=True))
    return stages


def _plan_full(s):
    lr = s.learning_rate * FINE_TUNE_LR_RATIO
    return [Stage("full", s.epochs, lr, train_blocks="all", discriminative=True)]


def _plan_progressive(s):
    return [Stage("progressive", s.epochs, s.learning_rate, discriminative=True, progressive=True)]


for _recipe in (
    Recipe(
        "feature_extraction",
        _plan_feature_extraction,
        5,
        description="backbone frozen, the head trains at `learning_rate`",
    ),
    Recipe(
        "two_stage",
        _plan_two_stage,
        (3, 3),
        epoch_values=2,
        description="the head first, then the top `unfreeze_blocks` blocks at LR / 10",
    ),
    Recipe(
        "full",
        _plan_full,
        5,
        description="everything trains from the start at LR / 10, discriminative LRs",
    ),
    Recipe(
        "progressive",
        _plan_progressive,
        5,
        description="one more block unfreezes each epoch, the LR halving each time",
    ),
):
    register_recipe(_recipe)
# The built-in recipe names (`list_recipes()` includes ones registered later).
RECIPES = list_recipes()
DEFAULT_EPOCHS = {name: _RECIPES[name].default_epochs for name in RECIPES}


def _positive_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


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


def _check_epochs(recipe: Recipe, epochs):
    if epochs is None:
        return recipe.default_epochs
    if recipe.epoch_values == 2:
        pair = (epochs, epochs) if isinstance(epochs, int) else tuple(epochs)
        if (
            len(pair) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in pair)
            or min(pair) < 0
            or sum(pair) < 1
        ):
            raise ValueError(
                f"For recipe={recipe.name!r}, `epochs` must be an int or (head_epochs, "
                f"fine_tune_epochs) with a positive total. Received: epochs={epochs!r}"
            )
        return tuple(int(e) for e in pair)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"`epochs` must be an integer >= 1. Received: epochs={epochs!r}")
    return epochs


def _check_common(
    *, weight_decay, label_smoothing, lr_spread, patience, batch_size, steps_per_epoch, lr_scaling
):
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
    be dicts keyed by output name (missing heads get their defaults).

    Args:
        model: the model to compile.
        targets_spec: the dataset's target `element_spec` (a `TensorSpec`, or
            a dict of them for several heads); None skips the checks.
        loss: None, a loss for every head, or a dict by output name.
        metrics: None (defaults), a list, or a dict by output name.
        loss_weights: None, or a dict by output name / a list.
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
        kind = head_kind(layer) if name not in given_loss or name not in given_metrics else None
        if name in given_loss:
            losses[name] = given_loss[name]
        else:
            spec = specs.get(name)
            if spec is not None:
                check_labels(kind, layer.units, spec.shape, spec.dtype.as_numpy_dtype)
            losses[name] = default_loss(kind, label_smoothing)
        metric_lists[name] = given_metrics.get(name, default_metrics(kind) if kind else [])
    if loss_weights is not None:
        if single:
            raise ValueError(
                "`loss_weights` is for models with several heads. "
                f"Received: loss_weights={loss_weights!r}"
            )
        _by_output("loss_weights", loss_weights, heads)
    if single:
        name = next(iter(heads))
        return {"loss": losses[name], "metrics": metric_lists[name], "loss_weights": None}
    return {"loss": losses, "metrics": metric_lists, "loss_weights": loss_weights}


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


def stage_optimizer(
    model: keras.Model,
    stage: Stage,
    steps: int,
    *,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    lr_spread: float = DEFAULT_LR_SPREAD,
    lr_scale: float = 1.0,
) -> keras.optimizers.Optimizer:
    """The optimizer a stage compiles: AdamW, warm-up + cosine, layer-wise LRs.

    Args:
        model: the model (its backbone blocks set the discriminative LRs).
        stage: the `Stage`.
        steps: training steps per epoch.
        weight_decay: AdamW decoupled weight decay.
        lr_spread: head LR / stem LR for discriminative stages.
        lr_scale: multiplies the stage's peak LR (linear scaling rule).

    Returns:
        An unbuilt layer-wise AdamW.

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
    if stage.discriminative:
        return discriminative_optimizer(
            model, "adamw", spread=lr_spread, learning_rate=schedule, weight_decay=weight_decay
        )
    return layerwise_optimizer("adamw", learning_rate=schedule, weight_decay=weight_decay)


def stage_callbacks(
    stage: Stage,
    *,
    validation=None,
    patience: int | None = DEFAULT_PATIENCE,
    bn_policy: str | None = None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one stage: the caller's, progressive unfreezing, early stopping.

    Args:
        stage: the `Stage`.
        validation: the validation data (early stopping needs it).
        patience: early-stopping patience on `val_loss`; None: off.
        bn_policy: BatchNorm policy for blocks unfrozen during the stage.
        callbacks: the caller's callbacks, first.

    Returns:
        A new list of callbacks.

    Example:

    >>> [type(c).__name__ for c in stage_callbacks(Stage("p", 2, 1e-3, progressive=True))]
    ['ProgressiveUnfreezing']
    """
    result = list(callbacks or [])
    if stage.progressive:
        result.append(
            ProgressiveUnfreezing(1, lr_factor=PROGRESSIVE_LR_FACTOR, bn_policy=bn_policy)
        )
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
    if stage.train_blocks == "all":
        unfreeze(model, "all", bn_policy=policy)
        return
    freeze_backbone(model)
    if stage.train_blocks:
        unfreeze(model, blocks=stage.train_blocks, bn_policy=policy)


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


def fit_stage(
    model: keras.Model,
    train,
    validation=None,
    stage: Stage | None = None,
    *,
    initial_epoch: int = 0,
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
    verbose="auto",
) -> keras.callbacks.History:
    """Runs one stage of a recipe: set what trains, compile, `fit`.

    Args:
        model: a model with a `"backbone"` layer and named output layer(s).
        train: a batched `tf.data.Dataset` or a tuple of arrays (shuffled
            every epoch, seeded).
        validation: the same for validation, or None.
        stage: the `Stage` to run.
        initial_epoch: epoch number the stage starts at (its history's epochs
            and the schedule of a progressive stage count from it).
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
        jit_compile: passed to `compile`.
        verbose: passed to `fit`.

    Returns:
        The stage's `keras.callbacks.History`.

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
    _check_common(
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        lr_spread=lr_spread,
        patience=patience,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        lr_scaling=lr_scaling,
    )
    strategy = resolve_strategy(model, strategy)
    _global_batch(batch_size, strategy)
    train = as_dataset(train, batch_size, seed=seed, name="train")
    validation = as_dataset(validation, batch_size, seed=seed, name="validation")
    arguments = {
        "loss": loss,
        "metrics": metrics,
        "loss_weights": loss_weights,
        "label_smoothing": label_smoothing,
    }
    compile_arguments(model, train.element_spec[1], **arguments)
    return _run_stage(
        model,
        train,
        validation,
        stage,
        arguments,
        initial_epoch=initial_epoch,
        weight_decay=weight_decay,
        lr_spread=lr_spread,
        lr_scale=strategy.num_replicas_in_sync if lr_scaling == "linear" else 1.0,
        bn_policy=bn_policy,
        patience=patience,
        steps_per_epoch=steps_per_epoch,
        callbacks=callbacks,
        strategy=strategy,
        jit_compile=jit_compile,
        verbose=verbose,
    )


def _run_stage(
    model,
    train,
    validation,
    stage,
    arguments,
    *,
    initial_epoch,
    weight_decay,
    lr_spread,
    lr_scale,
    bn_policy,
    patience,
    steps_per_epoch,
    callbacks,
    strategy,
    jit_compile,
    verbose,
):
    policy = resolve_bn_policy(model, bn_policy)
    apply_stage(model, stage, policy)
    steps = _steps(train, steps_per_epoch)
    with strategy.scope():
        optimizer = stage_optimizer(
            model, stage, steps, weight_decay=weight_decay, lr_spread=lr_spread, lr_scale=lr_scale
        )
        model.compile(
            optimizer=optimizer,
            jit_compile=jit_compile,
            **compile_arguments(model, **arguments),
        )
    return model.fit(
        train,
        validation_data=validation,
        epochs=initial_epoch + stage.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        callbacks=stage_callbacks(
            stage,
            validation=validation,
            patience=patience,
            bn_policy=policy,
            callbacks=callbacks,
        ),
        verbose=verbose,
        shuffle=False,
    )


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


def plan_recipe(
    model: keras.Model,
    recipe: str = "two_stage",
    *,
    epochs: int | tuple[int, int] | None = None,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    unfreeze_blocks: int | str = "all",
    **options,
) -> list[Stage]:
    """The stages a named recipe would run on `model` (nothing is trained).

    Args:
        model: a model with a `"backbone"` layer.
        recipe: a registered recipe name.
        epochs: see `fine_tune`.
        learning_rate: the head stage's peak LR.
        unfreeze_blocks: `"all"` or a number of top blocks.
        **options: the recipe's own options (`Recipe.options`).

    Returns:
        A list of `Stage`s.

    Example:

    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3))
    >>> [(s.name, s.epochs, s.learning_rate) for s in kt.plan_recipe(model, epochs=(2, 3))]
    [('head', 2, 0.001), ('fine_tune', 3, 0.0001)]
    """
    spec = get_recipe(recipe)
    if not _positive_number(learning_rate):
        raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={learning_rate!r}")
    epochs = _check_epochs(spec, epochs)
    num_blocks = len(backbone_blocks(model))
    if unfreeze_blocks != "all" and not (
        isinstance(unfreeze_blocks, int)
        and not isinstance(unfreeze_blocks, bool)
        and 1 <= unfreeze_blocks <= num_blocks
    ):
        raise ValueError(
            f"`unfreeze_blocks` must be 'all' or an integer in [1, {num_blocks}]. "
            f"Received: unfreeze_blocks={unfreeze_blocks!r}"
        )
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ValueError(
            f"Recipe {recipe!r} takes the options {list(spec.options)}. "
            f"Received: unknown option(s) {unknown}"
        )
    settings = RecipeSettings(epochs, float(learning_rate), unfreeze_blocks, num_blocks)
    stages = spec.plan(settings, **options)
    if not isinstance(stages, list) or not all(isinstance(s, Stage) for s in stages):
        raise TypeError(f"Recipe {recipe!r} must plan a list of Stage. Received: {stages!r}")
    return stages


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
    lr_scaling: str | None = None,
    bn_policy: str | None = None,
    patience: int | None = DEFAULT_PATIENCE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    steps_per_epoch: int | None = None,
    loss=None,
    metrics=None,
    loss_weights=None,
    callbacks: list | None = None,
    strategy: tf.distribute.Strategy | None = None,
    seed: int = 0,
    jit_compile="auto",
    verbose="auto",
    **recipe_options,
) -> keras.callbacks.History:
    """Fine-tunes a model built by `keras_transfer` with a named recipe.

    Validates every argument, plans the recipe's stages (`plan_recipe`) and
    runs them one by one (`fit_stage`); nothing trains before all checks
    pass.

    Recipes (see `list_recipes()`; add your own with `register_recipe`):
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
            `"backbone"` layer and named output layers).
        train: a batched `tf.data.Dataset` of `(inputs, targets)`, or a tuple
            of arrays (shuffled every epoch with `seed`, as `fit` does).
        validation: the same for validation, or None (then no early stopping).
        recipe: a registered recipe name.
        epochs: an int, or `(head_epochs, fine_tune_epochs)` for
            `"two_stage"`; defaults in `DEFAULT_EPOCHS`.
        learning_rate: peak LR of the head stage.
        weight_decay: AdamW decoupled weight decay (>= 0).
        label_smoothing: for softmax and multi-label heads, in [0, 1).
        unfreeze_blocks: blocks unfrozen in stage 2 of `"two_stage"` (an int
            or `"all"`).
        lr_spread: head LR / stem LR in the backbone-training stages (>= 1).
        lr_scaling: None, or `"linear"` to multiply LRs by the number of
            replicas of the strategy.
        bn_policy: see `kt.unfreeze`; None infers it from the model.
        patience: early-stopping patience (epochs) when `validation` is
            given; None disables early stopping.
        batch_size: global batch size when `train` is a tuple of arrays.
        steps_per_epoch: needed when `train` has unknown length.
        loss: None (each head's default), a loss, or a dict by output name.
        metrics: None (defaults), a list, or a dict by output name.
        loss_weights: per-head loss weights (dict by output name or list).
        callbacks: extra Keras callbacks, used in every stage.
        strategy: the `tf.distribute.Strategy` the model was built under
            (`build_image_classifier(..., strategy=...)`); None: its own.
        seed: seed of the array shuffle.
        jit_compile: passed to `compile`.
        verbose: passed to `fit`.
        **recipe_options: options of the chosen recipe (`Recipe.options`).

    Returns:
        A `keras.callbacks.History` whose `history` merges all stages, with
        a `"stage"` entry giving each epoch's stage (1 or 2).

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3), alpha=0.75)
    >>> data = (np.random.rand(8, 32, 32, 3) * 255, np.arange(8) % 2)
    >>> history = kt.fine_tune(model, data, recipe="two_stage", epochs=(1, 1),
    ...                        verbose=0)
    >>> history.history["stage"]
    [1, 2]
    """
    stages = plan_recipe(
        model,
        recipe,
        epochs=epochs,
        learning_rate=learning_rate,
        unfreeze_blocks=unfreeze_blocks,
        **recipe_options,
    )
    _check_common(
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        lr_spread=lr_spread,
        patience=patience,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        lr_scaling=lr_scaling,
    )
    policy = resolve_bn_policy(model, bn_policy)
    strategy = resolve_strategy(model, strategy)
    _global_batch(batch_size, strategy)
    train = as_dataset(train, batch_size, seed=seed, name="train")
    validation = as_dataset(validation, batch_size, seed=seed, name="validation")
    arguments = {
        "loss": loss,
        "metrics": metrics,
        "loss_weights": loss_weights,
        "label_smoothing": label_smoothing,
    }
    compile_arguments(model, train.element_spec[1], **arguments)  # checks targets up front
    _steps(train, steps_per_epoch)
    histories = []
    for stage in stages:
        start = sum(len(history.epoch) for history in histories)
        histories.append(
            _run_stage(
                model,
                train,
                validation,
                stage,
                arguments,
                initial_epoch=start,
                weight_decay=weight_decay,
                lr_spread=lr_spread,
                lr_scale=strategy.num_replicas_in_sync if lr_scaling == "linear" else 1.0,
                bn_policy=policy,
                patience=patience,
                steps_per_epoch=steps_per_epoch,
                callbacks=callbacks,
                strategy=strategy,
                jit_compile=jit_compile,
                verbose=verbose,
            )
        )
    return _merge(histories)
