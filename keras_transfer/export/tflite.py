"""LiteRT (TFLite) export with post-training quantisation and a parity report.

`tflite(model, "model.tflite", quantization=...)` converts the model's
`serving_default` signature (input `image`, or `token_ids`, `padding_mask` and
`segment_ids` for a text model; output `probabilities`: the names of
`export.signatures`)
and measures the file against the Keras model with the LiteRT interpreter
(`ai-edge-litert`): top-1 agreement, max abs difference, accuracy of both,
latency per example. Files get the standard TFLite metadata that MediaPipe
Tasks reads (`export.metadata`): image models what `ImageClassifier` needs
(normalisation, colour space, the labels as an associated file), BERT-style
text models what `TextClassifier` needs (the WordPiece vocabulary for its
on-device tokenizer, inputs named `ids` / `mask` / `segment_ids`, the labels).
Class names also travel as `<stem>.labels.txt` beside the file (text models
without a known WordPiece vocabulary keep them in a `keras_transfer.labels`
metadata entry instead).

A text model's file takes token ids, not strings: the TFLite builtin op set
has no WordPiece tokenizer (nor the other tensorflow-text ops), so the client
tokenises with the model's vocabulary before it calls the file (MediaPipe's
`TextClassifier` does it from the metadata). Full-integer int8 is for image models: token ids are not
activations to quantise, and a text model's embeddings, layer norms and
softmaxes do not all have int8 kernels, so text models take "dynamic" or
"float16".
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import staging as staging_lib
from keras_transfer.backbones.registry import BACKBONE_NAME
from keras_transfer.export import metadata as metadata_lib
from keras_transfer.export import signatures
from keras_transfer.export.parity import (
    ParityReport,
    _as_arrays,
    _check_token_inputs,
    _logged_native_output,
    _measure,
    format_parity_table,
)
from keras_transfer.techniques import lora

if TYPE_CHECKING:
    import keras_hub

QUANTIZATIONS = ("none", "dynamic", "float16", "int8")
IO_TYPES = ("float32", "uint8", "int8")
LABELS_METADATA = "keras_transfer.labels"
# Calibration images for int8: the TFLite guide's "around 100-500 samples".
DEFAULT_CALIBRATION_SAMPLES = 100


def _check_choice(name, value, allowed):
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"`{name}` must be one of {allowed}.{hint} Received: {name}={value!r}")


def _converter(saved_model_dir, quantization, representative, io_type):
    converter = tf.lite.TFLiteConverter.from_saved_model(
        saved_model_dir, signature_keys=[signatures.SERVING_DEFAULT]
    )
    if quantization == "none":
        return converter
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantization == "float16":
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "int8":

        def calibration():
            for image in representative:
                yield [image[None]]
            if io_type == "uint8":
                # One more sample holding a 0 and a 255 pixel: the input's
                # quantisation becomes the identity on 0-255 (scale 1, zero
                # point 0), so clients that feed raw uint8 pixels, as
                # MediaPipe Tasks does, give the model the right values.
                anchor = np.array(representative[0], copy=True)
                anchor.flat[0], anchor.flat[-1] = 0.0, 255.0
                yield [anchor[None]]

        converter.representative_dataset = calibration
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.as_dtype(io_type)
        converter.inference_output_type = tf.as_dtype(io_type)
    return converter


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def float_ops(flatbuffer: bytes) -> list[str]:
    """Names of the ops that read or write float32 tensors (boundary casts excepted).

    Args:
        flatbuffer: the bytes of a `.tflite` file.

    Returns:
        Sorted unique op names, e.g. `["LOGISTIC"]`; empty for a fully
        integer model (QUANTIZE / DEQUANTIZE at float inputs and outputs are
        not counted).
    """
    schema = _schema()
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    boundary = {schema.BuiltinOperator.QUANTIZE, schema.BuiltinOperator.DEQUANTIZE}
    model = schema.Model.GetRootAs(flatbuffer, 0)
    found = set()
    for s in range(model.SubgraphsLength()):
        graph = model.Subgraphs(s)
        for o in range(graph.OperatorsLength()):
            op = graph.Operators(o)
            code = model.OperatorCodes(op.OpcodeIndex())
            builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
            if builtin in boundary:
                continue
            tensors = [op.Inputs(i) for i in range(op.InputsLength())]
            tensors += [op.Outputs(i) for i in range(op.OutputsLength())]
            if any(
                t >= 0 and graph.Tensors(t).Type() == schema.TensorType.FLOAT32 for t in tensors
            ):
                found.add(names.get(builtin, str(builtin)))
    return sorted(found)


def _with_labels_metadata(flatbuffer: bytes, labels: list[str]) -> bytes:
    """Text models: the labels as a `keras_transfer.labels` entry (one per line)."""
    return metadata_lib.with_metadata_entry(
        flatbuffer, LABELS_METADATA, "\n".join(labels).encode("utf-8")
    )


def image_normalization(model: keras.Model, normalization="auto") -> tuple[float, float] | None:
    """The `(mean, std)` a client applies to 0-255 pixels before this model, or None.

    Models from `build_image_classifier` take raw 0-255 RGB pixels (their
    preprocessing is inside the model), so theirs is `(0, 1)`; so is that of
    a model whose input is named `"image"` (the exports' convention for raw
    pixels). For any other model the input range is unknown: pass
    `normalization=(mean, std)`.

    Args:
        model: an image model.
        normalization: `"auto"`, a `(mean, std)` pair, or None.

    Returns:
        `(mean, std)`, or None when it cannot be told.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3))
    >>> image_normalization(model)
    (0.0, 1.0)
    """
    if normalization is None:
        return None
    if normalization == "auto":
        # Our builders' models, and models following their convention (an
        # input named "image"), take raw pixels.
        ours = signatures.is_image_model(model) and (
            model.inputs[0].name == signatures.IMAGE_INPUT
            or any(layer.name == BACKBONE_NAME for layer in model.layers)
        )
        return (0.0, 1.0) if ours else None
    if (
        not isinstance(normalization, (tuple, list))
        or len(normalization) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in normalization)
        or not normalization[1] > 0
    ):
        raise ValueError(
            "`normalization` must be 'auto', None or (mean, std) with std > 0: what a client "
            f"applies to 0-255 pixels. Received: normalization={normalization!r}"
        )
    return float(normalization[0]), float(normalization[1])


def _input_order(flatbuffer: bytes) -> list[str]:
    """The signature input names of a `.tflite` file, in subgraph input order."""
    model = _schema().Model.GetRootAs(flatbuffer, 0)
    signature = model.SignatureDefs(0)
    by_tensor = {
        signature.Inputs(i).TensorIndex(): signature.Inputs(i).Name().decode()
        for i in range(signature.InputsLength())
    }
    graph = model.Subgraphs(signature.SubgraphIndex())
    return [by_tensor.get(graph.Inputs(i), "") for i in range(graph.InputsLength())]


def _text_metadata(flatbuffer, model, labels, version, description, preprocessor):
    """MediaPipe `TextClassifier` metadata for a BERT-style file; else our labels entry."""
    import keras_hub

    tokenizer = getattr(preprocessor, "tokenizer", None)
    vocabulary = getattr(tokenizer, "vocabulary", None)
    order = _input_order(flatbuffer)
    bert = (
        isinstance(tokenizer, keras_hub.models.BertTokenizer)
        and vocabulary is not None
        and sorted(order) == sorted(metadata_lib.BERT_INPUT_NAMES)
    )
    if not bert:  # no WordPiece vocabulary known: the labels only
        return _with_labels_metadata(flatbuffer, labels) if labels else flatbuffer
    data, files = metadata_lib.bert_classifier_metadata(
        name=model.name,
        description=description
        or "Text classifier fine-tuned with keras_transfer; BERT WordPiece tokens.",
        version=str(version),
        input_order=order,
        labels=labels,
        vocabulary=list(vocabulary),
    )
    return metadata_lib.populate(flatbuffer, data, files)


def _with_metadata(flatbuffer, model, labels, normalization, version, description, preprocessor):
    """Standard metadata: MediaPipe's `ImageClassifier` / BERT `TextClassifier` read it."""
    if signatures.has_several_outputs(model):
        return flatbuffer  # MediaPipe's classifiers read one head: labels go beside the file
    if not signatures.is_image_model(model):
        return _text_metadata(flatbuffer, model, labels, version, description, preprocessor)
    mean_std = image_normalization(model, normalization)
    if mean_std is None:
        warnings.warn(
            f"Model {model.name!r} is not from keras_transfer's builders and its input is not "
            "named 'image' (raw 0-255 pixels), so the pixel range it expects is unknown: its "
            ".tflite metadata has no NormalizationOptions, and "
            "MediaPipe Tasks will refuse its float input until you pass "
            "normalization=(mean, std) (what the client applies to 0-255 pixels).",
            stacklevel=3,
        )
    if description is None:
        description = (
            f"Image classifier ({len(labels) if labels else model.output_shape[-1]} classes) "
            "fine-tuned with keras_transfer; input: RGB pixels 0-255 at the model's size."
        )
        if mean_std is None:
            description += " Input normalisation unknown: not in this metadata."
    data, files = metadata_lib.image_classifier_metadata(
        name=model.name,
        description=description,
        version=str(version),
        image_size=signatures.image_size(model),
        labels=labels,
        normalization=mean_std,
    )
    return metadata_lib.populate(flatbuffer, data, files)


def read_tflite_labels(path: str) -> list[str] | None:
    """Class names stored in a `.tflite` file (None if it has none).

    Reads the standard metadata's `TENSOR_AXIS_LABELS` file (image models),
    else the `keras_transfer.labels` entry (text models, and files written
    before the standard metadata).

    Args:
        path: a `.tflite` file.

    Returns:
        The labels, or None.

    Example:
    >>> import tempfile
    >>> read_tflite_labels(__file__) is None  # not a .tflite file: no labels
    True
    """
    with open(path, "rb") as f:
        data = f.read()
    try:
        standard = metadata_lib.read_metadata(data)
        ours = metadata_lib.metadata_entry(data, LABELS_METADATA)
    except Exception:  # not a flatbuffer at all
        return None
    if standard and standard["labels"]:
        return standard["labels"]
    return ours.decode("utf-8").split("\n") if ours is not None else None


def tflite(
    model: keras.Model,
    path: str,
    quantization: str = "none",
    representative_data: tf.data.Dataset | np.ndarray | None = None,
    *,
    evaluation_data: tf.data.Dataset | tuple | np.ndarray | None = None,
    labels: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    io_type: str = "float32",
    num_calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    num_evaluation_samples: int | None = None,
    allow_float_ops: bool = False,
    source_dir: str | None = None,
    preprocessor: keras_hub.models.TextClassifierPreprocessor | None = None,
    normalization: str | tuple[float, float] | None = "auto",
    metadata_version: str = "1",
    description: str | None = None,
    verbose: bool = True,
) -> ParityReport:
    """Converts an image or text model to a LiteRT (`.tflite`) file and reports parity.

    The file has one signature, `serving_default`: input `image` (pixels
    0..255, `[batch, h, w, 3]`), or for a text model `token_ids` and
    `padding_mask` (int32 `[batch, sequence_length]`, mask 1 for tokens and 0
    for padding; strings cannot go in: the TFLite builtin op set has no
    WordPiece tokenizer); output `probabilities` (for a model with several
    named outputs, `<output>_probabilities` each: no MediaPipe metadata
    then, the labels go beside the file as `<stem>.<output>.labels.txt`, and
    the parity report's agreement is the mean over the outputs, its max
    difference the largest, its accuracies None). The model runs in
    inference mode (augmentation and dropout off). Quantisation modes:
    `"none"` (float32), `"dynamic"` (int8 weights, float activations),
    `"float16"` (float16 weights) and `"int8"` (image models only:
    full-integer post-training quantisation calibrated on
    `representative_data`; every op in int8, or an error that names why).

    Args:
        model: a built Keras image model, or a text model taking
            `token_ids` and `padding_mask` (`build_text_classifier`).
        path: the `.tflite` file to write (replaced if it exists).
        quantization: one of `QUANTIZATIONS`.
        representative_data: training images for int8 calibration: a
            `tf.data.Dataset` of images or `(images, labels)` batches, or an
            array `[n, h, w, 3]`. Required for "int8".
        evaluation_data: held-out data for the parity report: a dataset of
            `(images, labels)` batches, an `(images, labels)` tuple or an
            image array; for a text model the same with the preprocessor's
            token dicts (`[n, sequence_length]` arrays) in place of images.
            None compares on the calibration images (int8) or only
            measures size and latency.
        labels: class names; written beside the file and into its metadata
            (a dict by output name for a model with several outputs).
        io_type: input/output dtype: "float32", or "uint8"/"int8" (int8 only).
        num_calibration_samples: calibration images taken from
            `representative_data`.
        num_evaluation_samples: compare at most this many images of
            `evaluation_data` (None: all). Each runs through the interpreter
            one by one, so a cap keeps big test sets quick.
        allow_float_ops: int8 only: accept a file where some ops stayed in
            float (listed in `report.float_ops`) instead of failing.
        source_dir: a folder written by `write_conversion_source(model,
            ...)` to convert from; None writes one in a temporary folder.
            Several files of one model share it (`export_model` does).
        normalization: image models: the `(mean, std)` a client applies to
            0-255 pixels, written as the standard metadata's
            `NormalizationOptions`; `"auto"`: `(0, 1)` for models from
            `build_image_classifier` (they take raw pixels); None, or a model
            of unknown input range under "auto", writes none, with a warning
            (MediaPipe then refuses float input).
        metadata_version: the model version written in the metadata.
        description: the metadata's model description (None: a default).
        preprocessor: text models: the KerasHub preprocessor whose
            `sequence_length` fixes the file's input length (None:
            `model.preprocessor`, or the model's own fixed input length).
        verbose: print the parity table.

    Returns:
        A `ParityReport`, also written as `<stem>.parity.json` beside `path`.

    Raises:
        ValueError: bad arguments, int8 without representative data or for
            a text model, or an int8 conversion that cannot make every op
            integer (the error names the ops; nothing is written).

    Example:

    >>> import tempfile, keras, numpy as np
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.GlobalAveragePooling2D()(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    >>> path = f"{tempfile.mkdtemp()}/toy.tflite"
    >>> report = tflite(model, path, evaluation_data=np.ones((4, 8, 8, 3)), verbose=False)
    >>> report.top1_agreement, report.max_abs_diff < 1e-5
    (1.0, True)
    """
    check_quantization(model, quantization, representative_data)
    _check_choice("io_type", io_type, IO_TYPES)
    if io_type != "float32" and quantization != "int8":
        raise ValueError(
            "Integer inputs and outputs need quantization='int8'. "
            f"Received: quantization={quantization!r}, io_type={io_type!r}"
        )
    for name, value, optional in (
        ("num_calibration_samples", num_calibration_samples, False),
        ("num_evaluation_samples", num_evaluation_samples, True),
    ):
        if (value is None and optional) or (
            not isinstance(value, bool) and isinstance(value, int) and value >= 1
        ):
            continue
        allowed = "None or an integer >= 1" if optional else "an integer >= 1"
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")
    labels = signatures.validate_labels(model, labels)
    if signatures.is_image_model(model):
        image_normalization(model, normalization)  # checked before any work
    model = lora.deployable(model)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"The folder for the .tflite file does not exist: {folder!r}")
    staging_lib.writable_folder(folder, "a .tflite file")
    representative = None
    if quantization == "int8":
        representative, _ = _as_arrays(representative_data, num_calibration_samples)
    inputs, truth = _as_arrays(evaluation_data, num_evaluation_samples)
    if signatures.is_token_model(model):
        sequence_length = _sequence_length(model, preprocessor)
        if inputs is not None:
            _check_token_inputs(inputs, sequence_length)

    with contextlib.ExitStack() as stack:
        if source_dir is None:
            source_dir = stack.enter_context(tempfile.TemporaryDirectory())
            write_conversion_source(model, source_dir, preprocessor=preprocessor)
        converter = _converter(source_dir, quantization, representative, io_type)
        try:
            with _logged_native_output("converter"):
                flatbuffer = converter.convert()
        except Exception as error:  # the converter raises ConverterError and others
            if quantization != "int8":
                raise
            reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise ValueError(
                "Full-integer (int8) conversion failed: some ops have no int8 kernel "
                f"({reason}). Use quantization='dynamic' or 'float16' for this model."
            ) from error
    report = ParityReport(path, quantization, io_type, 0)
    if quantization == "int8":
        report.float_ops = float_ops(flatbuffer)
        if report.float_ops and not allow_float_ops:
            raise ValueError(
                "Full-integer (int8) conversion is impossible for this model: these ops have "
                f"no int8 kernel and stayed in float: {report.float_ops}. Use "
                "quantization='dynamic' or 'float16', or pass allow_float_ops=True."
            )
    flatbuffer = _with_metadata(
        flatbuffer,
        model,
        labels,
        normalization,
        metadata_version,
        description,
        signatures.serving_preprocessor(model, preprocessor)
        if signatures.is_token_model(model)
        else None,
    )
    staging_lib.write_atomic(path, flatbuffer)
    stem = path[: -len(".tflite")] if path.endswith(".tflite") else path
    if isinstance(labels, dict):
        for name, names in labels.items():
            signatures.write_labels(names, f"{stem}.{name}.labels.txt")
    elif labels:
        signatures.write_labels(labels, f"{stem}.labels.txt")
    report.size_bytes = os.path.getsize(path)

    if inputs is None and representative is not None:
        inputs = representative
    _measure(report, model, path, inputs, truth)
    staging_lib.write_atomic(f"{stem}.parity.json", json.dumps(report.to_dict(), indent=2))
    if verbose:
        print(format_parity_table([report]))
    return report


def check_quantization(
    model: keras.Model, quantization: str, representative_data: object = None
) -> None:
    """Checks, before any work, that `model` converts to LiteRT with `quantization`.

    Args:
        model: a built Keras image or text model.
        quantization: one of `QUANTIZATIONS`.
        representative_data: the calibration data "int8" needs (only
            checked for None here).

    Raises:
        ValueError: an unknown mode, a model that takes neither one image nor
            tokens, "int8" for a text model, or "int8" without data.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten()])
    >>> check_quantization(model, "int8")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: quantization='int8' needs `representative_data`: ...
    """
    _check_choice("quantization", quantization, QUANTIZATIONS)
    text = signatures.is_token_model(model)
    if not (text or signatures.is_image_model(model)):
        raise ValueError(
            "LiteRT export takes models with one `[batch, h, w, 3]` image input or a dict "
            f"of {signatures.TOKEN_IDS!r} and {signatures.PADDING_MASK!r}. "
            f"Received: input_shape={model.input_shape}"
        )
    if quantization == "int8" and text:
        raise ValueError(
            "quantization='int8' (full-integer) is for image models: a text model's token "
            "ids are not activations to calibrate. Use 'dynamic' or 'float16'. "
            "Received: quantization='int8' for a text model"
        )
    if quantization == "int8" and representative_data is None:
        raise ValueError(
            "quantization='int8' needs `representative_data`: about 100 training images "
            "to calibrate activation ranges. Received: representative_data=None"
        )


def _sequence_length(model, preprocessor):
    """Tokens per text in a LiteRT file: the model's fixed input length, else the preprocessor's."""
    length = model.input[signatures.TOKEN_IDS].shape[1]
    if length is not None:
        return int(length)
    preprocessor = signatures.serving_preprocessor(model, preprocessor)
    if preprocessor is None:
        raise ValueError(
            "A text model's LiteRT file takes a fixed number of tokens: pass `preprocessor` "
            "(its `sequence_length` is used) or build the model with fixed-length inputs. "
            "Received: preprocessor=None and inputs of any length"
        )
    return int(preprocessor.sequence_length)


def write_conversion_source(
    model: keras.Model,
    folder: str,
    *,
    preprocessor: keras_hub.models.TextClassifierPreprocessor | None = None,
) -> str:
    """Writes the SavedModel that LiteRT files of `model` are converted from.

    It holds the `serving_default` signature only (input `image`, or
    `token_ids`, `padding_mask` and `segment_ids` for a text model; output
    `probabilities`), with float32 compute (see `float32_model`).

    Args:
        model: a built Keras image or text model.
        folder: an empty or missing folder.
        preprocessor: text models: as in `tflite` (fixes the token count).

    Returns:
        `folder`.

    Example:

    >>> import tempfile, keras
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.GlobalAveragePooling2D()(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    >>> source = write_conversion_source(model, f"{tempfile.mkdtemp()}/source")
    >>> os.path.isfile(f"{source}/saved_model.pb")
    True
    """
    model = lora.deployable(model)  # the source holds merged kernels, no adapters
    length = _sequence_length(model, preprocessor) if signatures.is_token_model(model) else None
    archive = signatures.conversion_archive(float32_model(model), length)
    archive.write_out(folder, verbose=False)
    return folder


def _float32_policy(config):
    """`config` with every mixed-precision dtype policy replaced by float32."""
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy":
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policy(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policy(value) for value in config]
    return config


def float32_model(model: keras.Model) -> keras.Model:
    """The model itself, or a float32 copy when it computes in mixed precision.

    LiteRT kernels compute in float32 (float16 is a weight storage format
    there), so a `mixed_float16` / `mixed_bfloat16` model is rebuilt with the
    float32 policy and given the same (float32) weights before conversion.

    Args:
        model: a Keras model.

    Returns:
        A model with float32 compute.
    """
    mixed = any(
        getattr(layer, "dtype_policy", None) is not None
        and layer.dtype_policy.compute_dtype != "float32"
        for layer in model._flatten_layers(include_self=True)
    )
    if not mixed:
        return model
    config = _float32_policy(keras.saving.serialize_keras_object(model))
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy
