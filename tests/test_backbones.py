import keras
import numpy as np
import pytest
from conftest import TINY, image_batch

import keras_transfer as kt
from keras_transfer.backbones import detect_block_rule

# One constructor per keras.applications family module, at its minimum size.
ONE_PER_FAMILY = [
    "convnext_tiny",
    "densenet121",
    "efficientnet_b0",
    "efficientnet_v2_b0",
    "inception_resnet_v2",
    "inception_v3",
    "mobilenet",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "nasnet_mobile",
    "resnet50",
    "resnet50_v2",
    "vgg16",
    "xception",
]
EXPECTED_MODE = {
    "convnext": "none",
    "densenet": "torch",
    "efficientnet": "none",
    "efficientnet_v2": "none",
    "efficientnet_lite": "lite",
    "inception_resnet_v2": "tf",
    "inception_v3": "tf",
    "mobilenet": "tf",
    "mobilenet_v2": "tf",
    "mobilenet_v3": "none",
    "nasnet": "tf",
    "resnet": "caffe",
    "resnet_v2": "tf",
    "vgg": "caffe",
    "xception": "tf",
}


def check_backbone(name):
    spec = kt.get_backbone_spec(name)
    size = spec.min_input_size
    model, built_spec = kt.create_backbone(name, input_shape=(size, size, 3), weights=None)
    assert built_spec is spec and model.name == "backbone"
    assert len(model.output_shape) == 4
    assert spec.preprocessing == EXPECTED_MODE[spec.family]
    assert detect_block_rule(model) == spec.block_rule
    blocks = kt.backbone_blocks(model)
    assert len(blocks) >= 3, [b.name for b in blocks]
    names = [b.name for b in blocks]
    assert len(set(names)) == len(names), names
    # The first block starts at the first layer after the input.
    assert blocks[0].layers[0] is model.layers[1]
    # Blocks are consecutive runs in model order and cover every weighted layer.
    order = {id(layer): i for i, layer in enumerate(model.layers)}
    flat = [order[id(layer)] for block in blocks for layer in block.layers]
    assert flat == sorted(flat)
    covered = {id(layer) for block in blocks for layer in block.layers}
    assert all(id(layer) in covered for layer in model.layers if layer.weights)
    assert all(any(layer.weights for layer in block.layers) for block in blocks)
    keras.backend.clear_session()


def test_all_forty_registered():
    applications = [n for n in kt.list_backbones() if not n.startswith("efficientnet_lite")]
    assert len(applications) == 40
    assert len(kt.list_backbones(family="efficientnet_lite")) == 5
    assert len(kt.list_backbones(family="efficientnet")) == 8


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_one_backbone_per_family(name):
    check_backbone(name)


# Built, never compiled or trained (a few seconds each); `-m "not extra_large"` skips them.
EXTRA_LARGE = ("convnext_xlarge", "efficientnet_b7", "efficientnet_v2_l", "nasnet_large")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.extra_large) if n in EXTRA_LARGE else n
        for n in kt.list_backbones()
        if n not in ONE_PER_FAMILY
    ],
)
def test_every_other_backbone(name):
    check_backbone(name)


@pytest.mark.parametrize("mode, caffe_mode", [("tf", "tf"), ("torch", "torch"), ("caffe", "caffe")])
def test_preprocessing_matches_keras_applications(mode, caffe_mode):
    x = image_batch(2, 8)
    expected = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode=caffe_mode)
    got = kt.ImagePreprocessing(mode)(x)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


def test_lite_preprocessing():
    got = kt.ImagePreprocessing("lite")(np.array([[127.0, 255.0]]))
    np.testing.assert_allclose(np.asarray(got), [[0.0, 1.0]])


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean: mobilenet_v3_small"):
        kt.get_backbone_spec("mobilenet_v3_smal")
    with pytest.raises(ValueError, match="Received: backbone='resnet5000'"):
        kt.create_backbone("resnet5000", weights=None)


def test_input_below_family_minimum():
    with pytest.raises(
        ValueError, match=r">= 75 for 'inception_v3'. Received: input_shape=\(64, 64, 3\)"
    ):
        kt.create_backbone("inception_v3", input_shape=(64, 64, 3), weights=None)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        kt.create_backbone("resnet50", input_shape=(64, 64, 1), weights=None)


def test_missing_weights_file(tmp_path):
    missing = str(tmp_path / "nope.weights.h5")
    with pytest.raises(FileNotFoundError, match="nope.weights.h5"):
        kt.create_backbone("resnet50_v2", input_shape=(32, 32, 3), weights=missing)
    with pytest.raises(ValueError, match="Received: weights='imagenet21k'"):
        kt.create_backbone("resnet50_v2", input_shape=(32, 32, 3), weights="imagenet21k")


def test_weights_from_file(tmp_path):
    source, _ = kt.create_backbone(
        "mobilenet_v3_small", input_shape=(32, 32, 3), weights=None, **TINY
    )
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    loaded, _ = kt.create_backbone(
        "mobilenet_v3_small", input_shape=(32, 32, 3), weights=path, **TINY
    )
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        kt.register_backbone(kt.get_backbone_spec("resnet50"))


def test_user_model_as_backbone():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="c1")(inputs)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    user = keras.Model(inputs, x, name="mine")
    model = kt.build_image_classifier(user, num_classes=2, weights=None)
    assert model.get_layer("backbone") is user
    assert [b.name for b in kt.backbone_blocks(model)] == ["c1", "c2"]
