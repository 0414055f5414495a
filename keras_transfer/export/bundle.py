"""One call for every export of a model: SavedModel and LiteRT files side by side.

Layout under `output` (`saved_models/<name>`):

    <name>/<version>/                         SavedModel (TF Serving)
    <name>/litert/<name>_<quantization>.tflite (+ .labels.txt, .parity.json)
    <name>/litert/parity.json                 all parity reports together

TF Serving only loads all-digit folders, so `litert/` does not disturb it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import staging as staging_lib
from keras_transfer.export import saved_model as saved_model_lib
from keras_transfer.export import tflite as tflite_lib
from keras_transfer.techniques import lora

if TYPE_CHECKING:
    import keras_hub

FORMATS = ("saved_model", "tflite")
LITERT_FOLDER = "litert"


def _choices(name, values, allowed):
    values = [values] if isinstance(values, str) else list(values)
    bad = [v for v in values if v not in allowed]
    if not values or bad:
        raise ValueError(f"`{name}` must be a list from {allowed}. Received: {name}={values!r}")
    return list(dict.fromkeys(values))


def export_options(
    formats: Sequence[str], quantizations: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Checks export formats and LiteRT modes; returns them as lists without repeats.

    Args:
        formats: any of `FORMATS` (a string is one format).
        quantizations: any of `tflite.QUANTIZATIONS`.

    Returns:
        `(formats, quantizations)`.

    Raises:
        ValueError: an empty list or an unknown name.

    Example:

    >>> export_options("tflite", ["none", "int8", "none"])
    (['tflite'], ['none', 'int8'])
    """
    return (
        _choices("formats", formats, FORMATS),
        _choices("quantizations", quantizations, tflite_lib.QUANTIZATIONS),
    )


def export_model(
    model: keras.Model,
    output: str,
    *,
    formats: Sequence[str] = FORMATS,
    quantizations: Sequence[str] = ("none",),
    labels: Sequence[str] | None = None,
    representative_data: tf.data.Dataset | np.ndarray | None = None,
    evaluation_data: tf.data.Dataset | tuple | np.ndarray | None = None,
    version: int | None = None,
    overwrite: bool = False,
    num_evaluation_samples: int | None = None,
    preprocessor: keras_hub.models.TextClassifierPreprocessor | None = None,
    verbose: bool = True,
) -> dict:
    """Exports a model as a SavedModel and/or LiteRT files in one folder.

    A text model with its preprocessor gets a SavedModel served from raw
    strings and LiteRT files on token ids (see `saved_model`, `tflite`).

    Args:
        model: a built Keras model.
        output: the model's export folder, `saved_models/<name>`.
        formats: any of `FORMATS`.
        quantizations: LiteRT modes, any of `tflite.QUANTIZATIONS` ("int8":
            image models only).
        labels: class names (stored with every export).
        representative_data: training images for int8 calibration.
        evaluation_data: held-out `(images, labels)` for the parity reports
            (text models: `(token dict, labels)`, as `text_dataset` makes).
        version: SavedModel version (None: the next free one).
        overwrite: replace an existing SavedModel version.
        num_evaluation_samples: compare at most this many evaluation examples
            (None: all of them).
        preprocessor: a text model's KerasHub `TextClassifierPreprocessor`
            (None: `model.preprocessor`, if any).
        verbose: print the parity table.

    Returns:
        `{"saved_model": version folder or None, "tflite": [ParityReport...]}`.

    Example:

    >>> import tempfile, keras
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.GlobalAveragePooling2D()(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    >>> out = export_model(model, f"{tempfile.mkdtemp()}/toy", verbose=False)
    >>> os.path.basename(out["saved_model"]), out["tflite"][0].quantization
    ('1', 'none')
    """
    formats, quantizations = export_options(formats, quantizations)
    if "tflite" in formats:
        for quantization in quantizations:
            tflite_lib.check_quantization(model, quantization, representative_data)
    # A LoRA model is merged once here, not once per format.
    model = lora.deployable(model)
    result = {"saved_model": None, "tflite": []}
    if "saved_model" in formats:
        result["saved_model"] = saved_model_lib.saved_model(
            model,
            output,
            version=version,
            labels=labels,
            overwrite=overwrite,
            preprocessor=preprocessor,
        )
    if "tflite" in formats:
        name = os.path.basename(os.path.abspath(output))
        folder = os.path.join(output, LITERT_FOLDER)
        created = staging_lib.writable_folder(folder, "LiteRT files")
        try:
            with tempfile.TemporaryDirectory() as scratch:
                # One float32 SavedModel serves every quantisation mode.
                source = tflite_lib.write_conversion_source(
                    model, scratch, preprocessor=preprocessor
                )
                for quantization in quantizations:
                    report = tflite_lib.tflite(
                        model,
                        os.path.join(folder, f"{name}_{quantization}.tflite"),
                        quantization,
                        representative_data=representative_data,
                        evaluation_data=evaluation_data,
                        labels=labels,
                        num_evaluation_samples=num_evaluation_samples,
                        source_dir=source,
                        preprocessor=preprocessor,
                        verbose=False,
                    )
                    result["tflite"].append(report)
        except BaseException:
            staging_lib.remove_empty(created)
            raise
        with open(os.path.join(folder, "parity.json"), "w", encoding="utf-8") as f:
            json.dump([r.to_dict() for r in result["tflite"]], f, indent=2)
        if verbose:
            print(tflite_lib.format_parity_table(result["tflite"]))
    return result
