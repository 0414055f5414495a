"""Frozen-feature caching: the frozen part of a model runs once, the head trains on its features.

While the backbone is frozen (feature extraction, stage 1 of `"two_stage"`),
every epoch computes the same features again: `input -> [preprocessing] ->
backbone -> pooling` does not change. `split_at_head` cuts a model into that
frozen part and its head (`[dropout] -> head`: the model's own layers, so the
same variables); `cached_features` runs the frozen part once per example in
inference mode (`training=False`) and returns `tf.data` pipelines of
`(features, targets)` for the head. `fit_stage(..., cache_features=...)` and
`fine_tune(..., cache_features=...)` train the head on them and leave the
ordinary end-to-end model trained.

Data order: arrays `(x, y)` are run through the frozen part in their own
order, then shuffled each epoch with the same seeded shuffle as without
caching (`training.as_dataset`): the head sees the same batches in the same
order. A `tf.data.Dataset` is read once, in its own order; its examples are
then reshuffled every epoch with `seed` and batched at the dataset's batch
size (that of its first batch; a static batch dimension keeps
`drop_remainder`). A dataset that reshuffles itself cannot be replayed without
reading its images again, so its order differs from an uncached run; it must
give the same examples every epoch (random augmentation inside the `tf.data`
pipeline would be fixed at its first draw). Validation data is cached the
same way and never shuffled.

Where the features are kept (`FeatureCache`): in memory while their estimated
size (examples x feature values x bytes per value) fits
`FEATURE_CACHE_MEMORY_BUDGET`, else in a file on disk that the training
pipeline reads by index, so the shuffle stays a full one (as without caching)
at bounded memory. The files are removed when training ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Iterator

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.backbones import BACKBONE_NAME
from keras_transfer.builders import AUGMENTATION_NAME
from keras_transfer.data.splits import suggest
from keras_transfer.distribute import shard_by_data
from keras_transfer.training import DEFAULT_BATCH_SIZE, check_number, output_heads

FEATURE_CACHE_MODES = ("auto", "memory", "disk")
# Above this estimated size features go to disk: 2 GiB leaves most of a 16 GB
# training machine to the data pipeline and the model, and keeps an in-memory
# cache below the 2 GB protobuf limit TensorFlow meets when a strategy
# serialises the input pipeline (constants included).
FEATURE_CACHE_MEMORY_BUDGET = 2 * 1024**3
# Layers between the features and the head that act only in training: they
# stay in the head, so each epoch draws new noise on the cached features.
_TRAINING_NOISE = (
    keras.layers.Dropout,
    keras.layers.AlphaDropout,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
)


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """Where `fine_tune(..., cache_features=...)` keeps the frozen part's features.

    Args:
        mode: `"auto"` (in memory while the estimated size fits
            `memory_budget`, else on disk), `"memory"` or `"disk"`.
        directory: the folder for disk caches (made if missing; each cache is
            a new temporary folder inside, removed when training ends); None:
            the system's temporary folder.
        memory_budget: bytes of features kept in memory in `"auto"` mode.

    Example:

    >>> FeatureCache("disk").mode
    'disk'
    >>> FeatureCache("disc")
    Traceback (most recent call last):
    ...
    ValueError: `mode` must be one of ('auto', 'memory', 'disk'). Did you mean 'disk'? Received: mode='disc'
    """

    mode: str = "auto"
    directory: str | os.PathLike | None = None
    memory_budget: int = FEATURE_CACHE_MEMORY_BUDGET

    def __post_init__(self):
        if self.mode not in FEATURE_CACHE_MODES:
            raise ValueError(
                f"`mode` must be one of {FEATURE_CACHE_MODES}.{suggest(self.mode, FEATURE_CACHE_MODES)}"
                f" Received: mode={self.mode!r}"
            )
        if self.directory is not None and not isinstance(self.directory, (str, os.PathLike)):
            raise TypeError(
                "`directory` must be a path or None. "
                f"Received: directory of type {type(self.directory).__name__}"
            )
        check_number("memory_budget", self.memory_budget, 0, integer=True)


def as_feature_cache(value) -> FeatureCache | None:
    """The `FeatureCache` a `cache_features` argument asks for (None: no caching).

    Args:
        value: False or None (off), True (`FeatureCache()`: `"auto"`), a mode
            name from `FEATURE_CACHE_MODES`, or a `FeatureCache`.

    Returns:
        A `FeatureCache`, or None.

    Example:

    >>> as_feature_cache(True)
    FeatureCache(mode='auto', directory=None, memory_budget=2147483648)
    >>> as_feature_cache(False) is None
    True
    """
    if value is None or value is False:
        return None
    if value is True:
        return FeatureCache()
    if isinstance(value, FeatureCache):
        return value
    if isinstance(value, str) and value in FEATURE_CACHE_MODES:
        return FeatureCache(value)
    hint = suggest(value, FEATURE_CACHE_MODES) if isinstance(value, str) else ""
    raise ValueError(
        f"`cache_features` must be True, False, one of {FEATURE_CACHE_MODES} or a "
        f"FeatureCache.{hint} Received: cache_features={value!r}"
    )


def split_at_head(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Cuts a functional model where its head begins: `(frozen part, head)`.

    The cut is the tensor the output layer(s) read or, when dropout (or
    another layer active only in training) comes first, the tensor that
    layer reads; every head must read the same one. For a model of
    `build_image_classifier` that is the pooled features: the frozen part is
    `input -> [augmentation] -> [preprocessing] -> backbone -> pooling`, the
    head `[dropout] -> head`. Both are made of the model's own layers, so
    training the head trains the model.

    Args:
        model: a functional model (one from `build_image_classifier` or
            `build_text_classifier`, or any with named output layers).

    Returns:
        `(frozen, head)`: `frozen` maps the model's inputs to the features,
        `head` maps features to the model's outputs.

    Raises:
        ValueError: the heads do not read one common tensor, or it is the
            model's input.

    Example:

    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 3, weights=None,
    ...                                   input_shape=(32, 32, 3))
    >>> frozen, head = split_at_head(model)
    >>> frozen.output_shape, [layer.name for layer in head.layers[1:]]
    ((None, 576), ['dropout', 'head'])
    """
    producers = {}
    for layer in model.layers:
        with contextlib.suppress(AttributeError, ValueError):
            for tensor in tf.nest.flatten(layer.output):
                producers[id(tensor)] = layer
    cuts = []
    for layer in output_heads(model).values():
        tensor = layer.input
        producer = producers.get(id(tensor))
        while isinstance(producer, _TRAINING_NOISE):
            tensor = producer.input
            producer = producers.get(id(tensor))
        cuts.append(tensor)
    cut = cuts[0]
    if not isinstance(cut, keras.KerasTensor) or any(other is not cut for other in cuts):
        raise ValueError(
            "Caching features needs every head to read one tensor (the pooled features). "
            f"Received: heads reading {[getattr(t, 'name', t) for t in cuts]}"
        )
    if any(cut is tensor for tensor in tf.nest.flatten(model.input)):
        raise ValueError(
            "The heads read the model's input: there is no frozen part to cache. "
            f"Received: model {model.name!r}"
        )
    frozen = keras.Model(model.input, cut, name=f"{model.name}_frozen")
    head = keras.Model(cut, model.output, name=f"{model.name}_head")
    return frozen, head


def check_cacheable(model: keras.Model) -> None:
    """Checks that a model's features can be cached once its backbone is frozen.

    Random augmentation cannot be cached: the features would be those of one
    fixed draw. Nor can layers before the head that train (other than the
    backbone, which a head stage freezes).

    Args:
        model: a functional model (see `split_at_head`).

    Returns:
        None.

    Raises:
        ValueError: the model has an `"augmentation"` block, trainable layers
            other than the backbone before its head, or no single feature
            tensor its heads read.

    Example:

    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 3, weights=None,
    ...                                   input_shape=(32, 32, 3), augmentation="light")
    >>> check_cacheable(model)
    Traceback (most recent call last):
    ...
    ValueError: Random augmentation cannot be cached: ...
    """
    frozen, _ = split_at_head(model)
    names = [layer.name for layer in frozen.layers]
    if AUGMENTATION_NAME in names:
        augmentation = frozen.get_layer(AUGMENTATION_NAME)
        layers = [layer.name for layer in getattr(augmentation, "layers", [augmentation])]
        raise ValueError(
            "Random augmentation cannot be cached: the backbone would run once per image, so "
            "the head would train on the features of one fixed augmentation. Build the model "
            "with augmentation=None to cache features, or train without cache_features. "
            f"Received: a model with an {AUGMENTATION_NAME!r} block {layers}"
        )
    training = [
        layer.name
        for layer in frozen.layers
        if layer.name != BACKBONE_NAME and layer.trainable_weights
    ]
    if training:
        raise ValueError(
            "Caching features needs everything before the head frozen, apart from the "
            f"backbone (frozen by the stage). Received: trainable layers {training}"
        )


@contextlib.contextmanager
def cached_features(
    frozen: keras.Model,
    train,
    validation=None,
    cache: FeatureCache | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    jit_compile: bool | str = False,
    verbose="auto",
) -> Iterator[tuple[tf.data.Dataset, tf.data.Dataset | None]]:
    """Runs `frozen` once per example; yields `(features, targets)` datasets.

    The frozen part runs in inference mode (`training=False`), on one device
    (the default one, per worker under a multi-worker strategy, each worker
    computing every example so that the cached dataset is sharded like the
    original). See the module docstring for the data order. When `verbose`
    is not 0 the estimated size and where it goes are printed first.

    Args:
        frozen: the frozen part (see `split_at_head`).
        train: a batched `tf.data.Dataset` of `(inputs, targets)` (or
            `(inputs, targets, sample_weights)`), or a tuple of arrays.
        validation: the same, or None.
        cache: a `FeatureCache`; None: `FeatureCache()`.
        batch_size: the batch of array inputs.
        seed: the seed of the per-epoch shuffle of the training examples.
        jit_compile: True compiles the frozen part with XLA.
        verbose: 0 prints nothing.

    Yields:
        `(train_features, validation_features or None)`, batched datasets
        whose first element is the features; files on disk are removed on
        exit.

    Raises:
        ValueError: a dataset is infinite or empty.

    Example:

    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 3, weights=None,
    ...                                   input_shape=(32, 32, 3))
    >>> frozen, head = split_at_head(model)
    >>> data = (np.random.rand(10, 32, 32, 3) * 255, np.arange(10) % 3)
    >>> with cached_features(frozen, data, batch_size=4, verbose=0) as (train, _):
    ...     [tuple(x.shape) for x, y in train]
    [(4, 576), (4, 576), (2, 576)]
    """
    cache = cache or FeatureCache()
    store = _FeatureStore(cache, verbose)
    extract = tf.function(
        lambda x: frozen(x, training=False),
        jit_compile=jit_compile is True,
        reduce_retracing=True,
    )
    try:
        train_features = _cached_split(
            extract, train, "train", store, batch_size=batch_size, seed=seed, shuffle=True
        )
        validation_features = None
        if validation is not None:
            validation_features = _cached_split(
                extract, validation, "validation", store, batch_size=batch_size, seed=seed
            )
        yield train_features, validation_features
    finally:
        store.remove_files()


def _cached_split(extract, data, name, store, *, batch_size, seed, shuffle=False):
    """Runs the frozen part over one split; returns the batched `(features, *targets)`."""
    if isinstance(data, tf.data.Dataset):
        cardinality = int(data.cardinality())
        if cardinality == tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                f"Caching features needs a finite `{name}` dataset (each example is computed "
                "once). Received: an infinite dataset (`.repeat()`?)"
            )
        first_input = tf.nest.flatten(data.element_spec[0])[0]
        drop_remainder = first_input.shape[0] is not None
        rest_chunks, sizes = [], []

        def batches():
            for inputs, *rest in data:
                sizes.append(int(tf.nest.flatten(inputs)[0].shape[0]))
                rest_chunks.append(tf.nest.map_structure(np.asarray, tuple(rest)))
                yield extract(inputs).numpy()

        known = cardinality if cardinality > 0 else None
        features = store.keep(name, batches(), batches_count=known)
        rest = tf.nest.map_structure(lambda *parts: np.concatenate(parts), *rest_chunks)
        batch_size = sizes[0]
    else:
        inputs, *rest = data
        rest = tuple(tf.nest.map_structure(np.asarray, tuple(rest)))
        count = len(tf.nest.flatten(inputs)[0])
        inputs = tf.data.Dataset.from_tensor_slices(inputs).batch(batch_size)
        features = store.keep(name, (extract(x).numpy() for x in inputs), examples=count)
        drop_remainder = False
    return shard_by_data(
        _features_dataset(
            features,
            rest,
            batch_size=batch_size,
            shuffle=shuffle,
            seed=seed,
            drop_remainder=drop_remainder,
        )
    )


def _features_dataset(features, rest, *, batch_size, shuffle, seed, drop_remainder):
    """`(features, *rest)` examples, shuffled (seeded, every epoch) then batched."""
    count = len(features)
    if isinstance(features, np.memmap):
        # Read by index: the shuffle buffer holds indices, not features, and
        # draws the same permutation as a shuffle of the examples themselves.
        dataset = tf.data.Dataset.range(count)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((features, *rest))
    if shuffle:
        dataset = dataset.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    if isinstance(features, np.memmap):
        dtype = tf.as_dtype(features.dtype)
        shape = (batch_size if drop_remainder else None, *features.shape[1:])

        def load(index):
            values = tf.numpy_function(lambda i: np.asarray(features[i]), [index], dtype)
            values.set_shape(shape)
            targets = tf.nest.map_structure(lambda t: tf.gather(t, index), rest)
            return (values, *targets)

        dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


class _FeatureStore:
    """Keeps feature batches in memory, or in files once the memory budget is spent."""

    def __init__(self, cache: FeatureCache, verbose):
        self.cache = cache
        self.verbose = verbose
        self.in_memory = 0  # bytes kept in memory, all splits together
        self.folder = None

    def keep(self, name, batches, *, examples=None, batches_count=None):
        """Stores every batch of `batches`; returns an array or a read-only memmap."""
        chunks, file, count = [], None, 0
        try:
            for values in batches:
                if count == 0:
                    expected = examples
                    if expected is None and batches_count is not None:
                        expected = batches_count * len(values)  # at most this many
                    to_disk = self._to_disk(expected, values)
                    self._report(name, expected, values, to_disk, exact=examples is not None)
                elif file is None and self._over_budget(values.nbytes):
                    to_disk = True
                    self._report(name, None, values, to_disk, spilled=count)
                if to_disk and file is None:
                    file = open(os.path.join(self._folder(), f"{name}.features"), "wb")  # noqa: SIM115
                    for chunk in chunks:
                        file.write(chunk.tobytes())
                    self.in_memory -= sum(chunk.nbytes for chunk in chunks)
                    chunks = []
                if file is not None:
                    file.write(np.ascontiguousarray(values).tobytes())
                else:
                    chunks.append(values)
                    self.in_memory += values.nbytes
                count += len(values)
                shape, dtype = values.shape[1:], values.dtype
        finally:
            if file is not None:
                file.close()
        if count == 0:
            raise ValueError(f"The `{name}` data holds no examples. Received: 0 examples")
        if file is not None:
            return np.memmap(file.name, dtype=dtype, mode="r", shape=(count, *shape))
        return np.concatenate(chunks)

    def _over_budget(self, nbytes):
        return self.cache.mode == "auto" and self.in_memory + nbytes > self.cache.memory_budget

    def _to_disk(self, expected, values):
        if self.cache.mode != "auto":
            return self.cache.mode == "disk"
        per_example = values.nbytes // max(len(values), 1)
        return self._over_budget(per_example * (expected or len(values)))

    def _report(self, name, expected, values, to_disk, spilled=None, exact=True):
        if self.verbose == 0:
            return
        per_example = math.prod(values.shape[1:])
        where = f"on disk in {self._folder()}" if to_disk else "in memory"
        if spilled is not None:
            print(
                f"Feature cache ({name}): over the memory budget of "
                f"{_size(self.cache.memory_budget)} after {spilled} examples: {where}."
            )
            return
        estimate = "an unknown number of" if expected is None else f"{expected}"
        if expected is not None and not exact:
            estimate = f"up to {expected}"
        size = "" if expected is None else f" = {_size(expected * values.nbytes // len(values))}"
        budget = ""
        if self.cache.mode == "auto":
            budget = f" (memory budget {_size(self.cache.memory_budget)})"
        print(
            f"Feature cache ({name}): {estimate} examples x {per_example} {values.dtype} values"
            f"{size}{budget}: {where}."
        )

    def _folder(self):
        if self.folder is None:
            parent = self.cache.directory
            if parent is not None:
                os.makedirs(parent, exist_ok=True)
            self.folder = tempfile.mkdtemp(prefix="kt-features-", dir=parent)
        return self.folder

    def remove_files(self):
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _size(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}"
