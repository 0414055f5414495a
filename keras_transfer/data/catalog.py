"""Named datasets and folders: Fashion-MNIST, digits, TFDS, image folders, text.

Fashion-MNIST, digits and WordNet load offline from files that Debian and
PyPI packages install (see OFFLINE_ASSETS.md); `"tfds:<name>"` downloads.
Text sources (WordNet, CSV/TSV/JSONL files, folders of `.txt` files) are
tokenised by the caller's KerasHub preprocessor.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_transfer.data.images import image_folder_dataset
from keras_transfer.data.splits import (
    AUTOTUNE,
    DatasetSplits,
    arrays_to_splits,
    cap_per_class,
    finish_pipeline,
    stratified_split,
    suggest,
    to_float,
    validate_image_size,
    validate_max,
    validate_split_options,
)
from keras_transfer.data.text import load_wordnet_nouns, text_dataset
from keras_transfer.data.text_files import (
    TEXT_FILE_EXTENSIONS,
    TEXT_FOLDER_EXTENSION,
    is_text_folder,
    load_text_files,
)

DATASET_NAMES = ("digits", "fashion_mnist")
TEXT_DATASET_NAMES = ("wordnet_nouns",)
_TEXT_SOURCES = (
    f"{TEXT_DATASET_NAMES[0]!r}, a {'/'.join(TEXT_FILE_EXTENSIONS)} file or a folder of "
    f"class subfolders of {TEXT_FOLDER_EXTENSION} files"
)
TFDS_PREFIX = "tfds:"
# Debian package `dataset-fashion-mnist` installs the four standard IDX files here.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Label order from the Fashion-MNIST README (github.com/zalandoresearch/fashion-mnist).
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# IDX element types by the magic number's third byte (yann.lecun.com/exdb/mnist).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# scikit-learn's digits hold integers in 0..16 (`load_digits().DESCR`).
_DIGITS_MAX_VALUE = 16
# Digits, image folders and text have no official test split: hold out the
# usual 20% of each class (seeded, stratified).
DIGITS_TEST_SPLIT = 0.2
FOLDER_TEST_SPLIT = 0.2
# Sources with an official test set take no `test_split`.
_OFFICIAL_TEST = ("fashion_mnist", TFDS_PREFIX)
# Shuffle buffer for TFDS training splits, which may not fit in one buffer.
_TFDS_SHUFFLE_BUFFER = 10_000


def _read_idx(path):
    """Reads an IDX file (gzipped or not): magic number, big-endian dims, data."""
    with (gzip.open if os.fspath(path).endswith(".gz") else open)(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"'{path}' is not an IDX file (magic number {data[:4].hex()})")
    dims = np.frombuffer(data, ">u4", count=data[3], offset=4)
    array = np.frombuffer(data, _IDX_DTYPES[data[2]], offset=4 + 4 * data[3])
    if array.size != np.prod(dims):
        raise ValueError(f"'{path}' holds {array.size} values; its header says {dims.tolist()}")
    return array.reshape(dims).astype(array.dtype.newbyteorder("="))


def _fashion_mnist_arrays(directory):
    paths = {
        s: [os.path.join(directory, f) for f in files] for s, files in _FASHION_MNIST_FILES.items()
    }
    if all(os.path.isfile(p) for files in paths.values() for p in files):
        return {split: tuple(_read_idx(p) for p in files) for split, files in paths.items()}
    import keras  # Downloads: only where the Debian files are absent.

    train, test = keras.datasets.fashion_mnist.load_data()
    return {"train": train, "test": test}


def fashion_mnist_arrays() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """All of Fashion-MNIST as uint8 arrays, as `keras.datasets.fashion_mnist.load_data()`.

    Read from the Debian `dataset-fashion-mnist` files (offline); downloaded
    by Keras where they are absent.

    Returns:
        `((x_train, y_train), (x_test, y_test))`: `[60000, 28, 28]` and
        `[10000, 28, 28]` images, labels 0..9 (`FASHION_MNIST_CLASSES`).

    Example:

    >>> (x_train, y_train), (x_test, y_test) = fashion_mnist_arrays()
    >>> x_train.shape, x_test.dtype.name, int(y_train.max())
    ((60000, 28, 28), 'uint8', 9)
    """
    arrays = _fashion_mnist_arrays(FASHION_MNIST_DIR)
    return arrays["train"], arrays["test"]


def _load_fashion_mnist(
    *, image_size, batch_size, validation_split, seed, max_per_class, max_test_per_class=None
):
    validate_split_options(batch_size, validation_split, 0.0)
    validate_max("max_test_per_class", max_test_per_class)
    (x_train, y_train), (x_test, y_test) = fashion_mnist_arrays()
    rows = cap_per_class(y_train, max_per_class, seed)
    train, validation, _ = stratified_split(y_train[rows], validation_split, 0.0, seed)
    test = cap_per_class(y_test, max_test_per_class, seed)
    parts = {
        "train": (x_train[rows[train]], y_train[rows[train]]),
        "validation": (x_train[rows[validation]], y_train[rows[validation]]),
        "test": (x_test[test], y_test[test]),
    }
    return arrays_to_splits(
        parts,
        FASHION_MNIST_CLASSES,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        info={"source": "fashion_mnist", "skipped": []},
    )


def _load_digits(
    *,
    image_size,
    batch_size,
    validation_split,
    seed,
    max_per_class,
    max_test_per_class=None,
    test_split=DIGITS_TEST_SPLIT,
):
    validate_split_options(batch_size, validation_split, test_split)
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("The digits dataset needs `pip install scikit-learn`.") from error
    digits = load_digits()
    images = (digits.images * (255.0 / _DIGITS_MAX_VALUE)).astype(np.float32)
    rows = cap_per_class(digits.target, max_per_class, seed)
    splits = stratified_split(digits.target[rows], validation_split, test_split, seed)
    if max_test_per_class is not None:
        validate_max("max_test_per_class", max_test_per_class)
        test = splits[2]
        splits = (
            *splits[:2],
            test[cap_per_class(digits.target[rows][test], max_test_per_class, seed)],
        )
    parts = {
        split: (images[rows[part]], digits.target[rows[part]])
        for split, part in zip(("train", "validation", "test"), splits, strict=True)
    }
    return arrays_to_splits(
        parts,
        [str(d) for d in range(10)],
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        info={"source": "digits", "skipped": []},
    )


def _load_tfds(name, *, image_size, batch_size, validation_split, seed, data_dir=None, cache=True):
    validate_split_options(batch_size, validation_split, 0.0)
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError("TFDS datasets need `pip install tensorflow-datasets`.") from error
    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    splits, percent = builder.info.splits, round(validation_split * 100)
    names = {"train": "train", "validation": "validation" if "validation" in splits else None}
    if names["validation"] is None and percent:
        names = {"train": f"train[{percent}%:]", "validation": f"train[:{percent}%]"}
    names["test"] = "test" if "test" in splits else None
    wanted = {split: n for split, n in names.items() if n}
    loaded = builder.as_dataset(
        split=list(wanted.values()),
        as_supervised=True,
        shuffle_files=True,
        read_config=tfds.ReadConfig(shuffle_seed=seed),
    )

    def prepare(image, label):
        image = tf.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        image = tf.image.resize(image, image_size, antialias=True)
        return tf.saturate_cast(tf.round(image), tf.uint8), tf.cast(label, tf.int32)

    datasets = dict.fromkeys(("train", "validation", "test"))
    counts = dict.fromkeys(datasets, 0)
    for split, dataset in zip(wanted, loaded, strict=True):
        size = int(dataset.cardinality())
        counts[split] = size if size >= 0 else None  # None: unknown
        datasets[split] = finish_pipeline(
            dataset.map(prepare, num_parallel_calls=AUTOTUNE),
            training=split == "train",
            count=min(size, _TFDS_SHUFFLE_BUFFER) if size > 0 else _TFDS_SHUFFLE_BUFFER,
            batch_size=batch_size,
            seed=seed,
            transform=to_float,
            cache=cache,
        )
    class_names = list(builder.info.features[builder.info.supervised_keys[1]].names)
    source = {"source": f"{TFDS_PREFIX}{name}", "counts": counts, "skipped": []}
    return DatasetSplits(**datasets, class_names=class_names, info=source)


_LOADERS = {"digits": _load_digits, "fashion_mnist": _load_fashion_mnist}


def _is_text_source(path):
    return (
        path in TEXT_DATASET_NAMES
        or path.lower().endswith(TEXT_FILE_EXTENSIONS)
        or is_text_folder(path)
    )


def _load_text(
    path,
    preprocessor,
    *,
    text_column,
    label_column,
    batch_size,
    validation_split,
    seed,
    max_per_class,
    test_split,
    **kwargs,
):
    if preprocessor is None:
        raise ValueError(
            f"{path!r} is text data: pass `preprocessor=` (a KerasHub TextClassifierPreprocessor, "
            "e.g. `kt.backbones.kerashub.text_preprocessor('minilm')`; --task=text on the "
            "command line)."
        )
    if path in _LOADERS or path.startswith(TFDS_PREFIX):
        raise ValueError(
            f"`preprocessor` is for text data: {_TEXT_SOURCES}. Received: {path!r}, which is "
            "image data (--task=image on the command line)."
        )
    if os.path.isdir(path) and not is_text_folder(path):
        raise ValueError(
            f"`preprocessor` is for text data: {_TEXT_SOURCES}. Received: {path!r}, a folder "
            f"whose class subfolders hold images or no {TEXT_FOLDER_EXTENSION} files."
        )
    test_split = FOLDER_TEST_SPLIT if test_split is None else test_split
    validate_split_options(batch_size, validation_split, test_split)
    problems = []
    if path in TEXT_DATASET_NAMES:
        texts, labels, names = load_wordnet_nouns(max_per_class=max_per_class, seed=seed, **kwargs)
    elif os.path.exists(path) or path.lower().endswith(TEXT_FILE_EXTENSIONS) or os.sep in path:
        texts, labels, names, problems = load_text_files(
            path,
            text_column=text_column,
            label_column=label_column,
            max_per_class=max_per_class,
            seed=seed,
            **kwargs,
        )
    else:
        raise ValueError(
            f"Unknown text dataset {path!r}: give {_TEXT_SOURCES}."
            f"{suggest(path, TEXT_DATASET_NAMES)}"
        )
    splits = text_dataset(
        texts,
        labels,
        preprocessor,
        class_names=names,
        batch_size=batch_size,
        validation_split=validation_split,
        test_split=test_split,
        seed=seed,
    )
    return dataclasses.replace(splits, info={**splits.info, "source": path, "skipped": problems})


def load_dataset(
    name: str | os.PathLike,
    *,
    image_size: Sequence[int] | None = (224, 224),
    batch_size: int = 32,
    validation_split: float = 0.1,
    seed: int = 0,
    max_per_class: int | None = None,
    test_split: float | None = None,
    preprocessor=None,
    text_column: str = "text",
    label_column: str = "label",
    **kwargs,
) -> DatasetSplits:
    """Loads a labelled image or text dataset by name or path, ready for `fit`.

    Images:

    - `"fashion_mnist"`: 60k + 10k 28x28 grey clothes images, 10 classes,
      read from the Debian `dataset-fashion-mnist` files (else downloaded).
      The official test set is `test`; validation is carved from train.
      `max_test_per_class=N` caps the test set as `max_per_class` does train.
    - `"digits"`: scikit-learn's 1,797 8x8 digits (offline), 10 classes;
      `test_split` (default 0.2) is held out for test.
    - `"tfds:<name>"`: a TensorFlow Datasets image classification dataset
      (downloads); its official test split, if any; `data_dir=` and
      `cache=` are passed on.
    - an existing directory: `image_folder_dataset(name, ...)`, holding out
      `test_split` (default `FOLDER_TEST_SPLIT`, 0.2) of each class for test.
      A class too small for three splits gives up its test examples first;
      `info["counts"]["test"]` says what is left.

    Grey images become RGB; images are float32 in 0..255.

    Text (needs `preprocessor`; batches are `(token dict, labels)` from
    `text_dataset`, `test_split` defaults to 0.2):

    - `"wordnet_nouns"`: `load_wordnet_nouns` (offline); `categories=` is
      passed on.
    - a `.csv`, `.tsv` or `.jsonl` file, or a folder whose class subfolders
      hold `.txt` files: `load_text_files`; `on_error=` and `class_names=`
      are passed on, and `info["skipped"]` lists the bad rows left out
      (`"reviews.csv line 7: empty text"`).

    Args:
        name: a dataset name, `"tfds:<name>"`, a folder or a text file.
        image_size: `(height, width)` to resize to; None keeps the native
            size (Fashion-MNIST and digits only). Unused for text.
        batch_size: examples per batch.
        validation_split: fraction of the training data held out per class.
        seed: seed of the subset, the split and the training shuffle.
        max_per_class: keep at most this many training examples per class
            (a seeded choice), for small labelled subsets; None keeps all.
        test_split: fraction of each class held out for test, for digits,
            folders and text (None: 0.2); sources with an official test set
            (Fashion-MNIST, TFDS) take None only.
        preprocessor: a KerasHub `TextClassifierPreprocessor` (see
            `keras_transfer.backbones.kerashub.text_preprocessor`): required
            for text, which it tokenises; None for images.
        text_column: the text's column (JSON key) in a CSV, TSV or JSONL file.
        label_column: the label's column (JSON key) in such a file.
        **kwargs: passed to the loader (see above).

    Returns:
        A `DatasetSplits`.

    Raises:
        ValueError: an unknown name, text without `preprocessor` (or a
            `preprocessor` for images), or bad text data (see
            `load_text_files`).

    Example:
    >>> from keras_transfer.data import load_dataset
    >>> splits = load_dataset("digits", image_size=None, max_per_class=5)
    >>> splits.num_classes, splits.info["counts"]["train"]
    (10, 30)

    Text, from a CSV file:

    >>> import os, tempfile
    >>> from keras_transfer.backbones.kerashub import text_preprocessor
    >>> path = os.path.join(tempfile.mkdtemp(), "reviews.csv")
    >>> with open(path, "w") as f:
    ...     _ = f.write("review,stars\\n" + "".join(
    ...         f"review {i},{'good' if i % 2 else 'bad'}\\n" for i in range(10)))
    >>> splits = load_dataset(path, preprocessor=text_preprocessor("minilm", 16),
    ...                       text_column="review", label_column="stars", batch_size=4)
    >>> splits.class_names, sorted(next(iter(splits.train))[0])
    (['bad', 'good'], ['padding_mask', 'segment_ids', 'token_ids'])
    """
    image_size = validate_image_size(image_size, allow_none=True)
    validate_max("max_per_class", max_per_class)
    path = os.fspath(name)
    if preprocessor is not None or _is_text_source(path):
        return _load_text(
            path,
            preprocessor,
            text_column=text_column,
            label_column=label_column,
            batch_size=batch_size,
            validation_split=validation_split,
            seed=seed,
            max_per_class=max_per_class,
            test_split=test_split,
            **kwargs,
        )
    common = {
        "image_size": image_size,
        "batch_size": batch_size,
        "validation_split": validation_split,
        "seed": seed,
    }
    if test_split is not None:
        if path.startswith(_OFFICIAL_TEST):
            raise ValueError(
                f"{path!r} has an official test set; `test_split` applies to digits and "
                f"image folders only. Received: test_split={test_split!r}"
            )
        kwargs["test_split"] = test_split
    if path in _LOADERS:
        return _LOADERS[path](max_per_class=max_per_class, **common, **kwargs)
    if path.startswith(TFDS_PREFIX) or os.path.isdir(path):
        if max_per_class is not None or image_size is None:
            raise ValueError(
                "`max_per_class` must be None and `image_size` set for TFDS datasets and "
                f"folders. Received: max_per_class={max_per_class}, image_size={image_size}"
            )
        if os.path.isdir(path):
            kwargs.setdefault("test_split", FOLDER_TEST_SPLIT)
            return image_folder_dataset(path, **common, **kwargs)
        return _load_tfds(path[len(TFDS_PREFIX) :], **common, **kwargs)
    if os.path.isfile(path):
        raise ValueError(
            f"A data file must be text, ending with one of {TEXT_FILE_EXTENSIONS}; images come "
            f"in a folder of class subfolders. Received: {path!r}"
        )
    if os.sep in path or path.startswith("."):
        raise FileNotFoundError(f"Image folder not found: {path!r}.")
    raise ValueError(
        f"Unknown dataset {path!r}: give one of {DATASET_NAMES}, '{TFDS_PREFIX}<name>', an "
        f"existing image folder, or text data ({_TEXT_SOURCES}, with `preprocessor=`)."
        f"{suggest(path, DATASET_NAMES + TEXT_DATASET_NAMES)}"
    )
