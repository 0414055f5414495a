"""Magnitude pruning for Keras 3: schedule, masks kept exactly, strip, report, effect."""

import keras
import numpy as np
import pytest
from conftest import assert_round_trip

import keras_transfer as kt
from keras_transfer.benchmarks.effects import pruning as effect
from keras_transfer.techniques import pruning
from keras_transfer.techniques.sparsity import layer_sparsity, magnitude_mask, prunable_kernels


def _toy(name="toy"):
    """Conv, DepthwiseConv and Dense kernels in a nested backbone, as the builders nest it."""
    backbone = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, activation="relu", name="conv"),
            keras.layers.DepthwiseConv2D(3, activation="relu", name="depthwise"),
            keras.layers.Flatten(),
            keras.layers.Dense(16, activation="relu", name="fc"),
        ],
        name="toy_backbone",
    )
    return kt.build_image_classifier(
        backbone, 3, weights=None, freeze_backbone=False, dropout=0.0, name=name
    )


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, (n, 8, 8, 3)).astype("float32"), np.arange(n) % 3


class _ZerosAfterEveryStep(keras.callbacks.Callback):
    """Runs after the pruning callback: every masked weight must be exactly 0 after each step."""

    def __init__(self, pruning_callback):
        super().__init__()
        self.pruning, self.checked = pruning_callback, 0

    def on_train_batch_end(self, batch, logs=None):
        for path, mask in self.pruning.masks.items():
            values = keras.ops.convert_to_numpy(self.pruning.kernels[path])
            assert np.all(values[mask == 0] == 0), path
        self.checked += 1


@pytest.fixture(scope="module")
def pruned():
    """A toy model trained with Adam (momentum) while pruned to 50%, every step checked."""
    keras.utils.set_random_seed(0)
    model = _toy()
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    callback = pruning.PruningCallback(sparsity=0.5, frequency=2)
    probe = _ZerosAfterEveryStep(callback)
    history = model.fit(*_data(), batch_size=8, epochs=4, callbacks=[callback, probe], verbose=0)
    return model, callback, probe, history


def test_polynomial_schedule_follows_zhu_and_gupta():
    s = pruning.polynomial_sparsity
    assert s(0, sparsity=0.5, end_step=100) == 0.0
    assert s(100, sparsity=0.5, end_step=100) == 0.5
    assert s(500, sparsity=0.5, end_step=100) == 0.5
    # s_t = s_f + (s_i - s_f)(1 - (t - t0) / (n dt))^3
    assert s(60, sparsity=0.8, initial_sparsity=0.2, begin_step=20, end_step=100) == (
        pytest.approx(0.8 + (0.2 - 0.8) * (1 - 40 / 80) ** 3)
    )
    assert s(10, sparsity=0.8, initial_sparsity=0.2, begin_step=20, end_step=100) == 0.2


def test_magnitude_mask_zeroes_exactly_the_smallest_weights():
    weights = np.random.default_rng(0).normal(size=(40, 25))
    mask = magnitude_mask(weights, 0.3)
    assert mask.shape == weights.shape and int((mask == 0).sum()) == 300
    assert np.abs(weights[mask == 0]).max() <= np.abs(weights[mask == 1]).min()


def test_pruned_weights_stay_exactly_zero_after_every_step_despite_momentum(pruned):
    model, callback, probe, history = pruned
    assert probe.checked == 4 * 6
    assert set(callback.masks) == set(prunable_kernels(model))
    assert {path.split("/")[-2] for path in callback.masks} == {"conv", "depthwise", "fc", "head"}
    for path, value in layer_sparsity(model).items():
        assert value == pytest.approx(0.5, abs=0.02), path
    assert history.history["sparsity"][-1] == 0.5
    assert history.history["sparsity"][0] < 0.5  # the schedule rises


def test_strip_pruning_gives_a_plain_model_that_round_trips_and_exports(pruned, tmp_path):
    model, *_ = pruned
    plain = pruning.strip_pruning(model)
    assert not plain.compiled
    # No variable beyond the model's own (the masks live in the callback).
    assert [v.name for v in plain.weights] == [v.name for v in model.weights]
    for ours, theirs in zip(plain.weights, model.weights, strict=True):
        np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    x, _ = _data(4)
    loaded = assert_round_trip(plain, x, tmp_path)
    assert layer_sparsity(loaded) == layer_sparsity(model)
    path = kt.export.saved_model(plain, str(tmp_path / "export"))
    assert (tmp_path / "export" / "1" / "saved_model.pb").is_file(), path


def test_report_gives_sparsity_per_kernel_and_gzip_sizes(pruned):
    model, *_ = pruned
    dense = _toy(name="toy")
    report = pruning.pruning_report(model, dense, tflite=False)
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert set(report.layers) == set(layer_sparsity(model))
    assert report.sizes.keras_gzip_bytes < report.baseline.keras_gzip_bytes
    assert report.reduction() > 0.2 and report.sizes.tflite_bytes is None
    text = report.format()
    assert "keras_gzip" in text and "backbone/fc/kernel" in text
    alone = pruning.pruning_report(model, tflite=False)
    assert alone.baseline is None and alone.reduction() is None and "keras_gzip" in alone.format()


def test_callback_works_with_fine_tune_and_only_on_named_layers():
    keras.utils.set_random_seed(0)
    model = _toy()
    callback = pruning.PruningCallback(sparsity=0.75, layers=["fc"])
    kt.fine_tune(
        model, _data(16), recipe="full", epochs=1, batch_size=8, callbacks=[callback], verbose=0
    )
    sparsity = layer_sparsity(model)
    assert sparsity["backbone/fc/kernel"] == 0.75
    assert sparsity["backbone/conv/kernel"] == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sparsity": 1.0}, r"`sparsity` must be a number in \[0, 1\). Received: sparsity=1.0"),
        ({"sparsity": -0.1}, "Received: sparsity=-0.1"),
        ({"sparsity": 0.5, "initial_sparsity": 0.6}, "initial_sparsity=0.6, sparsity=0.5"),
        ({"sparsity": 0.5, "frequency": 0}, "Received: frequency=0"),
        ({"sparsity": 0.5, "end_step": 0}, "Received: end_step=0"),
        ({"sparsity": 0.5, "layers": "fc"}, "Received: layers='fc'"),
    ],
)
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pruning.PruningCallback(**kwargs)


def test_a_model_with_nothing_to_prune_is_refused():
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, trainable=False),
            keras.layers.LayerNormalization(),
        ]
    )
    model.compile("adam", "mse")
    with pytest.raises(ValueError, match="Nothing to prune"):
        model.fit(
            np.ones((4, 4)), np.ones((4, 3)), callbacks=[pruning.PruningCallback()], verbose=0
        )
    frozen = _toy()
    frozen.get_layer("backbone").trainable = False
    with pytest.raises(ValueError, match="unknown \\['nope'\\]"):
        pruning.prune(frozen, _data(8), layers=["nope"], epochs=1, verbose=0)


@pytest.mark.slow  # two small CNNs on Fashion-MNIST and two LiteRT conversions
def test_half_the_weights_pruned_keeps_accuracy_and_shrinks_the_gzip_size():
    figures = effect.measure(seed=0)
    assert figures["pruned_weights_zero"] == 1.0
    assert figures["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert figures["accuracy_change"] >= -0.02, figures
    assert figures["keras_gzip_reduction"] >= 0.30, figures
    assert figures["tflite_gzip_reduction"] >= 0.30, figures
