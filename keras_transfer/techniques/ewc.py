"""Elastic Weight Consolidation (Kirkpatrick et al. 2017): the Fisher estimate and the penalty.

`estimate_fisher` measures, per weight, how much the old task's
log-likelihood depends on it (the diagonal of the Fisher information);
`EWCTrainer` trains a model with `ewc_lambda / 2 * sum_i F_i (theta_i -
theta*_i) ** 2` added to its loss, pulling the weights that mattered to the
old task back to their old values `theta*`. `kt.techniques.continual`
(`learn_new_task(method="ewc")`) uses both.

Example:
>>> import keras, numpy as np
>>> inputs = keras.Input((3,))
>>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="head")(inputs))
>>> fisher = estimate_fisher(model, np.ones((4, 3)), np.zeros(4, int), method="empirical")
>>> trainer = EWCTrainer(model, model.trainable_variables, fisher, ewc_lambda=10.0)
>>> float(trainer.ewc_penalty())
0.0
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_transfer.training import DEFAULT_BATCH_SIZE, check_number, output_heads

FISHER_METHODS = ("sampled", "empirical")
_EPSILON = 1e-7  # a floor on probabilities before their log


def _labels_by_head(model, labels) -> dict[str, np.ndarray]:
    heads = list(output_heads(model))
    if not isinstance(labels, dict):
        if len(heads) != 1:
            raise ValueError(
                f"`labels` must be a dict keyed by the old heads (of {heads}) for a model "
                f"with several heads. Received: {type(labels).__name__}"
            )
        labels = {heads[0]: labels}
    unknown = sorted(set(labels) - set(heads))
    if unknown or not labels:
        raise ValueError(f"`labels` keys must be heads of the model {heads}. Received: {unknown}")
    return {name: np.asarray(value).reshape(-1).astype("int64") for name, value in labels.items()}


def estimate_fisher(
    model: keras.Model,
    x,
    labels,
    *,
    variables=None,
    method: str = "sampled",
    max_examples: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """The diagonal Fisher information of the old task's log-likelihood, one array per variable.

    `F_i = mean over examples of (d log p(y | x) / d theta_i) ** 2`, from one
    gradient per example, in inference mode (dropout off, BatchNorm on its
    moving statistics); with several old heads, `log p` sums over them. `y`
    is drawn from the model's own prediction (`method="sampled"`: the Fisher
    information proper, the expectation over the model's distribution that
    Kirkpatrick et al. 2017 use, estimated with one draw per example) or is
    the data's label (`"empirical"`: the "empirical Fisher").

    Args:
        model: a model with softmax heads.
        x: the old task's inputs (arrays, or a dict of arrays).
        labels: their class labels: an array for a single-head model, or
            `{head name: array}`; the heads named are those of the old task
            (with `"sampled"` their labels are not used, only their names).
        variables: the variables (default: the model's trainable ones).
        method: `"sampled"` or `"empirical"`.
        max_examples: use at most this many examples, drawn with `seed`
            (None: all).
        seed: seed of the example subset and of the label draws.

    Returns:
        A list of float32 arrays shaped like `variables`.

    Example:
    >>> import keras, numpy as np
    >>> inputs = keras.Input((3,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    >>> [f.shape for f in estimate_fisher(model, np.ones((4, 3)), np.zeros(4, int))]
    [(3, 2), (2,)]
    """
    if method not in FISHER_METHODS:
        raise ValueError(f"`method` must be one of {FISHER_METHODS}. Received: method={method!r}")
    check_number("max_examples", max_examples, 1, optional=True, integer=True)
    labels = _labels_by_head(model, labels)
    heads = list(labels)
    rng = np.random.default_rng(seed)
    count = len(keras.tree.flatten(x)[0])
    rows = np.arange(count)
    if max_examples is not None and max_examples < count:
        rows = np.sort(rng.choice(count, max_examples, replace=False))
    x = keras.tree.map_structure(lambda a: np.asarray(a)[rows], x)
    labels = {name: value[rows] for name, value in labels.items()}
    if method == "sampled":
        outputs = model.predict(x, batch_size=DEFAULT_BATCH_SIZE, verbose=0)
        outputs = outputs if isinstance(outputs, dict) else {heads[0]: outputs}
        for name in heads:
            p = outputs[name].astype("float64")
            cumulative = np.cumsum(p / p.sum(-1, keepdims=True), -1)
            labels[name] = (rng.random((len(p), 1)) > cumulative).sum(-1).clip(0, p.shape[-1] - 1)
    variables = list(model.trainable_variables if variables is None else variables)

    @tf.function
    def squared_gradients(x_one, y_one):
        with tf.GradientTape() as tape:
            out = model(x_one, training=False)
            out = out if isinstance(out, dict) else {heads[0]: out}
            log_p = 0.0
            for name in heads:
                p = ops.take_along_axis(out[name], y_one[name][:, None], axis=1)
                log_p = log_p + ops.sum(ops.log(ops.maximum(p, _EPSILON)))
        gradients = tape.gradient(log_p, variables)
        return [
            ops.zeros(v.shape) if g is None else ops.square(g)
            for g, v in zip(gradients, variables, strict=True)
        ]

    totals = [np.zeros(v.shape, "float64") for v in variables]
    for i in range(len(rows)):
        x_one = keras.tree.map_structure(lambda a, i=i: a[i : i + 1], x)
        y_one = {name: value[i : i + 1].astype("int32") for name, value in labels.items()}
        for total, square in zip(totals, squared_gradients(x_one, y_one), strict=True):
            total += np.asarray(square)
    return [(total / len(rows)).astype("float32") for total in totals]


class EWCTrainer(keras.Model):
    """A training-only functional model on `model`'s layers that adds the EWC penalty.

    Its loss is the compiled loss plus `ewc_penalty()`, `ewc_lambda / 2 *
    sum F (w - w*) ** 2` over `variables`, `w*` their values when the
    trainer is made. Training it trains `model` (the layers are shared); save
    and export `model`, not the trainer.

    Args:
        model: the functional model to train.
        variables: the anchored variables (none: no penalty).
        fisher: one array of Fisher values per variable (`estimate_fisher`).
        ewc_lambda: the penalty's strength (>= 0).
    """

    def __init__(self, model: keras.Model, variables=(), fisher=(), ewc_lambda: float = 0.0):
        check_number("ewc_lambda", ewc_lambda, 0)
        if len(variables) != len(fisher):
            raise ValueError(
                "`fisher` needs one array per variable. Received: "
                f"{len(fisher)} arrays for {len(variables)} variables"
            )
        super().__init__(model.inputs, model.output, name=f"{model.name}_ewc_trainer")
        self.ewc_lambda = float(ewc_lambda)
        self.anchored = list(variables)
        self.anchors = [keras.Variable(v.numpy(), trainable=False) for v in self.anchored]
        self.fisher = [keras.Variable(f, trainable=False, dtype="float32") for f in fisher]

    def ewc_penalty(self):
        """`ewc_lambda / 2 * sum F (w - w*) ** 2` (0 without anchored variables)."""
        total = 0.0
        for variable, anchor, fisher in zip(self.anchored, self.anchors, self.fisher, strict=True):
            total = total + ops.sum(fisher * ops.square(ops.cast(variable, "float32") - anchor))
        return 0.5 * self.ewc_lambda * total

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + self.ewc_penalty() if self.anchored else loss
