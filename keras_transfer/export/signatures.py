"""Serving signatures with meaningful names, shared by SavedModel and LiteRT.

A Keras model exported as is gets signature keys such as `keras_tensor_176`
and `output_0` (keras-team/keras#19458, tensorflow/tensorflow#48157). Here
every endpoint is a `tf.function` whose inputs and outputs are named. Every
signature returns `probabilities` and, with labels, `classes` (top-k label
strings) and `scores` (their probabilities). A model with several named
outputs (`techniques.build_multitask_model`) returns them for each:
`<task>_probabilities` and, with `labels={task: [names]}`, `<task>_classes`
and `<task>_scores` (each task's labels an asset `<task>_labels.txt`); it
gets no `classify` signature (TF Serving's Classify API has one head).

Image models (one `[batch, h, w, 3]` input):

- `serving_default`: `image`, float32 `[batch, h, w, 3]`, raw pixels 0..255;
- `serving_bytes`: `image_bytes`, `tf.string [batch]` of encoded JPEG / PNG /
  GIF / BMP, decoded and resized in the graph by `data.decode_image_bytes`;
- with labels, `classify`: TF Serving's classification signature, input
  `inputs` (serialized `tf.Example`s with a bytes feature `image_bytes`),
  outputs `classes` and `scores` for every class.

Text models (a dict of `token_ids`, `padding_mask` and maybe `segment_ids`,
as `build_text_classifier` makes) with a KerasHub `TextClassifierPreprocessor`:

- `serving_default`: `text`, `tf.string [batch]`, tokenised in the graph.
  Bytes that are not valid UTF-8 are first replaced by U+FFFD, so such a
  request gets the answer the model gives for the text with replacement
  characters, not an error;
- `serving_tokens`: `token_ids` and `padding_mask`, int32 `[batch, tokens]`
  (mask 1 for a token, 0 for padding: plain integers in JSON), with
  `segment_ids` zeros inside;
- with labels, `classify` as for images, with a bytes feature `text`.

A text model exported without a preprocessor keeps a `serving_default` keyed
by its own inputs (all int32 for KerasHub backbones) and gets
`serving_tokens` too. Other models get a `serving_default` keyed by the
model's own input and output names.

The tokeniser runs tensorflow-text ops (`RegexSplitWithOffsets`,
`FastWordpieceTokenizeWithOffsets`, `CaseFoldUTF8`), so the server must
register them (`import tensorflow_text` in Python). TF Serving's stock
`tensorflow_model_server` links tensorflow-text's op library, but an older
release (2.12.1 when tensorflow/serving#4057 was filed) that lacks newer ops
such as `TFText>RoundRobinTrim`, which KerasHub's default "round_robin"
truncation puts in the graph. Texts are therefore cut by the "waterfall"
trimmer (`backbones.kerashub.TRUNCATE`, plain TensorFlow ops; the same
tokens for one segment), and a preprocessor that truncates otherwise is
refused. LiteRT files (`conversion_archive`) take token ids only: the TFLite
builtin op set has no WordPiece tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import keras
import tensorflow as tf

from keras_transfer.backbones.kerashub import TRUNCATE
from keras_transfer.data.images import decode_image_bytes

if TYPE_CHECKING:
    import keras_hub

SERVING_DEFAULT = "serving_default"
SERVING_BYTES = "serving_bytes"
SERVING_TOKENS = "serving_tokens"
# TF Serving's Classify API needs this method name, input key and output keys.
CLASSIFY = "classify"
CLASSIFY_METHOD = "tensorflow/serving/classify"
CLASSIFY_INPUT = "inputs"
IMAGE_INPUT = "image"
BYTES_INPUT = "image_bytes"
TEXT_INPUT = "text"
# The input names of KerasHub text backbones (and their preprocessors' outputs).
TOKEN_IDS = "token_ids"
PADDING_MASK = "padding_mask"
SEGMENT_IDS = "segment_ids"
PROBABILITIES = "probabilities"
CLASSES = "classes"
SCORES = "scores"
LABELS_ASSET = "labels.txt"
# Top-k labels returned by `classes` / `scores` (TF Serving's classify API
# returns every class; 5 is the usual "top-5" of ImageNet-style reports).
DEFAULT_TOP_K = 5
# U+FFFD REPLACEMENT CHARACTER: what invalid UTF-8 bytes become before tokenising
# (the Unicode standard's recommended substitute).
REPLACEMENT_CHARACTER = 0xFFFD


def is_image_model(model: keras.Model) -> bool:
    """True when `model` takes one `[batch, h, w, 3]` image tensor."""
    shapes = model.input_shape
    return (
        not isinstance(shapes, list)
        and len(shapes) == 4
        and shapes[-1] == 3
        and None not in shapes[1:3]
    )


def validate_labels(
    model: keras.Model, labels: Sequence[str] | Mapping[str, Sequence[str]] | None
) -> list[str] | dict[str, list[str]] | None:
    """Checks `labels` against the model's output width; returns them as a list.

    A model with several named outputs takes a dict `{output name: labels}`
    (outputs without labels are left out) and gets a dict of lists back.
    """
    if labels is None:
        return None
    if has_several_outputs(model):
        return _labels_by_output(model, labels)
    return _label_list(labels, model.output_shape)


def _label_list(labels, outputs):
    """`labels` as a list of strings, one per class of an output of shape `outputs`."""
    if isinstance(labels, str):
        raise TypeError(f"`labels` must be a sequence of class names. Received: labels={labels!r}")
    labels = [str(label) for label in labels]
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


def has_several_outputs(model: keras.Model) -> bool:
    """True when `model`'s outputs are a dict or list (named heads), not one tensor."""
    return isinstance(model.output_shape, (list, dict))


def _labels_by_output(model, labels):
    names = list(model.output_names)
    if not isinstance(labels, Mapping):
        raise TypeError(
            f"A model with several outputs {names} takes `labels` as a dict "
            f"{{output name: [class names]}}. Received: {type(labels).__name__}"
        )
    unknown = sorted(set(labels) - set(names))
    if unknown:
        raise ValueError(f"`labels` keys must be output names {names}. Received: {unknown}")
    shapes = dict(zip(names, model.output_shape, strict=True))
    result = {}
    for name, head_labels in labels.items():
        try:
            result[name] = _label_list(head_labels, shapes[name])
        except (TypeError, ValueError) as error:
            raise type(error)(f"labels[{name!r}]: {error}") from None
    return result


def image_size(model: keras.Model) -> tuple[int, int]:
    """`(height, width)` of an image model's input."""
    return tuple(int(d) for d in model.input_shape[1:3])


def is_token_model(model: keras.Model) -> bool:
    """True when `model` takes a dict of `token_ids`, `padding_mask` (and maybe `segment_ids`).

    Example:

    >>> import keras
    >>> inputs = {k: keras.Input((None,), dtype="int32", name=k) for k in (TOKEN_IDS, PADDING_MASK)}
    >>> x = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(10, 4)(inputs[TOKEN_IDS]))
    >>> is_token_model(keras.Model(inputs, keras.layers.Dense(2)(x)))
    True
    """
    try:
        inputs = model.input
    except (AttributeError, ValueError):  # a subclassed model has no symbolic input
        return False
    names = set(inputs) if isinstance(inputs, dict) else set()
    return {TOKEN_IDS, PADDING_MASK} <= names <= {TOKEN_IDS, PADDING_MASK, SEGMENT_IDS}


def serving_preprocessor(
    model: keras.Model, preprocessor: keras_hub.models.TextClassifierPreprocessor | None = None
) -> keras_hub.models.TextClassifierPreprocessor | None:
    """The KerasHub text preprocessor a text model is served with, or None.

    Args:
        model: the model to export.
        preprocessor: a `keras_hub.models.TextClassifierPreprocessor`, or None
            for `model.preprocessor` when the model has one of that type
            (`build_text_classifier` attaches it; a `.keras` file loses it).

    Returns:
        The preprocessor, or None when there is none to use.

    Raises:
        TypeError: `preprocessor` is not a `TextClassifierPreprocessor`.
        ValueError: the model does not take `token_ids` and `padding_mask`,
            or the preprocessor truncates "round_robin" (see the module
            docstring).

    Example:

    >>> import keras_transfer as kt
    >>> model = kt.build_text_classifier("minilm", 2, weights=None,
    ...                                  sequence_length=16, num_layers=1)
    >>> serving_preprocessor(model).sequence_length
    16
    >>> serving_preprocessor(model, "bert")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: `preprocessor` must be a keras_hub.models.TextClassifierPreprocessor, ...
    """
    import keras_hub

    expected = keras_hub.models.TextClassifierPreprocessor
    if preprocessor is None:
        preprocessor = getattr(model, "preprocessor", None)
        if not isinstance(preprocessor, expected):  # none, or e.g. an image task's own
            return None
    elif not isinstance(preprocessor, expected):
        raise TypeError(
            "`preprocessor` must be a keras_hub.models.TextClassifierPreprocessor, e.g. "
            "keras_transfer.backbones.kerashub.text_preprocessor(preset, sequence_length). "
            f"Received: preprocessor of type {type(preprocessor).__name__}"
        )
    if not is_token_model(model):
        raise ValueError(
            f"A text preprocessor needs a model taking a dict of {TOKEN_IDS!r} and "
            f"{PADDING_MASK!r} (and maybe {SEGMENT_IDS!r}). Received: input_shape="
            f"{model.input_shape}"
        )
    if preprocessor.truncate != TRUNCATE:
        raise ValueError(
            f"The preprocessor must truncate {TRUNCATE!r}: other modes add tensorflow-text ops "
            "that TF Serving's stock server does not register (RoundRobinTrim, "
            "tensorflow/serving#4057). Build it with keras_transfer.backbones.kerashub."
            f"text_preprocessor. Received: truncate={preprocessor.truncate!r}"
        )
    return preprocessor


def _head_outputs(archive, labels=None, labels_file=None, top_k=DEFAULT_TOP_K, prefix=""):
    """A function from one head's output to its named, float32 signature outputs."""
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

    def head_outputs(output):
        probabilities = tf.cast(output, tf.float32)
        result = {prefix + PROBABILITIES: probabilities}
        if table is not None:
            scores, indices = tf.math.top_k(probabilities, k=k)
            result[prefix + CLASSES] = table.lookup(tf.cast(indices, tf.int64))
            result[prefix + SCORES] = scores
        return result

    return head_outputs


def _named_outputs(model, archive, labels=None, labels_file=None, top_k=DEFAULT_TOP_K):
    """A function from the model's outputs to the named, float32 outputs of a signature.

    Several outputs (a dict or list) are named `<output>_probabilities`,
    `<output>_classes`, `<output>_scores`; `labels` and `labels_file` are
    then dicts by output name.
    """
    if not has_several_outputs(model):
        return _head_outputs(archive, labels, labels_file, top_k)
    labels, labels_file = labels or {}, labels_file or {}
    heads = {
        name: _head_outputs(
            archive, labels.get(name), labels_file.get(name), top_k, prefix=f"{name}_"
        )
        for name in model.output_names
    }

    def named_outputs(outputs):
        if isinstance(outputs, (list, tuple)):
            outputs = dict(zip(model.output_names, outputs, strict=True))
        result = {}
        for name, value in outputs.items():
            result.update(heads[name](value))
        return result

    return named_outputs


def _image_endpoint(model, named_outputs):
    """`serve_image(image)` and its input signature."""
    height, width = image_size(model)
    input_dtype = model.inputs[0].dtype

    def serve_image(image):
        return named_outputs(model(tf.cast(image, input_dtype), training=False))

    return serve_image, [tf.TensorSpec([None, height, width, 3], tf.float32, name=IMAGE_INPUT)]


def _run_tokens(model, named_outputs):
    """Runs a token model on a feature dict; `segment_ids` default to zeros (one segment)."""
    specs = model.input

    def run(features):
        if SEGMENT_IDS in specs and SEGMENT_IDS not in features:
            features = {**features, SEGMENT_IDS: tf.zeros_like(features[TOKEN_IDS])}
        features = {key: tf.cast(features[key], spec.dtype) for key, spec in specs.items()}
        return named_outputs(model(features, training=False))

    return run


def _token_endpoint(model, named_outputs, sequence_length=None, segments=False):
    """`serve_tokens(token_ids, padding_mask[, segment_ids])` (int32) and its input signature.

    `segments=True` (LiteRT files) takes `segment_ids` too: the three inputs
    of a BERT classifier that MediaPipe's `TextClassifier` feeds.
    """
    run = _run_tokens(model, named_outputs)
    length = sequence_length or model.input[TOKEN_IDS].shape[1]
    names = (TOKEN_IDS, PADDING_MASK, SEGMENT_IDS) if segments else (TOKEN_IDS, PADDING_MASK)

    def serve_tokens(token_ids, padding_mask):
        return run({TOKEN_IDS: token_ids, PADDING_MASK: padding_mask})

    def serve_segments(token_ids, padding_mask, segment_ids):
        return run({TOKEN_IDS: token_ids, PADDING_MASK: padding_mask, SEGMENT_IDS: segment_ids})

    specs = [tf.TensorSpec([None, length], tf.int32, name=name) for name in names]
    return (serve_segments if segments else serve_tokens), specs


def _add_classify(archive, labels, feature, serve):
    """TF Serving's `classify`: `tf.Example`s whose bytes feature `feature` goes to `serve`."""
    label_tensor = tf.constant(labels)

    def classify(inputs):
        features = tf.io.parse_example(inputs, {feature: tf.io.FixedLenFeature([], tf.string)})
        probabilities = serve(features[feature])[PROBABILITIES]
        batch = tf.shape(probabilities)[0]
        return {CLASSES: tf.tile(label_tensor[None], [batch, 1]), SCORES: probabilities}

    archive.add_endpoint(
        CLASSIFY, classify, [tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT)]
    )


def serving_archive(
    model: keras.Model,
    labels: list[str] | dict[str, list[str]] | None = None,
    labels_file: str | dict[str, str] | None = None,
    top_k: int = DEFAULT_TOP_K,
    preprocessor: keras_hub.models.TextClassifierPreprocessor | None = None,
) -> keras.export.ExportArchive:
    """An `ExportArchive` holding the model's named serving signatures.

    The model always runs with `training=False` (augmentation and dropout off,
    BatchNorm on its moving statistics) and its outputs are cast to float32,
    so mixed-precision models export with float32 inputs and outputs.

    Args:
        model: a built Keras model.
        labels: class names (validated), or None; for a model with several
            outputs, a dict of them by output name.
        labels_file: path of a file holding `labels`, one per line; it becomes
            a SavedModel asset read by a lookup table in the graph (a dict
            of paths by output name, as `staging_labels` returns).
        top_k: how many `classes` / `scores` per example.
        preprocessor: for a text model, the preprocessor returned by
            `serving_preprocessor`: `serving_default` then takes strings.

    Returns:
        The archive; `write_out(path)` saves it.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    named_outputs = _named_outputs(model, archive, labels, labels_file, top_k)
    if is_image_model(model):
        serve_image, image_spec = _image_endpoint(model, named_outputs)
        height, width = image_size(model)
        archive.add_endpoint(SERVING_DEFAULT, serve_image, image_spec)

        def serve_bytes(image_bytes):
            images = tf.map_fn(
                lambda data: decode_image_bytes(data, (height, width)),
                image_bytes,
                fn_output_signature=tf.TensorSpec([height, width, 3], tf.float32),
            )
            return serve_image(images)

        archive.add_endpoint(
            SERVING_BYTES, serve_bytes, [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)]
        )
        if labels and not isinstance(labels, dict):
            _add_classify(archive, labels, BYTES_INPUT, serve_bytes)
        return archive

    if preprocessor is not None:
        if not preprocessor.built:  # KerasHub makes the packer in `build`
            preprocessor.build(None)
        archive.track(preprocessor)
        run = _run_tokens(model, named_outputs)

        def serve_text(text):
            text = tf.strings.unicode_transcode(
                text, "UTF-8", "UTF-8", errors="replace", replacement_char=REPLACEMENT_CHARACTER
            )
            return run(preprocessor(text))

        archive.add_endpoint(
            SERVING_DEFAULT, serve_text, [tf.TensorSpec([None], tf.string, name=TEXT_INPUT)]
        )
        if labels and not isinstance(labels, dict):
            _add_classify(archive, labels, TEXT_INPUT, serve_text)
    else:
        specs = {
            tensor.name: tf.TensorSpec(tensor.shape, tensor.dtype, name=tensor.name)
            for tensor in model.inputs
        }

        def serve_inputs(inputs):
            return named_outputs(model(inputs, training=False))

        archive.add_endpoint(SERVING_DEFAULT, serve_inputs, [specs])
    if is_token_model(model):
        archive.add_endpoint(SERVING_TOKENS, *_token_endpoint(model, named_outputs))
    return archive


def conversion_archive(
    model: keras.Model, sequence_length: int | None = None
) -> keras.export.ExportArchive:
    """An `ExportArchive` with one numeric `serving_default`, for LiteRT conversion.

    Image models take `image` as in `serving_archive`; text models take
    `token_ids`, `padding_mask` and `segment_ids` (int32 `[batch,
    sequence_length]`; the three inputs MediaPipe's BERT `TextClassifier`
    feeds): strings cannot go into a LiteRT file.

    Args:
        model: a built Keras image or text model.
        sequence_length: tokens per text (text models; None keeps the
            model's own input length).

    Returns:
        The archive; `write_out(path)` saves it.

    Raises:
        ValueError: the model takes neither one image nor tokens.

    Example:

    >>> import tempfile, keras, tensorflow as tf
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.GlobalAveragePooling2D()(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    >>> folder = f"{tempfile.mkdtemp()}/source"
    >>> conversion_archive(model).write_out(folder, verbose=False)
    >>> list(tf.saved_model.load(folder).signatures)
    ['serving_default']
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    named_outputs = _named_outputs(model, archive)
    if is_image_model(model):
        archive.add_endpoint(SERVING_DEFAULT, *_image_endpoint(model, named_outputs))
    elif is_token_model(model):
        endpoint = _token_endpoint(model, named_outputs, sequence_length, segments=True)
        archive.add_endpoint(SERVING_DEFAULT, *endpoint)
    else:
        raise ValueError(
            "LiteRT export takes models with one `[batch, h, w, 3]` image input or a dict of "
            f"{TOKEN_IDS!r} and {PADDING_MASK!r}. Received: input_shape={model.input_shape}"
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


def staging_labels(
    labels: list[str] | dict[str, list[str]] | None, directory: str
) -> str | dict[str, str] | None:
    """Writes `labels` into `directory` for use as an asset (None without labels).

    Labels by output name go to `<output>_labels.txt` each; a dict of paths
    comes back.
    """
    if not labels:
        return None
    if isinstance(labels, dict):
        return {
            name: write_labels(names, os.path.join(directory, f"{name}_{LABELS_ASSET}"))
            for name, names in labels.items()
        }
    return write_labels(labels, os.path.join(directory, LABELS_ASSET))
