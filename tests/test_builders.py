import keras
import numpy as np
import pytest
from conftest import assert_round_trip, image_batch, tiny_classifier

import keras_transfer as kt


def test_classifier_structure():
    model = tiny_classifier(num_classes=4)
    assert isinstance(model, keras.Model)
    assert model.get_layer("backbone").trainable is False
    assert model.get_layer("head").units == 4
    assert model.output_shape == (None, 4)
    probabilities = model.predict(image_batch(2), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "head, activation",
    [("softmax", "softmax"), ("multi_label", "sigmoid"), ("regression", "linear")],
)
def test_heads(head, activation):
    model = tiny_classifier(num_classes=2, head=head)
    assert model.get_layer("head").activation.__name__ == activation


def test_preprocessing_is_baked_in():
    model = kt.build_image_classifier(
        "resnet50_v2", num_classes=2, weights=None, input_shape=(32, 32, 3)
    )
    assert model.get_layer("preprocessing").mode == "tf"


def test_round_trip_with_augmentation_and_dropout(tmp_path):
    model = tiny_classifier(augmentation="standard", dropout=0.5)
    x = image_batch(4)
    # Inference is deterministic: augmentation and dropout are training-only.
    np.testing.assert_array_equal(model.predict(x, verbose=0), model.predict(x, verbose=0))
    loaded = assert_round_trip(model, x, tmp_path)
    assert loaded.get_layer("backbone").trainable is False


def test_feature_extractor():
    extractor = kt.build_feature_extractor(
        "mobilenet_v3_small", weights=None, input_shape=(32, 32, 3), alpha=0.75
    )
    assert len(extractor.output_shape) == 2
    assert not extractor.trainable_weights


@pytest.mark.parametrize("num_classes", [0, -1])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match=f"Received: num_classes={num_classes}"):
        tiny_classifier(num_classes=num_classes)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "sigmoid"}, "Received: head='sigmoid'"),
        ({"pooling": "mean"}, "Received: pooling='mean'"),
        ({"dropout": 1.0}, "Received: dropout=1.0"),
        ({"augmentation": "heavy"}, "Received: augmentation='heavy'"),
        ({"bn_policy": "moving"}, "Received: bn_policy='moving'"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_classifier(**kwargs)
