"""LiteRT files load in MediaPipe Tasks' ImageClassifier as they are, and agree with LiteRT.

MediaPipe Tasks (the `mobile` extra) is the client a phone app uses; it reads
the standard TFLite metadata that `kt.export.tflite` writes.
"""

import warnings

import keras

# MediaPipe Tasks comes with the `mobile` extra (scripts/setup.sh installs it).
import mediapipe as mp
import numpy as np
import pytest
from conftest import tiny_text_classifier
from mediapipe.tasks.metadata import metadata_schema_py_generated as mp_schema
from mediapipe.tasks.python import vision
from mediapipe.tasks.python.core.base_options import BaseOptions

import keras_transfer as kt
from keras_transfer import export
from keras_transfer.export import metadata

SIZE = 64
SAMPLES = 100
# (quantization, io_type) of every file MediaPipe must load unchanged.
LOADABLE = [
    ("none", "float32"),
    ("dynamic", "float32"),
    ("float16", "float32"),
    ("int8", "float32"),
    ("int8", "uint8"),
]


def _classifier(path):
    options = vision.ImageClassifierOptions(
        base_options=BaseOptions(model_asset_path=str(path)), max_results=1
    )
    return vision.ImageClassifier.create_from_options(options)


@pytest.fixture(scope="module")
def lite0_head():
    """EfficientNet-Lite0 (ImageNet weights) with a head fine-tuned on Fashion-MNIST."""
    keras.utils.set_random_seed(0)
    splits = kt.data.load_dataset(
        "fashion_mnist",
        image_size=(SIZE, SIZE),
        batch_size=32,
        max_per_class=20,
        max_test_per_class=10,
    )
    model = kt.build_image_classifier(
        "efficientnet_lite0", splits.num_classes, input_shape=(SIZE, SIZE, 3)
    )
    kt.fine_tune(model, splits.train, recipe="feature_extraction", epochs=2, verbose=0)
    # Held-out images already at the model's size, as whole pixel values.
    images = np.concatenate([x.numpy() for x, _ in splits.test])[:SAMPLES]
    images = np.clip(np.round(images), 0, 255).astype("uint8")
    calibration = np.concatenate([x.numpy() for x, _ in splits.train.take(4)])
    return model, splits.class_names, images, calibration


def _litert_top1(path, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path))
    runner = interpreter.get_signature_runner()
    detail = interpreter.get_input_details()[0]
    results = []
    for image in images:
        x = image[None].astype("float32")
        if detail["dtype"] != np.float32:
            scale, zero_point = detail["quantization"]
            x = np.round(x / scale + zero_point).clip(0, 255).astype(detail["dtype"])
        results.append(int(np.argmax(next(iter(runner(image=x).values())))))
    return np.array(results)


@pytest.mark.slow
@pytest.mark.parametrize("quantization,io_type", LOADABLE)
def test_mediapipe_loads_the_file_and_agrees_with_litert(
    lite0_head, quantization, io_type, tmp_path
):
    model, labels, images, calibration = lite0_head
    path = tmp_path / f"{quantization}_{io_type}.tflite"
    export.tflite(
        model,
        str(path),
        quantization,
        representative_data=calibration,
        labels=labels,
        io_type=io_type,
        verbose=False,
    )
    if io_type == "uint8":
        # MediaPipe feeds raw uint8 pixels: the input's quantisation must be the identity.
        from ai_edge_litert.interpreter import Interpreter

        detail = Interpreter(model_path=str(path)).get_input_details()[0]
        assert detail["quantization"] == (1.0, 0)
    classifier = _classifier(path)  # unchanged file: no error
    names, indices = [], []
    for image in images:
        result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
        top = result.classifications[0].categories[0]
        names.append(top.category_name)
        indices.append(top.index)
    litert = _litert_top1(path, images)
    agreement = float(np.mean(np.array(indices) == litert))
    print(f"{quantization}/{io_type}: MediaPipe == LiteRT top-1 on {agreement:.0%}")
    assert agreement >= 0.99, (quantization, io_type, agreement)
    assert all(name == labels[index] for name, index in zip(names, indices, strict=True))
    assert len(set(names)) > 3  # a trained model, not one answer for everything


@pytest.mark.slow
def test_int8_io_file_is_for_other_runtimes(lite0_head, tmp_path):
    """MediaPipe takes uint8 or float32 input tensors only: the int8-I/O file is refused."""
    model, labels, _, calibration = lite0_head
    path = tmp_path / "int8_int8.tflite"
    export.tflite(
        model,
        str(path),
        "int8",
        representative_data=calibration,
        labels=labels,
        io_type="int8",
        verbose=False,
    )
    assert metadata.read_metadata(path.read_bytes())["labels"] == labels
    with pytest.raises(Exception, match="uint8/float32, got INT8"):
        _classifier(path)


def _tiny(name="tiny"):
    return kt.build_image_classifier(
        "mobilenet_v3_small", 3, weights=None, input_shape=(32, 32, 3), alpha=0.75, name=name
    )


def test_metadata_reads_back_with_our_reader_and_mediapipe_schema(tmp_path):
    path = tmp_path / "tiny.tflite"
    export.tflite(
        _tiny("pets"), str(path), labels=["cat", "dog", "fox"], metadata_version="7", verbose=False
    )
    data = path.read_bytes()
    info = metadata.read_metadata(data)
    assert (info["name"], info["version"], info["labels"]) == ("pets", "7", ["cat", "dog", "fox"])
    assert info["inputs"][0]["normalization"] == {"mean": [0.0], "std": [1.0]}
    assert info["inputs"][0]["color_space"] == "RGB" and info["inputs"][0]["image_size"] == [32, 32]
    assert export.read_tflite_labels(str(path)) == ["cat", "dog", "fox"]

    # The same bytes through MediaPipe's generated schema (an independent reader).
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(data, 0)
    entry = next(
        model.Metadata(i)
        for i in range(model.MetadataLength())
        if model.Metadata(i).Name() == b"TFLITE_METADATA"
    )
    payload = bytes(model.Buffers(entry.Buffer()).DataAsNumpy())
    assert mp_schema.ModelMetadata.ModelMetadataBufferHasIdentifier(payload, 0)
    root = mp_schema.ModelMetadata.GetRootAs(payload, 0)
    tensor = root.SubgraphMetadata(0).InputTensorMetadata(0)
    unit = tensor.ProcessUnits(0)
    assert unit.OptionsType() == mp_schema.ProcessUnitOptions.NormalizationOptions
    options = mp_schema.NormalizationOptions()
    options.Init(unit.Options().Bytes, unit.Options().Pos)
    assert (options.MeanAsNumpy().tolist(), options.StdAsNumpy().tolist()) == ([0.0], [1.0])
    label_file = root.SubgraphMetadata(0).OutputTensorMetadata(0).AssociatedFiles(0)
    assert label_file.Type() == mp_schema.AssociatedFileType.TENSOR_AXIS_LABELS
    assert root.MinParserVersion() == b"1.0.0"

    # Populating again replaces the entry and the archive: same labels, one entry.
    again = metadata.populate(
        data,
        *metadata.image_classifier_metadata(
            name="pets", description="", version="8", image_size=(32, 32), labels=["a", "b", "c"]
        ),
    )
    assert metadata.read_metadata(again)["labels"] == ["a", "b", "c"]
    assert metadata.read_metadata(again)["version"] == "8"


def test_unknown_input_range_gets_no_normalization_and_a_note(tmp_path):
    inputs = keras.Input((16, 16, 3), name="scaled_pixels")  # not our raw-pixel "image"
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    plain = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x), name="mine")
    path = tmp_path / "mine.tflite"
    with pytest.warns(UserWarning, match="no NormalizationOptions"):
        export.tflite(plain, str(path), labels=["a", "b"], verbose=False)
    info = metadata.read_metadata(path.read_bytes())
    assert "normalization" not in info["inputs"][0]
    assert "normalisation unknown" in info["description"]
    with pytest.raises(Exception, match="NormalizationOptions"):
        _classifier(path)  # MediaPipe refuses it, as the warning says
    # Told the range, the file is complete and loads.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        export.tflite(plain, str(path), labels=["a", "b"], normalization=(0, 1), verbose=False)
    assert metadata.read_metadata(path.read_bytes())["inputs"][0]["normalization"]["std"] == [1.0]
    _classifier(path)
    with pytest.raises(ValueError, match=r"Received: normalization=\(0, 0\)"):
        export.tflite(plain, str(path), normalization=(0, 0), verbose=False)


def test_text_file_runs_in_mediapipe_text_classifier(tmp_path):
    """BERT metadata (WordPiece vocabulary, ids/mask/segment_ids): MediaPipe tokenises on device."""
    from mediapipe.tasks.python import text

    keras.utils.set_random_seed(0)
    model = tiny_text_classifier(3, dropout=0.0)
    texts = [
        "a small dog",
        "an edible fruit with a hard shell and many seeds inside it, of several kinds",
        "HELLO World! It's 2026.",
        "Ünïcödé café 東京",
        "",
    ]
    tokens = {k: v.numpy() for k, v in model.preprocessor(texts).items()}
    # A head that reads what differs between the texts' pooled vectors, so a
    # token MediaPipe got wrong would change the answer.
    features = keras.Model(model.input, model.get_layer("mean_pool").output).predict(
        tokens, verbose=0
    )
    spread = np.linalg.norm(features - features.mean(0), axis=1).mean()
    kernel = np.random.default_rng(0).normal(0, 3 / spread, (features.shape[1], 3))
    model.get_layer("head").set_weights([kernel, -features.mean(0) @ kernel])
    expected = model.predict(tokens, verbose=0)
    assert np.ptp(expected, axis=0).max() > 0.1, expected  # the texts get different answers
    path = tmp_path / "topics.tflite"
    export.tflite(model, str(path), labels=["x", "y", "z"], evaluation_data=tokens, verbose=False)
    info = metadata.read_metadata(path.read_bytes())
    assert info["tokenizer"] == {"type": "bert", "vocab_file": "vocab.txt"}
    assert sorted(t["name"] for t in info["inputs"]) == ["ids", "mask", "segment_ids"]
    assert info["labels"] == ["x", "y", "z"] and info["min_parser_version"] == "1.1.0"

    options = text.TextClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)))
    classifier = text.TextClassifier.create_from_options(options)
    for sentence, probabilities in zip(texts, expected, strict=True):
        categories = classifier.classify(sentence).classifications[0].categories
        served = np.zeros(3)
        for category in categories:
            served[category.index] = category.score
            assert category.category_name == ["x", "y", "z"][category.index]
        np.testing.assert_allclose(served, probabilities, atol=1e-5, err_msg=sentence)
