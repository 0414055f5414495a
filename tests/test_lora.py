"""LoRA (kt.lora and the "lora" recipe) on a tiny CNN, a tiny BERT and the real MiniLM."""

import json
import os
import zipfile

import keras
import numpy as np
import pytest
from conftest import assert_user_error, run_cli, tiny_text_classifier

import keras_transfer as kt
from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.data import load_wordnet_nouns, text_dataset


def _cnn():
    keras.utils.set_random_seed(1)
    return kt.build_image_classifier(
        "mobilenet_v3_small", 3, weights=None, input_shape=(32, 32, 3), alpha=0.75, dropout=0.0
    )


def _kernels(model):
    """Every non-adapter backbone variable, by path."""
    return {
        v.path: np.array(v.numpy())
        for v in kt.get_backbone(model).weights
        if "lora_kernel" not in v.path
    }


def _config_has_lora(path):
    with zipfile.ZipFile(path) as archive:
        return "lora_rank" in archive.read("config.json").decode()


@pytest.fixture(scope="module")
def cnn_lora(tmp_path_factory):
    """A tiny CNN trained with the lora recipe, with its base weights from before."""
    model = _cnn()
    base_weights = model.get_weights()
    before = _kernels(model)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32")
    labels = np.arange(24) % 3
    kt.fine_tune(model, (images, labels), recipe="lora", epochs=2, lora_rank=4, verbose=0)
    return model, base_weights, before, images, tmp_path_factory.mktemp("cnn_lora")


def test_lora_on_conv_kernels_trains_only_adapters(cnn_lora):
    model, _, before, _, _ = cnn_lora
    layers = kt.lora.lora_layers(model)
    assert layers and all(isinstance(layer, keras.layers.Conv2D) for layer in layers.values())
    for path, value in _kernels(model).items():  # base kernels, BN statistics: untouched
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    moved = [layer for layer in layers.values() if np.any(layer.lora_kernel_b.numpy() != 0)]
    assert len(moved) == len(layers)  # every adapter trained (B starts at zero)


def test_enable_reports_skipped_depthwise_and_trainable_fraction(capsys):
    model = _cnn()
    report = kt.lora.enable(model, rank=2, alpha=4)
    assert report.alpha == 4 and report.rank == 2
    assert report.skipped and all("DepthwiseConv2D" in s for s in report.skipped)
    head = model.get_layer("head")
    expected = report.adapter_params + sum(int(np.prod(v.shape)) for v in head.weights)
    assert report.trainable_params == expected
    assert "Skipped" in str(report) and "%" in str(report)
    kt.trainable_summary(model)
    assert "trainable fraction" in capsys.readouterr().out


def test_merge_equals_lora_model_and_reloads_plain(cnn_lora):
    model, _, _, images, folder = cnn_lora
    merged = kt.lora.merge(model)
    np.testing.assert_allclose(
        merged.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5
    )
    assert not kt.lora.lora_layers(merged)
    path = os.path.join(folder, "merged.keras")
    merged.save(path)
    assert not _config_has_lora(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert not any("lora" in v.path for v in reloaded.weights)
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5
    )


def test_adapters_file_round_trip(cnn_lora):
    model, base_weights, _, images, folder = cnn_lora
    path = kt.lora.save_adapters(model, os.path.join(folder, "adapters"))
    fresh = _cnn()
    fresh.set_weights(base_weights)
    # The head trained too: the adapter file holds only adapters, so copy it.
    fresh.get_layer("head").set_weights(model.get_layer("head").get_weights())
    report = kt.lora.load_adapters(fresh, path)
    assert report.layers == tuple(kt.lora.lora_layers(model))
    np.testing.assert_allclose(
        fresh.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5
    )
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        kt.lora.load_adapters(fresh, path)
    other = kt.build_image_classifier("resnet50_v2", 3, weights=None, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="do not fit this model"):
        kt.lora.load_adapters(other, path)


def test_lora_errors():
    model = _cnn()
    data = (np.zeros((4, 32, 32, 3), "float32"), np.arange(4) % 3)
    with pytest.raises(ValueError, match="Received: lora_rank=0"):
        kt.fine_tune(model, data, recipe="lora", lora_rank=0, verbose=0)
    with pytest.raises(ValueError, match="Received: lora_alpha=-1"):
        kt.fine_tune(model, data, recipe="lora", lora_alpha=-1, verbose=0)
    with pytest.raises(ValueError, match=r"match no layer.*\['no_such_layer'\]"):
        kt.lora.enable(model, rank=2, targets=["no_such_layer"])
    with pytest.raises(ValueError, match="Received: rank=-3"):
        kt.lora.enable(model, rank=-3)
    kt.lora.enable(model, rank=2)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        kt.lora.enable(model, rank=2)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        kt.lora.save_adapters(_cnn(), "/tmp/never")


def test_lora_on_a_tiny_bert_targets_query_and_value():
    texts, labels, names = load_wordnet_nouns(("animal", "food"), max_per_class=8)
    splits = text_dataset(
        texts,
        labels,
        text_preprocessor("minilm", 16),
        class_names=names,
        batch_size=8,
        validation_split=0.0,
        test_split=0.25,
    )
    model = tiny_text_classifier(2, num_layers=2)
    before = _kernels(model)
    kt.fine_tune(model, splits.train, recipe="lora", epochs=1, lora_rank=2, verbose=0)
    names = [path.rsplit("/", 1)[-1] for path in kt.lora.lora_layers(model)]
    assert names == ["query", "value"] * 2
    for path, value in _kernels(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    x, _ = next(iter(splits.test))
    merged = kt.lora.merge(model)
    np.testing.assert_allclose(merged.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    assert merged.preprocessor is model.preprocessor


@pytest.mark.slow
def test_minilm_lora_vs_full_fine_tuning_vs_random_init(tmp_path):
    """The issue's acceptance, on real text: three MiniLM runs (~60 s)."""
    texts, labels, names = load_wordnet_nouns(max_per_class=40, seed=0)
    splits = text_dataset(
        texts,
        labels,
        text_preprocessor("minilm", 32),
        class_names=names,
        batch_size=16,
        validation_split=0.0,
        test_split=0.4,
    )

    def train(weights, recipe, **options):
        keras.utils.set_random_seed(0)
        model = kt.build_text_classifier("minilm", 4, weights=weights, sequence_length=32)
        kt.fine_tune(model, splits.train, recipe=recipe, epochs=3, verbose=0, **options)
        return model, model.evaluate(splits.test, verbose=0, return_dict=True)["accuracy"]

    # Full fine-tuning at its documented LR (1e-4 everywhere, as the text demo's baseline).
    full, full_accuracy = train("pretrained", "full", lr_spread=1.0)
    _, random_accuracy = train(None, "full", lr_spread=1.0)
    assert full_accuracy > random_accuracy + 0.2, (full_accuracy, random_accuracy)

    keras.utils.set_random_seed(0)
    model = kt.build_text_classifier("minilm", 4, sequence_length=32)
    before = _kernels(model)
    report_rows = []
    kt.fine_tune(model, splits.train, recipe="lora", epochs=3, lora_rank=8, verbose=0)
    lora_accuracy = model.evaluate(splits.test, verbose=0, return_dict=True)["accuracy"]
    kt.trainable_summary(model, print_fn=report_rows.append)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    total = sum(int(np.prod(v.shape)) for v in model.weights)
    assert trainable / total <= 0.02, trainable / total
    for path, value in _kernels(model).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    assert lora_accuracy >= full_accuracy - 0.05, (lora_accuracy, full_accuracy)
    print(
        f"test accuracy: full {full_accuracy:.3f}, random init {random_accuracy:.3f}, "
        f"LoRA r=8 {lora_accuracy:.3f}; {report_rows[-1]}"
    )

    adapters = kt.lora.save_adapters(model, tmp_path / "minilm")
    merged = kt.lora.merge(model)
    merged.save(tmp_path / "merged.keras")
    assert os.path.getsize(adapters) < 0.05 * os.path.getsize(tmp_path / "merged.keras")
    x, _ = next(iter(splits.test))
    np.testing.assert_allclose(merged.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)
    reloaded = keras.saving.load_model(tmp_path / "merged.keras", safe_mode=True)
    assert not any("lora" in v.path for v in reloaded.weights)
    assert not _config_has_lora(tmp_path / "merged.keras")
    record = json.loads(str(np.load(adapters)["__lora__"]))
    assert record["rank"] == 8 and len(record["layers"]) == 12


def test_cli_lora_run_saves_adapters_and_a_plain_model(tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--data=digits",
        "--backbone=mobilenet_v3_small",
        "--weights=none",
        "--image_size=32",
        "--max_per_class=6",
        "--recipe=lora",
        "--epochs=1",
        f"--output_dir={out}",
    ]
    assert_user_error(run_cli(*args, "--lora_rank=0"), "lora_rank=0")
    assert not out.exists() and not list(tmp_path.iterdir())
    result = run_cli(*args, "--lora_rank=2", "--lora_alpha=4")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(str(np.load(out / "adapters.lora.npz")["__lora__"]))
    assert (record["rank"], record["alpha"]) == (2, 4.0)
    assert not _config_has_lora(out / "model.keras")
    model = keras.saving.load_model(out / "model.keras", safe_mode=True)
    assert not any("lora" in v.path for v in model.weights)
    assert json.loads((out / "config.json").read_text())["lora_rank"] == 2


def test_export_ships_the_merged_model(cnn_lora):
    model, _, _, images, folder = cnn_lora
    version = kt.export.saved_model(
        model, os.path.join(folder, "export", "cnn"), models_config=False
    )
    import tensorflow as tf

    served = tf.saved_model.load(version)
    assert not any("lora" in v.name for v in served.variables)
    probabilities = served.signatures["serving_default"](image=tf.constant(images[:4]))
    np.testing.assert_allclose(
        probabilities["probabilities"].numpy(), model.predict(images[:4], verbose=0), atol=1e-5
    )
    report = kt.export.tflite(
        model, os.path.join(folder, "cnn.tflite"), evaluation_data=images, verbose=False
    )
    assert report.max_abs_diff <= 1e-5
