"""Serving signatures with meaningful names, shared by SavedModel and LiteRT.

A Keras model exported as is gets signature keys such as `keras_tensor_176`
and `output_0` (keras-team/keras#19458, tensorflow/tensorflow#48157). Here
every endpoint is a `tf.function` whose inputs and outputs are named:

- `serving_default`: `image`, float32 `[batch, h, w, 3]`, raw pixels 0..255;
- `serving_bytes`: `image_bytes`, `tf.string [batch]` of encoded JPEG / PNG /
  GIF / BMP, decoded and resized in the graph by `data.decode_image_bytes`;
- outputs `probabilities` and, with labels, `classes` (top-k label strings)
  and `scores` (their probabilities);
- with labels, `classify`: TF Serving's classification signature, input
  `inputs` (serialized `tf.Example`s with a bytes feature `image_bytes`),
  outputs `classes` and `scores` for every class.

Models whose input is not one image get a `serving_default` keyed by the
model's own input and output names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_transfer.data.images import decode_image_bytes

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
# TF Serving's Classify API needs this method name, input key and output keys.
CLASSIFY = "classify"
CLASSIFY_METHOD = "tensorflow/serving/classify"
CLASSIFY_INPUT = "inputs"
IMAGE_INPUT = "image"
BYTES_INPUT = "image_bytes"
PROBABILITIES = "probabilities"
CLASSES = "classes"
SCORES = "scores"
LABELS_ASSET = "labels.txt"
# Top-k labels returned by `classes` / `scores` (TF Serving's classify API
# returns every class; 5 is the usual "top-5" of ImageNet-style reports).
DEFAULT_TOP_K = 5


def is_image_model(model: keras.Model) -> bool:
    """True when `model` takes one `[batch, h, w, 3]` image tensor."""
    shapes = model.input_shape
    return (
        not isinstance(shapes, list)
        and len(shapes) == 4
        and shapes[-1] == 3
        and None not in shapes[1:3]
    )


def validate_labels(model: keras.Model, labels: Sequence[str] | None) -> list[str] | None:
    """Checks `labels` against the model's output width; returns them as a list."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise TypeError(f"`labels` must be a sequence of class names. Received: labels={labels!r}")
    labels = [str(label) for label in labels]
    outputs = model.output_shape
    if isinstance(outputs, list) or len(outputs) != 2:
        raise ValueError(
            "`labels` needs a model with one `[batch, num_classes]` output. "
            f"Received: output_shape={outputs}"
        )
    if len(labels) != outputs[-1]:
        raise ValueError(
            f"`labels` must have one name per class ({outputs[-1]} for this model). "
            f"Received: {len(labels)} labels"
        )
    bad = [label for label in labels if not label.strip() or "\n" in label or "\r" in label]
    if bad:
        raise ValueError(f"Labels must be non-empty single lines. Received: {bad[:3]!r}")
    return labels


def image_size(model: keras.Model) -> tuple[int, int]:
    """`(height, width)` of an image model's input."""
    return tuple(int(d) for d in model.input_shape[1:3])


def serving_archive(
    model: keras.Model,
    labels: list[str] | None = None,
    labels_file: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    bytes_signature: bool = True,
) -> keras.export.ExportArchive:
    """An `ExportArchive` holding the model's named serving signatures.

    The model always runs with `training=False` (augmentation and dropout off,
    BatchNorm on its moving statistics) and its outputs are cast to float32,
    so mixed-precision models export with float32 inputs and outputs.

    Args:
        model: a built Keras model.
        labels: class names (validated), or None.
        labels_file: path of a file holding `labels`, one per line; it becomes
            a SavedModel asset read by a lookup table in the graph.
        top_k: how many `classes` / `scores` per example.
        bytes_signature: add `serving_bytes` (image models only).

    Returns:
        The archive; `write_out(path)` saves it.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    table = None
    if labels:
        initializer = tf.lookup.TextFileInitializer(
            tf.saved_model.Asset(labels_file),
            key_dtype=tf.int64,
            key_index=tf.lookup.TextFileIndex.LINE_NUMBER,
            value_dtype=tf.string,
            value_index=tf.lookup.TextFileIndex.WHOLE_LINE,
        )
        table = tf.lookup.StaticHashTable(initializer, default_value="")
        archive.track(table)
    k = min(top_k, len(labels)) if labels else 0

    def named_outputs(outputs):
        if isinstance(outputs, dict):
            return {name: tf.cast(value, tf.float32) for name, value in outputs.items()}
        if isinstance(outputs, (list, tuple)):
            return {
                name: tf.cast(value, tf.float32)
                for name, value in zip(model.output_names, outputs, strict=True)
            }
        probabilities = tf.cast(outputs, tf.float32)
        result = {PROBABILITIES: probabilities}
        if table is not None:
            scores, indices = tf.math.top_k(probabilities, k=k)
            result[CLASSES] = table.lookup(tf.cast(indices, tf.int64))
            result[SCORES] = scores
        return result

    if not is_image_model(model):
        specs = {
            tensor.name: tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name)
            for tensor in model.inputs
        }

        def serve_inputs(inputs):
            return named_outputs(model(inputs, training=False))

        archive.add_endpoint(SERVING_DEFAULT, serve_inputs, [specs])
        return archive

    height, width = image_size(model)
    input_dtype = model.inputs[0].dtype

    def serve_image(image):
        return named_outputs(model(tf.cast(image, input_dtype), training=False))

    archive.add_endpoint(
        SERVING_DEFAULT,
        serve_image,
        [tf.TensorSpec([None, height, width, 3], tf.float32, name=IMAGE_INPUT)],
    )
    if bytes_signature:

        def serve_bytes(image_bytes):
            images = tf.map_fn(
                lambda data: decode_image_bytes(data, (height, width)),
                image_bytes,
                fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
            )
            return serve_image(images)

        archive.add_endpoint(
            SERVING_BYTES,
            serve_bytes,
            [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
        )
        if table is not None:
            label_tensor = tf.constant(labels)

            def classify(inputs):
                features = tf.io.parse_example(
                    inputs, {BYTES_INPUT: tf.io.FixedLenFeature([], tf.string)}
                )
                probabilities = serve_bytes(features[BYTES_INPUT])[PROBABILITIES]
                batch = tf.shape(probabilities)[0]
                return {
                    CLASSES: tf.tile(label_tensor[None], [batch, 1]),
                    SCORES: probabilities,
                }

            archive.add_endpoint(
                CLASSIFY, classify, [tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)]
            )
    return archive


def mark_classify_signature(saved_model_dir: str) -> None:
    """Gives the `classify` signature TF Serving's classification method name.

    `tf.saved_model.save` marks every signature as a predict signature; TF
    Serving's Classify API only runs signatures whose method name is
    `tensorflow/serving/classify`. The fingerprint is rewritten to match.
    """
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.saved_model.pywrap_saved_model import fingerprinting

    path = os.path.join(saved_model_dir, "saved_model.pb")
    proto = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    signature_defs = proto.meta_graphs[0].signature_def
    if CLASSIFY not in signature_defs:
        return
    signature_defs[CLASSIFY].method_name = CLASSIFY_METHOD
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    with open(os.path.join(saved_model_dir, "fingerprint.pb"), "wb") as f:
        f.write(fingerprinting.CreateFingerprintDef(saved_model_dir))


def write_labels(labels: Sequence[str], path: str) -> str:
    """Writes class names one per line; returns `path`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{label}\n" for label in labels))
    return path


def staging_labels(labels: list[str] | None, directory: str) -> str | None:
    """Writes `labels` into `directory` for use as an asset (None without labels)."""
    if not labels:
        return None
    return write_labels(labels, os.path.join(directory, LABELS_ASSET))
