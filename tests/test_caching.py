"""Frozen-feature caching: the frozen part runs once per example, the head trains as before."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import SIZE, TINY, assert_round_trip, image_batch, labels, run_cli
from keras import ops

import keras_transfer as kt
from keras_transfer.feature_cache import FeatureCache


def _classifier(**kwargs):
    """The tiny MobileNetV3 with BatchNorm statistics set from a batch.

    At random initialisation its frozen BatchNorm layers (mean 0, variance 1)
    shrink the activations to ~1e-11, so every image would give the same
    features; statistics measured on a batch give features of unit scale.
    """
    model = kt.build_image_classifier(
        "mobilenet_v3_small", 3, weights=None, input_shape=(SIZE, SIZE, 3), alpha=0.75, **kwargs
    )
    backbone = model.get_layer("backbone")
    backbone.trainable = True
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    backbone(image_batch(16, seed=9), training=True)
    backbone.trainable = False
    return model


class _CountExamples(keras.layers.Layer):
    """Adds the size of every batch it sees to a variable (inside compiled steps too)."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(), initializer="zeros", trainable=False, name="count")

    def call(self, inputs):
        self.count.assign_add(ops.cast(ops.shape(inputs)[0], "float32"))
        return inputs


def _counted_classifier():
    """A classifier whose backbone counts the examples that go through it."""
    base, _ = kt.create_backbone(
        "mobilenet_v3_small", weights=None, input_shape=(SIZE, SIZE, 3), **TINY
    )
    counter = _CountExamples()
    backbone = keras.Sequential([keras.Input((SIZE, SIZE, 3)), counter, base])
    return kt.build_image_classifier(backbone, 3, weights=None), counter


class _BackboneChanges(keras.callbacks.Callback):
    """Records, per `fit`, which model the callbacks see and whether its backbone changed."""

    def __init__(self):
        super().__init__()
        self.changed, self.models = [], []

    def on_train_begin(self, logs=None):
        self.before = [v.numpy().copy() for v in self.model.get_layer("backbone").weights]
        self.models.append(self.model)

    def on_train_end(self, logs=None):
        after = self.model.get_layer("backbone").weights
        self.changed.append(
            any(not np.array_equal(a, b.numpy()) for a, b in zip(self.before, after, strict=True))
        )


def test_cached_head_matches_uncached(tmp_path):
    data = (image_batch(16, seed=1), labels(16))
    validation = (image_batch(6, seed=2), labels(6))
    runs = {}
    for cache in (False, True, "disk"):
        keras.utils.set_random_seed(0)
        model = _classifier()  # dropout 0.2: the head's Dropout draws the same masks
        history = kt.fine_tune(
            model,
            data,
            validation,
            recipe="feature_extraction",
            epochs=2,
            batch_size=8,
            learning_rate=1e-2,
            cache_features=cache,
            verbose=0,
        )
        runs[cache] = (model, history.history)
    reference, expected = runs[False]
    assert expected["loss"][-1] < expected["loss"][0]  # the head learned something
    for cache in (True, "disk"):
        model, history = runs[cache]
        assert sorted(history) == sorted(expected)
        np.testing.assert_allclose(history["loss"], expected["loss"], atol=1e-5)
        pairs = zip(
            model.get_layer("head").weights, reference.get_layer("head").weights, strict=True
        )
        for ours, theirs in pairs:
            np.testing.assert_allclose(ours.numpy(), theirs.numpy(), atol=1e-5, rtol=0)
        x = validation[0]
        np.testing.assert_allclose(
            model.predict(x, verbose=0), reference.predict(x, verbose=0), atol=1e-5
        )
    # What is saved is the ordinary end-to-end model.
    assert_round_trip(runs[True][0], validation[0], tmp_path)


def test_backbone_runs_once_per_example_and_spills_to_disk(capsys):
    model, counter = _counted_classifier()
    train = tf.data.Dataset.from_tensor_slices((image_batch(10), labels(10))).shuffle(10, seed=1)
    # Unknown length: the cache learns the size as it goes, and spills past the budget.
    train = train.filter(lambda x, y: True).batch(4)
    validation = tf.data.Dataset.from_tensor_slices((image_batch(6, seed=3), labels(6))).batch(4)
    budget = 4 * model.get_layer("avg_pool").output.shape[-1] * 4  # one batch of float32
    history = kt.fine_tune(
        model,
        train,
        validation,
        recipe="feature_extraction",
        epochs=3,
        steps_per_epoch=3,
        cache_features=FeatureCache(memory_budget=budget),
        verbose=2,
    )
    assert len(history.history["loss"]) == 3
    assert counter.count.numpy() == 10 + 6
    printed = capsys.readouterr().out
    assert "Feature cache (train): an unknown number of examples" in printed
    assert "over the memory budget" in printed and "on disk" in printed


@pytest.fixture(scope="module")
def augmented():
    return kt.build_image_classifier(
        "mobilenet_v3_small",
        3,
        weights=None,
        input_shape=(SIZE, SIZE, 3),
        augmentation="light",
        **TINY,
    )


class _FailOnTrain(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        raise AssertionError("training started before the arguments were checked")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, r"Random augmentation cannot be cached.*\['random_flip'\]"),
        ({"cache_features": "disc"}, "Did you mean 'disk'"),
        ({"recipe": "full"}, r"recipe 'full' plans none \(\['full'\]\)"),
        ({"recipe": "progressive"}, "recipe 'progressive' plans none"),
    ],
)
def test_caching_is_refused_before_training(augmented, kwargs, message):
    kwargs = {"recipe": "feature_extraction", "cache_features": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        kt.fine_tune(
            augmented,
            (image_batch(4), labels(4)),
            epochs=1,
            callbacks=[_FailOnTrain()],
            verbose=0,
            **kwargs,
        )


def test_a_stage_that_trains_the_backbone_is_refused(augmented):
    stage = kt.Stage("fine_tune", 1, 1e-4, train_blocks=2)
    assert not stage.frozen_backbone and kt.Stage("head", 1, 1e-3).frozen_backbone
    with pytest.raises(ValueError, match="stage 'fine_tune' trains it. Received: train_blocks=2"):
        kt.fit_stage(
            augmented,
            (image_batch(4), labels(4)),
            stage=stage,
            cache_features=True,
            callbacks=[_FailOnTrain()],
        )


def test_two_stage_caches_stage_one_only(capsys):
    model, counter = _counted_classifier()
    changes = _BackboneChanges()
    history = kt.fine_tune(
        model,
        (image_batch(8), labels(8)),
        recipe="two_stage",
        epochs=(2, 1),
        batch_size=4,
        cache_features=True,
        callbacks=[changes],
        verbose=2,
    )
    assert history.history["stage"] == [1, 1, 2]
    # Stage 1: once per image for two epochs; stage 2: every image, every epoch.
    assert counter.count.numpy() == 8 + 8
    assert capsys.readouterr().out.count("Feature cache (train): 8 examples") == 1
    # The callbacks saw the whole model in both stages; only stage 2 trained its backbone.
    assert changes.models == [model, model]
    assert changes.changed == [False, True]


def test_cached_stage_resumes_from_its_backup(tmp_path):
    data = (image_batch(8), labels(8))
    options = {"recipe": "feature_extraction", "epochs": 3, "batch_size": 4, "verbose": 0}

    class Killed(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    model = _classifier()
    with pytest.raises(KeyboardInterrupt):
        kt.fine_tune(
            model,
            data,
            cache_features=True,
            backup_dir=str(tmp_path),
            callbacks=[Killed()],
            **options,
        )
    saved = [w.numpy().copy() for w in model.get_layer("head").weights]

    class Resumed(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.iterations = int(self.model.optimizer.iterations)
            self.head = [w.numpy().copy() for w in self.model.get_layer("head").weights]

    resumed = Resumed()
    model = _classifier()
    history = kt.fine_tune(
        model,
        data,
        cache_features=True,
        backup_dir=str(tmp_path),
        callbacks=[resumed],
        **options,
    )
    assert len(history.history["loss"]) == 3
    # Epoch 3 started from the saved head and the saved optimizer (2 epochs x 2 steps).
    assert resumed.iterations == 4
    for ours, theirs in zip(resumed.head, saved, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_cli_flag_reaches_fine_tune(monkeypatch, tmp_path):
    received = {}

    def stop(*args, **kwargs):
        received.update(kwargs)
        raise ValueError("stopped before training")

    monkeypatch.setattr("keras_transfer.runs.fine_tune", stop)
    common = (
        "train",
        "--data=digits",
        "--backbone=mobilenet_v3_small",
        "--weights=none",
        "--image_size=32",
        "--max_per_class=2",
        "--output_dir=run",
    )
    result = run_cli(*common, "--cache_features", cwd=tmp_path)
    assert result.returncode == 2 and "stopped before training" in result.stderr
    cache = received["cache_features"]
    assert cache.mode == "auto" and cache.directory.endswith("checkpoint")
    refused = run_cli(*common, "--cache_features", "--augmentation=light", cwd=tmp_path)
    assert refused.returncode == 2 and "needs augmentation='none'" in refused.stderr
