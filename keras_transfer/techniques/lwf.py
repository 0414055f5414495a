"""Learning without Forgetting (Li and Hoiem 2016): the distillation loss on recorded outputs.

LwF records an old head's outputs on the new task's data before training,
then keeps them with `LwFLoss` while the new task trains;
`kt.techniques.continual` (`learn_new_task(method="lwf")`) does both.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

# Li and Hoiem 2016's temperature.
DEFAULT_TEMPERATURE = 2.0
_EPSILON = 1e-7  # probabilities are clipped to [eps, 1] before their log


def _check_positive(name, value):
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.number))
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a number > 0. Received: {name}={value!r}")


@keras.saving.register_keras_serializable(package="keras_transfer")
class LwFLoss(keras.losses.Loss):
    """Learning-without-Forgetting distillation loss on recorded probabilities.

    `KL(softmax(log(y_true) / T) || softmax(log(y_pred) / T))` per example:
    `y_true` are an old head's outputs recorded before training, `y_pred` its
    current ones (both probabilities; `log(p)` are logits up to a constant).
    Li and Hoiem's cross-entropy form has the same gradient (they differ by
    the entropy of the recorded targets, a constant), and the loss is 0 when
    the head's outputs have not moved. No `T ** 2` factor (Li and Hoiem
    balance the terms with `lwf_weight` instead).

    Args:
        temperature: T > 0; T > 1 softens both distributions.
        **kwargs: standard loss arguments (`name`, `reduction`).

    Example:
    >>> import numpy as np
    >>> loss = LwFLoss(temperature=2.0)
    >>> float(loss(np.array([[0.7, 0.3]]), np.array([[0.7, 0.3]])))
    0.0
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, name: str = "lwf", **kwargs):
        _check_positive("temperature", temperature)
        super().__init__(name=name, **kwargs)
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        def log_soft(p):
            p = ops.clip(ops.cast(p, "float32"), _EPSILON, 1.0)
            return ops.log_softmax(ops.log(p) / self.temperature, axis=-1)

        target = log_soft(y_true)
        return ops.sum(ops.exp(target) * (target - log_soft(y_pred)), axis=-1)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
