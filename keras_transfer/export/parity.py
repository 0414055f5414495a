"""Parity of a LiteRT file with its Keras model: agreement, max difference, accuracy, latency.

`_LiteRunner` runs a `.tflite` file's `serving_default` one example at a
time with the LiteRT interpreter (`ai-edge-litert`); `_measure` fills a
`ParityReport` (the `kt.export.tflite` result) against the Keras model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_transfer.export import signatures
from keras_transfer.native_output import CapturedOutput, captured_native_output

# Images timed for latency (after one warm-up call).
LATENCY_SAMPLES = 50


def _litert_interpreter():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImportError(
            "Running .tflite files needs the LiteRT interpreter: pip install ai-edge-litert==2.3.0"
        ) from None
    return Interpreter


@dataclasses.dataclass
class ParityReport:
    """How a LiteRT file compares with the Keras model it came from.

    Attributes:
        path: the `.tflite` file.
        quantization: one of `QUANTIZATIONS`.
        io_type: input/output dtype of the file.
        size_bytes: file size.
        num_examples: examples compared (0 without data).
        top1_agreement: share of examples where both models pick the same class.
        max_abs_diff: largest difference between the probabilities.
        keras_accuracy / tflite_accuracy: accuracy when labels were given.
        latency_ms_mean / latency_ms_p95: LiteRT time per example (batch 1).
        float_ops: ops of an int8 file that still compute in float.
    """

    path: str
    quantization: str
    io_type: str
    size_bytes: int
    num_examples: int = 0
    top1_agreement: float | None = None
    max_abs_diff: float | None = None
    keras_accuracy: float | None = None
    tflite_accuracy: float | None = None
    latency_ms_mean: float | None = None
    latency_ms_p95: float | None = None
    float_ops: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict."""
        return dataclasses.asdict(self)


def format_parity_table(reports: Sequence[ParityReport]) -> str:
    """A fixed-width table of parity reports, one row per file.

    Args:
        reports: reports from `tflite`.

    Returns:
        The table as text.

    Example:

    >>> print(format_parity_table([ParityReport("m.tflite", "none", "float32", 2048)]))
    quantization  io       size KB  top-1 agree  max abs diff  acc keras  acc lite  ms mean  ms p95
    none          float32      2.0            -             -          -         -        -       -
    """

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [
        "quantization  io       size KB  top-1 agree  max abs diff  acc keras  acc lite"
        "  ms mean  ms p95"
    ]
    for r in reports:
        lines.append(
            f"{r.quantization:<12}  {r.io_type:<7}  {r.size_bytes / 1024:7.1f}  "
            f"{cell(r.top1_agreement, '11.4f'):>11}  {cell(r.max_abs_diff, '12.2e'):>12}  "
            f"{cell(r.keras_accuracy, '9.4f'):>9}  {cell(r.tflite_accuracy, '8.4f'):>8}  "
            f"{cell(r.latency_ms_mean, '7.2f'):>7}  {cell(r.latency_ms_p95, '6.2f'):>6}"
        )
    return "\n".join(lines)


def _numpy_inputs(x):
    """Images as a float32 array, or a text model's dict of token arrays as numpy."""
    if isinstance(x, dict):
        return {key: np.asarray(value) for key, value in x.items()}
    return np.asarray(x, "float32")


def _num_examples(x):
    return len(keras.tree.flatten(x)[0])


def _as_arrays(data, limit=None):
    """(inputs, labels or None) as numpy from a dataset, a tuple, an array or a dict.

    Inputs are an image array, or a dict of token arrays for text models.
    """
    if data is None:
        return None, None
    if isinstance(data, tf.data.Dataset):
        inputs, labels = [], []
        count = 0
        for batch in data:
            x, y = batch if isinstance(batch, tuple) else (batch, None)
            inputs.append(_numpy_inputs(x))
            if y is not None:
                labels.append(np.asarray(y))
            count += _num_examples(inputs[-1])
            if limit is not None and count >= limit:
                break
        if not inputs:
            raise ValueError("The dataset given for export is empty.")
        x = keras.tree.map_structure(lambda *parts: np.concatenate(parts), *inputs)
        y = np.concatenate(labels) if labels else None
    elif isinstance(data, tuple):
        x, y = _numpy_inputs(data[0]), np.asarray(data[1])
    else:
        x, y = _numpy_inputs(data), None
    if limit is not None:
        x = keras.tree.map_structure(lambda value: value[:limit], x)
        y = None if y is None else y[:limit]
    return x, y


def _check_token_inputs(inputs, sequence_length):
    """Token arrays for parity must be `[n, sequence_length]`, the file's input shape."""
    keys = (signatures.TOKEN_IDS, signatures.PADDING_MASK)
    if not isinstance(inputs, dict) or any(key not in inputs for key in keys):
        found = sorted(inputs) if isinstance(inputs, dict) else type(inputs).__name__
        raise ValueError(
            f"`evaluation_data` for a text model must hold a dict with {list(keys)} "
            f"(a preprocessor's output). Received: {found}"
        )
    shapes = {key: np.shape(inputs[key]) for key in keys}
    if any(len(shape) != 2 or shape[1] != sequence_length for shape in shapes.values()):
        raise ValueError(
            f"`evaluation_data` tokens must be `[n, {sequence_length}]`, the LiteRT file's "
            f"input length. Received: shapes={shapes}"
        )


@contextlib.contextmanager
def _logged_native_output(source):
    """Native chatter of the converter / interpreter, sent to absl logging at INFO."""
    captured = CapturedOutput()
    try:
        with captured_native_output(replay_on_error=False) as captured:
            yield
    finally:
        if captured.text.strip():
            logging.info("LiteRT %s: %s", source, captured.text.strip())


class _LiteRunner:
    """Runs the `serving_default` signature of a `.tflite` file on one example at a time.

    An example is an image (float pixels) or a dict of inputs by name (a text
    model's `token_ids`, `padding_mask` and, if given, `segment_ids`; zeros
    when not).
    """

    def __init__(self, path, preserve_all_tensors=False):
        options = {}
        if preserve_all_tensors:
            # Every intermediate tensor readable after a call (the per-layer
            # quantisation report): no delegate, whose fused kernels keep
            # their intermediates to themselves.
            from ai_edge_litert.interpreter import OpResolverType

            options = {
                "experimental_preserve_all_tensors": True,
                "experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            }
        with _logged_native_output("interpreter"), warnings.catch_warnings():
            # LiteRT warns that preserving tensors costs memory: here it is the point.
            warnings.filterwarnings("ignore", "Warning: Enabling `experimental_preserve_all")
            self.interpreter = _litert_interpreter()(
                model_path=path, num_threads=os.cpu_count(), **options
            )
            self.runner = self.interpreter.get_signature_runner(signatures.SERVING_DEFAULT)
        self.inputs = self.runner.get_input_details()
        self.input_dtype = next(iter(self.inputs.values()))["dtype"]
        self.output_quant = {
            name: details["quantization"]
            for name, details in self.runner.get_output_details().items()
        }

    def zeros(self):
        """One batch of a single all-zero example, in the file's input shapes."""
        return {name: np.zeros((1, *d["shape"][1:]), "float32") for name, d in self.inputs.items()}

    def _zeros(self, name):
        return np.zeros(self.inputs[name]["shape"][1:], "int32")

    def _input(self, name, value):
        details = self.inputs[name]
        x = np.asarray(value)[None]
        dtype, (scale, zero) = details["dtype"], details["quantization"]
        if np.issubdtype(dtype, np.integer) and scale:  # a quantised float input
            info = np.iinfo(dtype)
            x = np.clip(np.round(x.astype("float32") / scale + zero), info.min, info.max)
        return x.astype(dtype)

    def __call__(self, example):
        if not isinstance(example, dict):
            example = {signatures.IMAGE_INPUT: example}
        feed = {
            # A file's `segment_ids` are all 0 for one text when the data has none.
            name: self._input(name, example[name] if name in example else self._zeros(name))
            for name in self.inputs
        }
        outputs = {}
        for name, y in self.runner(**feed).items():
            if y.dtype != np.float32:
                scale, zero = self.output_quant[name]
                y = (y.astype("float32") - zero) * scale
            outputs[name] = y[0]
        # One head: its `probabilities`; several: `{<head>_probabilities: ...}`.
        return outputs.get(signatures.PROBABILITIES, outputs)


def _keras_inputs(model, inputs):
    """What the Keras model gets for `inputs`: tokens as the LiteRT file sees them."""
    if not isinstance(inputs, dict):
        return inputs
    specs = model.input
    features = {key: inputs[key] for key in (signatures.TOKEN_IDS, signatures.PADDING_MASK)}
    if signatures.SEGMENT_IDS in specs:  # the file's signature makes them zeros
        features[signatures.SEGMENT_IDS] = np.zeros_like(features[signatures.TOKEN_IDS])
    return {key: np.asarray(value).astype(specs[key].dtype) for key, value in features.items()}


def _measure(report, model, path, inputs, labels):
    runner = _LiteRunner(path)
    compare = inputs is not None
    if inputs is None:
        inputs = runner.zeros()
        if signatures.IMAGE_INPUT in inputs:
            inputs = inputs[signatures.IMAGE_INPUT]
    examples = [
        keras.tree.map_structure(lambda value, i=i: value[i], inputs)
        for i in range(_num_examples(inputs))
    ]
    with _logged_native_output("interpreter"):  # the first call applies the XNNPACK delegate
        runner(examples[0])  # warm-up
    lite, times = [], []
    for example in examples:
        start = time.perf_counter()
        lite.append(runner(example))
        times.append(time.perf_counter() - start)
    times = np.array(times[:LATENCY_SAMPLES]) * 1e3
    report.latency_ms_mean = float(times.mean())
    report.latency_ms_p95 = float(np.percentile(times, 95))
    if not compare:
        return
    reference = model.predict(_keras_inputs(model, inputs), batch_size=32, verbose=0)
    if isinstance(reference, dict):  # several heads, `<head>_probabilities` in the file
        pairs = [
            (
                np.stack([row[f"{name}_{signatures.PROBABILITIES}"] for row in lite]),
                np.asarray(value, "float32"),
            )
            for name, value in reference.items()
        ]
    else:
        pairs = [(np.stack(lite), np.asarray(reference, "float32"))]
    report.num_examples = len(examples)
    report.top1_agreement = float(
        np.mean([np.mean(a.argmax(-1) == b.argmax(-1)) for a, b in pairs])
    )
    report.max_abs_diff = float(max(np.abs(a - b).max() for a, b in pairs))
    lite, reference = pairs[0]
    if labels is not None and len(pairs) == 1:
        labels = labels.reshape(-1) if labels.ndim > 1 and labels.shape[-1] == 1 else labels
        truth = labels.argmax(-1) if labels.ndim > 1 else labels
        report.keras_accuracy = float(np.mean(reference.argmax(-1) == truth))
        report.tflite_accuracy = float(np.mean(lite.argmax(-1) == truth))
