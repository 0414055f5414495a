"""Text models served from raw strings: SavedModel signatures, LiteRT on token ids, runs."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY_TEXT, run_cli, sharpen_head, tiny_text_classifier

import keras_transfer as kt
from keras_transfer import export
from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.export.parity import _LiteRunner
from keras_transfer.export.saved_model import WARMUP_FILE

LABELS = ["animal", "plant", "tool"]
SEQUENCE_LENGTH = 16
# MiniLM's vocabulary with a one-layer, 32-wide encoder: ~1 M parameters, most
# of them the 30522-token embedding.
LONG_TEXT = " ".join(["transfer learning keeps what the backbone knew"] * 20)
TEXTS = ["a small brown dog", "", "Ünïcödé café 東京", LONG_TEXT]
# Bytes that are not UTF-8: a stray 0xff 0xfe, and a 3-byte character cut short.
INVALID_UTF8 = [b"\xff\xfe ok", b"caf\xe6\x9d"]

# Loads and runs the SavedModel in a process where keras and keras_transfer
# cannot be imported, first without tensorflow-text (its ops are then missing),
# then with tensorflow-text's op libraries loaded, as TF Serving links them.
# (The `tensorflow_text` Python package itself reaches for tf.keras on import.)
_CLEAN = """
import glob, importlib.util, os, sys
sys.modules["keras"] = sys.modules["keras_transfer"] = None
import numpy as np
import tensorflow as tf

path, inputs, outputs = sys.argv[1:]
try:
    tf.saved_model.load(path)
    missing = ""
except Exception as error:
    missing = str(error)
ops = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
for library in sorted(glob.glob(os.path.join(ops, "python", "ops", "_*.so"))):
    tf.load_op_library(library)
assert "tensorflow_text" not in sys.modules

loaded = tf.saved_model.load(path)
data = np.load(inputs, allow_pickle=True)
text = loaded.signatures["serving_default"](text=tf.constant(list(data["texts"])))
tokens = loaded.signatures["serving_tokens"](
    token_ids=tf.constant(data["token_ids"]), padding_mask=tf.constant(data["padding_mask"])
)
classify = loaded.signatures["classify"](inputs=tf.constant(list(data["examples"])))
np.savez(
    outputs,
    missing=np.array(missing),
    probabilities=text["probabilities"].numpy(),
    classes=text["classes"].numpy(),
    scores=text["scores"].numpy(),
    token_probabilities=tokens["probabilities"].numpy(),
    classify_classes=classify["classes"].numpy(),
    classify_scores=classify["scores"].numpy(),
)
"""


def tokenize(preprocessor, texts):
    """Token dicts as training sees them (`tf.data` runs the preprocessor's TF graph)."""
    features = tf.function(preprocessor)(tf.constant(texts))
    return {key: value.numpy() for key, value in features.items()}


def keras_probabilities(model, texts):
    return model.predict(tokenize(model.preprocessor, texts), verbose=0)


def graph_ops(saved_model_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    graph = proto.meta_graphs[0].graph_def
    return {n.op for n in graph.node} | {n.op for f in graph.library.function for n in f.node_def}


def tf_example(text):
    feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[text.encode()]))
    example = tf.train.Example(features=tf.train.Features(feature={"text": feature}))
    return example.SerializeToString()


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    model = tiny_text_classifier(len(LABELS), SEQUENCE_LENGTH)
    return sharpen_head(model)  # non-trivial outputs


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """SavedModel (with warm-up texts) and a float LiteRT file, from one `export_model` call."""
    features = tokenize(model.preprocessor, TEXTS)
    root = tmp_path_factory.mktemp("export")
    result = export.export_model(
        model,
        str(root / "glosses"),
        labels=LABELS,
        evaluation_data=(features, np.arange(len(TEXTS)) % len(LABELS)),
        verbose=False,
    )
    warm = export.saved_model(
        model, str(root / "warm"), warmup_data=["a small brown dog", b"caf\xc3\xa9"]
    )
    return result["saved_model"], result["tflite"][0], warm


def test_tiny_config_reaches_the_backbone(model):
    assert [b.name for b in kt.backbone_blocks(model)] == ["stem", "layer0"]
    assert model.get_layer("backbone").output.shape[-1] == TINY_TEXT["hidden_dim"]
    assert model.preprocessor.tokenizer.vocabulary_size() == 30522
    # The long text is cut to the sequence length, ending with [SEP].
    long_ids = tokenize(model.preprocessor, [LONG_TEXT])["token_ids"][0]
    assert long_ids[-1] == model.preprocessor.tokenizer.end_token_id and 0 not in long_ids


def test_signatures_take_strings_and_int32_tokens(exported):
    path = exported[0]
    loaded = tf.saved_model.load(path)
    assert sorted(loaded.signatures) == ["classify", "serving_default", "serving_tokens"]
    text_inputs = loaded.signatures["serving_default"].structured_input_signature[1]
    assert list(text_inputs) == ["text"]
    assert text_inputs["text"].dtype == tf.string and text_inputs["text"].shape.as_list() == [None]
    token_inputs = loaded.signatures["serving_tokens"].structured_input_signature[1]
    assert sorted(token_inputs) == ["padding_mask", "token_ids"]
    assert {spec.dtype for spec in token_inputs.values()} == {tf.int32}
    assert sorted(loaded.signatures["serving_default"].structured_outputs) == [
        "classes",
        "probabilities",
        "scores",
    ]


def test_graph_holds_no_round_robin_trim(exported):
    ops = graph_ops(exported[0])
    assert {"FastWordpieceTokenizeWithOffsets", "RegexSplitWithOffsets"} <= ops
    assert "UnicodeTranscode" in ops  # invalid UTF-8 becomes U+FFFD before the tokeniser
    # The stock TF Serving binary lacks TFText>RoundRobinTrim (tensorflow/serving#4057).
    assert not any("RoundRobinTrim" in op or op.startswith("TFText>") for op in ops), sorted(ops)


def test_round_robin_preprocessor_is_refused(model, tmp_path):
    import keras_hub

    from keras_transfer.backbones.kerashub import check_preset

    round_robin = keras_hub.models.TextClassifierPreprocessor.from_preset(
        check_preset("minilm"), sequence_length=SEQUENCE_LENGTH
    )
    # The op test_graph_holds_no_round_robin_trim looks for is really what it makes.
    traced = tf.function(round_robin).get_concrete_function(tf.TensorSpec([None], tf.string))
    graph = traced.graph.as_graph_def()
    assert "TFText>RoundRobinTrim" in {n.op for f in graph.library.function for n in f.node_def} | {
        n.op for n in graph.node
    }
    with pytest.raises(ValueError, match="Received: truncate='round_robin'"):
        export.saved_model(model, str(tmp_path / "m"), preprocessor=round_robin)
    assert not (tmp_path / "m").exists()


def test_raw_strings_match_keras_in_clean_process(model, exported, tmp_path):
    """TF + tensorflow-text only (no keras): strings, tokens and classify match the model."""
    path = exported[0]
    features = tokenize(model.preprocessor, TEXTS)
    np.savez(
        tmp_path / "inputs.npz",
        texts=np.array([t.encode() for t in TEXTS] + INVALID_UTF8, dtype=object),
        token_ids=features["token_ids"],
        padding_mask=features["padding_mask"].astype("int32"),
        examples=np.array([tf_example(t) for t in TEXTS], dtype=object),
    )
    result = subprocess.run(
        [sys.executable, "-c", _CLEAN, path, tmp_path / "inputs.npz", tmp_path / "out.npz"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "out.npz", allow_pickle=True)  # string outputs: object arrays
    assert "not registered" in str(out["missing"])  # tensorflow-text's ops are needed

    # Invalid bytes give the model's answer for the text with U+FFFD in their place.
    replaced = [data.decode("utf-8", errors="replace") for data in INVALID_UTF8]
    assert all("\ufffd" in text for text in replaced)
    expected = keras_probabilities(model, TEXTS + replaced)
    assert np.abs(out["probabilities"] - expected).max() <= 1e-5
    assert np.abs(out["token_probabilities"] - expected[: len(TEXTS)]).max() <= 1e-5
    assert np.abs(out["classify_scores"] - expected[: len(TEXTS)]).max() <= 1e-5
    assert out["classify_classes"].astype(str).tolist() == [LABELS] * len(TEXTS)
    top = np.argsort(-expected, axis=1)
    assert out["classes"].astype(str).tolist() == np.array(LABELS)[top].tolist()
    np.testing.assert_allclose(out["scores"], np.take_along_axis(expected, top, 1), atol=1e-5)


def test_litert_takes_token_ids(model, exported):
    report = exported[1]
    assert report.num_examples == len(TEXTS) and report.top1_agreement == 1.0
    assert report.max_abs_diff <= 1e-5
    details = _LiteRunner(report.path).runner.get_input_details()
    assert sorted(details) == ["padding_mask", "segment_ids", "token_ids"]
    for spec in details.values():
        assert spec["dtype"] == np.int32 and list(spec["shape"]) == [1, SEQUENCE_LENGTH]
    assert export.read_tflite_labels(report.path) == LABELS


def test_warmup_texts(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    records = list(tf.data.TFRecordDataset(os.path.join(exported[2], WARMUP_FILE)))
    assert len(records) == 2
    request = prediction_log_pb2.PredictionLog.FromString(records[1].numpy()).predict_log.request
    assert request.model_spec.signature_name == "serving_default"
    assert tf.make_ndarray(request.inputs["text"]).tolist() == [b"caf\xc3\xa9"]


def test_token_model_without_preprocessor(model, tmp_path):
    bare = keras.Model(model.input, model.output)  # as loaded from a .keras file
    path = export.saved_model(bare, str(tmp_path / "bare"), labels=LABELS)
    loaded = tf.saved_model.load(path)
    assert sorted(loaded.signatures) == ["serving_default", "serving_tokens"]
    default = loaded.signatures["serving_default"]
    assert sorted(default.structured_input_signature[1]) == [
        "padding_mask",
        "segment_ids",
        "token_ids",
    ]
    features = tokenize(model.preprocessor, TEXTS[:2])
    out = loaded.signatures["serving_tokens"](
        token_ids=tf.constant(features["token_ids"]),
        padding_mask=tf.constant(features["padding_mask"], tf.int32),
    )
    expected = model.predict(features, verbose=0)
    assert np.abs(out["probabilities"].numpy() - expected).max() <= 1e-5
    with pytest.raises(ValueError, match="fixed number of tokens"):
        export.tflite(bare, str(tmp_path / "bare.tflite"), verbose=False)
    with pytest.raises(ValueError, match="`warmup_data` is for image models"):
        export.saved_model(bare, str(tmp_path / "bare"), warmup_data=["a text"])


def test_cli_export_of_a_text_run_serves_strings(model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model.save(run_dir / "model.keras")
    (run_dir / "labels.txt").write_text("".join(f"{label}\n" for label in LABELS))
    config = {
        "task": "text",
        "backbone": "minilm",
        "sequence_length": SEQUENCE_LENGTH,
        "data": "wordnet_nouns",
        "max_per_class": 4,
    }
    (run_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "saved_models" / "glosses"
    result = run_cli("export", f"--model={run_dir}", f"--output={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    # LiteRT parity on the run's own held-out texts (batches of token dicts).
    (report,) = json.loads((out / "litert" / "parity.json").read_text())
    assert report["num_examples"] > 0 and report["max_abs_diff"] <= 1e-5
    served = tf.saved_model.load(str(out / "1")).signatures["serving_default"]
    out_text = served(text=tf.constant(TEXTS[:1]))
    np.testing.assert_allclose(
        out_text["probabilities"], keras_probabilities(model, TEXTS[:1]), atol=1e-5, rtol=0
    )
    assert out_text["classes"].shape == (1, len(LABELS))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda m, p: export.saved_model(m, p, preprocessor="bert"),
            TypeError,
            "must be a keras_hub.models.TextClassifierPreprocessor.*Received: preprocessor of "
            "type str",
        ),
        (
            lambda m, p: export.tflite(m, f"{p}.tflite", "int8", representative_data=[1]),
            ValueError,
            "'int8' \\(full-integer\\) is for image models",
        ),
        (
            lambda m, p: export.export_model(m, p, quantizations=["none", "int8"]),
            ValueError,
            "is for image models",
        ),
        (
            lambda m, p: export.tflite(m, f"{p}.tflite", evaluation_data=np.zeros((2, 16))),
            ValueError,
            "must hold a dict with \\['token_ids', 'padding_mask'\\]",
        ),
        (
            lambda m, p: export.tflite(
                m,
                f"{p}.tflite",
                evaluation_data={"token_ids": [[1] * 8], "padding_mask": [[1] * 8]},
            ),
            ValueError,
            "tokens must be `\\[n, 16\\]`",
        ),
        (
            lambda m, p: export.saved_model(m, p, warmup_data="one text"),
            TypeError,
            "must be a list of texts",
        ),
    ],
    ids=[
        "preprocessor_type",
        "int8",
        "int8_in_export_model",
        "images_for_text",
        "wrong_length",
        "warmup_string",
    ],
)
def test_bad_arguments(model, tmp_path, call, error, message):
    with pytest.raises(error, match=message):
        call(model, str(tmp_path / "m"))
    assert os.listdir(tmp_path) == []


def test_preprocessor_needs_a_token_model(tmp_path):
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    image_model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    with pytest.raises(ValueError, match="needs a model taking a dict of 'token_ids'"):
        export.saved_model(
            image_model, str(tmp_path / "m"), preprocessor=text_preprocessor("minilm", 8)
        )
