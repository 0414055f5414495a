"""KerasHub image backbones in `build_image_classifier`: presets, converters, blocks, export.

Tiny random-init ResNet (CNN) and ViT (transformer) backbones are saved with
`save_to_preset` plus their image converter, as a KerasHub task preset is,
and loaded back by path: the code path of a downloaded preset, offline.
"""

import functools

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from conftest import SIZE, assert_round_trip, image_batch, labels, weights_by_path

import keras_transfer as kt
from keras_transfer import export

# ImageNet mean/std folded into scale/offset, as KerasHub's ResNet presets store them.
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESNET_SCALE = [1 / (255 * s) for s in _STD]
RESNET_OFFSET = [-m / s for m, s in zip(_MEAN, _STD, strict=True)]


def tiny_resnet(use_pre_activation=False):
    """ResNet basic blocks, two stacks (the first must have 64 filters): 82 k parameters.

    Pre-activation (v2): the stem pads with -inf through `ops.pad`, a graph op, not a layer.
    """
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 8],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
        use_pre_activation=use_pre_activation,
    )


def tiny_vit():
    return keras_hub.models.ViTBackbone(
        image_shape=(SIZE, SIZE, 3),
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )


def _save_preset(folder, backbone, converter):
    backbone.save_to_preset(str(folder))
    converter.save_to_preset(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def resnet_preset(tmp_path_factory):
    keras.utils.set_random_seed(0)
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(SIZE, SIZE), scale=RESNET_SCALE, offset=RESNET_OFFSET
    )
    return _save_preset(tmp_path_factory.mktemp("tiny_resnet"), tiny_resnet(), converter)


@pytest.fixture(scope="module")
def vit_preset(tmp_path_factory):
    keras.utils.set_random_seed(0)
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(SIZE, SIZE), scale=1 / 127.5, offset=-1.0
    )
    return _save_preset(tmp_path_factory.mktemp("tiny_vit"), tiny_vit(), converter)


def test_preset_directory_bakes_in_the_converter(resnet_preset):
    model = kt.build_image_classifier(resnet_preset, 3)
    assert model.input.name == "image" and model.input_shape == (None, SIZE, SIZE, 3)
    assert model.name == "tiny_resnet0_classifier"
    x = image_batch(4)
    preprocess = keras.Model(model.input, model.get_layer("preprocessing").output)
    by_hand = keras_hub.layers.ImageConverter.from_preset(resnet_preset)(x)
    np.testing.assert_allclose(preprocess(x), by_hand, atol=1e-6, rtol=0)
    # "imagenet" loads the preset's weights; None initialises at random.
    saved = keras_hub.models.Backbone.from_preset(resnet_preset)
    backbone = model.get_layer("backbone")
    np.testing.assert_allclose(backbone(by_hand), saved(by_hand), atol=1e-5)
    random = kt.build_image_classifier(resnet_preset, 3, weights=None)
    kernel = "conv1_conv/kernel"
    assert not np.array_equal(
        weights_by_path(random.get_layer("backbone"))[kernel], weights_by_path(backbone)[kernel]
    )


def test_blocks_are_stages_and_transformer_layers(resnet_preset, vit_preset):
    resnet = kt.build_image_classifier(resnet_preset, 2, weights=None)
    assert [b.name for b in kt.backbone_blocks(resnet)] == ["stem", "stack0", "stack1"]
    vit = kt.build_image_classifier(vit_preset, 2, weights=None)
    blocks = kt.backbone_blocks(vit)
    assert [b.name for b in blocks] == ["stem", "layer0", "layer1", "top"]
    assert [layer.name for layer in blocks[1].layers] == ["transformer_block_1"]
    # ViT pools its class token: the output is the head on token 0.
    assert vit.get_layer("class_token_pool").output.shape == (None, 16)


def tiny_efficientnet():
    return keras_hub.models.EfficientNetBackbone(
        stackwise_kernel_sizes=[3, 3],
        stackwise_num_repeats=[1, 2],
        stackwise_input_filters=[8, 8],
        stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4],
        stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2],
        stackwise_block_types=["v1", "v1"],
        width_coefficient=1.0,
        depth_coefficient=1.0,
        num_features=32,
    )


def tiny_mobilenet_v3():
    return keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[16], [24, 24]],
        stackwise_num_blocks=[1, 2],
        stackwise_num_filters=[[8], [8, 8]],
        stackwise_kernel_size=[[3], [3, 3]],
        stackwise_num_strides=[[2], [1, 1]],
        stackwise_se_ratio=[[None], [0.25, 0.25]],
        stackwise_activation=[["relu"], ["hard_swish", "hard_swish"]],
        stackwise_padding=[[1], [1, 1]],
        output_num_filters=32,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=32,
        squeeze_and_excite=0.5,
        input_num_filters=8,
    )


@pytest.mark.parametrize(
    "make, blocks",
    [
        (tiny_efficientnet, ["stem", "block1", "block2", "top"]),
        (tiny_mobilenet_v3, ["stem", "block0", "block1", "block2", "block3"]),
        (
            functools.partial(tiny_resnet, use_pre_activation=True),
            ["stem", "stack0", "stack1", "top"],
        ),
    ],
)
def test_cnn_families_blocks_survive_reload(make, blocks, tmp_path):
    model = kt.build_image_classifier(make(), 2, input_shape=(SIZE, SIZE, 3))
    assert [b.name for b in kt.backbone_blocks(model)] == blocks
    loaded = assert_round_trip(model, image_batch(2), tmp_path)
    assert [b.name for b in kt.backbone_blocks(loaded)] == blocks


@pytest.mark.parametrize("recipe", kt.list_recipes())
def test_every_recipe_runs_on_a_preset(resnet_preset, recipe):
    model = kt.build_image_classifier(resnet_preset, 2, weights=None)
    before = weights_by_path(model.get_layer("backbone"))
    # The fewest epochs in which each recipe trains what it trains ("progressive"
    # trains the head alone in its first epoch).
    epochs = (1, 1) if kt.get_recipe(recipe).epoch_values == 2 else 1
    epochs = 2 if recipe == "progressive" else epochs
    plan = kt.plan_recipe(model, recipe, epochs=epochs)
    history = kt.fine_tune(
        model, (image_batch(8), labels(8, 2)), recipe=recipe, epochs=epochs, verbose=0
    )
    assert np.all(np.isfinite(history.history["loss"]))
    after = weights_by_path(model.get_layer("backbone"))
    changed = any(not np.array_equal(before[k], after[k]) for k in before)
    if not any(getattr(stage, "lora_rank", None) for stage in plan):  # LoRA trains adapters
        assert changed == any(stage.train_blocks or stage.progressive for stage in plan)


def test_progressive_unfreezing_over_vit_layers(vit_preset):
    model = kt.build_image_classifier(vit_preset, 2, weights=None, dropout=0.0)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    blocks = kt.backbone_blocks(model)
    before = {b.name: weights_by_path(keras.Sequential(b.layers)) for b in blocks}
    # Epoch 0: head only; 1: + top; 2: + layer1.
    model.fit(
        image_batch(8),
        labels(8, 2),
        epochs=3,
        verbose=0,
        callbacks=[kt.ProgressiveUnfreezing(1)],
    )
    changed = {
        b.name: any(
            not np.array_equal(before[b.name][v.path], v.numpy())
            for layer in b.layers
            for v in layer.trainable_weights
        )
        for b in blocks
    }
    assert changed == {"stem": False, "layer0": False, "layer1": True, "top": True}


def test_round_trip_and_export_parity(resnet_preset, vit_preset, tmp_path):
    x = image_batch(4)
    for name, preset in (("resnet", resnet_preset), ("vit", vit_preset)):
        (tmp_path / name).mkdir()
        model = kt.build_image_classifier(preset, 3, weights="imagenet", augmentation="light")
        head = model.get_layer("head")
        head.kernel.assign(np.random.default_rng(0).normal(0, 3, head.kernel.shape))
        loaded = assert_round_trip(model, x, tmp_path / name)
        assert [b.name for b in kt.backbone_blocks(loaded)] == [
            b.name for b in kt.backbone_blocks(model)
        ]
        expected = model.predict(x, verbose=0)
        path = export.saved_model(model, str(tmp_path / name / "served"))
        served = tf.saved_model.load(path).signatures["serving_default"]
        probabilities = served(image=tf.constant(x))["probabilities"].numpy()
        assert np.abs(probabilities - expected).max() <= 1e-5
        report = export.tflite(
            model, str(tmp_path / name / "m.tflite"), evaluation_data=(x, labels(4)), verbose=False
        )
        assert report.max_abs_diff <= 1e-5


def test_backbone_object_and_converter_object():
    vit = tiny_vit()
    plain = kt.build_image_classifier(vit, 2)
    assert "preprocessing" not in [layer.name for layer in plain.layers]
    converter = keras_hub.layers.ViTImageConverter(scale=1 / 255)
    model = kt.build_image_classifier(vit, 2, preprocessing=converter)
    x = image_batch(2)
    np.testing.assert_allclose(
        keras.Model(model.input, model.get_layer("preprocessing").output)(x), x / 255, atol=1e-6
    )
    # The Backbone keeps its weights: the nested model computes what it does.
    np.testing.assert_allclose(model.get_layer("backbone")(x / 255), vit(x / 255), atol=1e-5)


def test_unknown_name_lists_registry_and_kerashub_names():
    with pytest.raises(ValueError, match="Did you mean: .*resnet50.*resnet_50_imagenet"):
        kt.build_image_classifier("resnet_50", 2)
    with pytest.raises(
        ValueError, match="resnet_18_imagenet.*Received: backbone='resnet_18_imagenett'"
    ):
        kt.build_image_classifier("resnet_18_imagenett", 2)
    with pytest.raises(ValueError, match="not an image model"):
        kt.build_image_classifier("bert_tiny_en_uncased", 2)


def test_download_failure_is_a_connection_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Failed to resolve 'api.kaggle.com'")  # as requests' ConnectionError

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", offline)
    with pytest.raises(ConnectionError, match="Could not download KerasHub preset 'resnet_18"):
        kt.build_image_classifier("resnet_18_imagenet", 2)


def test_directory_errors(resnet_preset, tmp_path):
    empty = tmp_path / "not_a_preset"
    empty.mkdir()
    (empty / "weights.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=f"{empty}.*no config.json"):
        kt.build_image_classifier(str(empty), 2)
    (empty / "config.json").write_text('{"foo": 1}')
    with pytest.raises(ValueError, match=f"Unrecognized format for config.json in {empty}"):
        kt.build_image_classifier(str(empty), 2)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        kt.build_image_classifier(str(tmp_path / "missing_dir"), 2)
    no_converter = tmp_path / "no_converter"
    tiny_resnet().save_to_preset(str(no_converter))
    with pytest.raises(ValueError, match="has no image converter"):
        kt.build_image_classifier(str(no_converter), 2, input_shape=(SIZE, SIZE, 3))
    # An explicit mode needs no converter.
    model = kt.build_image_classifier(
        str(no_converter), 2, weights=None, input_shape=(SIZE, SIZE, 3), preprocessing="torch"
    )
    assert model.get_layer("preprocessing").get_config()["mode"] == "torch"
    with pytest.raises(TypeError, match="Received: Dense"):
        kt.build_image_classifier(resnet_preset, 2, preprocessing=keras.layers.Dense(3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "random"}, "Received: weights='random'"),
        ({"input_shape": (64, 64, 3)}, "takes images of 32x32 pixels only"),
        ({"input_shape": (32, 32)}, r"Received: input_shape=\(32, 32\)"),
    ],
)
def test_bad_arguments(vit_preset, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kt.build_image_classifier(vit_preset, 2, **kwargs)
