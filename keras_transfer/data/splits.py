"""Splits: the `DatasetSplits` container and the seeded, stratified split.

Shared by every dataset source (folders, arrays, named datasets, text): one
way to validate options, cap and split per class and finish a `tf.data`
pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class DatasetSplits:
    """The train / validation / test datasets of one labelled image collection.

    Each dataset yields batches `(images, labels)`: images float32
    `[batch, height, width, 3]` with raw RGB values in 0..255, labels int32
    `[batch]`. Only `train` is shuffled (seeded, reshuffled every epoch).

    Args:
        train: the training `tf.data.Dataset`.
        validation: the validation dataset, or None when there is none.
        test: the test dataset, or None when there is none.
        class_names: class names; label `i` is `class_names[i]`.
        info: `"source"`, `"counts"` (examples per split), `"skipped"` (list
            of `{"path", "reason"}` for unreadable files) and, depending on
            the source, `"paths"` or `"indices"` per split.

    Example:
    >>> import numpy as np
    >>> from keras_transfer.data import array_dataset
    >>> splits = array_dataset(np.zeros((10, 8, 8), "uint8"), np.arange(10) % 2)
    >>> splits.num_classes, splits.info["counts"]
    (2, {'train': 8, 'validation': 2, 'test': 0})
    """

    train: tf.data.Dataset
    validation: tf.data.Dataset | None
    test: tf.data.Dataset | None
    class_names: list[str]
    info: dict

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def validate_image_size(image_size, allow_none: bool = False) -> tuple[int, int] | None:
    """Checks `(height, width)` (or None if allowed); returns it as a tuple of ints."""
    if image_size is None and allow_none:
        return None
    if (
        not isinstance(image_size, Sequence)
        or len(image_size) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
        or min(image_size) < 1
    ):
        allowed = "None or " if allow_none else ""
        raise ValueError(
            f"`image_size` must be {allowed}(height, width) with positive integers. "
            f"Received: image_size={image_size!r}"
        )
    return (int(image_size[0]), int(image_size[1]))


def validate_split_options(batch_size, validation_split, test_split) -> None:
    """Checks `batch_size` >= 1 and split fractions in [0, 1) that leave data to train on."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(
            f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}"
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    for name, value in (("validation_split", validation_split), ("test_split", test_split)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={value!r}")
    if validation_split + test_split >= 1:
        raise ValueError(
            "`validation_split + test_split` must be < 1 so that examples are left to train "
            f"on. Received: validation_split={validation_split}, test_split={test_split}"
        )


def _split_sizes(n, validation_split, test_split):
    """Validation and test sizes for a class of `n` examples (at least 1 each if asked)."""
    sizes = [max(1, round(n * s)) if s > 0 else 0 for s in (validation_split, test_split)]
    # Keep at least one training example per class; small classes give up test first.
    while sum(sizes) >= n and any(sizes):
        sizes[1 if sizes[1] else 0] -= 1
    return sizes


def stratified_split(
    labels: np.ndarray, validation_split: float, test_split: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-class split; returns shuffled index arrays (train, validation, test).

    Each class keeps at least one training example; a split asked for gets at
    least one example of each class that has enough.
    """
    rng = np.random.default_rng(seed)
    parts = ([], [], [])
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        n_val, n_test = _split_sizes(len(indices), validation_split, test_split)
        parts[1].append(indices[:n_val])
        parts[2].append(indices[n_val : n_val + n_test])
        parts[0].append(indices[n_val + n_test :])
    return tuple(rng.permutation(np.concatenate(part)).astype(np.int64) for part in parts)


def finish_pipeline(
    dataset: tf.data.Dataset,
    *,
    training,
    count,
    batch_size,
    seed,
    transform,
    cache=True,
    shuffle_buffer=None,
) -> tf.data.Dataset:
    """cache -> shuffle (train only) -> batch -> `transform` per batch -> prefetch.

    Shuffling after the cache reshuffles every epoch without decoding again.
    The shuffle buffer holds `shuffle_buffer` examples (None: all `count`).
    """
    if cache:
        dataset = dataset.cache() if cache is True else dataset.cache(os.fspath(cache))
    if training:
        buffer = count if shuffle_buffer is None else min(count, shuffle_buffer)
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(transform, num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)


def to_float(images, labels):
    """Casts a batch of uint8 images to float32 (values stay 0..255)."""
    return tf.cast(images, tf.float32), labels


def _array_transform(image_size):
    """Per batch: float32, grey -> RGB (channel repeated), optional resize."""

    def transform(images, labels):
        images = tf.cast(images, tf.float32)
        if images.shape.rank == 3:
            images = images[..., tf.newaxis]
        if images.shape[-1] == 1:
            images = tf.repeat(images, 3, axis=-1)
        if image_size is not None:
            images = tf.image.resize(images, image_size, antialias=True)
        return images, labels

    return transform


def arrays_to_splits(parts, class_names, *, image_size, batch_size, seed, info):
    """`DatasetSplits` from `{"train": (images, labels), "validation": ..., "test": ...}`."""
    datasets, counts = {}, {}
    for split in ("train", "validation", "test"):
        images, labels = parts.get(split) or (None, None)
        counts[split] = 0 if labels is None else len(labels)
        if not counts[split]:
            datasets[split] = None
            continue
        # Raw arrays stay in memory as they are; RGB, float32 and resizing are
        # applied per batch, so there is nothing worth caching.
        datasets[split] = finish_pipeline(
            tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32))),
            training=split == "train",
            count=counts[split],
            batch_size=batch_size,
            seed=seed,
            transform=_array_transform(image_size),
            cache=False,
        )
    return DatasetSplits(**datasets, class_names=list(class_names), info={"counts": counts, **info})


def suggest(value, choices) -> str:
    """The hint " Did you mean 'x'?" for the closest of `choices`, or ""."""
    close = difflib.get_close_matches(str(value), choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def validate_max(name, value) -> None:
    """Checks a per-class cap: None or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
        raise ValueError(f"`{name}` must be None or an integer >= 1. Received: {name}={value!r}")
    if value is not None and value < 1:
        raise ValueError(f"`{name}` must be None or >= 1. Received: {name}={value}")


def cap_per_class(labels, max_per_class, seed):
    """Seeded shuffle of the row indices, keeping the first `max_per_class` of each class."""
    order = np.random.default_rng(seed).permutation(len(labels))
    if max_per_class is None:
        return order
    rank = np.zeros(len(labels), np.int64)
    for label in np.unique(labels):
        in_class = labels[order] == label
        rank[in_class] = np.arange(in_class.sum())
    return order[rank < max_per_class]
