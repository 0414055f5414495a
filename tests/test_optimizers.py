import keras
import numpy as np
import pytest
from conftest import image_batch, labels, tiny_classifier

import keras_transfer as kt


def test_discriminative_update_ratio():
    """One Adam step: each block's largest update is `factor` x the block above's."""
    factor = 0.1
    model = tiny_classifier()
    kt.unfreeze(model, "all")
    model.compile(
        optimizer=kt.discriminative_optimizer(
            model, "adam", factor=factor, learning_rate=1e-3, epsilon=1e-20
        ),
        loss="sparse_categorical_crossentropy",
    )
    blocks = kt.backbone_blocks(model)
    top, below = blocks[-1], blocks[-2]

    def kernels(block):
        return [
            v
            for layer in block.layers
            for v in layer.trainable_weights
            if v.path.endswith("kernel")
        ]

    before = {v.path: v.numpy().copy() for v in kernels(top) + kernels(below)}
    model.fit(image_batch(8), labels(8), batch_size=8, epochs=1, verbose=0)

    def max_step(block):
        return max(np.abs(v.numpy() - before[v.path]).max() for v in kernels(block))

    # Adam's first step is lr * g / (|g| + eps) ~= lr * multiplier.
    np.testing.assert_allclose(max_step(top), 1e-3 * factor, rtol=1e-2)
    np.testing.assert_allclose(max_step(below) / max_step(top), factor, rtol=1e-2)


def test_multipliers_shrink_down_the_backbone():
    model = tiny_classifier()
    multipliers = kt.discriminative_multipliers(model, spread=100.0)
    blocks = kt.backbone_blocks(model)
    stem = next(layer for layer in blocks[0].layers if layer.weights).weights[0].path
    np.testing.assert_allclose(multipliers[stem], 0.01, rtol=1e-6)
    assert "head/kernel" not in multipliers
    with pytest.raises(ValueError, match="Received: factor=1.5"):
        kt.discriminative_multipliers(model, factor=1.5)


def test_layerwise_optimizer_config_round_trip():
    opt = kt.layerwise_optimizer("sgd", {"a/kernel": 0.5}, learning_rate=0.1, momentum=0.9)
    config = keras.optimizers.serialize(opt)
    again = keras.optimizers.deserialize(config)
    assert type(again) is type(opt)
    assert again.lr_multipliers == {"a/kernel": 0.5} and again.momentum == 0.9
    with pytest.raises(ValueError, match="must be > 0"):
        kt.layerwise_optimizer("adam", {"a/kernel": 0.0})


def test_weight_decay_scales_with_multiplier():
    """With zero gradient, AdamW's only change is decay: w *= 1 - lr * wd * multiplier."""
    variable = keras.Variable(np.ones((2,), "float32"), name="w")
    other = keras.Variable(np.ones((2,), "float32"), name="v")
    opt = kt.layerwise_optimizer("adamw", {variable.path: 0.1}, learning_rate=0.5, weight_decay=0.2)
    opt.apply([np.zeros(2, "float32"), np.zeros(2, "float32")], [variable, other])
    np.testing.assert_allclose(variable.numpy(), 1 - 0.5 * 0.2 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(other.numpy(), 1 - 0.5 * 0.2, rtol=1e-6)


def test_prepare_for_unfreezing_extends_and_keeps_state():
    model = tiny_classifier()
    model.compile(
        optimizer=kt.layerwise_optimizer("adam", learning_rate=1e-3),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(image_batch(8), labels(8), batch_size=4, epochs=1, verbose=0)
    optimizer = model.optimizer
    head_moments = {v.path: v.numpy().copy() for v in optimizer.variables if "head" in v.path}
    assert head_moments and int(optimizer.iterations) == 2
    kt.prepare_for_unfreezing(model)
    assert len(optimizer._trainable_variables) == len(kt.optimizers.candidate_variables(model))
    assert int(optimizer.iterations) == 2
    for v in optimizer.variables:
        if v.path in head_moments:
            np.testing.assert_array_equal(v.numpy(), head_moments[v.path])
    kt.unfreeze(model, "all")
    model.make_train_function(force=True)
    model.fit(image_batch(8), labels(8), batch_size=4, epochs=1, verbose=0)


def test_schedules():
    schedule = kt.warmup_cosine(1e-3, total_steps=100, warmup_fraction=0.1)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-5)
    assert float(schedule(100)) < 1e-6
    cycle = kt.OneCycle(1e-2, total_steps=100)
    np.testing.assert_allclose(float(cycle(0)), 1e-2 / 25, rtol=1e-5)
    np.testing.assert_allclose(float(cycle(25)), 1e-2, rtol=1e-5)
    np.testing.assert_allclose(float(cycle(100)), 1e-2 / 1e5, rtol=1e-3)
    again = kt.OneCycle.from_config(cycle.get_config())
    assert float(again(60)) == float(cycle(60))
    with pytest.raises(ValueError, match="Received: pct_start=1.0"):
        kt.OneCycle(1e-2, total_steps=100, pct_start=1.0)
