"""Predicting labels for image files with a saved model or run directory."""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_transfer.backbones.preprocessing import ImagePreprocessing
from keras_transfer.data.images import IMAGE_EXTENSIONS, decode_image_bytes

IMAGENET_MODELS = ("imagenet:efficientnet_lite0",)


def _expand(paths: list[str]) -> list[tuple[str, bool]]:
    """`(file, found_in_a_folder)` for each image file of `paths`, folders expanded."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                # Hidden files ("._x.jpg" from macOS) are metadata, not images.
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            )
            if not found:
                raise ValueError(f"No image files in folder. Received: {path!r}")
            files.extend((file, True) for file in found)
        elif os.path.isfile(path):
            files.append((path, False))
        else:
            raise FileNotFoundError(f"Image file or folder not found. Received: {path!r}")
    if not files:
        raise ValueError("No images given. Received: images=[]")
    return files


def image_files(paths: list[str]) -> list[str]:
    """Expands folders (their image files, sorted) and checks files exist.

    Args:
        paths: image files or folders.

    Returns:
        The image files, folders expanded in sorted order.

    Example:

    >>> image_files([])
    Traceback (most recent call last):
    ...
    ValueError: No images given. Received: images=[]
    """
    return [file for file, _ in _expand(paths)]


def load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """Reads an image file as float32 RGB `size` pixels in 0..255.

    Decodes with `data.decode_image_bytes`, the decoder of the training
    pipelines and of the exported `serving_bytes` signature.
    """
    import tensorflow as tf

    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_image_bytes(tf.constant(data), tuple(size)).numpy()
    except tf.errors.InvalidArgumentError as error:
        reason = error.message.strip().splitlines()[0]
        raise ValueError(f"Not a readable image file: {path!r} ({reason})") from None


def load_model_for_prediction(model: str) -> tuple[keras.Model, list[str] | None]:
    """Loads a run directory, a `.keras` file, or `imagenet:efficientnet_lite0`.

    Args:
        model: a run directory, a `.keras` file or one of `IMAGENET_MODELS`.

    Returns:
        `(model, class_names)`; class names come from the run's `labels.txt`
        (None for a bare `.keras` file without one beside it).

    Raises:
        FileNotFoundError: nothing at `model`.
        ValueError: a broken `.keras` file or a `labels.txt` that does not
            match the model (see `runs.load_run_model`).

    Example:

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> outputs = keras.layers.Dense(2, activation="softmax")(
    ...     keras.layers.GlobalAveragePooling2D()(inputs))
    >>> keras.Model(inputs, outputs).save(f"{folder}/model.keras")
    >>> model, names = load_model_for_prediction(folder)
    >>> model.output_shape, names
    ((None, 2), None)
    """
    from keras_transfer.runs import load_run_model

    if model in IMAGENET_MODELS:
        from keras_hub.utils import imagenet_id_to_name

        from keras_transfer.backbones.efficientnet_lite import EfficientNetLite

        inputs = keras.Input((224, 224, 3), name="image")
        x = ImagePreprocessing("lite", name="preprocessing")(inputs)
        outputs = EfficientNetLite("lite0", include_top=True, weights="imagenet")(x)
        names = [imagenet_id_to_name(i) for i in range(1000)]
        return keras.Model(inputs, outputs, name="efficientnet_lite0_imagenet"), names
    if not os.path.exists(model) and not model.endswith(".keras") and ":" in model:
        raise ValueError(
            f"`model` must be a run directory, a .keras file or one of {IMAGENET_MODELS}. "
            f"Received: model={model!r}"
        )
    return load_run_model(model)


def predict_files(
    model: keras.Model, paths: list[str], class_names: list[str] | None = None, top: int = 1
) -> list[dict]:
    """Predicts the top-`top` labels of each image file.

    Args:
        model: a classifier taking raw 0-255 RGB images.
        paths: image files or folders.
        class_names: names in output order (indices are used when None).
        top: how many labels per image.

    Returns:
        One dict per file, in order: `{"file", "labels": [(name, probability),
        ...]}`. A file inside a folder that cannot be decoded is skipped, as
        training skips it: its dict has `"labels": []` and `"error"`.

    Raises:
        ValueError: a file named in `paths` itself is not a readable image,
            or no file could be read.

    Example:
    >>> import os, tempfile, numpy as np
    >>> from PIL import Image
    >>> import keras_transfer as kt
    >>> from keras_transfer.predict import predict_files
    >>> folder = tempfile.mkdtemp()
    >>> Image.fromarray(np.zeros((8, 8, 3), "uint8")).save(os.path.join(folder, "a.png"))
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3))
    >>> rows = predict_files(model, [folder], ["cat", "dog"])
    >>> rows[0]["labels"][0][0] in ("cat", "dog")
    True
    """
    size = tuple(model.input_shape[1:3])
    rows, images = [], []
    for path, in_folder in _expand(paths):
        try:
            images.append(load_image(path, size))
        except ValueError as error:
            if not in_folder:
                raise
            rows.append({"file": path, "labels": [], "error": str(error)})
            continue
        rows.append({"file": path, "labels": None})
    if not images:
        raise ValueError(f"None of the images could be read. Received: images={paths!r}")
    probabilities = iter(np.asarray(model.predict(np.stack(images), verbose=0)))
    for row in rows:
        if row["labels"] is None:
            scores = next(probabilities)
            order = np.argsort(scores)[::-1][:top]
            row["labels"] = [
                (class_names[i] if class_names else str(i), float(scores[i])) for i in order
            ]
    return rows
