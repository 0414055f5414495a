"""Where an int8 LiteRT file loses precision: float and int8 activations compared layer by layer.

`quantization_report(model, "model_int8.tflite", images)` runs the same
images through the float LiteRT conversion of `model` and through the int8
file, both with every intermediate tensor kept
(`experimental_preserve_all_tensors`), dequantises each int8 activation with
its scale and zero point, and compares it with the float tensor of the same
name (the converter names tensors after the layers that produce them, in the
float and the int8 conversion alike). Per tensor:

- `sqnr_db`: signal-to-quantisation-noise ratio of the int8 activation
  against the float one, `10 log10(sum f^2 / sum (f - q)^2)`, the error
  accumulated by every layer up to this one (capped at `MAX_SQNR_DB`:
  identical tensors);
- `added_noise`: the noise this op adds, as a share of the signal's power:
  its noise-to-signal ratio minus that of its worst activation input
  (`10^(-sqnr/10)` each). It counts the op's own rounding and weights and
  the way it amplifies the error it receives; the report is sorted by it,
  worst first, which names the layers to look at (`drop_db` is the same in
  dB: large at the first ops, where tiny noise is far below the signal);
- `grid_sqnr_db` and `clipped`: the float activation put on this tensor's
  own int8 grid (its scale and zero point), and the share of its values
  outside the grid's range: a low grid SQNR with clipping means a
  calibration range that is too narrow, without clipping one too wide.

`format_quantization_report` prints the worst layers first.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.export import signatures
from keras_transfer.export.parity import _as_arrays, _LiteRunner, _logged_native_output
from keras_transfer.export.tflite import write_conversion_source

# Images run through both files: SQNR over ~30 images is stable to ~0.5 dB
# on the demo model, and each image keeps every tensor of both files.
DEFAULT_REPORT_SAMPLES = 32
# The SQNR of identical tensors; float32 round-off alone stays above it.
MAX_SQNR_DB = 100.0
SORT_KEYS = ("added", "drop", "sqnr", "grid", "order")


@dataclasses.dataclass
class TensorError:
    """How one activation of an int8 file differs from the float model's.

    Attributes:
        order: position of the op that writes it (0: the first op).
        op: the op type, e.g. `"CONV_2D"`.
        layer: the Keras layer it comes from, as far as the tensor's name
            tells (the name's first part when no model was given).
        tensor: the tensor's name in the file.
        shape: its shape.
        scale / zero_point: its int8 quantisation (0 and 0 for float).
        sqnr_db: SQNR of the int8 tensor against the float one, in dB.
        drop_db: `sqnr_db` of the op's worst activation input minus this one.
        added_noise: noise-to-signal power ratio of this tensor minus that
            of the op's worst activation input.
        grid_sqnr_db: SQNR of the float tensor put on this tensor's int8 grid.
        clipped: share of the float values outside the grid's range.
    """

    order: int
    op: str
    layer: str
    tensor: str
    shape: tuple[int, ...]
    scale: float
    zero_point: int
    sqnr_db: float
    drop_db: float
    added_noise: float
    grid_sqnr_db: float
    clipped: float


@dataclasses.dataclass
class QuantizationReport:
    """Per-tensor errors of an int8 LiteRT file against its float model.

    Attributes:
        int8_path: the int8 file.
        num_examples: images compared.
        tensors: one `TensorError` per matched activation, worst first.
        sort_by: the key `tensors` is sorted by (see `SORT_KEYS`).
        unmatched: int8 tensors with no float tensor of the same name.
    """

    int8_path: str
    num_examples: int
    tensors: list[TensorError]
    sort_by: str = "added"
    unmatched: list[str] = dataclasses.field(default_factory=list)

    def worst(self, n: int = 5) -> list[str]:
        """The layers of the `n` worst tensors (by `sort_by`)."""
        return [t.layer for t in self.tensors[:n]]

    @property
    def output_sqnr_db(self) -> float:
        """SQNR of the file's last op (the probabilities)."""
        return max(self.tensors, key=lambda t: t.order).sqnr_db

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict."""
        return dataclasses.asdict(self)


def format_quantization_report(report: QuantizationReport, max_rows: int | None = 15) -> str:
    """The report as a fixed-width table, worst layers first.

    Args:
        report: from `quantization_report`.
        max_rows: rows shown (None: all).

    Returns:
        The table as text.

    Example:

    >>> row = TensorError(3, "CONV_2D", "backbone/conv_1", "t", (1, 4, 4, 8), 0.02, -128,
    ...                   31.5, 6.25, 0.0005, 40.1, 0.0)
    >>> print(format_quantization_report(QuantizationReport("m.tflite", 8, [row])))
    int8 vs float activations on 8 images, worst first by added noise (SQNR in dB)
      op#  op                 layer                                SQNR   drop  added %   grid  clipped %
        3  CONV_2D            backbone/conv_1                      31.5    6.2     0.05   40.1       0.00
    """
    rows = report.tensors if max_rows is None else report.tensors[:max_rows]
    order = {"added": "added noise", "drop": "SQNR drop", "sqnr": "SQNR", "grid": "grid SQNR"}
    lines = [
        f"int8 vs float activations on {report.num_examples} images, "
        + (
            "in graph order"
            if report.sort_by == "order"
            else f"worst first by {order[report.sort_by]}"
        )
        + " (SQNR in dB)",
        f"  op#  {'op':<17}  {'layer':<34}   SQNR   drop  added %   grid  clipped %",
    ]
    for t in rows:
        layer = t.layer if len(t.layer) <= 34 else "..." + t.layer[-31:]
        lines.append(
            f"{t.order:>5}  {t.op[:17]:<17}  {layer:<34}  {t.sqnr_db:5.1f}  {t.drop_db:5.1f}"
            f"  {100 * t.added_noise:7.2f}  {t.grid_sqnr_db:5.1f}  {100 * t.clipped:9.2f}"
        )
    if max_rows is not None and len(report.tensors) > max_rows:
        lines.append(f"  ... {len(report.tensors) - max_rows} more tensors")
    return "\n".join(lines)


def _sqnr(signal, noise):
    if noise <= 0:
        return MAX_SQNR_DB
    if signal <= 0:
        return -MAX_SQNR_DB  # an all-zero float tensor that the int8 file makes non-zero
    return float(min(MAX_SQNR_DB, 10 * np.log10(signal / noise)))


def _graph(path):
    """`[(op name, activation inputs, outputs)]` of a file's main subgraph, and its inputs."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.Model.GetRootAs(f.read(), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.Subgraphs(0)
    produced = {graph.Inputs(i) for i in range(graph.InputsLength())}
    ops = []
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        inputs = [op.Inputs(i) for i in range(op.InputsLength())]
        outputs = [op.Outputs(i) for i in range(op.OutputsLength())]
        ops.append(
            (names.get(builtin, str(builtin)), [t for t in inputs if t in produced], outputs)
        )
        produced.update(outputs)
    return ops


def _layer_name(tensor, layer_names, op=None):
    """A readable layer for a tensor name such as `model_1/backbone_1/conv_1/Relu;...`.

    The scopes that name layers of the model (TF adds `_1` when tracing),
    else every scope between the model's and the TF op's; `input` and
    `output` for the tensors the converter names after no layer.
    """
    parts = tensor.split(";")[0].split("/")
    if len(parts) < 3:
        if op == "QUANTIZE" and parts[0].startswith("tfl."):
            return "input"
        return "output" if parts[0].startswith("StatefulPartitionedCall") else parts[0]
    scopes = []
    for part in parts[1:-1]:  # without the model's own scope and the TF op's name
        base = re.sub(r"_\d+$", "", part)
        scopes.append(part if part in layer_names or base not in layer_names else base)
    known = [scope for scope in scopes if scope in layer_names]
    return "/".join(known or scopes)


class _Accumulator:
    """Running sums of one tensor's errors over the images."""

    def __init__(self):
        self.signal = self.noise = self.grid_noise = 0.0
        self.clipped = self.count = 0

    def add(self, reference, value, scale, zero, dtype):
        reference = reference.astype("float64")
        if scale:
            info = np.iinfo(dtype)
            value = (value.astype("float64") - zero) * scale
            grid = np.round(reference / scale + zero)
            self.clipped += int(np.sum((grid < info.min) | (grid > info.max)))
            grid = (np.clip(grid, info.min, info.max) - zero) * scale
            self.grid_noise += float(np.sum((reference - grid) ** 2))
        self.signal += float(np.sum(reference**2))
        self.noise += float(np.sum((reference - value) ** 2))
        self.count += reference.size


def _float_file(model, folder):
    """`model` itself when it is a `.tflite` path, else its float conversion in `folder`."""
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model)
    source = write_conversion_source(model, os.path.join(folder, "source"))
    converter = tf.lite.TFLiteConverter.from_saved_model(
        source, signature_keys=[signatures.SERVING_DEFAULT]
    )
    with _logged_native_output("converter"):
        flatbuffer = converter.convert()
    path = os.path.join(folder, "float.tflite")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return path


def _check(model, int8_path, num_samples, sort_by):
    if not isinstance(model, (keras.Model, str, os.PathLike)):
        raise TypeError(
            "`model` must be a Keras image model or the path of its float .tflite file. "
            f"Received: model={type(model).__name__}"
        )
    for name, path in (("model", model), ("int8_path", int8_path)):
        if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
            raise FileNotFoundError(f"No .tflite file at `{name}`. Received: {name}={path!r}")
    if not isinstance(int8_path, (str, os.PathLike)):
        raise TypeError(
            "`int8_path` must be the path of an int8 .tflite file (`kt.export.tflite(..., "
            f"quantization='int8')` writes one). Received: int8_path={int8_path!r}"
        )
    if isinstance(model, keras.Model) and not signatures.is_image_model(model):
        raise ValueError(
            "The quantisation report compares image models (full-integer int8 is for "
            f"images). Received: input_shape={model.input_shape}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"`num_samples` must be an integer >= 1. Received: num_samples={num_samples!r}"
        )
    if sort_by not in SORT_KEYS:
        raise ValueError(f"`sort_by` must be one of {SORT_KEYS}. Received: sort_by={sort_by!r}")


def quantization_report(
    model: keras.Model | str,
    int8_path: str,
    data: tf.data.Dataset | tuple | np.ndarray,
    *,
    num_samples: int = DEFAULT_REPORT_SAMPLES,
    sort_by: str = "added",
    verbose: bool = False,
) -> QuantizationReport:
    """Compares an int8 LiteRT file's activations with the float model's, layer by layer.

    Both the float conversion of `model` and the int8 file run the same
    images with every intermediate tensor kept; each int8 activation is
    dequantised and compared with the float tensor of the same name (see the
    module docstring for the figures). Sorted by `added_noise`, the first
    rows are the layers that add the most error: candidates for a better
    calibration set, a clipped activation (ReLU6 instead of ReLU), or
    quantisation-aware training (`kt.techniques.quantization_aware`).

    Args:
        model: the Keras image model the int8 file was converted from, or
            the path of its float `.tflite` file (then layer names are the
            tensor names' first parts).
        int8_path: the int8 `.tflite` file (`kt.export.tflite(...,
            quantization="int8")`; float or uint8/int8 input alike).
        data: images to compare on (held-out ones are best): an array
            `[n, h, w, 3]` of 0-255 pixels, an `(images, labels)` tuple or a
            dataset of images or `(images, labels)` batches.
        num_samples: images used (the first ones of `data`).
        sort_by: `"added"` (noise added by the op, worst first), `"drop"`
            (the same in dB), `"sqnr"` (accumulated error, lowest SQNR
            first), `"grid"` (the tensor's own int8 grid, lowest first) or
            `"order"` (graph order).
        verbose: print the table (`format_quantization_report`).

    Returns:
        A `QuantizationReport`.

    Raises:
        ValueError: a text model, bad `num_samples` or `sort_by`.
        FileNotFoundError: a `.tflite` path that does not exist.

    Example:

    >>> import tempfile, keras, numpy as np
    >>> import keras_transfer as kt
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    >>> images = np.random.default_rng(0).uniform(0, 255, (8, 8, 8, 3))
    >>> path = f"{tempfile.mkdtemp()}/toy_int8.tflite"
    >>> _ = kt.export.tflite(model, path, "int8", representative_data=images, verbose=False)
    >>> report = quantization_report(model, path, images, num_samples=4)
    >>> report.tensors[0].op in {"CONV_2D", "MEAN", "FULLY_CONNECTED", "SOFTMAX", "QUANTIZE"}
    True
    """
    _check(model, int8_path, num_samples, sort_by)
    images, _ = _as_arrays(data, num_samples)
    layer_names = set()
    if isinstance(model, keras.Model):
        layer_names = {layer.name for layer in model._flatten_layers(include_self=False)}
    with tempfile.TemporaryDirectory() as folder:
        reference = _LiteRunner(_float_file(model, folder), preserve_all_tensors=True)
        quantized = _LiteRunner(os.fspath(int8_path), preserve_all_tensors=True)
        details = {d["index"]: d for d in quantized.interpreter.get_tensor_details()}
        ops = _graph(os.fspath(int8_path))
        pairs, unmatched = _pairs(ops, details, reference)
        for image in images:
            reference(image)
            quantized(image)
            for t, (f, accumulator) in pairs.items():
                scale, zero = details[t]["quantization"]
                accumulator.add(
                    reference.interpreter.get_tensor(f),
                    quantized.interpreter.get_tensor(t),
                    scale,
                    zero,
                    details[t]["dtype"],
                )
    rows = _rows(ops, details, pairs, layer_names)
    keys = {
        "added": lambda r: -r.added_noise,
        "drop": lambda r: -r.drop_db,
        "sqnr": lambda r: r.sqnr_db,
        "grid": lambda r: r.grid_sqnr_db,
        "order": lambda r: r.order,
    }
    rows.sort(key=keys[sort_by])
    report = QuantizationReport(os.fspath(int8_path), len(images), rows, sort_by, unmatched)
    if verbose:
        print(format_quantization_report(report))
    return report


def _pairs(ops, details, reference):
    """`{int8 tensor: (float tensor, _Accumulator)}` by name, and the int8 names left over.

    The input's QUANTIZE output pairs with the float input, and the int8
    tensor a DEQUANTIZE turns into the float output with that output.
    """
    float_index = {d["name"]: d["index"] for d in reference.interpreter.get_tensor_details()}
    source = {}
    for op, inputs, outputs in ops:
        names = [details[t]["name"] for t in outputs]
        if op == "QUANTIZE" and inputs and names[0] not in float_index:
            source[outputs[0]] = details[inputs[0]]["name"]
        elif op == "DEQUANTIZE" and names[0] in float_index:
            source.setdefault(inputs[0], names[0])
    pairs, unmatched = {}, []
    for _, _, outputs in ops:
        for t in outputs:
            name = source.get(t, details[t]["name"])
            if name in float_index:
                pairs[t] = (float_index[name], _Accumulator())
            else:
                unmatched.append(details[t]["name"])
    return pairs, unmatched


def _rows(ops, details, pairs, layer_names):
    """One `TensorError` per paired tensor, in graph order."""
    sqnr = {t: _sqnr(a.signal, a.noise) for t, (_, a) in pairs.items()}
    rows = []
    for order, (op, inputs, outputs) in enumerate(ops):
        before = min((sqnr.get(t, MAX_SQNR_DB) for t in inputs), default=MAX_SQNR_DB)
        for t in outputs:
            if t not in pairs:
                continue
            accumulator = pairs[t][1]
            scale, zero = details[t]["quantization"]
            rows.append(
                TensorError(
                    order=order,
                    op=op,
                    layer=_layer_name(details[t]["name"], layer_names, op),
                    tensor=details[t]["name"],
                    shape=tuple(int(d) for d in details[t]["shape"]),
                    scale=float(scale),
                    zero_point=int(zero),
                    sqnr_db=sqnr[t],
                    drop_db=before - sqnr[t],
                    added_noise=10 ** (-sqnr[t] / 10) - 10 ** (-before / 10),
                    grid_sqnr_db=_sqnr(accumulator.signal, accumulator.grid_noise),
                    clipped=accumulator.clipped / max(accumulator.count, 1),
                )
            )
    return rows
