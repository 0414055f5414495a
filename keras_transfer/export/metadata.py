"""Standard TFLite model metadata, the kind MediaPipe Tasks and the TFLite Task Library read.

A phone app runs an image classifier with MediaPipe Tasks (`ImageClassifier`
on Android, iOS and the web), and MediaPipe reads the model's *metadata*: a
flatbuffer of the published schema `metadata_schema.fbs` (file identifier
`M001`) stored in a model buffer named `TFLITE_METADATA`, whose associated
files (the labels) sit in a zip archive appended to the `.tflite` file. A
float-input model without `NormalizationOptions` is refused ("requires
specifying NormalizationOptions metadata"); without a `TENSOR_AXIS_LABELS`
file its categories have no names.

Which writer, and why this one:
- MediaPipe 1.2.x's own metadata writer does not import (`mediapipe.tasks.cc`
  is missing from the wheel), and needing all of MediaPipe (OpenCV included)
  to export a model would be heavy anyway.
- `tflite-support` 0.4.4 is unmaintained and pins `protobuf<4`, which
  TensorFlow 2.21 (protobuf >= 6) cannot share an environment with.
- The schema is small and stable, and `flatbuffers` is already a TensorFlow
  dependency. So this module writes (and reads) the few tables an image
  classifier needs with `flatbuffers.Builder`, field by field, following the
  schema's field order; the tests read the result back with MediaPipe's
  generated schema module and load the files in MediaPipe's `ImageClassifier`.

The tables written: `ModelMetadata` (name, description, version, author,
license, min parser version) -> one `SubGraphMetadata` -> input
`TensorMetadata` (`ImageProperties` RGB with the default size,
`NormalizationOptions`, `Stats` of the pixel range) and output
`TensorMetadata` (`FeatureProperties`, `Stats` [0, 1], the labels file as
`TENSOR_AXIS_LABELS`).

Our models take raw 0-255 RGB pixels (preprocessing is baked in), so the
normalisation is mean 0, std 1: the client feeds pixels as they are. For a
uint8 or int8 input the tensor's own quantisation parameters, which the
converter writes into the model, are what a client uses; the normalisation
still tells it the pixel range the model expects.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence

import flatbuffers
import numpy as np
from flatbuffers import number_types
from flatbuffers.table import Table

METADATA_NAME = "TFLITE_METADATA"
METADATA_IDENTIFIER = b"M001"
LABELS_FILE = "labels.txt"
VOCABULARY_FILE = "vocab.txt"
# The image tables date from metadata parser 1.0.0; BertTokenizerOptions from 1.1.0.
MIN_PARSER_VERSION = "1.0.0"
BERT_MIN_PARSER_VERSION = "1.1.0"
# The metadata names MediaPipe's BERT preprocessor looks its inputs up by.
BERT_INPUT_NAMES = {"token_ids": "ids", "padding_mask": "mask", "segment_ids": "segment_ids"}
# Enum values of metadata_schema.fbs.
TENSOR_AXIS_LABELS = 2
VOCABULARY = 5
_BERT_TOKENIZER_OPTIONS = 4  # ProcessUnitOptions union
_RGB = 1
_FEATURE_PROPERTIES, _IMAGE_PROPERTIES = 1, 2  # ContentProperties union
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union


# ----------------------------------------------------------------------------
# Writing.


def _strings(builder, values):
    return [None if v is None else builder.CreateString(v) for v in values]


def _vector(builder, offsets):
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def _floats(builder, values):
    builder.StartVector(4, len(values), 4)
    for value in reversed(values):
        builder.PrependFloat32(float(value))
    return builder.EndVector()


def _table(builder, fields):
    """A table from `(slot, kind, value)`: children (strings, vectors, tables) built first."""
    fields = [f for f in fields if f[2] is not None]
    builder.StartObject(max(slot for slot, _, _ in fields) + 1 if fields else 0)
    for slot, kind, value in fields:
        if kind == "offset":
            builder.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "byte":
            builder.PrependInt8Slot(slot, value, 0)
        elif kind == "ubyte":
            builder.PrependUint8Slot(slot, value, 0)
        elif kind == "uint":
            builder.PrependUint32Slot(slot, value, 0)
        else:  # pragma: no cover - a programming error
            raise ValueError(kind)
    return builder.EndObject()


def _associated_file(builder, name, description, file_type):
    name, description = _strings(builder, (name, description))
    return _table(
        builder, [(0, "offset", name), (1, "offset", description), (2, "byte", file_type)]
    )


def _stats(builder, low, high):
    high, low = _floats(builder, [high]), _floats(builder, [low])
    return _table(builder, [(0, "offset", high), (1, "offset", low)])


def image_classifier_metadata(
    *,
    name: str,
    description: str,
    version: str,
    image_size: Sequence[int],
    labels: Sequence[str] | None,
    normalization: tuple[float, float] | None = (0.0, 1.0),
    author: str | None = None,
    license: str | None = None,
) -> tuple[bytes, dict[str, bytes]]:
    """The metadata flatbuffer of an image classifier, and its associated files.

    Args:
        name: the model's name.
        description: what it does (shown by metadata viewers).
        version: the model's version string.
        image_size: `(height, width)` of the input.
        labels: class names in output order (written as `labels.txt`), or None.
        normalization: `(mean, std)` the client applies to 0-255 pixels
            (`(0, 1)`: raw pixels), or None to write none (a float model is
            then refused by MediaPipe until the app's code normalises).
        author: optional author string.
        license: optional licence string.

    Returns:
        `(metadata bytes, {file name: bytes})`.

    Example:
    >>> data, files = image_classifier_metadata(
    ...     name="pets", description="cats vs dogs", version="1",
    ...     image_size=(224, 224), labels=["cat", "dog"])
    >>> data[4:8], files
    (b'M001', {'labels.txt': b'cat\\ndog\\n'})
    """
    builder = flatbuffers.Builder(1024)
    height, width = (int(v) for v in image_size)

    # Input: an RGB image of raw pixels.
    size = _table(builder, [(0, "uint", width), (1, "uint", height)])
    image_properties = _table(builder, [(0, "byte", _RGB), (1, "offset", size)])
    content = _table(builder, [(0, "ubyte", _IMAGE_PROPERTIES), (1, "offset", image_properties)])
    process_units = None
    stats = None
    if normalization is not None:
        mean, std = (float(v) for v in normalization)
        mean_vector, std_vector = _floats(builder, [mean]), _floats(builder, [std])
        options = _table(builder, [(0, "offset", mean_vector), (1, "offset", std_vector)])
        unit = _table(builder, [(0, "ubyte", _NORMALIZATION_OPTIONS), (1, "offset", options)])
        process_units = _vector(builder, [unit])
        stats = _stats(builder, (0.0 - mean) / std, (255.0 - mean) / std)
    input_name, input_description = _strings(
        builder,
        ("image", f"RGB image, {height}x{width}, pixel values 0-255 (no resize in the model)"),
    )
    input_tensor = _table(
        builder,
        [
            (0, "offset", input_name),
            (1, "offset", input_description),
            (3, "offset", content),
            (4, "offset", process_units),
            (5, "offset", stats),
        ],
    )

    files = {}
    output_tensor = _probabilities_tensor(builder, labels, files)
    return _finish(
        builder,
        name=name,
        description=description,
        version=version,
        inputs=[input_tensor],
        outputs=[output_tensor],
        author=author,
        license=license,
        min_parser_version=MIN_PARSER_VERSION,
    ), files


def _probabilities_tensor(builder, labels, files):
    """The output tensor: class probabilities, the labels as an associated file."""
    label_files = None
    if labels:
        files[LABELS_FILE] = ("\n".join(labels) + "\n").encode("utf-8")
        label_file = _associated_file(
            builder,
            LABELS_FILE,
            "Class names, one per line, in output order.",
            TENSOR_AXIS_LABELS,
        )
        label_files = _vector(builder, [label_file])
    feature = _table(builder, [])
    output_content = _table(builder, [(0, "ubyte", _FEATURE_PROPERTIES), (1, "offset", feature)])
    output_stats = _stats(builder, 0.0, 1.0)
    output_name, output_description = _strings(
        builder, ("probabilities", "Probability of each class (softmax).")
    )
    return _table(
        builder,
        [
            (0, "offset", output_name),
            (1, "offset", output_description),
            (3, "offset", output_content),
            (5, "offset", output_stats),
            (6, "offset", label_files),
        ],
    )


def _finish(
    builder,
    *,
    name,
    description,
    version,
    inputs,
    outputs,
    author=None,
    license=None,
    input_process_units=None,
    min_parser_version=MIN_PARSER_VERSION,
) -> bytes:
    """Wraps tensors into SubGraphMetadata and ModelMetadata; returns the finished bytes."""
    inputs, outputs = _vector(builder, inputs), _vector(builder, outputs)
    units = _vector(builder, input_process_units) if input_process_units else None
    subgraph = _table(
        builder, [(2, "offset", inputs), (3, "offset", outputs), (5, "offset", units)]
    )
    subgraphs = _vector(builder, [subgraph])
    texts = _strings(builder, (name, description, version, author, license, min_parser_version))
    root = _table(
        builder,
        [
            (0, "offset", texts[0]),
            (1, "offset", texts[1]),
            (2, "offset", texts[2]),
            (3, "offset", subgraphs),
            (4, "offset", texts[3]),
            (5, "offset", texts[4]),
            (7, "offset", texts[5]),
        ],
    )
    builder.Finish(root, file_identifier=METADATA_IDENTIFIER)
    return bytes(builder.Output())


def bert_classifier_metadata(
    *,
    name: str,
    description: str,
    version: str,
    input_order: Sequence[str],
    labels: Sequence[str] | None,
    vocabulary: Sequence[str],
) -> tuple[bytes, dict[str, bytes]]:
    """Metadata of a BERT-style text classifier, as MediaPipe's `TextClassifier` reads it.

    MediaPipe tokenises on the device with a WordPiece `BertTokenizerOptions`
    process unit (the vocabulary as an associated `VOCABULARY` file) and finds
    the three int32 inputs by their metadata names `ids`, `mask` and
    `segment_ids`.

    Args:
        name: the model's name.
        description: what it does.
        version: the model's version string.
        input_order: the file's input tensors in subgraph order, each one of
            `"token_ids"`, `"padding_mask"`, `"segment_ids"`.
        labels: class names in output order, or None.
        vocabulary: the WordPiece vocabulary, one token per id.

    Returns:
        `(metadata bytes, {file name: bytes})`.

    Example:
    >>> data, files = bert_classifier_metadata(
    ...     name="topics", description="", version="1",
    ...     input_order=["padding_mask", "segment_ids", "token_ids"],
    ...     labels=["a", "b"], vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "dog"])
    >>> sorted(files), [t["name"] for t in _tensors(data)]
    (['labels.txt', 'vocab.txt'], ['mask', 'segment_ids', 'ids'])
    """
    unknown = sorted(set(input_order) - set(BERT_INPUT_NAMES))
    if unknown or len(set(input_order)) != len(BERT_INPUT_NAMES):
        raise ValueError(
            f"A BERT classifier's inputs must be {sorted(BERT_INPUT_NAMES)}. "
            f"Received: {list(input_order)}"
        )
    builder = flatbuffers.Builder(1024)
    files = {VOCABULARY_FILE: ("\n".join(vocabulary) + "\n").encode("utf-8")}
    vocab_file = _associated_file(
        builder, VOCABULARY_FILE, "WordPiece vocabulary, one token per id.", VOCABULARY
    )
    options = _table(builder, [(0, "offset", _vector(builder, [vocab_file]))])
    tokenizer = _table(builder, [(0, "ubyte", _BERT_TOKENIZER_OPTIONS), (1, "offset", options)])
    descriptions = {
        "token_ids": "WordPiece token ids: [CLS] text [SEP], then 0 padding.",
        "padding_mask": "1 for a token, 0 for padding.",
        "segment_ids": "0 for every token (one text).",
    }
    inputs = []
    for key in input_order:
        tensor_name, tensor_description = _strings(
            builder, (BERT_INPUT_NAMES[key], descriptions[key])
        )
        inputs.append(
            _table(builder, [(0, "offset", tensor_name), (1, "offset", tensor_description)])
        )
    output_tensor = _probabilities_tensor(builder, labels, files)
    data = _finish(
        builder,
        name=name,
        description=description,
        version=version,
        inputs=inputs,
        outputs=[output_tensor],
        input_process_units=[tokenizer],
        min_parser_version=BERT_MIN_PARSER_VERSION,
    )
    return data, files


def populate(flatbuffer: bytes, metadata: bytes, files: dict[str, bytes]) -> bytes:
    """The `.tflite` bytes with `metadata` as `TFLITE_METADATA` and `files` zipped at the end.

    Metadata entries of the same name and a previously appended archive are
    replaced, so populating twice gives the same file.

    Args:
        flatbuffer: the model (`.tflite` bytes).
        metadata: a metadata flatbuffer (`image_classifier_metadata`).
        files: associated files by name.

    Returns:
        The new `.tflite` bytes.

    Example:
    >>> import tensorflow as tf
    >>> spec = tf.TensorSpec([1, 4, 4, 3], tf.float32)
    >>> f = tf.function(lambda x: tf.nn.softmax(tf.reduce_mean(x, [1, 2])[:, :2]), [spec])
    >>> converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    >>> plain = converter.convert()
    >>> data, files = image_classifier_metadata(name="toy", description="", version="1",
    ...                                         image_size=(4, 4), labels=["a", "b"])
    >>> read_metadata(populate(plain, data, files))["labels"]
    ['a', 'b']
    """
    output = with_metadata_entry(flatbuffer, METADATA_NAME, metadata)
    if files:
        # Python's zipfile appends an archive to a file that is not one, as
        # TFLite Support's populator does; stored, not deflated.
        stream = io.BytesIO(output)
        stream.seek(0, io.SEEK_END)
        with zipfile.ZipFile(stream, "a", zipfile.ZIP_STORED) as archive:
            for file_name, data in files.items():
                archive.writestr(file_name, data)
        return stream.getvalue()
    return output


def with_metadata_entry(flatbuffer: bytes, name: str, payload: bytes) -> bytes:
    """The `.tflite` bytes with `payload` in a new buffer, listed as metadata `name`.

    An entry of the same name is replaced. Unpacking reads the flatbuffer
    only, so an archive appended to the file before is dropped.

    Args:
        flatbuffer: the model (`.tflite` bytes).
        name: the metadata entry's name (`TFLITE_METADATA`, ...).
        payload: the entry's bytes.

    Returns:
        The new `.tflite` bytes.

    Example:
    >>> import tensorflow as tf
    >>> spec = tf.TensorSpec([1, 2], tf.float32)
    >>> f = tf.function(lambda x: x * 2.0, [spec])
    >>> converter = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    >>> data = with_metadata_entry(converter.convert(), "note", b"hello")
    >>> metadata_entry(data, "note")
    b'hello'
    """
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(payload, dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = name
    entry.buffer = len(model.buffers) - 1
    kept = [m for m in (model.metadata or []) if _name(m.name) != name]
    model.metadata = [*kept, entry]
    builder = flatbuffers.Builder(len(flatbuffer) + len(payload) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def metadata_entry(data: bytes, name: str) -> bytes | None:
    """The bytes of a `.tflite` file's metadata entry `name`, or None.

    Args:
        data: the bytes of a `.tflite` file.
        name: the entry's name.

    Returns:
        The entry's buffer, or None when the file has no such entry.

    Example:
    >>> metadata_entry(b"", "note") is None
    True
    """
    if len(data) < 8:
        return None
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == name:
            return bytes(model.Buffers(entry.Buffer()).DataAsNumpy())
    return None


def _name(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------
# Reading.


class _Reader:
    """Reads fields of one flatbuffer table by slot (the schema's field order)."""

    def __init__(self, data: bytes, position: int):
        self._table = Table(bytearray(data) if isinstance(data, bytes) else data, position)

    def _offset(self, slot):
        return self._table.Offset(4 + 2 * slot)

    def string(self, slot):
        offset = self._offset(slot)
        return self._table.String(offset + self._table.Pos).decode("utf-8") if offset else None

    def table(self, slot):
        offset = self._offset(slot)
        if not offset:
            return None
        return _Reader(self._table.Bytes, self._table.Indirect(offset + self._table.Pos))

    def union(self, slot):
        offset = self._offset(slot)
        if not offset:
            return None
        target = Table(self._table.Bytes, 0)
        self._table.Union(target, offset)
        return _Reader(target.Bytes, target.Pos)

    def tables(self, slot):
        offset = self._offset(slot)
        if not offset:
            return []
        start, count = self._table.Vector(offset), self._table.VectorLen(offset)
        return [
            _Reader(self._table.Bytes, self._table.Indirect(start + 4 * i)) for i in range(count)
        ]

    def floats(self, slot):
        offset = self._offset(slot)
        if not offset:
            return []
        start, count = self._table.Vector(offset), self._table.VectorLen(offset)
        return [
            float(self._table.Get(number_types.Float32Flags, start + 4 * i)) for i in range(count)
        ]

    def scalar(self, slot, flags, default=0):
        offset = self._offset(slot)
        return self._table.Get(flags, offset + self._table.Pos) if offset else default


def _tensor_info(tensor: _Reader) -> dict:
    info = {"name": tensor.string(0), "description": tensor.string(1)}
    for unit in tensor.tables(4):
        if unit.scalar(0, number_types.Uint8Flags) == _NORMALIZATION_OPTIONS:
            options = unit.union(1)
            info["normalization"] = {"mean": options.floats(0), "std": options.floats(1)}
    content = tensor.table(3)
    if content is not None and content.scalar(0, number_types.Uint8Flags) == _IMAGE_PROPERTIES:
        image = content.union(1)
        size = image.table(1)
        info["color_space"] = {1: "RGB", 2: "GRAYSCALE"}.get(
            image.scalar(0, number_types.Int8Flags), "UNKNOWN"
        )
        if size is not None:
            info["image_size"] = [
                size.scalar(1, number_types.Uint32Flags),
                size.scalar(0, number_types.Uint32Flags),
            ]
    info["associated_files"] = [
        {"name": f.string(0), "type": f.scalar(2, number_types.Int8Flags)} for f in tensor.tables(6)
    ]
    return info


def _tensors(metadata: bytes) -> list[dict]:
    """The input tensors' info of a metadata flatbuffer (for checks)."""
    root = _Reader(metadata, flatbuffers.encode.Get(flatbuffers.packer.uoffset, metadata, 0))
    return [_tensor_info(t) for t in root.tables(3)[0].tables(2)]


def read_metadata(data: bytes) -> dict | None:
    """The standard metadata of a `.tflite` file's bytes, as a dict (None without any).

    Args:
        data: the bytes of a `.tflite` file.

    Returns:
        `{"name", "description", "version", "min_parser_version", "inputs",
        "outputs", "tokenizer", "files", "labels"}`: tensor entries with their
        normalisation, colour space, image size and associated files;
        `files` lists the appended archive's names; `labels` the output's
        `TENSOR_AXIS_LABELS` file, split into lines (None without one).

    Example:
    >>> read_metadata(b"")  is None
    True
    """
    payload = metadata_entry(data, METADATA_NAME)
    if payload is None:
        return None
    root = _Reader(payload, flatbuffers.encode.Get(flatbuffers.packer.uoffset, payload, 0))
    subgraph = next(iter(root.tables(3)), None)
    files = _archive(data)
    result = {
        "name": root.string(0),
        "description": root.string(1),
        "version": root.string(2),
        "min_parser_version": root.string(7),
        "inputs": [_tensor_info(t) for t in subgraph.tables(2)] if subgraph else [],
        "outputs": [_tensor_info(t) for t in subgraph.tables(3)] if subgraph else [],
        "tokenizer": _tokenizer(subgraph),
        "files": sorted(files),
        "labels": None,
    }
    for output in result["outputs"]:
        for file in output["associated_files"]:
            if file["type"] == TENSOR_AXIS_LABELS and file["name"] in files:
                result["labels"] = files[file["name"]].decode("utf-8").splitlines()
    return result


def _tokenizer(subgraph) -> dict | None:
    for unit in subgraph.tables(5) if subgraph else []:
        if unit.scalar(0, number_types.Uint8Flags) == _BERT_TOKENIZER_OPTIONS:
            files = unit.union(1).tables(0)
            return {"type": "bert", "vocab_file": files[0].string(0) if files else None}
    return None


def _archive(data: bytes) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}
