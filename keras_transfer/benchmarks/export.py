"""Suite `export`: LiteRT files per quantisation mode, SavedModel and Keras, side by side.

A classifier is trained quickly (the head, on Fashion-MNIST), then exported
with `kt.export.tflite` in every mode of `QUANTIZATIONS` and with
`kt.export.saved_model`. For each LiteRT file, its `ParityReport` gives the
size, the accuracy and top-1 agreement with the Keras model on the test
images, and the latency (mean, p95) of one image at a time. Then every
runtime is timed in turn, interleaved (Keras `predict_on_batch`, the
SavedModel's `serving_default` through `tf.saved_model.load`, each LiteRT
file), at batch 1 and (Keras, SavedModel) batch 32; the ratios to Keras at
the same batch size are the figures to compare across machines.
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np
import tensorflow as tf

from keras_transfer.benchmarks import workloads
from keras_transfer.benchmarks.figures import Figure
from keras_transfer.benchmarks.timing import (
    interleave,
    ratio_figures,
    seconds_per_call,
    spread_figures,
)
from keras_transfer.export import (
    IMAGE_INPUT,
    QUANTIZATIONS,
    SERVING_DEFAULT,
    saved_model,
    tflite,
    write_conversion_source,
)
from keras_transfer.native_output import captured_native_output
from keras_transfer.recipes import fine_tune

# A float32 file computes what Keras computes: its top-1 agrees on (almost) every image.
FLOAT_AGREEMENT_TARGET = ">= 0.99"
LARGE_BATCH = 32
# Full run: the head trains 2 epochs; each runtime is timed 5 times (20 calls
# at batch 1, 3 at batch 32 each time), interleaved.
FULL = {"head_epochs": 2, "repeats": 5, "calls": {1: 20, LARGE_BATCH: 3}}
QUICK = {"head_epochs": 1, "repeats": 3, "calls": {1: 3, LARGE_BATCH: 1}}
_MIB = 2**20


def _lite_runner(path: str):
    """A function running one batch through a `.tflite` file's `serving_default`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImportError(
            "The export benchmark runs .tflite files with the LiteRT interpreter: "
            "pip install ai-edge-litert==2.3.0"
        ) from None
    # Quiet: the interpreter announces its XNNPACK delegate on stderr.
    with captured_native_output(replay_on_error=True):
        interpreter = Interpreter(model_path=path, num_threads=os.cpu_count())
        runner = interpreter.get_signature_runner(SERVING_DEFAULT)
        runner(**{IMAGE_INPUT: np.zeros((1, *_input_shape(runner)), "float32")})
    return lambda images: runner(**{IMAGE_INPUT: images})


def _timed(function, calls):
    """One interleaved run: `calls` back-to-back calls, timed per call."""
    return lambda: {"call": seconds_per_call(function, calls)}


def _input_shape(runner):
    return tuple(runner.get_input_details()[IMAGE_INPUT]["shape"][1:])


def _folder_mib(path: str) -> float:
    total = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )
    return round(total / _MIB, 2)


def _report_figures(mode, report) -> dict[str, Figure]:
    parity = (
        f"{report.num_examples} test images, LiteRT vs Keras on the same images "
        f"({report.quantization}, io {report.io_type})."
    )
    if report.float_ops:
        parity += f" Ops left in float: {', '.join(report.float_ops)}."
    latency = "ParityReport: LiteRT, batch 1, one test image at a time, all cores."
    return {
        f"{mode}.size_mib": Figure(round(report.size_bytes / _MIB, 3), "MiB", notes="File size."),
        f"{mode}.accuracy": Figure(report.tflite_accuracy, "", notes=f"Test accuracy. {parity}"),
        f"{mode}.top1_agreement": Figure(
            report.top1_agreement,
            "",
            FLOAT_AGREEMENT_TARGET if mode == "none" else None,
            f"Share of images where LiteRT and Keras pick the same class. {parity}",
        ),
        f"{mode}.max_abs_diff": Figure(
            report.max_abs_diff, "", notes=f"Largest probability difference. {parity}"
        ),
        f"{mode}.latency_ms_mean": Figure(
            round(report.latency_ms_mean, 3), "ms", notes=f"Mean. {latency}"
        ),
        f"{mode}.latency_ms_p95": Figure(
            round(report.latency_ms_p95, 3), "ms", notes=f"95th percentile. {latency}"
        ),
    }


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `export` suite.

    Args:
        quick: the tiny random model at 32 px and a few images (for tests).

    Returns:
        Figures: `keras.accuracy`; per mode of `QUANTIZATIONS`
        `<mode>.size_mib`, `.accuracy`, `.top1_agreement`, `.max_abs_diff`,
        `.latency_ms_mean`, `.latency_ms_p95` (the `ParityReport`) and the
        interleaved `<mode>.b1_ms_min` / `_median` and `<mode>.b1_vs_keras`
        (LiteRT time / Keras time at batch 1); `saved_model.size_mib`,
        `saved_model.b1_*` and `saved_model.b32_*` the same way;
        `keras.b1_ms_*`, `keras.b32_ms_*`.

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["export"] is run  # `keras-transfer benchmark --suite=export`
    True
    """
    settings = QUICK if quick else FULL
    data = workloads.fashion_mnist(quick)
    model = workloads.classifier(len(data.class_names), quick)
    fine_tune(
        model,
        data.train,
        recipe="feature_extraction",
        epochs=settings["head_epochs"],
        verbose=0,
        **workloads.without_feature_cache(),
    )
    figures: dict[str, Figure] = {}
    one = tf.constant(data.x_test[:1])
    many = tf.constant(np.resize(data.x_test, (LARGE_BATCH, *data.image_shape)))
    runtimes = {
        "keras.b1": lambda: model.predict_on_batch(one),
        f"keras.b{LARGE_BATCH}": lambda: model.predict_on_batch(many),
    }
    with tempfile.TemporaryDirectory() as folder:
        source = write_conversion_source(model, os.path.join(folder, "source"))
        for mode in QUANTIZATIONS:
            path = os.path.join(folder, f"model_{mode}.tflite")
            report = tflite(
                model,
                path,
                mode,
                representative_data=data.x_train if mode == "int8" else None,
                evaluation_data=(data.x_test, data.y_test),
                labels=data.class_names,
                source_dir=source,
                allow_float_ops=True,
                verbose=False,
            )
            if mode == "none":
                figures["keras.accuracy"] = Figure(
                    report.keras_accuracy,
                    "",
                    notes=f"Test accuracy of the Keras model ({report.num_examples} images).",
                )
            figures.update(_report_figures(mode, report))
            runtimes[f"{mode}.b1"] = functools.partial(_lite_runner(path), data.x_test[:1])
        served_path = saved_model(
            model, os.path.join(folder, "saved_models", "bench"), models_config=False
        )
        loaded = tf.saved_model.load(served_path)
        serve = loaded.signatures[SERVING_DEFAULT]
        runtimes["saved_model.b1"] = lambda: serve(**{IMAGE_INPUT: one})
        runtimes[f"saved_model.b{LARGE_BATCH}"] = lambda: serve(**{IMAGE_INPUT: many})
        figures["saved_model.size_mib"] = Figure(
            _folder_mib(served_path), "MiB", notes="The SavedModel version folder."
        )
        for function in runtimes.values():  # traces, allocates, loads kernels
            function()
        calls = settings["calls"]
        timings = interleave(
            {
                name: _timed(function, calls[1 if name.endswith(".b1") else LARGE_BATCH])
                for name, function in runtimes.items()
            },
            repeats=settings["repeats"],
        )
    labels = {"keras": "Keras predict_on_batch", "saved_model": "SavedModel serving_default"}
    for name, measured in timings.items():
        runtime, batch = name.rsplit(".", 1)
        what = f"{labels.get(runtime, f'LiteRT {runtime}')}, {batch[1:]} image(s) per call."
        figures.update(spread_figures(f"{name}_ms", measured["call"], "ms", what, scale=1000))
        if runtime != "keras":
            figures.update(
                ratio_figures(
                    f"{name}_vs_keras",
                    measured["call"],
                    timings[f"keras.{batch}"]["call"],
                    notes=f"Time per call / Keras predict_on_batch's (below 1: faster). {what}",
                )
            )
    return figures
