import keras
import numpy as np
import pytest
from conftest import image_batch, labels, tiny_classifier

import keras_transfer as kt
from keras_transfer.export.parity import _LiteRunner


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


class _FailOnTrain(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        raise AssertionError("training started before the arguments were checked")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight_decay": -1.0}, "Received: weight_decay=-1.0"),
        ({"patience": -1}, "Received: patience=-1"),
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"lr_spread": 0.5}, "Received: lr_spread=0.5"),
        ({"label_smoothing": 1.0}, "Received: label_smoothing=1.0"),
        ({"lr_scaling": "sqrt"}, "Received: lr_scaling='sqrt'"),
        ({"steps_per_epoch": 0}, "Received: steps_per_epoch=0"),
        ({"rank": 8}, r"takes the options \[\]. Received: unknown option\(s\) \['rank'\]"),
        ({"recipe": "two_stag"}, "Did you mean 'two_stage'"),
    ],
)
def test_every_argument_is_checked_before_training(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kt.fine_tune(
            tiny_classifier(),
            (image_batch(4), labels(4)),
            epochs=(1, 1) if "recipe" not in kwargs else 1,
            callbacks=[_FailOnTrain()],
            verbose=0,
            **kwargs,
        )


def test_arrays_are_shuffled_every_epoch():
    # Class-sorted arrays: in order, every batch of 4 would hold one class only.
    y = np.repeat([0, 1], 8)
    x = np.arange(16, dtype="float32")
    data = kt.training.as_dataset((x, y), batch_size=4, seed=0)
    epochs = [[batch[1].numpy().tolist() for batch in data] for _ in range(2)]
    assert any(len(set(batch)) > 1 for batch in epochs[0])
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    again = kt.training.as_dataset((x, y), batch_size=4, seed=0)
    assert [b[1].numpy().tolist() for b in again] == epochs[0]  # seeded
    validation = kt.training.as_dataset((x, y), batch_size=4, name="validation")
    assert [b[1].numpy().tolist() for b in validation][0] == [0, 0, 0, 0]


def test_stages_are_public_and_recipes_extensible():
    def plan(settings, rounds=1):
        return [
            kt.Stage(f"head{i}", settings.epochs, settings.learning_rate) for i in range(rounds)
        ]

    recipe = kt.Recipe("test_head_rounds", plan, default_epochs=1, options=("rounds",))
    kt.register_recipe(recipe)
    with pytest.raises(ValueError, match="already registered"):
        kt.register_recipe(recipe)
    model = tiny_classifier()
    data = (image_batch(8), labels(8))
    history = kt.fine_tune(model, data, recipe="test_head_rounds", rounds=2, epochs=1, verbose=0)
    assert history.history["stage"] == [1, 2]
    stages = kt.plan_recipe(model, "two_stage", epochs=(2, 1), unfreeze_blocks=3)
    assert [(s.name, s.epochs, s.train_blocks, s.discriminative) for s in stages] == [
        ("head", 2, 0, False),
        ("fine_tune", 1, 3, True),
    ]
    # Stage 2 on its own: the top 3 blocks train, the rest of the backbone does not.
    before = {v.path: v.numpy().copy() for v in model.get_layer("backbone").weights}
    kt.fit_stage(model, data, stage=stages[1], verbose=0)
    blocks = kt.backbone_blocks(model)
    changed = {
        block.name: any(
            not np.array_equal(before[w.path], w.numpy())
            for layer in block.layers
            for w in layer.trainable_weights
        )
        for block in blocks
    }
    assert [changed[b.name] for b in blocks[-3:]] == [True] * 3
    assert not any(changed[b.name] for b in blocks[:-3])


def _two_head_model():
    inputs = keras.Input((32, 32, 3), name="image")
    backbone, _ = kt.create_backbone(
        "mobilenet_v3_small", input_shape=(32, 32, 3), weights=None, alpha=0.75, minimalistic=True
    )
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    outputs = {
        "color": kt.make_head("softmax", 3, name="color")(x),
        "size": kt.make_head("regression", 1, name="size")(x),
    }
    return keras.Model(inputs, outputs)


def test_two_heads_train_with_a_loss_per_head_and_weights():
    model = _two_head_model()
    x = image_batch(8)
    targets = {"color": labels(8), "size": np.linspace(0, 1, 8, dtype="float32")[:, None]}
    history = kt.fine_tune(
        model,
        (x, targets),
        recipe="feature_extraction",
        epochs=1,
        loss_weights={"color": 1.0, "size": 0.5},
        verbose=0,
    )
    assert {"color_loss", "size_loss", "color_accuracy"} <= set(history.history)
    result = model.evaluate(x, targets, return_dict=True, verbose=0)
    expected = result["color_loss"] + 0.5 * result["size_loss"]
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"Targets are missing for heads \['size'\]"):
        kt.fine_tune(model, (x, {"color": labels(8)}), recipe="feature_extraction", epochs=1)
    with pytest.raises(ValueError, match=r"keys must be output names.*\['shape'\]"):
        kt.fine_tune(model, (x, targets), epochs=(1, 1), loss={"shape": "mse"})


def test_a_custom_loss_is_the_one_used():
    def seven(y_true, y_pred):
        return keras.ops.mean(y_pred) * 0.0 + 7.0

    history = kt.fine_tune(
        tiny_classifier(),
        (image_batch(8), labels(8)),
        recipe="feature_extraction",
        epochs=1,
        loss=seven,
        verbose=0,
    )
    assert history.history["loss"] == [pytest.approx(7.0)]
    # Any output layer takes a given loss (no default metrics for a kind it is not).
    inputs = keras.Input((32, 32, 3), name="image")
    backbone, _ = kt.create_backbone(
        "mobilenet_v3_small", input_shape=(32, 32, 3), weights=None, alpha=0.75, minimalistic=True
    )
    x = keras.layers.GlobalAveragePooling2D()(backbone(inputs))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="relu", name="score")(x))
    targets = np.ones((8, 2), "float32")
    history = kt.fine_tune(
        model,
        (image_batch(8), targets),
        recipe="feature_extraction",
        epochs=1,
        loss="mse",
        verbose=0,
    )
    assert list(history.history) == ["loss", "stage"]


def test_mixed_bfloat16_trains_and_exports_float32(tmp_path):
    import tensorflow as tf

    model = tiny_classifier(mixed_precision="mixed_bfloat16")
    assert model.get_layer("backbone").compute_dtype == "bfloat16"
    assert model.get_layer("head").compute_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"  # restored after building
    history = kt.fine_tune(
        model, (image_batch(8), labels(8)), recipe="full", epochs=1, batch_size=4, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()
    path = kt.export.saved_model(model, str(tmp_path / "bf16"))
    served = tf.saved_model.load(path).signatures["serving_default"]
    assert served.structured_input_signature[1]["image"].dtype == tf.float32
    assert served.structured_outputs["probabilities"].dtype == tf.float32
    out = served(image=tf.constant(image_batch(2)))["probabilities"].numpy()
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-2)
    report = kt.export.tflite(model, str(tmp_path / "bf16.tflite"), verbose=False)
    assert report.size_bytes > 0
    assert _LiteRunner(report.path).input_dtype == np.float32


def test_mixed_float16_without_a_gpu_warns_and_scales_the_loss():
    with pytest.warns(UserWarning, match="mixed_float16 without a GPU"):
        model = tiny_classifier(mixed_precision="mixed_float16")
    kt.fine_tune(
        model,
        (image_batch(4), labels(4)),
        recipe="feature_extraction",
        epochs=1,
        batch_size=4,
        verbose=0,
    )
    assert type(model.optimizer).__name__ == "LossScaleOptimizer"
    assert type(model.optimizer.inner_optimizer).__name__ == "LayerwiseAdamW"


def test_run_config_checks_every_value():
    for kwargs, message in [
        ({"batch_size": 0}, "Received: batch_size=0"),
        ({"recipe": "fast"}, "Received: recipe='fast'"),
        ({"augmentation": "heavy"}, "Received: augmentation='heavy'"),
        ({"test_split": 1.5}, "Received: test_split=1.5"),
        ({"epochs": (1, -1)}, r"Received: epochs=\(1, -1\)"),
        ({"mixed_precision": "float8"}, "Received: mixed_precision='float8'"),
    ]:
        with pytest.raises(ValueError, match=message):
            kt.RunConfig(**kwargs)


def test_text_backbone_takes_config_overrides():
    model = kt.build_text_classifier("minilm", 2, weights=None, num_layers=1)
    assert len(kt.backbone_blocks(model)) < len(
        kt.backbone_blocks(kt.build_text_classifier("minilm", 2, weights=None))
    )
