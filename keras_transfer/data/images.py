"""Image datasets from a folder of class subfolders or from numpy arrays.

Both return `DatasetSplits`: batched `tf.data.Dataset`s of `(images, labels)`
with float32 RGB pixels in 0..255 (the toolkit's models take raw pixels and
preprocess inside the graph) and int32 labels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.data.splits import (
    AUTOTUNE,
    DatasetSplits,
    arrays_to_splits,
    finish_pipeline,
    stratified_split,
    to_float,
    validate_image_size,
    validate_split_options,
)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
ON_ERROR_MODES = ("skip", "raise")
# Formats `tf.io.decode_image` reads (TF 2.21; TIFF fails, WebP works: checked).
_TF_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "WEBP")
# Bit depths TensorFlow's BMP decoder reads (a 1-bit BMP fails: checked on TF 2.21).
_TF_BMP_BITS = (8, 24, 32)
# Checking every file first takes a while on big folders: show a progress bar
# from this many files, updated every _PROGRESS_EVERY files.
_PROGRESS_MIN_FILES = 2000
_PROGRESS_EVERY = 100
# How many bad paths a warning or an error spells out.
_MAX_LISTED = 5
# `cache="auto"` keeps decoded images (uint8) in memory only when all splits
# together fit this budget (1 GiB; the environment variable
# KERAS_TRANSFER_IMAGE_CACHE_MB overrides it). Larger folders are decoded
# again every epoch (or cached in files when `cache` is a path), so memory
# does not grow with the number of files.
IMAGE_CACHE_BUDGET = 1 << 30
IMAGE_CACHE_BUDGET_ENV = "KERAS_TRANSFER_IMAGE_CACHE_MB"
CACHE_MODES = ("auto", True, False)
# Without an in-memory cache, the training split shuffles its file list every
# epoch and then mixes decoded images in a buffer of this many.
DECODED_SHUFFLE_BUFFER = 1024


def class_files(directory: str, label: str, extensions: Sequence[str]) -> list[str]:
    """The files of one class folder (subfolders included) with these extensions, sorted.

    Hidden files (`._x.jpg` from macOS) are metadata and are left out;
    symbolic links to folders are followed.

    Args:
        directory: the dataset folder.
        label: the class subfolder.
        extensions: lower-case extensions, e.g. `(".txt",)`.

    Returns:
        Paths, sorted.

    Example:
    >>> import tempfile, os
    >>> root = tempfile.mkdtemp(); os.makedirs(f"{root}/cat")
    >>> for name in ("b.JPG", "a.png", ".hidden.png", "notes.md"):
    ...     open(f"{root}/cat/{name}", "w").close()
    >>> [os.path.basename(p) for p in class_files(root, "cat", (".png", ".jpg"))]
    ['a.png', 'b.JPG']
    """
    return sorted(
        os.path.join(root, file)
        for root, _, names in os.walk(os.path.join(directory, label), followlinks=True)
        for file in names
        if file.lower().endswith(tuple(extensions)) and not file.startswith(".")
    )


def _validate_arrays(images, labels, class_names):
    images, labels = np.asarray(images), np.asarray(labels)
    if not np.issubdtype(images.dtype, np.number) or images.ndim not in (3, 4):
        raise ValueError(
            "`images` must be a numeric array [n, h, w] or [n, h, w, 1|3]. "
            f"Received: images with shape {images.shape} and dtype {images.dtype}"
        )
    if (images.ndim == 4 and images.shape[-1] not in (1, 3)) or not len(images):
        raise ValueError(
            f"`images` must be [n, h, w, 1|3] with n >= 1. Received: shape {images.shape}"
        )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"`labels` must be a 1-D integer array with one label per image ({len(images)}). "
            f"Received: labels with shape {labels.shape} and dtype {labels.dtype}"
        )
    if labels.min() < 0:
        raise ValueError(f"`labels` must be >= 0. Received: min label {labels.min()}")
    low, high = images.min(), images.max()
    if low < 0 or high > 255:
        raise ValueError(f"`images` must be in 0..255. Received: values in [{low}, {high}]")
    if np.issubdtype(images.dtype, np.floating) and 0 < high <= 1:
        warnings.warn(
            f"`images` are in [{low}, {high}]: they look scaled to 0..1, but 0..255 is expected.",
            stacklevel=3,
        )
    if class_names is None:
        class_names = [str(i) for i in range(labels.max() + 1)]
    if len(class_names) <= labels.max():
        raise ValueError(
            f"`class_names` must name every label (max label {labels.max()}). "
            f"Received: class_names={class_names!r}"
        )
    return images, labels, [str(name) for name in class_names]


def array_dataset(
    images,
    labels,
    *,
    image_size: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    batch_size: int = 32,
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 0,
) -> DatasetSplits:
    """Builds train / validation / test datasets from numpy arrays.

    The split is stratified per class and fixed by `seed`. Grey images become
    RGB (the channel is repeated) and are resized (bilinear, antialiased)
    inside the `tf.data` pipeline, batch by batch.

    Args:
        images: array `[n, h, w]` (grey) or `[n, h, w, 1|3]`, any numeric
            dtype, values in 0..255.
        labels: integer array `[n]` of class indices.
        image_size: `(height, width)` to resize to; None keeps `(h, w)`.
        class_names: names of the classes; defaults to `"0"`, `"1"`, ...
        batch_size: examples per batch.
        validation_split: fraction of each class held out for validation.
        test_split: fraction of each class held out for test.
        seed: seed of the split and of the training shuffle.

    Returns:
        A `DatasetSplits`; `info["indices"]` maps each split to its rows.

    Example:
    >>> import numpy as np
    >>> from keras_transfer.data import array_dataset
    >>> splits = array_dataset(np.zeros((6, 8, 8), "uint8"), np.arange(6) % 2,
    ...                        image_size=(16, 16), batch_size=4)
    >>> images, labels = next(iter(splits.train))
    >>> tuple(images.shape), labels.dtype.name
    ((4, 16, 16, 3), 'int32')
    """
    image_size = validate_image_size(image_size, allow_none=True)
    validate_split_options(batch_size, validation_split, test_split)
    images, labels, class_names = _validate_arrays(images, labels, class_names)
    indices = dict(
        zip(
            ("train", "validation", "test"),
            stratified_split(labels, validation_split, test_split, seed),
            strict=True,
        )
    )
    parts = {split: (images[rows], labels[rows]) for split, rows in indices.items()}
    return arrays_to_splits(
        parts,
        class_names,
        image_size=image_size,
        batch_size=batch_size,
        seed=seed,
        info={"source": "arrays", "skipped": [], "indices": indices},
    )


def _import_pil():
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - pillow comes with matplotlib
        raise ImportError("Reading image folders needs Pillow: `pip install pillow`.") from error
    return Image


def _unreadable_reason(path):
    """Why TensorFlow could not decode `path`, or None if it can."""
    image_module = _import_pil()
    try:
        with image_module.open(path) as image:
            image.load()
            image_format = image.format
    except Exception as error:  # PIL raises many error types for bad files.
        return f"{type(error).__name__}: {error}"
    if image_format not in _TF_FORMATS:
        return f"{image_format} images cannot be decoded by tf.io.decode_image"
    if image_format == "BMP":
        with open(path, "rb") as file:
            header = file.read(30)
        # biBitCount: offset 28 (BITMAPINFOHEADER) or 24 (OS/2 BITMAPCOREHEADER, size 12).
        offset = 24 if int.from_bytes(header[14:18], "little") == 12 else 28
        bits = int.from_bytes(header[offset : offset + 2], "little")
        if bits not in _TF_BMP_BITS:
            return f"{bits}-bit BMP; TensorFlow reads only {_TF_BMP_BITS}-bit BMP files"
    return None


def _list_images(directory):
    """Sorted class names and, per class, the sorted image paths under its folder."""
    classes = sorted(
        entry.name for entry in os.scandir(directory) if entry.is_dir() and entry.name[0] != "."
    )
    if not classes:
        raise ValueError(
            f"`directory` must hold one subfolder per class. Received: directory='{directory}' "
            "has no subfolders"
        )
    files = []
    for name in classes:
        found = class_files(directory, name, IMAGE_EXTENSIONS)
        if not found:
            raise ValueError(
                f"class folder '{name}' has no images (extensions {IMAGE_EXTENSIONS}) in "
                f"'{directory}'"
            )
        files.append(found)
    return classes, files


def decode_image_bytes(data: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Decodes one encoded image into float32 RGB pixels of `image_size`.

    The one decoder of the toolkit: training pipelines, `predict` and the
    exported `serving_bytes` signature all call it, so a served model sees
    the pixels it was trained on. Grey images become RGB, an animation its
    first frame; resizing is bilinear with antialiasing.

    Args:
        data: scalar `tf.string` tensor of JPEG, PNG, GIF, BMP or WebP bytes.
        image_size: `(height, width)` of the result.

    Returns:
        A float32 tensor `[height, width, 3]` in 0..255.

    Raises:
        tf.errors.InvalidArgumentError: when `data` is not a readable image.

    Example:

    >>> import io
    >>> from PIL import Image
    >>> buffer = io.BytesIO()
    >>> Image.new("L", (40, 30), color=200).save(buffer, format="PNG")
    >>> image = decode_image_bytes(tf.constant(buffer.getvalue()), (16, 16))
    >>> tuple(image.shape), round(float(image[0, 0, 0]), 3)
    ((16, 16, 3), 200.0)
    """
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return tf.image.resize(image, image_size, antialias=True)


def image_cache_budget() -> int:
    """Bytes of decoded images `cache="auto"` keeps in memory (`IMAGE_CACHE_BUDGET`).

    Returns:
        The budget in bytes: `KERAS_TRANSFER_IMAGE_CACHE_MB` (MiB) when set,
        else `IMAGE_CACHE_BUDGET`.

    Raises:
        ValueError: the environment variable is not a number >= 0.

    Example:

    >>> image_cache_budget() == IMAGE_CACHE_BUDGET or "KERAS_TRANSFER_IMAGE_CACHE_MB" in os.environ
    True
    """
    value = os.environ.get(IMAGE_CACHE_BUDGET_ENV)
    if value is None:
        return IMAGE_CACHE_BUDGET
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise ValueError(
            f"{IMAGE_CACHE_BUDGET_ENV} must be a number of MiB >= 0. Received: {value!r}"
        )
    return int(megabytes * (1 << 20))


def plan_image_cache(count: int, image_size: Sequence[int], cache="auto") -> dict:
    """Where `image_folder_dataset` keeps decoded images: memory, files or nowhere.

    Args:
        count: images in all splits together.
        image_size: `(height, width)` after resizing.
        cache: `"auto"` (memory if the decoded uint8 images fit
            `image_cache_budget()`, else none), True (memory), False (none),
            or a path (files `<path>.<split>`).

    Returns:
        `{"mode": "memory" | "files" | "none", "decoded_bytes": estimate,
        "budget_bytes": budget or None, "path": path or None}`.

    Raises:
        ValueError: `cache` is none of those.

    Example:

    >>> plan_image_cache(1000, (224, 224))["mode"]
    'memory'
    >>> plan_image_cache(100_000, (224, 224), cache=False)["decoded_bytes"] // 2**20
    14355
    """
    if not (cache in CACHE_MODES or isinstance(cache, (str, os.PathLike))) or cache == "":
        raise ValueError(
            f"`cache` must be one of {CACHE_MODES} or a file path prefix. Received: cache={cache!r}"
        )
    decoded = int(count) * int(image_size[0]) * int(image_size[1]) * 3
    plan = {"mode": "none", "decoded_bytes": decoded, "budget_bytes": None, "path": None}
    if cache == "auto":
        plan["budget_bytes"] = image_cache_budget()
        plan["mode"] = "memory" if decoded <= plan["budget_bytes"] else "none"
    elif cache is True:
        plan["mode"] = "memory"
    elif cache is not False:
        plan["mode"], plan["path"] = "files", os.fspath(cache)
    return plan


def _decode(image_size):
    def decode(path, label):
        image = decode_image_bytes(tf.io.read_file(path), image_size)
        # Cached as uint8 (4x smaller than float32); rounding moves a pixel by <= 0.5.
        return tf.saturate_cast(tf.round(image), tf.uint8), label

    return decode


def image_folder_dataset(
    directory: str | os.PathLike,
    *,
    image_size: Sequence[int] = (224, 224),
    batch_size: int = 32,
    validation_split: float = 0.2,
    test_split: float = 0.0,
    seed: int = 0,
    on_error: str = "skip",
    shuffle: bool = True,
    cache: bool | str | os.PathLike = "auto",
    class_names: Sequence[str] | None = None,
) -> DatasetSplits:
    """Builds train / validation / test datasets from a folder of class folders.

    `directory/<class name>/**/*.{jpg,jpeg,png,bmp,gif}`: classes are the
    sorted subfolder names. Every file is opened and decoded with Pillow
    first, so a corrupt or unsupported file is reported here, by path, and
    never fails an epoch deep inside `tf.data`. The split is stratified per
    class and fixed by `seed`. Images are decoded with `tf.io.decode_image`
    (grey becomes RGB, an animation its first frame), resized and cached
    after the first epoch.

    Args:
        directory: the folder of class subfolders.
        image_size: `(height, width)` every image is resized to.
        batch_size: examples per batch.
        validation_split: fraction of each class held out for validation.
        test_split: fraction of each class held out for test.
        seed: seed of the split and of the training shuffle.
        on_error: `"skip"` leaves unreadable files out (listed in
            `info["skipped"]`, with a warning); `"raise"` raises.
        shuffle: shuffle the training split every epoch.
        cache: `"auto"` caches decoded images in memory when all splits fit
            `image_cache_budget()` (1 GiB by default) and otherwise decodes
            them again every epoch, saying so; True caches in memory, a path
            caches them in files `<path>.<split>`, False does not cache.
            Without an in-memory cache the training split shuffles its file
            list every epoch and mixes decoded images in a bounded buffer
            (`DECODED_SHUFFLE_BUFFER`), so memory stays flat however many
            files there are. `info["cache"]` records the choice.
        class_names: the classes of a model to evaluate, in its output
            order: each subfolder is labelled by its name's index in this
            list, so a folder may hold any subset of them in any order; a
            subfolder that is not one of them is an error. None: the sorted
            subfolder names are the classes.

    Returns:
        A `DatasetSplits`; `info["paths"]` maps each split to its files.

    Raises:
        FileNotFoundError: `directory` does not exist.
        ValueError: no class folders, a class without readable images, a
            class folder not in `class_names`, or unreadable files with
            `on_error="raise"`.

    Example:
    >>> from keras_transfer.data import image_folder_dataset
    >>> splits = image_folder_dataset("flowers/", image_size=(224, 224))  # doctest: +SKIP
    >>> splits.class_names  # doctest: +SKIP
    ['daisy', 'dandelion', 'roses', 'sunflowers', 'tulips']
    """
    if on_error not in ON_ERROR_MODES:
        raise ValueError(
            f"`on_error` must be one of {ON_ERROR_MODES}. Received: on_error={on_error!r}"
        )
    image_size = validate_image_size(image_size)
    validate_split_options(batch_size, validation_split, test_split)
    plan_image_cache(0, image_size, cache)  # checks `cache` before any work
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"`directory` must be an existing folder. Received: directory='{directory}' (not found)"
        )
    classes, files = _list_images(directory)
    paths = [path for found in files for path in found]
    class_ids = _class_ids(classes, class_names, directory)
    labels = np.repeat(class_ids, [len(found) for found in files])
    progress = (
        keras.utils.Progbar(len(paths), unit_name="file")
        if len(paths) >= _PROGRESS_MIN_FILES
        else None
    )
    reasons = []
    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while decoding.
        for reason in pool.map(_unreadable_reason, paths):
            reasons.append(reason)
            if progress is not None and len(reasons) % _PROGRESS_EVERY == 0:
                progress.update(len(reasons))
    if progress is not None:
        progress.update(len(reasons), finalize=True)
    skipped = [{"path": p, "reason": r} for p, r in zip(paths, reasons, strict=True) if r]
    if skipped:
        listed = "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:_MAX_LISTED])
        more = f"; and {len(skipped) - _MAX_LISTED} more" if len(skipped) > _MAX_LISTED else ""
        if on_error == "raise":
            raise ValueError(
                f"{len(skipped)} image file(s) cannot be decoded: {listed}{more}. "
                "Remove them or pass on_error='skip'."
            )
        warnings.warn(
            f"Skipped {len(skipped)} unreadable image file(s) in '{directory}': "
            f"{listed}{more}. See `info['skipped']`.",
            stacklevel=2,
        )
        keep = np.array([r is None for r in reasons])
        paths, labels = [p for p, k in zip(paths, keep, strict=True) if k], labels[keep]
        empty = [name for name, i in zip(classes, class_ids, strict=True) if i not in labels]
        if empty:
            raise ValueError(f"class folder '{empty[0]}' has no readable images")
    paths = np.array(paths)
    plan = plan_image_cache(len(paths), image_size, cache)
    if cache == "auto" and plan["mode"] == "none":
        print(
            f"Image cache: {len(paths)} images decode to ~{plan['decoded_bytes'] / 2**20:.0f} MiB, "
            f"over the {plan['budget_bytes'] / 2**20:.0f} MiB memory budget "
            f"({IMAGE_CACHE_BUDGET_ENV}): decoding them every epoch instead of caching."
        )
    info = {"source": directory, "counts": {}, "skipped": skipped, "paths": {}, "cache": plan}
    datasets = {}
    for split, rows in zip(
        ("train", "validation", "test"),
        stratified_split(labels, validation_split, test_split, seed),
        strict=True,
    ):
        info["counts"][split], info["paths"][split] = len(rows), paths[rows].tolist()
        if not len(rows):
            datasets[split] = None
            continue
        datasets[split] = _folder_pipeline(
            paths[rows],
            labels[rows].astype(np.int32),
            plan,
            image_size=image_size,
            training=shuffle and split == "train",
            batch_size=batch_size,
            seed=seed,
            split=split,
        )
    names = classes if class_names is None else [str(name) for name in class_names]
    return DatasetSplits(**datasets, class_names=names, info=info)


def _folder_pipeline(paths, labels, plan, *, image_size, training, batch_size, seed, split):
    """paths -> decode -> cache per `plan` -> shuffle -> batch -> float32 -> prefetch."""
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    in_memory = plan["mode"] == "memory"
    if training and not in_memory:
        # The file list (a few bytes per image) is shuffled in full; decoded
        # images only pass through a bounded buffer below.
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return finish_pipeline(
        dataset.map(_decode(image_size), num_parallel_calls=AUTOTUNE),
        training=training,
        count=len(paths),
        batch_size=batch_size,
        seed=seed,
        transform=to_float,
        cache={"memory": True, "none": False}.get(plan["mode"], f"{plan['path']}.{split}"),
        shuffle_buffer=None if in_memory else DECODED_SHUFFLE_BUFFER,
    )


def _class_ids(classes, class_names, directory):
    """The label of each class folder: its index in `class_names` (or in `classes`)."""
    if class_names is None:
        return np.arange(len(classes))
    known = {str(name): i for i, name in enumerate(class_names)}
    unknown = [name for name in classes if name not in known]
    if unknown:
        raise ValueError(
            f"Class folder(s) {unknown} in '{directory}' are not classes of the model. "
            f"Allowed: {list(known)}. Rename or remove them."
        )
    return np.array([known[name] for name in classes])
