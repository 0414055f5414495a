import keras
import numpy as np
import pytest
from conftest import assert_round_trip, tiny_text_classifier

import keras_transfer as kt
from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.builders import MaskedMeanPooling
from keras_transfer.data import load_wordnet_nouns, text_dataset

SEQUENCE_LENGTH = 16


@pytest.fixture(scope="module")
def wordnet_splits():
    texts, labels, names = load_wordnet_nouns(max_per_class=6)
    return text_dataset(
        texts,
        labels,
        text_preprocessor("minilm", SEQUENCE_LENGTH),
        class_names=names,
        batch_size=8,
        validation_split=0.0,
        test_split=0.25,
        seed=0,
    )


def test_masked_mean_pooling_ignores_padding():
    tokens = np.array([[[1.0, 2.0], [3.0, 4.0], [50.0, 60.0]]])
    pooled = MaskedMeanPooling()(tokens, np.array([[1, 1, 0]]))
    np.testing.assert_allclose(np.asarray(pooled), [[2.0, 3.0]])


def test_text_dataset_is_tokenised_and_deterministic(wordnet_splits):
    x, y = next(iter(wordnet_splits.test))
    assert sorted(x) == ["padding_mask", "segment_ids", "token_ids"]
    assert x["token_ids"].shape[1] == SEQUENCE_LENGTH
    assert wordnet_splits.info["counts"] == {"train": 16, "validation": 0, "test": 8}
    again = text_dataset(
        *load_wordnet_nouns(max_per_class=6)[:2],
        text_preprocessor("minilm", SEQUENCE_LENGTH),
        class_names=wordnet_splits.class_names,
        batch_size=8,
        validation_split=0.0,
        test_split=0.25,
        seed=0,
    )
    np.testing.assert_array_equal(next(iter(again.test))[1], y)


def test_text_classifier_blocks_and_frozen_training(wordnet_splits, tmp_path):
    model = kt.build_text_classifier("minilm", num_classes=4, weights=None)
    assert [b.name for b in kt.backbone_blocks(model)] == ["stem", *[f"layer{i}" for i in range(6)]]
    before = {v.path: v.numpy().copy() for v in model.get_layer("backbone").weights}
    head = model.get_layer("head").kernel.numpy().copy()
    kt.fine_tune(model, wordnet_splits.train, recipe="feature_extraction", epochs=1, verbose=0)
    for v in model.get_layer("backbone").weights:
        np.testing.assert_array_equal(v.numpy(), before[v.path])
    assert not np.array_equal(model.get_layer("head").kernel.numpy(), head)
    x, _ = next(iter(wordnet_splits.test))
    assert_round_trip(model, x, tmp_path)


def test_text_backbone_errors(tmp_path):
    with pytest.raises(ValueError, match="Received: weights='imagenet'"):
        kt.build_text_classifier("minilm", num_classes=2, weights="imagenet")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        kt.build_text_classifier(str(tmp_path / "nowhere"), num_classes=2)


@pytest.mark.slow
def test_pretrained_minilm_embeds_meaning():
    """Mean-pooled MiniLM vectors: a puppy is closer to a dog than to a car."""
    model = kt.build_text_classifier("minilm", num_classes=2)
    encoder = keras.Model(model.input, model.get_layer("mean_pool").output)
    preprocessor = text_preprocessor("minilm", SEQUENCE_LENGTH)
    texts = ["a young dog", "a puppy", "a motor vehicle with four wheels"]
    vectors = np.asarray(encoder.predict(preprocessor(texts), verbose=0))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1


def test_progressive_unfreezing_reaches_transformer_layers_in_order(wordnet_splits):
    """Inside one fit: a layer scheduled for a later epoch is unchanged before it."""
    model = tiny_text_classifier(4, SEQUENCE_LENGTH, num_layers=3)
    backbone = model.get_layer("backbone")
    layers = {
        name: backbone.get_layer(f"transformer_layer_{i}")
        for i, name in enumerate(("layer0", "layer1", "layer2"))
    }
    snapshots = []

    class Snapshot(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            snapshots.append(
                {name: [w.numpy().copy() for w in layer.weights] for name, layer in layers.items()}
            )

    start = {name: [w.numpy().copy() for w in layer.weights] for name, layer in layers.items()}
    kt.fine_tune(
        model,
        wordnet_splits.train,
        recipe="progressive",
        epochs=3,
        callbacks=[Snapshot()],
        verbose=0,
    )

    def changed(name, epoch):
        return any(
            not np.array_equal(a, b)
            for a, b in zip(start[name], snapshots[epoch][name], strict=True)
        )

    # Epoch 0: head only; epoch 1: + layer2 (the top); epoch 2: + layer1.
    assert [changed("layer2", e) for e in range(3)] == [False, True, True]
    assert [changed("layer1", e) for e in range(3)] == [False, False, True]
    assert [changed("layer0", e) for e in range(3)] == [False, False, False]


def test_text_classifier_options_and_errors(tmp_path):
    model = kt.build_text_classifier(
        "minilm", 2, weights=None, sequence_length=8, pooling="cls", num_layers=1
    )
    assert model.get_layer("cls_pool") is not None
    x = model.preprocessor(["a cat", "a long sentence about a very small dog indeed"])
    assert x["token_ids"].shape == (2, 8)
    assert model.predict(x, verbose=0).shape == (2, 2)
    with pytest.raises(ValueError, match=r"sequence_length` must be <= 512.*sequence_length=513"):
        kt.build_text_classifier("minilm", 2, weights=None, sequence_length=513, num_layers=1)
    with pytest.raises(ValueError, match="Received: sequence_length=1"):
        kt.build_text_classifier("minilm", 2, weights=None, sequence_length=1)
    with pytest.raises(ValueError, match=r"Received: pooling='max'"):
        kt.build_text_classifier("minilm", 2, weights=None, pooling="max")
    with pytest.raises(
        ValueError, match=r"Unknown KerasHub text preset 'bert_bse_en'.*bert_base_en"
    ):
        kt.build_text_classifier("bert_bse_en", 2)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes. is not a KerasHub preset or Hugging Face model"):
        kt.build_text_classifier(str(tmp_path / "notes"), 2)
