"""What aligns the features of two domains: DANN's gradient reversal, DAN's multi-kernel MMD.

The pieces `kt.techniques.domain_adaptation` trains with, public so that a
custom training loop can use them: `GradientReversal` (identity forward,
gradient times `-lambda` backward) and its schedule `dann_lambda` (Ganin et
al. 2016); `mmd_loss`, the multi-kernel maximum mean discrepancy (Long et al.
2015); `pooled_features`, the tensor of a builder's classifier they act on;
and the training-only models that add them to a classifier's source loss
(`DANNTrainer`, `MMDTrainer`) with `ReversalSchedule`, the callback that sets
the reversal's strength before each step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from keras_transfer.heads import head_kind
from keras_transfer.training import check_number, output_heads, positive_number

# Ganin et al. 2016: lambda_p = 2 / (1 + exp(-gamma p)) - 1, gamma = 10.
DANN_GAMMA = 10.0
# One hidden layer of ReLU units for the domain classifier: a small MLP, about
# the size Ganin et al. use on digits (two 1024-unit layers on large networks).
DEFAULT_DOMAIN_HIDDEN = 100
# Squared-bandwidth multipliers of the Gaussian kernels, times the median
# heuristic (Gretton et al. 2012): 2^-2 .. 2^2, the five kernels of the usual
# DAN implementations (kernel_mul 2, kernel_num 5); Long et al. 2015 use a
# wider family of the same form.
DEFAULT_MMD_KERNELS = (0.25, 0.5, 1.0, 2.0, 4.0)


def dann_lambda(progress, lambda_max: float = 1.0) -> float:
    """The gradient-reversal strength of DANN at training progress `progress`.

    `lambda_max * (2 / (1 + exp(-10 p)) - 1)` (Ganin et al. 2016): 0 at the
    start, `0.987 * lambda_max` half way, `~lambda_max` at the end.

    Args:
        progress: the fraction of training done, in [0, 1].
        lambda_max: the strength it tends to, >= 0.

    Returns:
        The strength, a float.

    Example:
    >>> [round(dann_lambda(p), 4) for p in (0.0, 0.5, 1.0)]
    [0.0, 0.9866, 0.9999]
    """
    check_number("progress", progress, 0)
    if progress > 1:
        raise ValueError(f"`progress` must be in [0, 1]. Received: progress={progress!r}")
    check_number("lambda_max", lambda_max, 0)
    return float(lambda_max) * (2.0 / (1.0 + math.exp(-DANN_GAMMA * progress)) - 1.0)


@keras.saving.register_keras_serializable(package="keras_transfer")
class GradientReversal(keras.layers.Layer):
    """Identity forward; multiplies the gradient by `-lambda` backward (Ganin et al. 2016).

    The strength is a non-trainable scalar variable, so it can change during
    `fit` (`set_lambda`, as `dann`'s schedule does) without retracing. The
    output is computed as `x' + (-lambda) * (x - x')` with `x' =
    stop_gradient(x)`: exactly `x` forward, gradient `-lambda` backward.

    Args:
        lambda_: the initial strength, >= 0.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Example:
    >>> import numpy as np, tensorflow as tf
    >>> layer = GradientReversal(0.5)
    >>> x = tf.constant([1.0, -2.0])
    >>> with tf.GradientTape() as tape:
    ...     tape.watch(x)
    ...     y = layer(x)
    >>> y.numpy().tolist(), tape.gradient(y, x).numpy().tolist()
    ([1.0, -2.0], [-0.5, -0.5])
    """

    def __init__(self, lambda_: float = 1.0, **kwargs):
        check_number("lambda_", lambda_, 0)
        super().__init__(**kwargs)
        self.lambda_ = float(lambda_)
        self.strength = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.lambda_),
            trainable=False,
            name="lambda",
        )

    def set_lambda(self, value: float) -> None:
        """Sets the strength (a variable: a traced train step reads the new value)."""
        self.strength.assign(float(value))

    def call(self, inputs):
        held = ops.stop_gradient(inputs)
        factor = ops.cast(-self.strength, inputs.dtype)
        return held + factor * (inputs - held)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "lambda_": self.lambda_}


def mmd_loss(source, target, kernels: Sequence[float] = DEFAULT_MMD_KERNELS):
    """Multi-kernel maximum mean discrepancy (squared, unbiased) between two samples.

    The mean of Gaussian kernels `exp(-|a - b|^2 / (k * h))`, `k` in
    `kernels`, `h` the median squared distance between all rows of both
    samples (the median heuristic, held constant for the gradient); the
    unbiased estimate (Gretton et al. 2012) leaves out each row's kernel with
    itself, so it is about 0 for two samples of one distribution (it may
    dip slightly below) and grows as they move apart.

    Args:
        source: features `[n, d]`, n >= 2.
        target: features `[m, d]`, m >= 2.
        kernels: squared-bandwidth multipliers, each > 0.

    Returns:
        A float32 scalar tensor.

    Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    >>> abs(float(mmd_loss(a, b))) < 0.01, float(mmd_loss(a, b + 1.0)) > 0.1
    (True, True)
    """
    if not kernels or not all(positive_number(k) for k in kernels):
        raise ValueError(f"`kernels` must be numbers > 0. Received: kernels={kernels!r}")
    source = ops.cast(ops.convert_to_tensor(source), "float32")
    target = ops.cast(ops.convert_to_tensor(target), "float32")
    rows = ops.concatenate([source, target], axis=0)
    squares = ops.sum(ops.square(rows), axis=1)
    distances = ops.maximum(
        squares[:, None] + squares[None, :] - 2.0 * ops.matmul(rows, ops.transpose(rows)), 0.0
    )
    bandwidth = ops.stop_gradient(ops.maximum(ops.median(distances), 1e-12))
    kernel = sum(ops.exp(-distances / (float(k) * bandwidth)) for k in kernels) / len(kernels)
    n, m = ops.shape(source)[0], ops.shape(target)[0]
    is_source = ops.concatenate([ops.ones((n,)), ops.zeros((m,))], axis=0)
    is_target = 1.0 - is_source
    n, m = ops.cast(n, "float32"), ops.cast(m, "float32")

    def pair_sum(a, b):
        return ops.sum(a * ops.matmul(kernel, b))

    # Each diagonal entry of `kernel` is exactly 1: leave them out (unbiased).
    within_source = (pair_sum(is_source, is_source) - n) / ops.maximum(n * (n - 1.0), 1.0)
    within_target = (pair_sum(is_target, is_target) - m) / ops.maximum(m * (m - 1.0), 1.0)
    return within_source + within_target - 2.0 * pair_sum(is_source, is_target) / (n * m)


def classifier_head(model) -> keras.layers.Layer:
    """The softmax head of a single-input classifier; refuses other models.

    Args:
        model: a `keras.Model`.

    Returns:
        The output layer.

    Example:
    >>> import keras
    >>> inputs = keras.Input((3,))
    >>> classifier_head(keras.Model(inputs, keras.layers.Dense(2, name="out")(inputs)))
    Traceback (most recent call last):
    ...
    ValueError: `model` must be a classifier with one image input and one softmax head (as kt.build_image_classifier makes). Received: inputs 1, outputs ['out'] (kind 'regression')
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    heads = output_heads(model)
    layer = next(iter(heads.values()))
    kind = None
    if len(heads) == 1 and len(model.inputs) == 1:
        with contextlib.suppress(ValueError):
            kind = head_kind(layer)
    if kind != "softmax":
        raise ValueError(
            "`model` must be a classifier with one image input and one softmax head (as "
            f"kt.build_image_classifier makes). Received: inputs {len(model.inputs)}, "
            f"outputs {list(heads)} (kind {kind!r})"
        )
    return layer


def pooled_features(model: keras.Model):
    """The pooled-feature tensor of a builder's classifier: what dropout and the head read.

    Args:
        model: a model from `kt.build_image_classifier`.

    Returns:
        The symbolic tensor (`[batch, features]`), for `keras.Model(model.input, ...)`.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> pooled_features(model).shape
    (None, 432)
    """
    tensor = classifier_head(model).input
    producer = tensor._keras_history.operation
    if isinstance(producer, keras.layers.Dropout):
        tensor = producer.input
    return tensor


class AdaptationTrainer(keras.Model):
    """Training only: a classifier on `(source, target)` batches; source loss + a term.

    Both batches go through the classifier in one pass (concatenated); the
    source loss is `source_loss` on the source rows, plus the subclass's
    adaptation term (`adaptation_loss`), logged as the metric `term`. The
    classifier's layers are shared, not copied: training this trains it.

    Args:
        model: a classifier (see `pooled_features`).
        source_loss: a Keras loss on labels and the classifier's output.
        term: the logged name of the adaptation term.
        **kwargs: `keras.Model` arguments (`name`).
    """

    def __init__(self, model, source_loss, term, **kwargs):
        super().__init__(**kwargs)
        self.network = keras.Model(model.inputs, [pooled_features(model), model.outputs[0]])
        self.source_loss = source_loss
        self.term_tracker = keras.metrics.Mean(name=term)

    def call(self, inputs, training=False):
        source, target = inputs
        features, outputs = self.network(
            ops.concatenate([source, target], axis=0), training=training
        )
        return {"outputs": outputs, "features": ops.cast(features, "float32")}

    def adaptation_loss(self, count, y_pred):
        """`(term added to the loss, value logged)` for a batch of `count` source rows."""
        raise NotImplementedError

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        count = ops.shape(x[0])[0]
        loss = self.source_loss(y, y_pred["outputs"][:count], sample_weight)
        term, logged = self.adaptation_loss(count, y_pred)
        self.term_tracker.update_state(logged)
        # Keras losses divide by the replicas themselves (summed across them
        # later); the adaptation term is a plain scalar, so divide it here.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        loss = loss + term / replicas
        for extra in self.losses:  # the classifier's regularisers
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        count = ops.shape(x[0])[0]
        return super().compute_metrics(x, y, y_pred["outputs"][:count], sample_weight)


class DANNTrainer(AdaptationTrainer):
    """`AdaptationTrainer` with a domain classifier behind a `GradientReversal` (DANN).

    The term is the binary cross-entropy of the domain classifier (source 0,
    target 1); its gradient reaches the features multiplied by `-lambda`
    (`self.reversal`, 0 until a `ReversalSchedule` sets it).

    Args:
        model: a classifier (see `pooled_features`).
        source_loss: a Keras loss on labels and the classifier's output.
        domain_hidden: ReLU units of the domain classifier (0: linear).
        seed: seed of the domain classifier's initial weights.
        **kwargs: `keras.Model` arguments.
    """

    def __init__(self, model, source_loss, *, domain_hidden, seed, **kwargs):
        super().__init__(model, source_loss, "domain_loss", **kwargs)
        self.reversal = GradientReversal(0.0, name="gradient_reversal")
        # A plain MLP, as in Ganin et al.: BatchNorm here (batch statistics over
        # both domains) measured worse, e.g. on the two-moons toy problem.
        layers = []
        if domain_hidden:
            init = keras.initializers.GlorotUniform(seed=seed)
            layers.append(keras.layers.Dense(domain_hidden, "relu", kernel_initializer=init))
        init = keras.initializers.GlorotUniform(seed=seed + 1)
        layers.append(keras.layers.Dense(1, kernel_initializer=init))
        self.domain_classifier = keras.Sequential(layers, name="domain_classifier")
        self.domain_loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction="mean")

    def call(self, inputs, training=False):
        result = super().call(inputs, training=training)
        reversed_features = self.reversal(result["features"])
        result["domain"] = self.domain_classifier(reversed_features, training=training)
        return result

    def adaptation_loss(self, count, y_pred):
        logits = y_pred["domain"]
        is_target = ops.cast(ops.arange(ops.shape(logits)[0]) >= count, "float32")
        loss = ops.mean(self.domain_loss.call(is_target[:, None], logits))
        return loss, loss


class MMDTrainer(AdaptationTrainer):
    """`AdaptationTrainer` whose term is `weight * mmd_loss` of the pooled features (DAN).

    Args:
        model: a classifier (see `pooled_features`).
        source_loss: a Keras loss on labels and the classifier's output.
        weight: weight of the MMD term (the unweighted estimate is logged).
        kernels: see `mmd_loss`.
        **kwargs: `keras.Model` arguments.
    """

    def __init__(self, model, source_loss, *, weight, kernels, **kwargs):
        super().__init__(model, source_loss, "mmd", **kwargs)
        self.weight, self.kernels = float(weight), tuple(kernels)

    def adaptation_loss(self, count, y_pred):
        features = y_pred["features"]
        discrepancy = mmd_loss(features[:count], features[count:], self.kernels)
        return self.weight * discrepancy, discrepancy


class ReversalSchedule(keras.callbacks.Callback):
    """Sets a `GradientReversal`'s strength to `dann_lambda(p, lambda_max)` before each step.

    The progress `p` is derived from the epoch and batch (not counted), so a
    resumed `fit` continues the schedule; the strength is logged as `lambda`.

    Args:
        layer: the `GradientReversal`.
        lambda_max: the strength it tends to.
        steps: training steps per epoch.
        epochs: epochs of the `fit`.
    """

    def __init__(self, layer, lambda_max, steps, epochs):
        super().__init__()
        self.layer, self.lambda_max, self.steps, self.epochs = layer, lambda_max, steps, epochs
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        progress = min((self.epoch * self.steps + batch) / (self.epochs * self.steps), 1.0)
        self.layer.set_lambda(dann_lambda(progress, self.lambda_max))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["lambda"] = float(keras.ops.convert_to_numpy(self.layer.strength))
