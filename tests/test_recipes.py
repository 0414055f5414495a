import keras
import numpy as np
import pytest
from conftest import assert_round_trip, image_batch, labels, tiny_classifier

import keras_transfer as kt


@pytest.mark.parametrize(
    "recipe, epochs, stages",
    [
        ("feature_extraction", 2, [1, 1]),
        ("two_stage", (1, 1), [1, 2]),
        ("full", 2, [1, 1]),
        ("progressive", 2, [1, 1]),
    ],
)
def test_recipe_trains_and_round_trips(recipe, epochs, stages, tmp_path):
    model = tiny_classifier()
    x, y = image_batch(16), labels(16)
    history = kt.fine_tune(
        model, (x, y), (x[:8], y[:8]), recipe=recipe, epochs=epochs, batch_size=8, verbose=0
    )
    assert history.history["stage"] == stages
    assert "val_loss" in history.history and "accuracy" in history.history
    loaded = assert_round_trip(model, x, tmp_path)
    saved = {v.path: v.numpy() for v in model.optimizer.variables}
    assert len(loaded.optimizer.variables) >= 2
    for v in loaded.optimizer.variables:
        np.testing.assert_array_equal(v.numpy(), saved[v.path], err_msg=v.path)
    assert loaded.optimizer.get_config()["lr_multipliers"] == model.optimizer.lr_multipliers
    # The reloaded model carries on training where it stopped.
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_feature_extraction_keeps_backbone():
    model = tiny_classifier()
    before = {v.path: v.numpy().copy() for v in model.get_layer("backbone").weights}
    kt.fine_tune(
        model, (image_batch(8), labels(8)), recipe="feature_extraction", epochs=1, verbose=0
    )
    for v in model.get_layer("backbone").weights:
        np.testing.assert_array_equal(v.numpy(), before[v.path])


def test_multi_label_head_refuses_class_indices():
    model = tiny_classifier(num_classes=3, head="multi_label")
    with pytest.raises(
        ValueError,
        match=r"multi-hot labels of shape \(batch, 3\).*Received: labels of shape \(None,\)",
    ):
        kt.fine_tune(model, (image_batch(8), labels(8)), epochs=1, verbose=0)
    multi_hot = keras.utils.to_categorical(labels(8), 3)
    history = kt.fine_tune(
        model, (image_batch(8), multi_hot), recipe="feature_extraction", epochs=1, verbose=0
    )
    assert "auc" in history.history


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"recipe": "fast"}, "Received: recipe='fast'"),
        ({"epochs": 0}, "Received: epochs=0"),
        ({"recipe": "two_stage", "epochs": (1, 2, 3)}, "Received: epochs=\\(1, 2, 3\\)"),
        ({"learning_rate": 0}, "Received: learning_rate=0"),
        ({"unfreeze_blocks": 0}, "Received: unfreeze_blocks=0"),
    ],
)
def test_bad_recipe_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kt.fine_tune(tiny_classifier(), (image_batch(4), labels(4)), verbose=0, **kwargs)


def test_softmax_refuses_float_labels():
    with pytest.raises(ValueError, match="integer class indices"):
        kt.fine_tune(tiny_classifier(), (image_batch(4), np.zeros(4, "float32")), verbose=0)
