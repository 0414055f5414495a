"""Predicting labels for image files with a saved model or run directory."""

from __future__ import annotations

import os

import keras
import numpy as np

from keras_transfer.backbones.preprocessing import ImagePreprocessing
from keras_transfer.data.images import decode_image_bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
IMAGENET_MODELS = ("imagenet:efficientnet_lite0",)


def image_files(paths: list[str]) -> list[str]:
    """Expands folders (their image files, sorted) and checks files exist."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name)
                for name in os.listdir(path)
                if name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not found:
                raise ValueError(f"No image files in folder. Received: {path!r}")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"Image file or folder not found. Received: {path!r}")
    if not files:
        raise ValueError("No images given. Received: images=[]")
    return files


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

    Returns:
        `(model, class_names)`; class names come from the run's `labels.txt`
        (None for a bare `.keras` file without one beside it).
    """
    from keras_transfer.runs import MODEL_FILE, load_labels

    if model in IMAGENET_MODELS:
        from keras_hub.utils import imagenet_id_to_name

        from keras_transfer.backbones.efficientnet_lite import EfficientNetLite

        inputs = keras.Input((224, 224, 3), name="image")
        x = ImagePreprocessing("lite", name="preprocessing")(inputs)
        outputs = EfficientNetLite("lite0", include_top=True, weights="imagenet")(x)
        names = [imagenet_id_to_name(i) for i in range(1000)]
        return keras.Model(inputs, outputs, name="efficientnet_lite0_imagenet"), names
    if os.path.isdir(model):
        path, labels_dir = os.path.join(model, MODEL_FILE), model
    else:
        path, labels_dir = model, os.path.dirname(os.path.abspath(model))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No model at {path!r}: give a run directory, a .keras file or one of "
            f"{IMAGENET_MODELS}. Received: model={model!r}"
        )
    return keras.saving.load_model(path, safe_mode=True), load_labels(labels_dir)


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
        One dict per file: `{"file", "labels": [(name, probability), ...]}`.

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
    files = image_files(paths)
    height, width = model.input_shape[1:3]
    batch = np.stack([load_image(path, (height, width)) for path in files])
    probabilities = np.asarray(model.predict(batch, verbose=0))
    rows = []
    for path, row in zip(files, probabilities, strict=True):
        order = np.argsort(row)[::-1][:top]
        labels = [(class_names[i] if class_names else str(i), float(row[i])) for i in order]
        rows.append({"file": path, "labels": labels})
    return rows
