import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import image_batch, labels, tiny_classifier

import keras_transfer as kt


class BlockSnapshots(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.initial = self._snapshot()
        self.per_epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.per_epoch.append(self._snapshot())

    def _snapshot(self):
        snapshot = {
            block.name: [v.numpy().copy() for layer in block.layers for v in layer.weights]
            for block in kt.backbone_blocks(self.model)
        }
        snapshot["head"] = [v.numpy().copy() for v in self.model.get_layer("head").weights]
        return snapshot


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def compile_tiny(model, lr=1e-2):
    model.compile(
        optimizer=kt.layerwise_optimizer("adam", learning_rate=lr),
        loss="sparse_categorical_crossentropy",
    )


def test_progressive_unfreezing_in_one_fit():
    model = tiny_classifier()
    compile_tiny(model)
    snapshots = BlockSnapshots()
    model.fit(
        image_batch(8),
        labels(8),
        batch_size=4,
        epochs=4,
        verbose=0,
        callbacks=[kt.ProgressiveUnfreezing({2: 2}), snapshots],
    )
    names = [b.name for b in kt.backbone_blocks(model)]
    scheduled, never = names[-2:], names[:-2]
    start, epochs = snapshots.initial, snapshots.per_epoch
    assert not same(epochs[0]["head"], start["head"])
    for name in scheduled:
        assert same(epochs[0][name], start[name]) and same(epochs[1][name], start[name])
        assert not same(epochs[2][name], epochs[1][name]), name
        assert not same(epochs[3][name], epochs[2][name]), name
    for name in never:
        assert same(epochs[3][name], start[name]), name


def test_resume_after_save_and_load(tmp_path):
    model = tiny_classifier()
    compile_tiny(model)
    x, y = image_batch(8), labels(8)
    model.fit(
        x,
        y,
        batch_size=4,
        epochs=2,
        verbose=0,
        callbacks=[kt.ProgressiveUnfreezing({1: 1, 3: 3}, lr_factor=0.5)],
    )
    assert model.optimizer.lr_scale == 0.5
    path = tmp_path / "resume.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
    assert loaded.optimizer.lr_scale == 0.5
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 4
    saved = {v.path: v.numpy() for v in model.optimizer.variables}
    for v in loaded.optimizer.variables:
        np.testing.assert_array_equal(v.numpy(), saved[v.path], err_msg=v.path)
    loaded.fit(
        x,
        y,
        batch_size=4,
        epochs=4,
        initial_epoch=2,
        verbose=0,
        callbacks=[kt.ProgressiveUnfreezing({1: 1, 3: 3}, lr_factor=0.5)],
    )
    assert loaded.optimizer.lr_scale == 0.25
    trainable = [r["block"] for r in kt.trainable_summary(loaded, print_fn=None) if r["trainable"]]
    assert len(trainable) == 4  # 3 blocks + head


def test_progressive_unfreezing_validation():
    with pytest.raises(ValueError, match="Received: schedule=0"):
        kt.ProgressiveUnfreezing(0)
    with pytest.raises(ValueError, match="Received: schedule"):
        kt.ProgressiveUnfreezing({-1: 2})
    with pytest.raises(ValueError, match="Received: lr_factor=2"):
        kt.ProgressiveUnfreezing(1, lr_factor=2)
    model = tiny_classifier()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="needs a layer-wise optimizer"):
        model.fit(
            image_batch(4),
            labels(4),
            epochs=1,
            verbose=0,
            callbacks=[kt.ProgressiveUnfreezing(1, lr_factor=0.5)],
        )


def test_schedule_states():
    callback = kt.ProgressiveUnfreezing({1: 2, 3: "all"}, lr_factor=0.5)
    assert [callback.state_at(e, 5) for e in range(5)] == [(0, 0), (2, 1), (2, 1), (5, 2), (5, 2)]
    assert kt.ProgressiveUnfreezing(2).state_at(5, 10) == (2, 2)


def test_lr_find_leaves_model_untouched(tmp_path):
    model = tiny_classifier()
    compile_tiny(model)
    before = [w.copy() for w in model.get_weights()]
    data = tf.data.Dataset.from_tensor_slices((image_batch(8), labels(8))).batch(4)
    result = kt.lr_find(model, data, num_steps=8, plot_path=str(tmp_path / "lr.png"))
    assert 1 <= len(result.learning_rates) <= 8
    assert np.all(np.diff(result.learning_rates) > 0)
    assert result.learning_rates[0] <= result.suggestion <= result.learning_rates[-1]
    assert (tmp_path / "lr.png").stat().st_size > 1000
    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
