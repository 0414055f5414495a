"""SavedModel export in TensorFlow Serving's versioned layout.

`saved_model(model, "saved_models/flowers")` writes `saved_models/flowers/<N>/`
with the named signatures of `export.signatures`, the labels as an asset,
optional warm-up records, and updates `saved_models/models.config`. A text
model with its KerasHub preprocessor is served from raw strings (the
tokeniser runs in the graph; see `export.signatures`).

A version is written to a hidden staging folder beside it
(`.tmp-<N>-<random>`; TF Serving only loads all-digit folder names) and renamed
into place when complete, so a server polling the folder never sees half a
model, and a failure leaves no version folder behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np

from keras_transfer import staging as staging_lib
from keras_transfer.export import signatures
from keras_transfer.techniques import lora

if TYPE_CHECKING:
    import keras_hub

MODELS_CONFIG = "models.config"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
# TF Serving reads at most 1000 warm-up records (servables/tensorflow/saved_model_warmup).
MAX_WARMUP_RECORDS = 1000
# Where `docker run -v $PWD/saved_models:/models tensorflow/serving` sees the export root.
DEFAULT_SERVING_BASE_PATH = "/models"
_STAGING_PREFIX = ".tmp-"


def _versions(base: str) -> list[int]:
    if not os.path.isdir(base):
        return []
    return sorted(int(name) for name in os.listdir(base) if name.isdigit())


def next_version(export_dir: str) -> int:
    """The next free version number under `export_dir` (1 when there is none).

    Args:
        export_dir: a model's folder, `<export root>/<name>`.

    Returns:
        One more than the highest all-digit subfolder, or 1.

    Example:

    >>> import tempfile
    >>> next_version(tempfile.mkdtemp())
    1
    """
    versions = _versions(export_dir)
    return versions[-1] + 1 if versions else 1


def _validate(model, export_dir, version, top_k):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model. Received: {type(model).__name__}")
    if not model.built:
        raise ValueError("`model` must be built (called once or given an Input) before export.")
    if not isinstance(export_dir, (str, os.PathLike)) or not os.fspath(export_dir).strip():
        raise ValueError(
            "`export_dir` must be a folder path such as 'saved_models/<name>'. "
            f"Received: export_dir={export_dir!r}"
        )
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise ValueError(
            f"`version` must be an integer >= 1 or None. Received: version={version!r}"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"`top_k` must be an integer >= 1. Received: top_k={top_k!r}")


def saved_model(
    model: keras.Model,
    export_dir: str,
    version: int | None = None,
    labels: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    *,
    top_k: int = signatures.DEFAULT_TOP_K,
    overwrite: bool = False,
    warmup_data: np.ndarray | Sequence[str | bytes] | None = None,
    models_config: bool = True,
    serving_base_path: str | None = DEFAULT_SERVING_BASE_PATH,
    preprocessor: keras_hub.models.TextClassifierPreprocessor | None = None,
) -> str:
    """Exports a model for TensorFlow Serving as `<export_dir>/<version>/`.

    Signatures: `serving_default` (input `image`: float32 pixels 0..255) and,
    for image models, `serving_bytes` (input `image_bytes`: encoded images,
    decoded and resized in the graph); outputs `probabilities` and, with
    `labels`, `classes` and `scores` (top-`top_k`). The model runs in inference
    mode (no augmentation, no dropout) with float32 inputs and outputs, also
    under a mixed-precision policy. Labels are stored as the asset
    `assets/labels.txt`. A model with several named outputs (e.g.
    `kt.techniques.build_multitask_model`) returns `<task>_probabilities`
    and, for the tasks in `labels={task: [names]}`, `<task>_classes` and
    `<task>_scores` (assets `<task>_labels.txt`); it has no `classify`
    signature.

    A text model (`build_text_classifier`) with a preprocessor gets
    `serving_default` with input `text` (`tf.string [batch]`, tokenised in
    the graph; invalid UTF-8 bytes become U+FFFD), `serving_tokens` (int32
    `token_ids` and `padding_mask`) and, with labels, `classify` (a bytes
    feature `text`). Without one, `serving_default` takes the model's own
    inputs and `serving_tokens` is added. The server must register the
    tensorflow-text ops the tokeniser uses (TF Serving's stock server links
    an older tensorflow-text; see `export.signatures` for what is avoided).

    Args:
        model: a built Keras model, e.g. from `build_image_classifier`.
        export_dir: the model's folder, `<export root>/<name>`.
        version: version number; None takes the next free one.
        labels: class names, one per model output; None for no `classes`;
            a dict `{output name: class names}` for a model with several
            outputs.
        top_k: number of `classes` / `scores` per image.
        overwrite: replace an existing `version`; otherwise it is an error.
        warmup_data: a few real inputs for TF Serving's warm-up records
            (`assets.extra/tf_serving_warmup_requests`): images as a float
            array `[n, h, w, 3]` (sent to `serving_default`) or image file
            paths / encoded bytes (sent to `serving_bytes`); for a text model
            with a preprocessor, texts (sent to `serving_default`). Needs
            `tensorflow-serving-api`.
        models_config: (re)write `<export root>/models.config` listing every
            model under the export root.
        serving_base_path: where the server sees the export root (used in
            `models.config`); None writes local absolute paths.
        preprocessor: for a text model, a KerasHub
            `TextClassifierPreprocessor` (e.g. `backbones.kerashub.
            text_preprocessor(preset, sequence_length)`); None takes
            `model.preprocessor` when the model has one (a model loaded from
            a `.keras` file has none).

    Returns:
        The path of the version folder.

    Raises:
        FileExistsError: `version` exists and `overwrite` is False.
        PermissionError: the folder cannot be written.
        TypeError: `preprocessor` is not a `TextClassifierPreprocessor`.
        ValueError: bad arguments (labels count, version, top_k, warm-up data,
            a preprocessor for a model that does not take tokens).

    Example:

    >>> import tempfile, keras
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.GlobalAveragePooling2D()(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    >>> root = tempfile.mkdtemp()
    >>> path = saved_model(model, f"{root}/toy", labels=["no", "yes"])
    >>> os.path.basename(path), sorted(os.listdir(root))
    ('1', ['models.config', 'toy'])

    A text model, served from strings (`model.preprocessor` goes into the graph):

    >>> import keras_transfer as kt, tensorflow as tf
    >>> text_model = kt.build_text_classifier("minilm", 2, weights=None,
    ...                                       sequence_length=16, num_layers=1)
    >>> path = saved_model(text_model, f"{root}/glosses", labels=["no", "yes"])
    >>> served = tf.saved_model.load(path).signatures["serving_default"]
    >>> served(text=tf.constant(["a small dog"]))["classes"].shape
    TensorShape([1, 2])
    """
    _validate(model, export_dir, version, top_k)
    labels = signatures.validate_labels(model, labels)
    preprocessor = signatures.serving_preprocessor(model, preprocessor)
    model = lora.deployable(model)
    base = os.path.abspath(os.fspath(export_dir))
    if version is None:
        version = next_version(base)
    target = os.path.join(base, str(version))
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(
            f"Version {version} already exists at {target!r}. Pass overwrite=True "
            "(--overwrite) to replace it, or version=None (no --version) for the next free one."
        )
    warmup = _warmup_requests(model, os.path.basename(base), warmup_data, preprocessor)

    created = staging_lib.writable_folder(base, "an export")
    staging = staging_lib.make_staging_folder(base, f"{_STAGING_PREFIX}{version}-")
    try:
        with tempfile.TemporaryDirectory() as scratch:
            labels_file = signatures.staging_labels(labels, scratch)
            archive = signatures.serving_archive(
                model, labels, labels_file, top_k, preprocessor=preprocessor
            )
            archive.write_out(staging, verbose=False)
        signatures.mark_classify_signature(staging)
        if warmup:
            _write_warmup(warmup, os.path.join(staging, WARMUP_FILE))
        staging_lib.move_into_place(staging, target, f"{_STAGING_PREFIX}old-")
    except BaseException:
        staging_lib.discard(staging, created)
        raise
    if models_config:
        write_models_config(os.path.dirname(base), serving_base_path=serving_base_path)
    return target


def _serving_apis():
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
    except ImportError:
        raise ImportError(
            "Warm-up records need TensorFlow Serving's protos: "
            "pip install tensorflow-serving-api==2.21.0"
        ) from None
    return model_pb2, predict_pb2, prediction_log_pb2


def _warmup_requests(model, name, warmup_data, preprocessor=None):
    """Serialized `PredictionLog` protos, one request per example."""
    if warmup_data is None:
        return []
    import tensorflow as tf

    if preprocessor is None and not signatures.is_image_model(model):
        raise ValueError(
            "`warmup_data` is for image models and for text models served from strings "
            "(with a `preprocessor`). Received: a model with input_shape="
            f"{model.input_shape} and no preprocessor"
        )
    model_pb2, predict_pb2, prediction_log_pb2 = _serving_apis()
    if preprocessor is not None:
        if isinstance(warmup_data, (str, bytes)) or not all(
            isinstance(text, (str, bytes)) for text in warmup_data
        ):
            raise TypeError(
                "`warmup_data` for a text model must be a list of texts. "
                f"Received: {warmup_data!r:.80}"
            )
        signature, key = signatures.SERVING_DEFAULT, signatures.TEXT_INPUT
        examples = [np.array([text], dtype=object) for text in warmup_data]
    elif isinstance(warmup_data, np.ndarray) and warmup_data.dtype.kind in "fiu":
        expected = (None, *model.input_shape[1:])
        if warmup_data.ndim != 4 or tuple(warmup_data.shape[1:]) != expected[1:]:
            raise ValueError(
                f"`warmup_data` images must have shape (n, *{expected[1:]}). "
                f"Received: shape={warmup_data.shape}"
            )
        signature, key = signatures.SERVING_DEFAULT, signatures.IMAGE_INPUT
        examples = [warmup_data[i : i + 1].astype("float32") for i in range(len(warmup_data))]
    else:
        if isinstance(warmup_data, (str, bytes)):
            raise TypeError(
                "`warmup_data` must be an image array or a list of files / bytes. "
                f"Received: {type(warmup_data).__name__}"
            )
        signature, key = signatures.SERVING_BYTES, signatures.BYTES_INPUT
        examples = [np.array([_read_bytes(item)], dtype=object) for item in warmup_data]
    if not examples:
        raise ValueError("`warmup_data` is empty. Pass a few real inputs or None.")
    records = []
    for value in examples[:MAX_WARMUP_RECORDS]:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=name, signature_name=signature)
        )
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        log = prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)
        )
        records.append(log.SerializeToString())
    return records


def _read_bytes(item: str | bytes) -> bytes:
    if isinstance(item, bytes):
        return item
    if not os.path.isfile(item):
        raise FileNotFoundError(f"Warm-up image not found. Received: {item!r}")
    with open(item, "rb") as f:
        return f.read()


def _write_warmup(records: list[bytes], path: str) -> None:
    import tensorflow as tf

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)


def _models_under(root: str) -> list[str]:
    names = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(folder):
            continue
        if any(
            os.path.isfile(os.path.join(folder, str(v), "saved_model.pb"))
            for v in _versions(folder)
        ):
            names.append(name)
    return names


def write_models_config(
    export_root: str,
    serving_base_path: str | None = DEFAULT_SERVING_BASE_PATH,
    num_versions: int = 1,
) -> str:
    """Writes TF Serving's `models.config` for every model under `export_root`.

    A model is a subfolder holding at least one all-digit version folder with
    a `saved_model.pb`. Each gets a `config` entry (name, base path, platform
    "tensorflow", a "latest N versions" policy) in `model_config_list`, the
    text proto that `tensorflow_model_server --model_config_file` reads.

    Args:
        export_root: the folder holding `<name>/<version>/` exports.
        serving_base_path: the export root as the server sees it (the docker
            image mounts it at `/models`); None writes local absolute paths.
        num_versions: how many of the newest versions the server loads.

    Returns:
        The path of `models.config`.

    Example:

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> print(open(write_models_config(root)).read().strip())
    model_config_list {
    }
    """
    if isinstance(num_versions, bool) or not isinstance(num_versions, int) or num_versions < 1:
        raise ValueError(f"`num_versions` must be an integer >= 1. Received: {num_versions!r}")
    root = os.path.abspath(export_root)
    prefix = serving_base_path.rstrip("/") if serving_base_path else root
    lines = ["model_config_list {"]
    for name in _models_under(root):
        lines += [
            "  config {",
            f"    name: {json.dumps(name)}",
            f"    base_path: {json.dumps(prefix + '/' + name)}",
            '    model_platform: "tensorflow"',
            "    model_version_policy {",
            f"      latest {{ num_versions: {num_versions} }}",
            "    }",
            "  }",
        ]
    lines.append("}")
    path = os.path.join(root, MODELS_CONFIG)
    staging_lib.write_atomic(path, "\n".join(lines) + "\n")
    return path
