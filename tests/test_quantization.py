"""int8 LiteRT: the per-layer quantisation report and quantisation-aware training (QAT)."""

import keras
import numpy as np
import pytest
from conftest import assert_round_trip, assert_user_error, run_cli, tiny_classifier

import keras_transfer as kt
from keras_transfer.benchmarks.effects import quantization as quantization_effect
from keras_transfer.export.parity import _LiteRunner
from keras_transfer.export.quantization_report import format_quantization_report
from keras_transfer.techniques.quantization_graph import ActivationQuantizer, simulate_int8

SIZE = 16


def _outlier_model():
    """Untrained, 8 channels: a scale of 30/127 rounds conv_b's weights (about 0.1) to zero."""
    return quantization_effect.dead_channel_cnn(live_bias=0.1, image_size=SIZE)


def _images(n=16, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    model = _outlier_model()
    path = str(tmp_path_factory.mktemp("report") / "outlier_int8.tflite")
    kt.export.tflite(model, path, "int8", representative_data=_images(), verbose=False)
    return model, path


def test_report_names_the_ruined_layer_first(outlier):
    model, path = outlier
    report = kt.export.quantization_report(model, path, _images(8, seed=1), num_samples=8)
    assert report.num_examples == 8 and not report.unmatched
    assert report.worst(1) == ["conv_b"]
    by_layer = {t.layer: t for t in report.tensors}
    # conv_a is quantised well (its own grid and the accumulated error);
    # conv_b's rounded weights cost it over 20 dB, though its grid is fine.
    conv_a, conv_b = by_layer["conv_a"], by_layer["conv_b"]
    assert conv_a.sqnr_db > 30 and conv_a.grid_sqnr_db > 30
    assert conv_b.drop_db > 20 and conv_b.grid_sqnr_db > 30
    table = format_quantization_report(report)
    assert table.splitlines()[2].split()[2] == "conv_b"  # first row after the headers
    ordered = kt.export.quantization_report(model, path, _images(4), num_samples=4, sort_by="order")
    assert [t.order for t in ordered.tensors] == sorted(t.order for t in ordered.tensors)
    assert (ordered.tensors[0].op, ordered.tensors[0].layer) == ("QUANTIZE", "input")


def test_report_takes_a_float_file(outlier, tmp_path):
    model, path = outlier
    float_path = str(tmp_path / "float.tflite")
    kt.export.tflite(model, float_path, verbose=False)
    report = kt.export.quantization_report(float_path, path, _images(4, seed=1), num_samples=4)
    assert "conv_b" in report.worst(1)[0]  # the tensor's scopes: conv_b_1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_samples": 0}, ValueError, "Received: num_samples=0"),
        ({"sort_by": "worst"}, ValueError, "Received: sort_by='worst'"),
        (
            {"int8_path": "missing.tflite"},
            FileNotFoundError,
            "Received: int8_path='missing.tflite'",
        ),
    ],
)
def test_report_bad_arguments(outlier, kwargs, error, match):
    model, path = outlier
    kwargs = {"int8_path": path, **kwargs}
    with pytest.raises(error, match=match):
        kt.export.quantization_report(model, data=_images(2), **kwargs)


def _with_batchnorm_statistics(model, seed=0):
    """Non-trivial BatchNorm statistics and affine terms, so that folding is tested."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 3.0, n).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.3, n).astype("float32"))
    return model


@pytest.fixture(scope="module")
def tiny():
    """The tiny MobileNetV3-Small (Conv, Depthwise, BN, ReLU, Add, pooling), head sharpened."""
    keras.utils.set_random_seed(0)
    model = _with_batchnorm_statistics(tiny_classifier())
    head = model.get_layer("head")
    head.kernel.assign(np.random.default_rng(0).normal(0, 3, head.kernel.shape).astype("float32"))
    return model


def _small_cnn(num_classes=10, seed=0):
    """Conv-BN-ReLU, depthwise, a linear bottleneck with a residual add, pooling, softmax."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False)(x)
    x = layers.ReLU(6.0)(layers.BatchNormalization(momentum=0.9)(x))
    x = layers.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False)(x)
    x = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(x))
    shortcut = x
    x = layers.Conv2D(16, 1, use_bias=False, name="project")(x)
    x = layers.Add()([shortcut, layers.BatchNormalization(momentum=0.9)(x)])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="head")(x)
    return keras.Model(inputs, outputs)


def test_simulation_folds_batchnorm_exactly_and_tracks_the_int8_file(tmp_path):
    model = _with_batchnorm_statistics(_small_cnn())
    features = keras.Model(model.inputs, model.get_layer("pool").output, name="features")
    images = _images(24, seed=2)
    simulation = simulate_int8(features)
    # In float, the rebuilt graph (BatchNorm folded into the convolutions) is the model.
    floating = features.predict(images, verbose=0)
    np.testing.assert_allclose(
        simulation.float_model.predict(images, verbose=0), floating, atol=1e-5, rtol=1e-5
    )
    # Fake-quantised and calibrated like the converter, it predicts what the
    # int8 file computes far better than the float model does (measured:
    # 0.19x the float model's error; 0.13x and 0.28x with seeds 1 and 2).
    calibration, held_out = images[:16], images[16:]
    simulation.calibrate(calibration)
    path = str(tmp_path / "features_int8.tflite")
    kt.export.tflite(features, path, "int8", representative_data=calibration, verbose=False)
    runner = _LiteRunner(path)
    lite = np.stack([runner(image) for image in held_out])
    simulated = simulation.model.predict(held_out, verbose=0)
    simulation_error = np.abs(simulated - lite).mean()
    float_error = np.abs(floating[16:] - lite).mean()
    assert simulation_error < 0.4 * float_error, (simulation_error, float_error)


def test_quantization_aware_returns_a_plain_model_that_converts(tmp_path):
    # A nested backbone (Conv-BN-ReLU, depthwise), frozen: QAT trains it all
    # the same, and restores the flags.
    features = _small_cnn()
    backbone = keras.Model(features.inputs, features.get_layer("pool").input, name="small")
    model = kt.build_image_classifier(backbone, 3, weights=None, input_shape=(SIZE, SIZE, 3))
    backbone = model.get_layer("backbone")
    kernel = next(v for v in backbone.weights if "kernel" in v.path)
    before = np.array(kernel.numpy())
    flags = {layer.name: layer.trainable for layer in backbone.layers}
    images = _images(16)
    result = kt.techniques.quantization_aware(
        model,
        (images, np.arange(16) % 3),
        epochs=1,
        learning_rate=1e-3,
        jit_compile=False,
        verbose=0,
    )
    assert result is model
    assert not np.allclose(kernel.numpy(), before)  # the frozen backbone trained
    assert {layer.name: layer.trainable for layer in backbone.layers} == flags
    assert not any(isinstance(layer, ActivationQuantizer) for layer in model._flatten_layers())
    assert len(model.history.history["loss"]) == 1
    loaded = assert_round_trip(model, images[:4], tmp_path)
    report = kt.export.tflite(
        loaded,
        str(tmp_path / "qat_int8.tflite"),
        "int8",
        representative_data=images,
        verbose=False,
    )
    assert report.float_ops == []


def test_quantization_aware_names_unsupported_layers():
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.SeparableConv2D(4, 3, name="separable")(inputs)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    data = (np.zeros((4, 8, 8, 3)), np.zeros(4))
    with pytest.raises(
        ValueError, match=r"separable \(SeparableConv2D\)', 'norm \(LayerNormalization"
    ):
        kt.techniques.quantization_aware(model, data, epochs=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "Received: epochs=0"),
        ({"learning_rate": 0.0}, "Received: learning_rate=0.0"),
        ({"num_calibration_samples": 0}, "Received: num_calibration_samples=0"),
    ],
)
def test_quantization_aware_bad_arguments(kwargs, match):
    model = _small_cnn(3)
    with pytest.raises(ValueError, match=match):
        kt.techniques.quantization_aware(model, (_images(4), np.zeros(4)), **kwargs)


def test_export_cli_qat_needs_int8(tmp_path):
    model = _small_cnn(3)
    model.save(tmp_path / "model.keras")
    result = run_cli(
        "export",
        f"--model={tmp_path / 'model.keras'}",
        f"--output={tmp_path / 'out'}",
        "--format=tflite",
        "--quantization=none",
        "--qat_epochs=1",
        "--data=digits",
    )
    assert_user_error(result, "--quantization=int8", "qat_epochs=1")


def test_export_cli_runs_qat_before_int8(tmp_path):
    model = _small_cnn(10)
    model.save(tmp_path / "model.keras")
    result = run_cli(
        "export",
        f"--model={tmp_path / 'model.keras'}",
        f"--output={tmp_path / 'out'}",
        "--format=tflite",
        "--quantization=int8",
        "--qat_epochs=1",
        "--data=digits",
        "--max_per_class=10",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "loss:" in result.stdout  # the QAT epoch ran
    assert (tmp_path / "out" / "litert" / "out_int8.tflite").is_file()


def test_activation_quantizer_rounds_to_the_int8_grid_and_round_trips(tmp_path):
    inputs = keras.Input((4,))
    quantizer = ActivationQuantizer(name="quant")
    model = keras.Model(inputs, quantizer(inputs))
    quantizer.set_range(-1.0, 3.0)  # scale 4/255, zero exactly representable
    x = np.array([[-2.0, 0.0, 1.01, 5.0]], "float32")
    step = 4.0 / 255.0
    y = model.predict(x, verbose=0)
    assert y[0, 1] == 0.0  # zero is exact (the range is nudged to put it on the grid)
    assert y[0, 0] == pytest.approx(-1.0, abs=step)  # clipped below
    assert y[0, 3] == pytest.approx(3.0, abs=step)  # clipped above
    assert abs(y[0, 2] / step - round(y[0, 2] / step)) < 1e-3  # on the grid
    loaded = assert_round_trip(model, x, tmp_path)
    assert float(loaded.get_layer("quant").maximum.numpy()) == pytest.approx(3.0, abs=step)


@pytest.mark.slow
def test_int8_after_qat_is_closer_to_float_than_after_ptq():
    # The techniques suite's effect, seed 0: a small CNN trained on digits
    # whose conv_b keeps a stale weight on a dead ReLU channel (its int8
    # scales about twice its real weights). Measured with seeds 0 / 1 / 2 (int8 test
    # accuracy on the 359 held-out digits; float 0.858 / 0.855 / 0.903): PTQ
    # 0.476 / 0.496 / 0.624, the control (the same 3 epochs without fake
    # quantisation) 0.535 / 0.507 / 0.618, QAT 0.880 / 0.905 / 0.894.
    figures = quantization_effect.measure(seed=0)
    float_accuracy = figures["float_accuracy"]
    assert float_accuracy > 0.8, figures  # trained (chance 0.1)
    assert figures["ptq_int8_accuracy"] < float_accuracy - 0.1, figures  # the hostile layer bites
    assert figures["ptq_float_ops"] == figures["qat_float_ops"] == 0, figures  # full integer
    # QAT's int8 file keeps the float model's accuracy; the same epochs
    # without fake quantisation do not: the gain is the simulation's.
    assert figures["int8_minus_float_accuracy"] >= -0.02, figures
    assert figures["qat_minus_control_accuracy"] > 0.1, figures
