"""Callbacks: progressive unfreezing inside one `fit`, the LR range test, and a relay.

`CallbackRelay` lets callbacks see the whole model while `fit` trains a part
of it (the head on cached features, `fit_stage(..., cache_features=True)`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import keras
import numpy as np

from keras_transfer.backbones import backbone_blocks
from keras_transfer.freezing import resolve_bn_policy, unfreeze
from keras_transfer.optimizers import (
    LayerwiseLearningRateMixin,
    _inner,
    prepare_for_unfreezing,
    set_lr_scale,
)


class ProgressiveUnfreezing(keras.callbacks.Callback):
    """Unfreezes backbone blocks top-down on a schedule, inside one `fit` call.

    The optimizer is built once over every variable that may train (so Keras
    never sees an "Unknown variable"), and each change retraces the train
    function, so frozen blocks cost no backward pass. The state at each epoch
    is computed from the epoch number alone, so a run resumed with
    `keras.callbacks.BackupAndRestore` or `initial_epoch` picks up the right
    blocks and LR.

    Args:
        schedule: an int `n` (one more block every `n` epochs: 0 blocks for
            epochs `[0, n)`, 1 block for `[n, 2n)`, ...) or a mapping
            `epoch -> number of top blocks unfrozen from that epoch` (a value
            may be `"all"`). Epochs before the first key train the head only.
        lr_factor: multiply the learning rate by this at each unfreezing step
            (needs a layer-wise optimizer, see `kt.layerwise_optimizer`).
        bn_policy: BatchNorm policy for unfrozen blocks (see `kt.unfreeze`).
        verbose: 1 to print each change.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    >>> x, y = np.zeros((4, 32, 32, 3)), np.array([0, 1, 0, 1])
    >>> _ = model.fit(x, y, epochs=2, verbose=0,
    ...               callbacks=[kt.ProgressiveUnfreezing({1: 2})])
    >>> [r["block"] for r in kt.trainable_summary(model, print_fn=None)
    ...  if r["trainable"]]
    ['block10', 'top', 'head']
    """

    def __init__(
        self,
        schedule: int | Mapping[int, int | str],
        lr_factor: float = 1.0,
        bn_policy: str | None = None,
        verbose: int = 0,
    ):
        super().__init__()
        if isinstance(schedule, Mapping):
            for epoch, count in schedule.items():
                if not isinstance(epoch, int) or epoch < 0:
                    raise ValueError(
                        "`schedule` keys must be epochs (integers >= 0). "
                        f"Received: schedule={dict(schedule)!r}"
                    )
                if count != "all" and (not isinstance(count, int) or count < 0):
                    raise ValueError(
                        "`schedule` values must be block counts (integers >= 0) or "
                        f"'all'. Received: schedule={dict(schedule)!r}"
                    )
            schedule = dict(sorted(schedule.items()))
        elif isinstance(schedule, bool) or not isinstance(schedule, int) or schedule < 1:
            raise ValueError(
                "`schedule` must be an integer >= 1 (epochs per block) or a mapping "
                f"epoch -> blocks. Received: schedule={schedule!r}"
            )
        if not 0.0 < lr_factor <= 1.0:
            raise ValueError(f"`lr_factor` must be in (0, 1]. Received: lr_factor={lr_factor}")
        self.schedule = schedule
        self.lr_factor = float(lr_factor)
        self.bn_policy = bn_policy
        self.verbose = verbose
        self._num_blocks = None
        self._applied = None

    def state_at(self, epoch: int, num_blocks: int) -> tuple[int, int]:
        """Returns `(blocks unfrozen, unfreezing steps taken)` at `epoch`."""
        if isinstance(self.schedule, int):
            count = min(epoch // self.schedule, num_blocks)
            return count, count
        count, steps = 0, 0
        for start, value in self.schedule.items():
            if start > epoch:
                break
            value = num_blocks if value == "all" else min(value, num_blocks)
            if value > count:
                steps += 1
            count = value
        return count, steps

    def on_train_begin(self, logs=None):
        resolve_bn_policy(self.model, self.bn_policy)
        if self.lr_factor != 1.0 and not isinstance(
            _inner(self.model.optimizer), LayerwiseLearningRateMixin
        ):
            raise ValueError(
                "`lr_factor` needs a layer-wise optimizer: compile with "
                "`kt.layerwise_optimizer(...)`. Received: lr_factor="
                f"{self.lr_factor} with {type(self.model.optimizer).__name__}"
            )
        self._num_blocks = len(backbone_blocks(self.model))
        prepare_for_unfreezing(self.model)
        self._applied = None

    def on_epoch_begin(self, epoch, logs=None):
        state = self.state_at(epoch, self._num_blocks)
        if state == self._applied:
            return
        count, steps = state
        unfreeze(self.model, blocks=count, bn_policy=self.bn_policy)
        if self.lr_factor != 1.0:
            set_lr_scale(self.model, self.lr_factor**steps)
        self.model.make_train_function(force=True)
        self._applied = state
        if self.verbose:
            print(
                f"\nEpoch {epoch + 1}: {count}/{self._num_blocks} backbone blocks "
                f"trainable, LR x{self.lr_factor**steps:g}"
            )


class CallbackRelay(keras.callbacks.Callback):
    """Runs callbacks on another model than the one `fit` trains.

    When `fit` trains a model made of another model's layers (the head of a
    classifier on cached features), the relay passes `fit`'s events to
    callbacks bound to the whole model: checkpoints save it, early stopping
    copies and restores its weights, and `model.stop_training = True` set by
    any of them stops the `fit`. Batch events are relayed only when one of
    the callbacks uses them, so Keras keeps dispatching the others
    asynchronously.

    Args:
        callbacks: the Keras callbacks to run.
        model: the model they see (`self.model`); it shares the variables
            `fit` trains, and should be compiled with the same optimizer.

    Example:

    >>> import numpy as np
    >>> inputs = keras.Input((4,))
    >>> head = keras.layers.Dense(2)
    >>> whole = keras.Model(inputs, head(keras.layers.Dense(4)(inputs)))
    >>> part = keras.Model(whole.layers[1].output, whole.output)
    >>> part.compile(loss="mse")
    >>> class StopAfterOneEpoch(keras.callbacks.Callback):
    ...     def on_epoch_end(self, epoch, logs=None):
    ...         self.model.stop_training = True
    >>> stop = StopAfterOneEpoch()
    >>> history = part.fit(np.ones((4, 4)), np.ones((4, 2)), epochs=5, verbose=0,
    ...                    callbacks=[CallbackRelay([stop], whole)])
    >>> len(history.epoch), stop.model is whole
    (1, True)
    """

    _BATCH_HOOKS = tuple(
        f"on_{mode}batch_{moment}"
        for mode in ("", "train_", "test_", "predict_")
        for moment in ("begin", "end")
    )

    def __init__(self, callbacks: Sequence[keras.callbacks.Callback], model: keras.Model):
        super().__init__()
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
        self.callbacks = list(callbacks)
        self.target = model
        self._relayed = keras.callbacks.CallbackList(self.callbacks, model=model)
        base = keras.callbacks.Callback
        if any(
            getattr(type(callback), hook) is not getattr(base, hook)
            for callback in self.callbacks
            for hook in self._BATCH_HOOKS
        ):
            for hook in self._BATCH_HOOKS[2:]:
                setattr(self, hook, functools.partial(self._relay, hook))

    def set_params(self, params):
        super().set_params(params)
        self._relayed.set_params(params)

    def _relay(self, hook, *args, **kwargs):
        getattr(self._relayed, hook)(*args, **kwargs)
        if self.target.stop_training:
            self.model.stop_training = True

    def on_train_begin(self, logs=None):
        self.target.stop_training = False
        self._relay("on_train_begin", logs)

    def on_train_end(self, logs=None):
        self._relay("on_train_end", logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._relay("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._relay("on_epoch_end", epoch, logs)

    def on_test_begin(self, logs=None):
        self._relay("on_test_begin", logs)

    def on_test_end(self, logs=None):
        self._relay("on_test_end", logs)

    def on_predict_begin(self, logs=None):
        self._relay("on_predict_begin", logs)

    def on_predict_end(self, logs=None):
        self._relay("on_predict_end", logs)


@dataclasses.dataclass
class LRFinderResult:
    """What `lr_find` measured.

    Attributes:
        learning_rates: the LR of each step.
        losses: the smoothed training loss of each step.
        suggestion: the LR at the steepest descent of the smoothed loss.
    """

    learning_rates: list[float]
    losses: list[float]
    suggestion: float

    def plot(self, path: str) -> str:
        """Writes loss vs LR (log scale) with the suggestion marked, as a PNG."""
        from keras_transfer.plots import plot_lr_find

        return plot_lr_find(self, path)


class _LRRangeTest(keras.callbacks.Callback):
    # Loss smoothing of fastai's LR finder (exponential moving average, 0.98)
    # and its stop rule (loss above 4x the best seen).
    SMOOTHING = 0.98
    DIVERGENCE = 4.0

    def __init__(self, start_lr, end_lr, num_steps):
        super().__init__()
        self.learning_rates = list(np.geomspace(start_lr, end_lr, num_steps))
        self.recorded_lrs, self.losses = [], []
        self._average, self._best = 0.0, math.inf

    def on_train_batch_begin(self, batch, logs=None):
        step = len(self.recorded_lrs)
        if step >= len(self.learning_rates):
            self.model.stop_training = True
            return
        self.model.optimizer.learning_rate = float(self.learning_rates[step])

    def on_train_batch_end(self, batch, logs=None):
        loss = float(logs["loss"])
        step = len(self.recorded_lrs)
        if step >= len(self.learning_rates):
            return
        self._average = self.SMOOTHING * self._average + (1 - self.SMOOTHING) * loss
        smoothed = self._average / (1 - self.SMOOTHING ** (step + 1))
        self.recorded_lrs.append(float(self.learning_rates[step]))
        self.losses.append(smoothed)
        self._best = min(self._best, smoothed)
        if not math.isfinite(smoothed) or smoothed > self.DIVERGENCE * self._best:
            self.model.stop_training = True


def lr_find(
    model: keras.Model,
    train_data,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 1.0,
    num_steps: int = 100,
    plot_path: str | None = None,
    strategy=None,
) -> LRFinderResult:
    """LR range test: trains a copy of `model` while the LR grows exponentially.

    The model itself is not changed: a clone (same weights, same loss, a fresh
    optimizer of the same class) is trained. The suggestion is the LR where
    the smoothed loss falls fastest.

    Args:
        model: a compiled model.
        train_data: a `tf.data.Dataset` of `(x, y)` batches (repeated as needed).
        start_lr: first learning rate (> 0).
        end_lr: last learning rate (> start_lr).
        num_steps: number of batches (>= 5).
        plot_path: if given, write the loss-vs-LR PNG there.
        strategy: the `tf.distribute.Strategy` the copy trains under; None:
            the one the model was built under.

    Returns:
        An `LRFinderResult`.

    Example:
    >>> import numpy as np, tensorflow as tf, keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=2, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    >>> data = tf.data.Dataset.from_tensor_slices(
    ...     (np.random.rand(8, 32, 32, 3) * 255, np.arange(8) % 2)).batch(4)
    >>> result = kt.lr_find(model, data, num_steps=6)
    >>> len(result.learning_rates) <= 6
    True
    """
    if not 0.0 < start_lr < end_lr:
        raise ValueError(
            f"Need 0 < start_lr < end_lr. Received: start_lr={start_lr}, end_lr={end_lr}"
        )
    if num_steps < 5:
        raise ValueError(f"`num_steps` must be >= 5. Received: num_steps={num_steps}")
    if getattr(model, "optimizer", None) is None or model.loss is None:
        raise ValueError(f"Model {model.name!r} must be compiled before `lr_find`.")
    with (strategy or model.distribute_strategy).scope():
        probe = keras.models.clone_model(model)
        probe.set_weights(model.get_weights())
        config = _inner(model.optimizer).get_config()
        config["learning_rate"] = float(start_lr)
        optimizer = type(_inner(model.optimizer)).from_config(config)
        probe.compile(optimizer=optimizer, loss=model.loss)
    recorder = _LRRangeTest(start_lr, end_lr, num_steps)
    probe.fit(
        train_data.repeat(),
        steps_per_epoch=num_steps,
        epochs=1,
        verbose=0,
        shuffle=False,
        callbacks=[recorder],
    )
    losses = np.asarray(recorder.losses)
    if len(losses) < 3:
        suggestion = recorder.recorded_lrs[0] if recorder.recorded_lrs else start_lr
    else:
        slopes = np.gradient(losses, np.log(recorder.recorded_lrs))
        suggestion = float(recorder.recorded_lrs[int(np.argmin(slopes))])
    result = LRFinderResult(recorder.recorded_lrs, [float(v) for v in losses], suggestion)
    if plot_path:
        result.plot(plot_path)
    return result
