"""kt.techniques.ensemble: one functional model that averages its members' probabilities."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import image_batch, sharpen_head

import keras_transfer as kt
from keras_transfer.benchmarks.effects import ensemble as ensemble_effect
from keras_transfer.techniques.ensemble import WeightedAverage, validation_accuracies


def _tiny_member(seed, num_classes=3, size=16, name="tiny_classifier"):
    """A tiny CNN through the builder: preprocessing ("tf") + conv backbone + softmax head."""
    keras.utils.set_random_seed(seed)
    body = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            keras.layers.Conv2D(4, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        ],
        name="tiny_cnn",
    )
    model = kt.build_image_classifier(
        body, num_classes, weights=None, preprocessing="tf", dropout=0.0, name=name
    )
    return sharpen_head(model, seed=seed)


@pytest.fixture(scope="module")
def members():
    return [_tiny_member(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def images():
    return image_batch(12, size=16)


def _probabilities(models, x):
    return [m.predict(x, verbose=0).astype("float64") for m in models]


def test_mean_ensemble_is_one_functional_model_averaging_members(members, images):
    model = kt.techniques.ensemble(members)
    # One shared input named like the members', members nested whole with unique names.
    assert [layer.name for layer in model.layers] == [
        "image",
        "tiny_classifier",
        "tiny_classifier_1",
        "tiny_classifier_2",
        "average",
    ]
    assert len(model.inputs) == 1 and model.input_shape == (None, 16, 16, 3)
    nested = model.get_layer("tiny_classifier_1")
    assert nested.get_layer("preprocessing") is members[1].get_layer("preprocessing")
    expected = np.mean(_probabilities(members, images), axis=0)
    assert np.abs(model.predict(images, verbose=0) - expected).max() <= 1e-6
    assert model.get_layer("average").member_weights == pytest.approx([1 / 3] * 3)


def test_weighted_ensemble_matches_weighted_mean(members, images):
    model = kt.techniques.ensemble(members, weights=[3, 1, 0])
    assert model.get_layer("average").member_weights == [0.75, 0.25, 0.0]
    p = _probabilities(members, images)
    expected = 0.75 * p[0] + 0.25 * p[1]
    assert np.abs(model.predict(images, verbose=0) - expected).max() <= 1e-6


def test_validation_weights_are_accuracy_above_chance(members, images):
    truth = members[0].predict(images, verbose=0).argmax(-1)  # member 0 is always right
    accuracies = validation_accuracies(members, (images, truth))
    assert accuracies[0] == 1.0
    model = kt.techniques.ensemble(members, "validation", validation=(images, truth))
    above = np.maximum(np.array(accuracies) - 1 / 3, 0)
    assert model.get_layer("average").member_weights == pytest.approx(above / above.sum())
    # A dataset and one-hot labels give the same weights.
    dataset = tf.data.Dataset.from_tensor_slices((images, np.eye(3)[truth])).batch(5)
    again = kt.techniques.ensemble(members, "validation", validation=dataset)
    assert again.get_layer("average").member_weights == pytest.approx(
        model.get_layer("average").member_weights
    )


def test_round_trip_and_export_as_one_model(members, images, tmp_path):
    model = kt.techniques.ensemble(members[:2], weights=[1, 3])
    path = tmp_path / "ensemble.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    reference = model.predict(images, verbose=0)
    assert np.abs(loaded.predict(images, verbose=0) - reference).max() <= 1e-6
    assert loaded.get_layer("average").member_weights == [0.25, 0.75]

    version = kt.export.saved_model(model, str(tmp_path / "served"), labels=["a", "b", "c"])
    served = tf.saved_model.load(version).signatures["serving_default"]
    probabilities = served(image=tf.constant(images))["probabilities"].numpy()
    assert np.abs(probabilities - reference).max() <= 1e-5

    report = kt.export.tflite(
        model, str(tmp_path / "ensemble.tflite"), evaluation_data=images, verbose=False
    )
    assert report.max_abs_diff <= 1e-5 and report.top1_agreement == 1.0


def test_weighted_average_layer_config_round_trips():
    layer = WeightedAverage([1, 3], name="average")
    again = WeightedAverage.from_config(layer.get_config())
    assert again.member_weights == [0.25, 0.75] and again.name == "average"


@pytest.mark.parametrize(
    ("models", "options", "error", "fragment"),
    [
        ("one", {}, ValueError, "at least 2 members. Received: 1"),
        ("not_a_list", {}, TypeError, "Received: Functional"),
        ("shapes", {}, ValueError, "same inputs"),
        ("classes", {}, ValueError, "member 1 has 4"),
        ("same", {}, ValueError, "different models"),
        ("shared", {}, ValueError, "members 0 and 1 share 'tiny_cnn/"),
        ("ok", {"weights": [1, 2]}, ValueError, "one weight per member (3 members)"),
        ("ok", {"weights": [1, -1, 1]}, ValueError, "Received: weights=[1.0, -1.0, 1.0]"),
        ("ok", {"weights": [0, 0, 0]}, ValueError, "not all zero"),
        ("ok", {"weights": "median"}, ValueError, "Did you mean 'mean'?"),
        ("ok", {"weights": "validation"}, ValueError, "Received: validation=None"),
        ("ok", {"validation": "data"}, ValueError, "only with weights='validation'"),
    ],
)
def test_bad_input_is_refused_by_name(members, models, options, error, fragment):
    chosen = {
        "one": lambda: members[:1],
        "not_a_list": lambda: members[0],
        "shapes": lambda: [members[0], _tiny_member(5, size=20)],
        "classes": lambda: [members[0], _tiny_member(5, num_classes=4)],
        "same": lambda: [members[0], members[0]],
        "shared": lambda: [
            members[0],
            kt.build_image_classifier(
                kt.get_backbone(members[0]), 3, weights=None, preprocessing="tf"
            ),
        ],
        "ok": lambda: members,
    }[models]()
    with pytest.raises(error) as caught:
        kt.techniques.ensemble(chosen, **options)
    assert fragment in str(caught.value)


def test_validation_weights_fall_back_to_equal_below_chance(members, images):
    # Labels neither of two members predicts: both at accuracy 0.
    predicted = np.stack([m.predict(images, verbose=0).argmax(-1) for m in members[:2]])
    wrong = np.array([min({0, 1, 2} - set(predicted[:, i])) for i in range(len(images))])
    with pytest.warns(UserWarning, match="No ensemble member beats chance"):
        model = kt.techniques.ensemble(members[:2], "validation", validation=(images, wrong))
    assert model.get_layer("average").member_weights == [0.5, 0.5]


@pytest.mark.slow
def test_ensemble_effect_on_fashion_mnist():
    """Seed 0 of the benchmark (Lite0 features, 5 MLP heads): >= mean, within 0.5 of best."""
    figures = ensemble_effect.measure(seed=0)
    print(figures)
    assert figures["max_abs_diff"] <= 1e-6
    assert figures["margin_over_mean_member"] >= 0.0
    assert figures["margin_over_best_member"] >= -0.005 - 1e-9  # float round-off only
