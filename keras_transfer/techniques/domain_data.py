"""The data of domain adaptation: labelled source batches paired with unlabelled target ones.

`kt.techniques.dann` and `mmd` train on `(source images, target images)`
batches with the source labels (`paired_batches`); the target images come
from `target_batches`, which refuses anything that carries labels, so target
labels cannot reach the training loss. Labelled target data is for
evaluation only: `evaluation_arrays` reads it and `TargetAccuracy` reports
the classifier's accuracy on it after each epoch.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_transfer.distribute import shard_by_data


class TargetAccuracy(keras.callbacks.Callback):
    """Adds a classifier's accuracy on labelled target data to each epoch's logs.

    The logs get `target_accuracy`; the labels serve this report only.

    Args:
        classifier: the model to evaluate (the one a training-only model
            shares its layers with).
        images: target images.
        labels: their integer labels.
        batch_size: prediction batch size.

    Example:
    >>> inputs = keras.Input((2,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(inputs))
    >>> logs = {}
    >>> TargetAccuracy(model, np.zeros((4, 2)), np.zeros(4), batch_size=2).on_epoch_end(0, logs)
    >>> list(logs)
    ['target_accuracy']
    """

    def __init__(self, classifier, images, labels, *, batch_size: int = 32):
        super().__init__()
        self.classifier, self.images, self.labels = classifier, images, labels
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        scores = self.classifier.predict(self.images, batch_size=self.batch_size, verbose=0)
        if logs is not None:
            logs["target_accuracy"] = float(np.mean(np.argmax(scores, axis=-1) == self.labels))


_UNLABELLED = (
    "`target` must be unlabelled images: an array `[n, height, width, channels]` or a "
    "batched tf.data.Dataset of images alone. Target labels never reach the training loss; "
    "to report target accuracy, pass them as `target_eval=(images, labels)`."
)


def check_not_empty(name: str, data) -> None:
    """Refuses empty data: arrays of 0 rows, a tuple of them, or a dataset of 0 batches.

    Args:
        name: the argument's name, for the error.
        data: arrays, a tuple or list of arrays, or a `tf.data.Dataset`.

    Returns:
        None.

    Example:
    >>> check_not_empty("target", np.zeros((0, 8, 8, 3)))
    Traceback (most recent call last):
    ...
    ValueError: `target` must hold at least one example. Received: 0 examples
    """
    if isinstance(data, tf.data.Dataset):
        count = int(data.cardinality())
    elif isinstance(data, (tuple, list)) and data:
        count = len(data[0])
    else:
        count = len(data)
    if count == 0:
        raise ValueError(f"`{name}` must hold at least one example. Received: 0 examples")


def target_batches(target, batch_size: int, *, seed: int = 0, rank: int = 4) -> tf.data.Dataset:
    """The target images as an endless stream of batches; refuses labelled data.

    Args:
        target: an array of images, or a batched `tf.data.Dataset` of image
            batches alone (repeated as it is).
        batch_size: batch size for an array (shuffled every pass with `seed`).
        seed: seed of the shuffle.
        rank: the rank of an image batch (4 for `[n, h, w, c]`).

    Returns:
        An infinite `tf.data.Dataset` of image batches.

    Raises:
        ValueError: labels in `target` (a tuple, list or dict, or a dataset
            of tuples), images of the wrong rank, or no images.

    Example:
    >>> batches = target_batches(np.zeros((5, 2, 2, 3)), 4)
    >>> [int(b.shape[0]) for b in batches.take(3)]
    [4, 4, 4]
    """
    if isinstance(target, tf.data.Dataset):
        spec = target.element_spec
        if not isinstance(spec, tf.TensorSpec):
            raise ValueError(f"{_UNLABELLED} Received: a dataset of {spec}")
        if spec.shape.rank != rank:
            raise ValueError(
                f"{_UNLABELLED} Received: a dataset of rank-{spec.shape.rank} elements "
                "(batch it first)"
            )
        check_not_empty("target", target)
        return target.repeat()
    if isinstance(target, (tuple, list, dict)):
        raise ValueError(f"{_UNLABELLED} Received: a {type(target).__name__} of {len(target)}")
    images = np.asarray(target)
    if images.ndim != rank:
        raise ValueError(f"{_UNLABELLED} Received: an array of shape {images.shape}")
    check_not_empty("target", images)
    dataset = tf.data.Dataset.from_tensor_slices(images)
    dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    return dataset.repeat().batch(batch_size)


def evaluation_arrays(target_eval):
    """`(images, labels)` arrays from labelled target data (arrays, or a dataset read once).

    Args:
        target_eval: None, a tuple `(images, labels)`, or a dataset of such
            batches.

    Returns:
        `(images, labels)` with flat labels, or None.

    Example:
    >>> images, labels = evaluation_arrays((np.zeros((3, 2)), [[0], [1], [2]]))
    >>> labels.tolist()
    [0, 1, 2]
    """
    if target_eval is None:
        return None
    if isinstance(target_eval, tf.data.Dataset):
        parts = [tuple(np.asarray(value) for value in element) for element in target_eval]
        if not parts or len(parts[0]) != 2:
            raise ValueError(
                "`target_eval` must be a dataset of (images, labels) batches or a tuple "
                f"(images, labels). Received: a dataset of {target_eval.element_spec}"
            )
        target_eval = tuple(np.concatenate(values) for values in zip(*parts, strict=True))
    if not isinstance(target_eval, tuple) or len(target_eval) != 2:
        raise ValueError(
            "`target_eval` must be a tuple (images, labels) or a dataset of such batches. "
            f"Received: {type(target_eval).__name__}"
        )
    images, labels = np.asarray(target_eval[0]), np.asarray(target_eval[1]).reshape(-1)
    if len(images) != len(labels) or not len(labels):
        raise ValueError(
            "`target_eval` must hold as many labels as images, at least one. Received: "
            f"{len(images)} images, {len(labels)} labels"
        )
    return images, labels


def paired_batches(source: tf.data.Dataset, target: tf.data.Dataset, dtype) -> tf.data.Dataset:
    """Source batches `(images, labels, ...)` as `((images, target images), labels, ...)`.

    One target batch joins each source batch (the target stream must not
    end first: see `target_batches`); both image batches are cast to `dtype`.

    Args:
        source: a batched dataset of `(images, labels)` (or with weights).
        target: a dataset of target image batches.
        dtype: the model's input dtype.

    Returns:
        The paired dataset, as long as `source`.

    Example:
    >>> source = tf.data.Dataset.from_tensor_slices((np.zeros((4, 2)), np.arange(4))).batch(2)
    >>> target = tf.data.Dataset.from_tensor_slices(np.ones((6, 2), "uint8")).batch(3)
    >>> (images, others), labels = next(iter(paired_batches(source, target, "float32")))
    >>> images.shape, others.shape, others.dtype.name
    (TensorShape([2, 2]), TensorShape([3, 2]), 'float32')
    """

    def pair(source_batch, target_batch):
        images, *rest = source_batch
        return ((ops.cast(images, dtype), ops.cast(target_batch, dtype)), *rest)

    paired = tf.data.Dataset.zip(source, target).map(pair)
    return shard_by_data(paired.prefetch(tf.data.AUTOTUNE))
