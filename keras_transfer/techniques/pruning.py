"""Magnitude pruning for Keras 3: a polynomial sparsity schedule, masks kept by a callback.

tensorflow-model-optimization prunes Keras 2 models only (it switches
TensorFlow to legacy Keras on import); this module prunes Keras 3 models
during ordinary training. `PruningCallback` sets the smallest-magnitude
weights of every trainable Dense, Conv and DepthwiseConv kernel to zero, each
kernel to the same sparsity, which rises during the `fit` along Zhu and
Gupta's polynomial schedule (2017, "To prune, or not to prune"):
`s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3` (`polynomial_sparsity`):
much pruning early, while the network can still recover, little at the end.
The masks are recomputed every `frequency` steps from the weights'
magnitudes, and applied after every training step (`kernel.assign(kernel *
mask)`): the optimizer's momentum would otherwise grow pruned weights back,
so pruned weights are exactly zero after each step.

The masks live in the callback, not in the model: the model stays a plain
Keras model throughout (no wrapper layers, no mask variables), and saves,
reloads and exports as it is. `strip_pruning` returns a clean copy without
the optimizer's state (the form to save and ship); `pruning_report` gives the
sparsity of each kernel and the gzip-compressed size of the `.keras` and
LiteRT files, against an unpruned model when given one (zeros compress, so a
50% sparse model gzips much smaller; the uncompressed size does not change).

Use it through `prune` (fine-tuning with the callback, one schedule over the
whole run) or give the callback to `kt.fine_tune(..., callbacks=[...])` or
`fit`; the schedule then spans each `fit` (each stage of a recipe) on its own.

Example:
>>> import keras, numpy as np
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="fc"),
...                           keras.layers.Dense(2, activation="softmax", name="out")],
...                          name="toy")
>>> model.compile("adam", "sparse_categorical_crossentropy")
>>> pruning = PruningCallback(sparsity=0.5)
>>> _ = model.fit(np.random.rand(64, 8), np.arange(64) % 2, epochs=2, verbose=0,
...               callbacks=[pruning])
>>> {name: round(value, 2) for name, value in layer_sparsity(model).items()}
{'fc/kernel': 0.5, 'out/kernel': 0.5}
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

# `recipes` as a module: it imports `kt.techniques` (multitask) as it loads.
from keras_transfer import recipes
from keras_transfer.techniques.sparsity import (
    layer_sparsity,
    magnitude_mask,
    model_layers,
    prunable_kernels,
    pruning_report,
)
from keras_transfer.training import check_number

__all__ = [
    "PruningCallback",
    "layer_sparsity",
    "polynomial_sparsity",
    "prune",
    "pruning_report",
    "strip_pruning",
]


# Zhu and Gupta 2017 use a cubic schedule.
SCHEDULE_EXPONENT = 3
# Without `end_step`, sparsity reaches its final value after this fraction of
# the `fit`'s steps; the rest trains with the final masks so that accuracy
# recovers (Zhu and Gupta stop pruning well before the end of training).
DEFAULT_END_FRACTION = 2 / 3
# Without `frequency`, masks are recomputed this many times on the way.
DEFAULT_PRUNING_UPDATES = 10


def polynomial_sparsity(
    step: int,
    *,
    sparsity: float,
    end_step: int,
    begin_step: int = 0,
    initial_sparsity: float = 0.0,
) -> float:
    """Zhu and Gupta's polynomial sparsity at training step `step`.

    `s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** 3` between
    `begin_step` (t0) and `end_step` (t1, that is `t0 + n * dt`);
    `initial_sparsity` before, `sparsity` after.

    Args:
        step: the training step.
        sparsity: the final sparsity `s_f`, in [0, 1).
        end_step: the step where the final sparsity is reached.
        begin_step: the step where pruning starts.
        initial_sparsity: the sparsity at `begin_step`, in [0, sparsity].

    Returns:
        The sparsity, a float.

    Example:
    >>> [round(polynomial_sparsity(t, sparsity=0.8, end_step=10), 3) for t in (0, 5, 10, 20)]
    [0.0, 0.7, 0.8, 0.8]
    """
    _check_schedule(sparsity, initial_sparsity, begin_step, end_step)
    if step <= begin_step:
        return float(initial_sparsity)
    if step >= end_step:
        return float(sparsity)
    remaining = 1.0 - (step - begin_step) / (end_step - begin_step)
    return float(sparsity + (initial_sparsity - sparsity) * remaining**SCHEDULE_EXPONENT)


def _check_schedule(sparsity, initial_sparsity, begin_step, end_step):
    check_number("sparsity", sparsity, 0, 1)
    check_number("initial_sparsity", initial_sparsity, 0, 1)
    if initial_sparsity > sparsity:
        raise ValueError(
            "`initial_sparsity` must be <= `sparsity`. Received: "
            f"initial_sparsity={initial_sparsity!r}, sparsity={sparsity!r}"
        )
    check_number("begin_step", begin_step, 0, integer=True)
    if end_step is not None:
        check_number("end_step", end_step, begin_step + 1, integer=True)


class PruningCallback(keras.callbacks.Callback):
    """Prunes the model's kernels by magnitude during `fit`, along a polynomial schedule.

    At `on_train_begin` the callback takes the trainable Dense, Conv and
    DepthwiseConv kernels (`prunable_kernels`, optionally only those of the
    named `layers`). Every `frequency` steps from `begin_step` to `end_step`
    it recomputes each kernel's mask to zero the smallest weights at the
    schedule's sparsity (`polynomial_sparsity`); after every training step
    it multiplies each kernel by its mask, so pruned weights are exactly
    zero whatever the optimizer did. Steps count from the start of the
    `fit` (derived from the epoch and batch, so a resumed `fit` resumes the
    schedule). Masks carry over to a later `fit` with the same callback, for
    kernels still trainable there. The schedule's sparsity is logged as
    `sparsity` after each epoch.

    Args:
        sparsity: the final sparsity of each kernel, in [0, 1).
        initial_sparsity: the sparsity at `begin_step`, in [0, sparsity].
        begin_step: the step where pruning starts (>= 0).
        end_step: the step where the final sparsity is reached; None:
            `DEFAULT_END_FRACTION` (2/3) of the `fit`'s steps, so that the
            last third trains with the final masks.
        frequency: steps between mask updates; None: the span divided into
            `DEFAULT_PRUNING_UPDATES` (10) updates.
        layers: names of the layers to prune (anywhere in the model, the
            backbone included); None: every prunable layer.

    Example:
    >>> PruningCallback(sparsity=1.0)
    Traceback (most recent call last):
    ...
    ValueError: `sparsity` must be a number in [0, 1). Received: sparsity=1.0
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        *,
        initial_sparsity: float = 0.0,
        begin_step: int = 0,
        end_step: int | None = None,
        frequency: int | None = None,
        layers: Sequence[str] | None = None,
    ):
        super().__init__()
        _check_schedule(sparsity, initial_sparsity, begin_step, end_step)
        check_number("frequency", frequency, 1, optional=True, integer=True)
        if layers is not None and (
            isinstance(layers, str) or not all(isinstance(name, str) for name in layers)
        ):
            raise ValueError(
                f"`layers` must be None or a list of layer names. Received: layers={layers!r}"
            )
        self.sparsity, self.initial_sparsity = float(sparsity), float(initial_sparsity)
        self.begin_step, self.end_step, self.frequency = begin_step, end_step, frequency
        self.layers = None if layers is None else tuple(layers)
        # {kernel path: 0/1 mask}, kept across `fit`s.
        self.masks: dict[str, np.ndarray] = {}
        self._mask_tensors = {}

    def _kernels(self):
        kernels = prunable_kernels(self.model)
        if self.layers is not None:
            names = {layer.name for _, layer in model_layers(self.model)}
            missing = sorted(set(self.layers) - names)
            if missing:
                raise ValueError(
                    f"`layers` must name layers of the model. Received: unknown {missing}"
                )
            # A kernel's path ends with its layer's name and its own.
            kernels = {p: v for p, v in kernels.items() if p.split("/")[-2] in self.layers}
        if not kernels:
            raise ValueError(
                "Nothing to prune: the model has no trainable Dense, Conv or DepthwiseConv "
                f"kernel{' in `layers`' if self.layers else ''} (unfreeze the backbone, e.g. "
                f"kt.unfreeze(model, 'all')). Received: model {self.model.name!r}"
            )
        return kernels

    def on_train_begin(self, logs=None):
        self.kernels = self._kernels()
        self.masks = {path: mask for path, mask in self.masks.items() if path in self.kernels}
        self._mask_tensors = {
            path: ops.convert_to_tensor(mask, self.kernels[path].dtype)
            for path, mask in self.masks.items()
        }
        self.steps = self.params.get("steps")
        self.epoch, self.counted = 0, 0
        total = (self.steps or 0) * (self.params.get("epochs") or 0)
        end = self.end_step
        if end is None:
            if not total:
                raise ValueError(
                    "PruningCallback needs `end_step` when the number of steps is unknown "
                    "(a dataset of unknown length without `steps_per_epoch`). Received: "
                    f"steps={self.steps!r}"
                )
            end = max(round(total * DEFAULT_END_FRACTION), self.begin_step + 1)
        self.schedule_end = end
        self.update_every = self.frequency or max(
            (end - self.begin_step) // DEFAULT_PRUNING_UPDATES, 1
        )
        self.last_sparsity = None
        self._apply()  # masks carried over from an earlier `fit`

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def _step(self, batch):
        """Steps done after batch `batch` of the current epoch (from the `fit`'s start)."""
        if self.steps:
            return self.epoch * self.steps + batch + 1
        return self.counted

    def current_sparsity(self, step: int) -> float:
        """The schedule's sparsity after `step` training steps of the current `fit`.

        Args:
            step: training steps done.

        Returns:
            The sparsity.
        """
        return polynomial_sparsity(
            step,
            sparsity=self.sparsity,
            end_step=self.schedule_end,
            begin_step=self.begin_step,
            initial_sparsity=self.initial_sparsity,
        )

    def _due(self, step) -> bool:
        if step < self.begin_step:
            return False
        if self.last_sparsity is None:  # the first update of this `fit`
            return True
        if step >= self.schedule_end:
            return self.last_sparsity != self.sparsity
        return (step - self.begin_step) % self.update_every == 0

    def _apply(self):
        for path, mask in self._mask_tensors.items():
            variable = self.kernels[path]
            variable.assign(ops.multiply(variable, mask))

    def on_train_batch_end(self, batch, logs=None):
        self.counted += 1
        step = self._step(batch)
        if self._due(step):
            target = self.current_sparsity(step)
            for path, variable in self.kernels.items():
                mask = magnitude_mask(keras.ops.convert_to_numpy(variable), target)
                self.masks[path] = mask
                self._mask_tensors[path] = ops.convert_to_tensor(mask, variable.dtype)
            self.last_sparsity = target
        self._apply()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.last_sparsity is not None:
            logs["sparsity"] = self.last_sparsity


def prune(
    model: keras.Model,
    train,
    validation=None,
    *,
    sparsity: float = 0.5,
    epochs: int | tuple[int, int] | None = None,
    recipe: str = "full",
    initial_sparsity: float = 0.0,
    end_step: int | None = None,
    frequency: int | None = None,
    layers: Sequence[str] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    **fine_tune_options,
) -> keras.Model:
    """Fine-tunes `model` while pruning its kernels to `sparsity` (`kt.fine_tune` + `PruningCallback`).

    The recipe's stages train as `kt.fine_tune` runs them, with a
    `PruningCallback` in each: with the default `"full"` recipe (everything
    trains, one stage) the sparsity rises over the first 2/3 of the steps and
    the last third trains with the final masks. A two-stage recipe prunes in
    each stage on its own schedule (the head in the first, the unfrozen
    backbone in the second). There is no early stopping: restoring an
    earlier epoch's weights would bring back weights pruned since.

    Args:
        model: a model from `kt.build_image_classifier` (or any model
            `kt.fine_tune` takes).
        train: training data, as `kt.fine_tune` takes it.
        validation: validation data (reported, no early stopping), or None.
        sparsity: the final sparsity of each kernel, in [0, 1).
        epochs: see `kt.fine_tune`.
        recipe: a `kt.fine_tune` recipe; `"full"` trains everything.
        initial_sparsity, end_step, frequency, layers: see `PruningCallback`.
        callbacks: more Keras callbacks (after the pruning one).
        **fine_tune_options: other `kt.fine_tune` arguments
            (`learning_rate`, `batch_size`, `seed`, `verbose`, ...).

    Returns:
        `model`, pruned; `model.history` holds `fine_tune`'s history (with
        the schedule's `sparsity` per epoch) and `model.pruning` the
        callback (its `masks`).

    Raises:
        ValueError: `sparsity` outside [0, 1), a model with nothing to prune,
            or a bad `kt.fine_tune` option.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> backbone = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, name="conv"),
    ...                              keras.layers.GlobalAveragePooling2D()])
    >>> model = kt.build_image_classifier(backbone, 2, weights=None)
    >>> data = (np.random.rand(8, 8, 8, 3) * 255, np.arange(8) % 2)
    >>> model = kt.techniques.prune(model, data, sparsity=0.5, epochs=1, verbose=0)
    >>> layer_sparsity(model)
    {'backbone/conv/kernel': 0.5, 'head/kernel': 0.5}
    """
    pruning = PruningCallback(
        sparsity,
        initial_sparsity=initial_sparsity,
        end_step=end_step,
        frequency=frequency,
        layers=layers,
    )
    model.history = recipes.fine_tune(
        model,
        train,
        validation,
        recipe=recipe,
        epochs=epochs,
        patience=None,
        callbacks=[pruning, *(callbacks or [])],
        **fine_tune_options,
    )
    model.pruning = pruning
    return model


def strip_pruning(model: keras.Model) -> keras.Model:
    """A plain copy of a pruned model: same layers and weights, no optimizer state.

    The masks live in `PruningCallback`, so the model holds no pruning
    variables; the copy also drops what training left (the compiled
    optimizer and its moments, which `model.save` would write). Save,
    convert or serve the copy.

    Args:
        model: a Keras model (pruned or not).

    Returns:
        A new, uncompiled `keras.Model` with `model`'s weights.

    Example:
    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model.compile("adam", "mse")
    >>> plain = strip_pruning(model)
    >>> plain.compiled, len(plain.weights) == len(model.weights)
    (False, True)
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    # From the config, not `clone_model`, which compiles the copy as the original was.
    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy
