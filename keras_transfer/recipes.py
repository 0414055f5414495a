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
from collections.abc import Callable

import keras
import tensorflow as tf

from keras_transfer.backbones import backbone_blocks
from keras_transfer.checkpoints import (
    EpochCheckpoint,
    TrainingState,
    load_state,
    plan_key,
    restore_variables,
    save_state,
)
from keras_transfer.class_weights import format_class_weights, resolve_class_weight
from keras_transfer.feature_cache import FeatureCache, as_feature_cache, check_cacheable
from keras_transfer.freezing import resolve_bn_policy
from keras_transfer.heads import DEFAULT_LABEL_SMOOTHING
from keras_transfer.optimizers import DEFAULT_LR_SPREAD, DEFAULT_WEIGHT_DECAY
from keras_transfer.stages import Stage, fit_stage
from keras_transfer.techniques.multitask import uncertainty_training_view
from keras_transfer.training import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_PATIENCE,
    UNCERTAINTY,
    positive_number,
    prepare_training,
)

DEFAULT_LEARNING_RATE = 1e-3
# The backbone-training stage runs this much slower than the head stage.
FINE_TUNE_LR_RATIO = 0.1


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


# LoRA's usual rank (Hu et al. 2021 found r = 4..8 on the attention query and
# value projections as good as larger ranks).
DEFAULT_LORA_RANK = 8
# Adapters start at zero and have few parameters: they take a larger LR than
# full weights. Measured on all-MiniLM-L6-v2 / WordNet (4 classes, 96 texts,
# 3 epochs of 6 steps): test accuracy 0.44 at 1e-3, 0.58 at 3e-3, 0.89 at
# 1e-2 (full fine-tuning at 1e-4: 0.78). Long runs (thousands of steps) do
# well lower, e.g. `learning_rate=1e-4` (a 1e-3 LoRA LR, the LoRA paper's range).
LORA_LR_RATIO = 10.0


def _plan_lora(s, lora_rank=DEFAULT_LORA_RANK, lora_alpha=None, lora_targets="auto"):
    return [
        Stage(
            "lora",
            s.epochs,
            s.learning_rate * LORA_LR_RATIO,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_targets=lora_targets,
        )
    ]


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
    Recipe(
        "lora",
        _plan_lora,
        5,
        options=("lora_rank", "lora_alpha", "lora_targets"),
        description="LoRA adapters (rank `lora_rank`) and the head train at LR x 10",
    ),
):
    register_recipe(_recipe)
# The built-in recipe names (`list_recipes()` includes ones registered later).
RECIPES = list_recipes()
DEFAULT_EPOCHS = {name: _RECIPES[name].default_epochs for name in RECIPES}


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
    if not positive_number(learning_rate):
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
    backup_dir: str | None = None,
    cache_features: bool | str | FeatureCache = False,
    class_weight=None,
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
        `"lora"`: the backbone stays frozen; LoRA adapters (`lora_rank`,
        default 8, `lora_alpha`, `lora_targets`; see `kt.lora.enable`) and
        the head train at `learning_rate * LORA_LR_RATIO` (1e-2 by default:
        zero-initialised low-rank adapters take a larger LR than full
        weights; see `LORA_LR_RATIO`). `kt.export` merges the adapters; for
        `.keras` files use `kt.lora.merge` and `kt.lora.save_adapters`.

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
        loss_weights: per-head loss weights (dict by output name or list),
            or `"uncertainty"`: learned (Kendall et al. 2018, see
            `kt.techniques.multitask`); `model` then trains through an
            `UncertaintyWeighting` view that shares its layers, and the
            history reports each head's `<head>_log_variance`.
        callbacks: extra Keras callbacks, used in every stage.
        strategy: the `tf.distribute.Strategy` the model was built under
            (`build_image_classifier(..., strategy=...)`); None: its own.
        seed: seed of the array shuffle.
        jit_compile: passed to `compile`: `"auto"` (XLA where Keras judges
            it safe), True or False.
        backup_dir: a folder for the training state, saved after every epoch
            (see `keras_transfer.checkpoints`); when it holds the state of an
            interrupted run of the same plan, training resumes from its last
            finished epoch, in the right stage, with the optimizer's state.
            Under a multi-worker strategy only the chief writes. None: no
            backups. Works with `cache_features` (the whole model is saved;
            the features are computed again on resume).
        cache_features: compute the frozen part's features once and train
            the head on them in the stages whose backbone stays frozen
            (`"feature_extraction"`, stage 1 of `"two_stage"`); the other
            stages train as usual. False (default), True (`"auto"`: in
            memory up to `kt.feature_cache.FEATURE_CACHE_MEMORY_BUDGET`,
            2 GiB, else on disk in a temporary folder), `"memory"`,
            `"disk"`, or a `kt.FeatureCache` (mode, folder, budget). Arrays
            keep the order and batches of an uncached run; a dataset is read
            once and its examples reshuffled every epoch with `seed`. Needs
            a model without random augmentation; features are the
            inference-mode ones (see `fit_stage`). Under a strategy the
            feature pass runs on one device per worker and the head trains
            under the strategy.
        class_weight: weigh each example's loss by its class, for
            imbalanced data (one softmax head): None, `"balanced"`
            (scikit-learn's `n_samples / (n_classes * count_c)`, from the
            training labels; a dataset's labels are read once) or a dict
            `{class index: weight > 0}` (other classes get 1). The weights
            are printed when `verbose` and returned in
            `history.params["class_weight"]`; every stage uses them, cached
            or not.
        verbose: passed to `fit`.
        **recipe_options: options of the chosen recipe (`Recipe.options`).

    Returns:
        A `keras.callbacks.History` whose `history` merges all stages, with
        a `"stage"` entry giving each epoch's stage (1 or 2); after a resume
        it holds the epochs run before the interruption too.
        `history.params["class_weight"]` holds the class weights used
        (None without).

    Raises:
        ValueError: a bad value (nothing has trained then); with
            `cache_features`: a recipe without a frozen-backbone stage, or a
            model with random augmentation.

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
    cache = as_feature_cache(cache_features)
    if cache is not None:
        if not any(stage.frozen_backbone for stage in stages):
            raise ValueError(
                "`cache_features` caches the stages whose backbone stays frozen; recipe "
                f"{recipe!r} plans none ({[stage.name for stage in stages]}). Use "
                "'feature_extraction' or 'two_stage', or cache_features=False. "
                f"Received: recipe={recipe!r}, cache_features={cache_features!r}"
            )
        check_cacheable(model)
    if loss_weights == UNCERTAINTY:
        # Trains `model` through a view that shares its layers and learns the weights.
        model = uncertainty_training_view(model)
    policy = resolve_bn_policy(model, bn_policy)
    options = {
        "loss": loss,
        "metrics": metrics,
        "loss_weights": loss_weights,
        "weight_decay": weight_decay,
        "label_smoothing": label_smoothing,
        "lr_spread": lr_spread,
        "lr_scaling": lr_scaling,
        "patience": patience,
        "batch_size": batch_size,
        "steps_per_epoch": steps_per_epoch,
    }
    # Everything is checked, and arrays become one shuffled pipeline, before stage 1.
    inputs = prepare_training(model, train, validation, strategy=strategy, seed=seed, **options)
    weights = resolve_class_weight(model, train, class_weight)
    if weights is not None and verbose:
        print(format_class_weights(weights))
    state = None
    if backup_dir is not None:
        state = load_state(backup_dir, stages, inputs.strategy)
        state = state or TrainingState(plan=plan_key(stages))
    histories = [] if state is None else [_as_history(h) for h in state.histories[: state.stage]]
    trained = False
    for index, stage in enumerate(stages):
        if len(histories) > index:
            continue  # finished before an interruption
        stage_callbacks = list(callbacks or [])
        done = 0
        if state is not None:
            if len(state.histories) <= index:
                state.histories.append({})
                state.stage, state.stage_epochs = index, 0
            done = state.stage_epochs
            if done >= stage.epochs:  # interrupted between its last epoch and its end
                histories.append(_as_history(state.histories[index]))
                state.stage, state.stage_epochs = index + 1, 0
                continue
            # Restore once, into the first stage this call runs.
            resume = state.weights is not None and not trained
            stage_callbacks.append(EpochCheckpoint(backup_dir, state, resume=resume))
        cached = cache is not None and stage.frozen_backbone
        # A cached stage reads the data as given: arrays keep their own order.
        data = (train, validation) if cached else (inputs.train, inputs.validation)
        history = fit_stage(
            model,
            *data,
            stage,
            initial_epoch=sum(len(history.epoch) for history in histories),
            completed_epochs=done,
            bn_policy=policy,
            callbacks=stage_callbacks,
            strategy=inputs.strategy,
            jit_compile=jit_compile,
            cache_features=cache if cached else False,
            class_weight=weights,
            seed=seed,
            verbose=verbose,
            **options,
        )
        trained = True
        if state is not None:
            history = _as_history(state.histories[index])
            # The stage is over (early stopping may have restored its best weights).
            state.stage, state.stage_epochs = index + 1, 0
            save_state(model, backup_dir, state)
        histories.append(history)
    if state is not None and not trained and state.weights is not None:
        restore_variables(model, backup_dir, state)  # every stage had finished
    merged = _merge(histories)
    merged.params = {"class_weight": weights}
    return merged


def _as_history(values: dict) -> keras.callbacks.History:
    history = keras.callbacks.History()
    history.history = {key: list(v) for key, v in values.items()}
    history.epoch = list(range(len(next(iter(values.values()), []))))
    return history
