import numpy as np
import pytest
from conftest import image_batch, labels, tiny_classifier, weights_by_path

import keras_transfer as kt


def fit_briefly(model, epochs=2, lr=1e-2):
    model.compile(
        optimizer=kt.layerwise_optimizer("adam", learning_rate=lr),
        loss="sparse_categorical_crossentropy",
    )
    kt.prepare_for_unfreezing(model)
    model.fit(image_batch(8), labels(8), batch_size=4, epochs=epochs, verbose=0)


def moving_stats(model):
    backbone = model.get_layer("backbone")
    return {v.path: v.numpy().copy() for v in backbone.non_trainable_weights}


def test_frozen_backbone_is_bit_identical_after_fit():
    model = tiny_classifier()
    backbone_before = weights_by_path(model.get_layer("backbone"))
    head_before = weights_by_path(model.get_layer("head"))
    assert any("moving_mean" in p for p in backbone_before)
    fit_briefly(model)
    for path, value in weights_by_path(model.get_layer("backbone")).items():
        np.testing.assert_array_equal(value, backbone_before[path], err_msg=path)
    head_after = weights_by_path(model.get_layer("head"))
    assert any(not np.array_equal(head_after[p], head_before[p]) for p in head_before)


def trainable_blocks(model):
    return [r["block"] for r in kt.trainable_summary(model, print_fn=None) if r["trainable"]]


def test_unfreeze_selectors():
    model = tiny_classifier()
    names = [b.name for b in kt.backbone_blocks(model)]
    kt.unfreeze(model, blocks=3)
    assert trainable_blocks(model) == [*names[-3:], "head"]
    kt.unfreeze(model, fraction=0.5)
    assert trainable_blocks(model) == [*names[-7:], "head"]
    kt.unfreeze(model, from_layer="expanded_conv_10_expand")
    assert trainable_blocks(model) == ["block10", "top", "head"]
    kt.unfreeze(model, "all")
    assert trainable_blocks(model) == [*names, "head"]
    kt.freeze_backbone(model)
    assert trainable_blocks(model) == ["head"]


def test_unfreeze_keeps_batchnorm_frozen_by_default():
    model = tiny_classifier()
    kt.unfreeze(model, "all")
    stats = moving_stats(model)
    bn_gammas = {
        v.path: v.numpy().copy()
        for v in model.get_layer("backbone").weights
        if v.path.endswith("gamma")
    }
    fit_briefly(model, epochs=1)
    for path, value in moving_stats(model).items():
        np.testing.assert_array_equal(value, stats[path], err_msg=path)
    after = {v.path: v.numpy() for v in model.get_layer("backbone").weights}
    for path, value in bn_gammas.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_affine_policy_trains_gamma_not_statistics():
    model = tiny_classifier(bn_policy="affine")
    kt.unfreeze(model, "all", bn_policy="affine")
    stats = moving_stats(model)
    gamma = "conv_1_bn/gamma"
    before = model.get_layer("backbone").get_layer("conv_1_bn").gamma.numpy().copy()
    fit_briefly(model, epochs=1)
    for path, value in moving_stats(model).items():
        np.testing.assert_array_equal(value, stats[path], err_msg=path)
    after = model.get_layer("backbone").get_layer("conv_1_bn").gamma.numpy()
    assert not np.array_equal(before, after), gamma


def test_train_policy_updates_statistics():
    model = tiny_classifier(bn_policy="train")
    kt.unfreeze(model, "all", bn_policy="train")
    stats = moving_stats(model)
    fit_briefly(model, epochs=1)
    changed = [p for p, v in moving_stats(model).items() if not np.array_equal(v, stats[p])]
    assert changed


def test_bn_policy_mismatch():
    with pytest.raises(ValueError, match="Received: bn_policy='affine'"):
        kt.unfreeze(tiny_classifier(), "all", bn_policy="affine")
    with pytest.raises(ValueError, match="Received: bn_policy='train'"):
        kt.unfreeze(tiny_classifier(bn_policy="affine"), "all", bn_policy="train")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blocks": 99}, "Received: blocks=99"),
        ({"fraction": 0.0}, "Received: fraction=0.0"),
        ({"from_layer": "conv_1_bnn"}, "Did you mean: conv_1_bn"),
        ({"what": "some"}, "Received: what='some'"),
        ({}, "Pass exactly one"),
        ({"blocks": 1, "fraction": 0.5}, "Pass exactly one"),
    ],
)
def test_unfreeze_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kt.unfreeze(tiny_classifier(), **kwargs)


def test_trainable_summary_prints_and_counts(capsys):
    model = tiny_classifier()
    rows = kt.trainable_summary(model)
    out = capsys.readouterr().out
    assert "total" in out and "head" in out
    total = sum(r["trainable"] + r["frozen"] for r in rows)
    assert total == model.count_params()
