"""LiteRT export: quantisation modes, labels, parity reports, errors."""

import json
import os

import keras
import numpy as np
import pytest
from conftest import image_batch, tiny_classifier

from keras_transfer import export
from keras_transfer.export.parity import _LiteRunner

LABELS = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    model = tiny_classifier(3, dropout=0.5, augmentation="standard")
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 3, head.kernel.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def source(model, tmp_path_factory):
    """One conversion source for the module's files (as `export_model` shares one)."""
    return export.write_conversion_source(model, str(tmp_path_factory.mktemp("source") / "sm"))


@pytest.fixture(scope="module")
def float_file(model, tmp_path_factory):
    """The float file, converted once without `source_dir` (the default path)."""
    folder = tmp_path_factory.mktemp("float")
    x, y = image_batch(16), np.arange(16) % 3
    path = str(folder / "m.tflite")
    report = export.tflite(model, path, evaluation_data=(x, y), labels=LABELS, verbose=False)
    return folder, path, report


def test_float_export_with_augmentation_and_dropout(float_file):
    """keras-team/keras#19108: augmentation layers convert; the file is in inference mode."""
    tmp_path, path, report = float_file
    x = image_batch(16)
    assert report.num_examples == 16
    assert report.top1_agreement == 1.0
    assert report.max_abs_diff <= 1e-5
    assert report.keras_accuracy == report.tflite_accuracy
    runner = _LiteRunner(path)
    np.testing.assert_array_equal(runner(x[0]), runner(x[0]))
    assert report.latency_ms_mean > 0 and report.latency_ms_p95 > 0
    assert export.read_tflite_labels(path) == LABELS
    with open(tmp_path / "m.labels.txt") as f:
        assert f.read().splitlines() == LABELS
    with open(tmp_path / "m.parity.json") as f:
        assert json.load(f) == report.to_dict()
    details = runner.runner.get_input_details()
    assert list(details) == ["image"] and details["image"]["dtype"] == np.float32
    assert list(runner.runner.get_output_details()) == ["probabilities"]


@pytest.mark.parametrize("quantization", ["dynamic", "float16"])
def test_weight_quantization_shrinks_the_file(model, source, float_file, tmp_path, quantization):
    x = image_batch(8)
    float_report = float_file[2]
    report = export.tflite(
        model,
        str(tmp_path / "q.tflite"),
        quantization,
        evaluation_data=x,
        source_dir=source,
        verbose=False,
    )
    assert report.size_bytes < 0.75 * float_report.size_bytes
    assert report.num_examples == 8 and report.max_abs_diff < 0.5


@pytest.mark.parametrize("io_type", ["float32", "uint8", "int8"])
def test_int8_io_types(model, source, tmp_path, io_type):
    x = image_batch(16)
    path = str(tmp_path / f"{io_type}.tflite")
    report = export.tflite(
        model,
        path,
        "int8",
        representative_data=x,
        evaluation_data=x,
        io_type=io_type,
        source_dir=source,
        verbose=False,
    )
    assert report.float_ops == []
    runner = _LiteRunner(path)
    assert runner.input_dtype == np.dtype(io_type)
    assert report.max_abs_diff < 0.5


class _Sine(keras.layers.Layer):
    def call(self, x):
        return keras.ops.sin(x)


def test_int8_fails_clearly_when_ops_stay_float(tmp_path):
    inputs = keras.Input((8, 8, 3), name="image")
    x = _Sine()(keras.layers.Conv2D(4, 3)(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    data = image_batch(8, size=8)
    path = tmp_path / "sine.tflite"
    with pytest.raises(ValueError, match=r"stayed in float: \['SIN'\]"):
        export.tflite(model, str(path), "int8", representative_data=data, verbose=False)
    assert os.listdir(tmp_path) == []
    report = export.tflite(
        model, str(path), "int8", representative_data=data, allow_float_ops=True, verbose=False
    )
    assert report.float_ops == ["SIN"]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"quantization": "int8"}, ValueError, "needs `representative_data`"),
        ({"quantization": "int9"}, ValueError, "Did you mean 'int8'\\? Received: quantization"),
        ({"io_type": "uint8"}, ValueError, "Integer inputs and outputs need quantization='int8'"),
        ({"labels": ["a"]}, ValueError, "one name per class"),
        ({"num_calibration_samples": 0}, ValueError, "Received: num_calibration_samples=0"),
    ],
)
def test_bad_arguments(model, tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        export.tflite(model, str(tmp_path / "m.tflite"), verbose=False, **kwargs)
    assert os.listdir(tmp_path) == []


def test_missing_folder(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export.tflite(model, str(tmp_path / "nope" / "m.tflite"), verbose=False)


def test_parity_table_lists_every_mode(model, tmp_path):
    x = image_batch(8)
    result = export.export_model(
        model,
        str(tmp_path / "pets"),
        quantizations=["none", "int8"],
        representative_data=x,
        evaluation_data=(x, np.arange(8) % 3),
        labels=LABELS,
        verbose=False,
    )
    assert result["saved_model"].endswith(os.path.join("pets", "1"))
    table = export.format_parity_table(result["tflite"])
    assert table.splitlines()[1].startswith("none") and table.splitlines()[2].startswith("int8")
    with open(tmp_path / "pets" / "litert" / "parity.json") as f:
        assert [row["quantization"] for row in json.load(f)] == ["none", "int8"]
    assert sorted(os.listdir(tmp_path / "pets" / "litert"))[:2] == [
        "parity.json",
        "pets_int8.labels.txt",
    ]
