"""Layer-wise (discriminative) learning rates, and optimizers that survive unfreezing.

Two Keras 3 facts shape this module:

* An optimizer refuses variables it was not built with ("Unknown variable"),
  so a model that unfreezes during `fit` needs an optimizer built over every
  variable that may ever train. `prepare_for_unfreezing` builds (or extends)
  it; the trainable flags then decide, at each retrace, what gets gradients:
  frozen variables cost no backward pass.
* Scaling gradients does not change Adam-family steps (they are invariant to
  the gradient's scale), so layer-wise learning rates scale the learning rate
  each variable's `update_step` receives. That works for every Keras optimizer.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_transfer.backbones import backbone_blocks

# fastai's `fine_tune` trains unfrozen groups with slice(lr / 100, lr): the
# lowest block learns 100x slower than the head.
DEFAULT_LR_SPREAD = 100.0
# AdamW weight decay for fine-tuning; small because the pretrained weights
# are a good prior (Keras' AdamW default 0.004 is tuned for training from
# scratch).
DEFAULT_WEIGHT_DECAY = 1e-4


class LayerwiseLearningRateMixin:
    """Adds per-variable learning-rate multipliers to a Keras optimizer class.

    Use `layerwise_optimizer()` rather than this class directly: it makes (and
    registers for `.keras` loading) the subclass of your optimizer's class.

    Args:
        lr_multipliers: dict `variable.path -> multiplier`; variables not in
            it use 1.0.
        lr_scale: a global multiplier on top (used by `ProgressiveUnfreezing`
            to lower the LR as blocks unfreeze).
    """

    def __init__(self, *args, lr_multipliers=None, lr_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        bad = {k: v for k, v in self.lr_multipliers.items() if not v > 0}
        if bad:
            raise ValueError(
                "`lr_multipliers` values must be > 0 (freeze layers with "
                f"`trainable=False` instead). Received: {bad}"
            )
        self.lr_scale = float(lr_scale)

    def lr_factor(self, variable) -> float:
        """The learning-rate multiplier applied to `variable` (trace-time constant)."""
        index = self._get_variable_index(variable)
        path = self._trainable_variables[index].path
        return self.lr_scale * self.lr_multipliers.get(path, 1.0)

    def update_step(self, gradient, variable, learning_rate):
        factor = self.lr_factor(variable)
        if factor != 1.0:
            learning_rate = ops.multiply(learning_rate, factor)
        return super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        # Decoupled decay is `w -= w * wd * lr`: scale it with the variable's LR.
        if self.weight_decay is None:
            return super()._apply_weight_decay(variables)
        groups: dict[float, list] = {}
        for variable in variables:
            groups.setdefault(self.lr_factor(variable), []).append(variable)
        base = self.weight_decay
        try:
            for factor, group in groups.items():
                self.weight_decay = base * factor
                super()._apply_weight_decay(group)
        finally:
            self.weight_decay = base

    def get_config(self):
        config = super().get_config()
        config.update({"lr_multipliers": dict(self.lr_multipliers), "lr_scale": self.lr_scale})
        return config

    # State is stored by variable path, not position, so a model saved while
    # partly unfrozen reloads its optimizer state even though Keras rebuilds
    # the optimizer over the (fewer) currently trainable variables.
    def save_own_variables(self, store):
        for variable in self.variables:
            store[_store_key(variable.path)] = variable.numpy()

    def load_own_variables(self, store):
        keys = set(store.keys())
        for variable in self.variables:
            key = _store_key(variable.path)
            if key in keys:
                variable.assign(store[key])


def _store_key(path: str) -> str:
    # "/" would create nested HDF5 groups.
    return path.replace("/", "|")


_LAYERWISE_CLASSES: dict[type, type] = {}


def _layerwise_class(base: type) -> type:
    if issubclass(base, LayerwiseLearningRateMixin):
        return base
    if base not in _LAYERWISE_CLASSES:
        cls = type(f"Layerwise{base.__name__}", (LayerwiseLearningRateMixin, base), {})
        cls.__module__ = __name__
        keras.saving.register_keras_serializable(package="keras_transfer", name=cls.__name__)(cls)
        _LAYERWISE_CLASSES[base] = cls
    return _LAYERWISE_CLASSES[base]


# Register the layer-wise versions of the built-in optimizers at import, so
# `keras.saving.load_model` finds them in a fresh process.
for _name in (
    "Adam",
    "AdamW",
    "SGD",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "Adamax",
    "Nadam",
    "Ftrl",
    "Lion",
    "Lamb",
):
    if hasattr(keras.optimizers, _name):
        _layerwise_class(getattr(keras.optimizers, _name))


def layerwise_optimizer(
    optimizer: str | keras.optimizers.Optimizer = "adamw",
    lr_multipliers: dict[str, float] | None = None,
    *,
    lr_scale: float = 1.0,
    **optimizer_kwargs,
) -> keras.optimizers.Optimizer:
    """Returns an optimizer of the same kind with per-variable LR multipliers.

    Args:
        optimizer: a name (`"adamw"`, `"sgd"`, ...) or an optimizer instance
            (its config is copied; it must not be built yet).
        lr_multipliers: `variable.path -> multiplier` (see
            `discriminative_multipliers`).
        lr_scale: global multiplier.
        **optimizer_kwargs: arguments for a named optimizer
            (`learning_rate`, `weight_decay`, ...).

    Returns:
        An instance of `Layerwise<Class>`, a subclass of the optimizer's class.

    Example:
    >>> import keras_transfer as kt
    >>> opt = kt.layerwise_optimizer("adam", {"head/kernel": 2.0},
    ...                              learning_rate=1e-3)
    >>> type(opt).__name__, opt.lr_multipliers
    ('LayerwiseAdam', {'head/kernel': 2.0})
    """
    if isinstance(optimizer, str):
        optimizer = keras.optimizers.get({"class_name": optimizer, "config": optimizer_kwargs})
    elif optimizer_kwargs:
        raise ValueError(
            "Pass optimizer arguments only with an optimizer name. "
            f"Received: {sorted(optimizer_kwargs)} with {type(optimizer).__name__}"
        )
    if not isinstance(optimizer, keras.optimizers.Optimizer):
        raise TypeError(
            "`optimizer` must be a name or a keras.optimizers.Optimizer. "
            f"Received: optimizer={optimizer!r}"
        )
    if optimizer.built:
        raise ValueError(
            "`optimizer` is already built; pass a fresh one (or its name). "
            f"Received: optimizer={optimizer.name!r}"
        )
    config = optimizer.get_config()
    if isinstance(optimizer, LayerwiseLearningRateMixin) and lr_multipliers is None:
        lr_multipliers = config["lr_multipliers"]
    config.update({"lr_multipliers": lr_multipliers or {}, "lr_scale": lr_scale})
    return _layerwise_class(type(optimizer)).from_config(config)


def candidate_variables(model: keras.Model) -> list:
    """Every variable of `model` that would train if everything were unfrozen.

    BatchNorm moving statistics (never trainable) are not included.

    Args:
        model: any Keras model.

    Returns:
        A list of variables, in `model.weights` order.
    """
    layers = model._flatten_layers(include_self=True, recursive=True)
    saved = [(layer, layer.trainable) for layer in layers]
    try:
        for layer, _ in saved:
            layer.trainable = True
        candidates = list(model.trainable_variables)
    finally:
        # Parents come before children, so restoring in order is exact.
        for layer, flag in saved:
            layer.trainable = flag
    return candidates


def discriminative_multipliers(
    model: keras.Model,
    factor: float | None = None,
    *,
    spread: float = DEFAULT_LR_SPREAD,
) -> dict[str, float]:
    """Learning-rate multipliers that shrink geometrically down the backbone.

    The head (everything outside the backbone) gets 1.0; the top backbone
    block gets `factor`, the next `factor**2`, and so on down to the stem.

    Args:
        model: a model with a `"backbone"` layer.
        factor: per-block factor in (0, 1]. If None, it is chosen so that the
            stem's multiplier is `1 / spread`.
        spread: ratio between the head's and the stem's LR when `factor` is
            None (100, as in fastai's `slice(lr / 100, lr)`).

    Returns:
        Dict `variable.path -> multiplier` for the backbone's variables.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> mult = kt.discriminative_multipliers(model, factor=0.5)
    >>> mult["conv_1/kernel"], mult["conv/kernel"]
    (0.5, 0.0001220703125)
    """
    blocks = backbone_blocks(model)
    if factor is None:
        if not spread >= 1.0:
            raise ValueError(f"`spread` must be >= 1. Received: spread={spread}")
        factor = (1.0 / spread) ** (1.0 / max(len(blocks), 1))
    if not 0.0 < factor <= 1.0:
        raise ValueError(f"`factor` must be in (0, 1]. Received: factor={factor}")
    multipliers = {}
    for depth, block in enumerate(reversed(blocks), start=1):
        for layer in block.layers:
            for variable in layer.weights:
                multipliers[variable.path] = factor**depth
    return multipliers


def discriminative_optimizer(
    model: keras.Model,
    optimizer: str | keras.optimizers.Optimizer = "adamw",
    *,
    factor: float | None = None,
    spread: float = DEFAULT_LR_SPREAD,
    **optimizer_kwargs,
) -> keras.optimizers.Optimizer:
    """An optimizer with discriminative LRs for `model`, ready to compile.

    Args:
        model: a model with a `"backbone"` layer.
        optimizer: a name or an unbuilt optimizer instance.
        factor: per-block LR factor (see `discriminative_multipliers`).
        spread: head/stem LR ratio when `factor` is None.
        **optimizer_kwargs: arguments for a named optimizer.

    Returns:
        A layer-wise optimizer.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> opt = kt.discriminative_optimizer(model, "adam", factor=0.5,
    ...                                   learning_rate=1e-3)
    >>> model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    """
    multipliers = discriminative_multipliers(model, factor, spread=spread)
    return layerwise_optimizer(optimizer, multipliers, **optimizer_kwargs)


def _inner(optimizer):
    return getattr(optimizer, "inner_optimizer", optimizer)


def prepare_for_unfreezing(model: keras.Model, strategy=None) -> None:
    """Builds (or extends) the model's optimizer over every candidate variable.

    Call after `compile`; `ProgressiveUnfreezing` and `fine_tune` call it for
    you. An optimizer already built over fewer variables (e.g. by `fit` on a
    frozen model, or by loading) is rebuilt over all of them; its existing
    state (iterations, moments of variables that trained) is kept.

    Args:
        model: a compiled model.
        strategy: the `tf.distribute.Strategy` whose scope holds the
            optimizer's variables; None: the one the model was built under.

    Returns:
        None.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    >>> kt.prepare_for_unfreezing(model)
    >>> model.optimizer.built
    True
    """
    if getattr(model, "optimizer", None) is None:
        raise ValueError(f"Model {model.name!r} is not compiled; call `model.compile(...)` first.")
    with (strategy or model.distribute_strategy).scope():
        _build_over(model, candidate_variables(model))


def _build_over(model, candidates):
    optimizer = _inner(model.optimizer)
    if not optimizer.built:
        model.optimizer.build(candidates)
        return
    known = optimizer._trainable_variables_indices
    if all(optimizer._var_key(v) in known for v in candidates):
        return
    old_state = {v.path: v.numpy() for v in optimizer.variables}
    keep = {id(optimizer._iterations), id(getattr(optimizer, "_learning_rate", None))}
    optimizer._variables[:] = [v for v in optimizer._variables if id(v) in keep]
    optimizer._trainable_variables_indices.clear()
    optimizer.built = False
    optimizer.build(candidates)
    for variable in optimizer.variables:
        value = old_state.get(variable.path)
        if value is not None and tuple(value.shape) == tuple(variable.shape):
            variable.assign(value)


def set_lr_scale(model: keras.Model, scale: float) -> None:
    """Sets the global LR multiplier of a model's layer-wise optimizer.

    Takes effect at the next trace of the train function
    (`model.make_train_function(force=True)`).
    """
    optimizer = _inner(model.optimizer)
    if not isinstance(optimizer, LayerwiseLearningRateMixin):
        raise ValueError(
            "Changing the LR scale needs a layer-wise optimizer: compile with "
            "`kt.layerwise_optimizer(...)` or `kt.discriminative_optimizer(...)`. "
            f"Received: optimizer of type {type(optimizer).__name__}"
        )
    optimizer.lr_scale = float(scale)


def warmup_cosine(
    learning_rate: float, total_steps: int, warmup_fraction: float = 0.1
) -> keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up to `learning_rate`, then cosine decay to zero.

    MediaPipe Model Maker and most fine-tuning guides use this shape: warm-up
    protects pretrained weights from the first, noisy updates of a fresh head.

    Args:
        learning_rate: peak learning rate.
        total_steps: number of optimizer steps in the run (>= 1).
        warmup_fraction: fraction of steps spent warming up, in [0, 1).

    Returns:
        A `keras.optimizers.schedules.CosineDecay` (serialisable).

    Example:
    >>> import keras_transfer as kt
    >>> schedule = kt.warmup_cosine(1e-3, total_steps=100)
    >>> round(float(schedule(10)), 6)
    0.001
    """
    if total_steps < 1:
        raise ValueError(f"`total_steps` must be >= 1. Received: total_steps={total_steps}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(
            f"`warmup_fraction` must be in [0, 1). Received: warmup_fraction={warmup_fraction}"
        )
    warmup = int(total_steps * warmup_fraction)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else learning_rate,
        decay_steps=max(total_steps - warmup, 1),
        warmup_target=learning_rate if warmup else None,
        warmup_steps=warmup,
    )


@keras.saving.register_keras_serializable(package="keras_transfer")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """One-cycle learning rate: cosine up to `max_learning_rate`, cosine down.

    Smith & Topin (2018), as popularised by fastai's `fit_one_cycle`: start at
    `max / div_factor`, peak after `pct_start` of the steps, end at
    `max / final_div_factor`.

    Args:
        max_learning_rate: peak learning rate.
        total_steps: number of optimizer steps.
        pct_start: fraction of steps spent rising, in (0, 1).
        div_factor: start LR is `max_learning_rate / div_factor` (fastai: 25).
        final_div_factor: end LR is `max_learning_rate / final_div_factor`
            (fastai: 1e5).

    Example:
    >>> from keras_transfer import OneCycle
    >>> schedule = OneCycle(1e-2, total_steps=100)
    >>> round(float(schedule(25)), 6)
    0.01
    """

    def __init__(
        self,
        max_learning_rate,
        total_steps,
        pct_start=0.25,
        div_factor=25.0,
        final_div_factor=1e5,
    ):
        if total_steps < 2:
            raise ValueError(f"`total_steps` must be >= 2. Received: total_steps={total_steps}")
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"`pct_start` must be in (0, 1). Received: pct_start={pct_start}")
        self.max_learning_rate = float(max_learning_rate)
        self.total_steps = int(total_steps)
        self.pct_start = float(pct_start)
        self.div_factor = float(div_factor)
        self.final_div_factor = float(final_div_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = self.max_learning_rate
        start = peak / self.div_factor
        end = peak / self.final_div_factor
        up_steps = max(self.total_steps * self.pct_start, 1.0)
        down_steps = max(self.total_steps - up_steps, 1.0)

        def cosine(lo, hi, progress):
            progress = ops.clip(progress, 0.0, 1.0)
            return hi + (lo - hi) * (1.0 + ops.cos(math.pi * progress)) / 2.0

        rising = cosine(start, peak, step / up_steps)
        falling = cosine(peak, end, (step - up_steps) / down_steps)
        return ops.where(step < up_steps, rising, falling)

    def get_config(self):
        return {
            "max_learning_rate": self.max_learning_rate,
            "total_steps": self.total_steps,
            "pct_start": self.pct_start,
            "div_factor": self.div_factor,
            "final_div_factor": self.final_div_factor,
        }
