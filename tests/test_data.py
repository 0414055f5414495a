import gzip
import os

import numpy as np
import pytest
from PIL import Image

from keras_transfer.data import (
    FASHION_MNIST_CLASSES,
    DatasetSplits,
    array_dataset,
    image_folder_dataset,
    load_dataset,
    load_wordnet_nouns,
)
from keras_transfer.data.catalog import FASHION_MNIST_DIR, _read_idx
from keras_transfer.data.text import WORDNET_NOUN_PATH

needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="apt-get install dataset-fashion-mnist"
)
needs_wordnet = pytest.mark.skipif(
    not os.path.isfile(WORDNET_NOUN_PATH), reason="apt-get install wordnet-base"
)


def _collect(dataset):
    """All (images, labels) of a batched dataset as numpy arrays."""
    batches = list(dataset)
    return (
        np.concatenate([x.numpy() for x, _ in batches]),
        np.concatenate([y.numpy() for _, y in batches]),
    )


def _save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def image_folder(tmp_path):
    """cat/ and dog/ with five 8x8 RGB images each (PNG and JPEG), plus a grey PNG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        for i in range(5):
            ext = "png" if i % 2 else "JPG"
            _save(root / name / f"{i}.{ext}", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    _save(root / "dog" / "grey.png", rng.integers(0, 256, (10, 6), dtype=np.uint8))
    return root


def test_image_folder_dataset_batches(image_folder):
    splits = image_folder_dataset(image_folder, image_size=(16, 12), batch_size=4)
    assert isinstance(splits, DatasetSplits)
    assert splits.class_names == ["cat", "dog"] and splits.num_classes == 2
    assert splits.info["counts"] == {"train": 9, "validation": 2, "test": 0}
    assert splits.test is None and splits.info["skipped"] == []
    images, labels = _collect(splits.train)
    assert images.shape == (9, 16, 12, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and set(labels) == {0, 1}
    assert images.min() >= 0 and images.max() <= 255
    # Stratified: each class gives 20% (rounded, at least one) to validation.
    assert sorted(_collect(splits.validation)[1]) == [0, 1]


def _epoch_signatures(dataset):
    """Each image of one epoch as bytes, in the order the dataset gives them."""
    images, _ = _collect(dataset)
    return [image.tobytes() for image in images]


@pytest.mark.parametrize("cache", ["auto", "path"])
def test_folder_over_the_cache_budget_is_decoded_each_epoch_in_bounded_memory(
    image_folder, tmp_path, monkeypatch, capsys, cache
):
    monkeypatch.setenv("KERAS_TRANSFER_IMAGE_CACHE_MB", "0")
    cache = str(tmp_path / "cache" / "images") if cache == "path" else cache
    if cache != "auto":
        (tmp_path / "cache").mkdir()
    reference = image_folder_dataset(image_folder, image_size=(8, 8), validation_split=0.0)
    assert reference.info["cache"]["mode"] == "none"
    assert "over the 0 MiB memory budget" in capsys.readouterr().out
    splits = image_folder_dataset(
        image_folder, image_size=(8, 8), validation_split=0.0, cache=cache, batch_size=3
    )
    assert splits.info["cache"]["mode"] == ("none" if cache == "auto" else "files")
    epochs = [_epoch_signatures(splits.train) for _ in range(3)]
    # Every image exactly once per epoch, the same pixels as an uncached read,
    # in a new order each epoch.
    expected = sorted(_epoch_signatures(reference.train))
    assert all(sorted(epoch) == expected for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


def test_plan_image_cache_keeps_small_folders_in_memory_and_checks_the_setting(monkeypatch):
    from keras_transfer.data import plan_image_cache

    monkeypatch.delenv("KERAS_TRANSFER_IMAGE_CACHE_MB", raising=False)
    assert plan_image_cache(10_000, (128, 128))["mode"] == "memory"
    plan = plan_image_cache(50_000, (128, 128))
    assert plan["mode"] == "none" and plan["decoded_bytes"] == 50_000 * 128 * 128 * 3
    assert plan_image_cache(50_000, (128, 128), cache=True)["mode"] == "memory"
    with pytest.raises(ValueError, match="Received: cache=3.5"):
        plan_image_cache(1, (8, 8), cache=3.5)
    monkeypatch.setenv("KERAS_TRANSFER_IMAGE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="KERAS_TRANSFER_IMAGE_CACHE_MB must be a number"):
        plan_image_cache(1, (8, 8))


def test_grey_image_becomes_rgb(image_folder):
    splits = image_folder_dataset(
        image_folder, image_size=(4, 4), validation_split=0.0, shuffle=False
    )
    index = splits.info["paths"]["train"].index(str(image_folder / "dog" / "grey.png"))
    images, _ = _collect(splits.train)
    grey = images[index]
    assert grey.shape == (4, 4, 3)
    np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


def test_image_folder_split_is_deterministic(image_folder):
    def build(seed):
        return image_folder_dataset(
            image_folder, image_size=(8, 8), validation_split=0.2, test_split=0.2, seed=seed
        )

    first, again, other = build(0), build(0), build(1)
    assert first.info["paths"] == again.info["paths"]
    np.testing.assert_array_equal(_collect(first.train)[0], _collect(again.train)[0])
    np.testing.assert_array_equal(_collect(first.train)[1], _collect(again.train)[1])
    assert first.info["paths"] != other.info["paths"]
    paths = [set(first.info["paths"][split]) for split in ("train", "validation", "test")]
    assert sum(map(len, paths)) == len(set.union(*paths)) == 11


def test_corrupt_file_is_skipped_with_a_warning(image_folder):
    broken = image_folder / "cat" / "broken.jpg"
    broken.write_bytes(np.random.default_rng(0).bytes(64))
    with pytest.warns(UserWarning, match="Skipped 1 unreadable image file.*broken.jpg"):
        splits = image_folder_dataset(image_folder, image_size=(8, 8))
    (skipped,) = splits.info["skipped"]
    assert skipped["path"] == str(broken) and skipped["reason"]
    assert sum(splits.info["counts"].values()) == 11
    assert len(_collect(splits.train)[1]) + len(_collect(splits.validation)[1]) == 11


def test_corrupt_file_raises(image_folder):
    (image_folder / "cat" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="1 image file.*broken.jpg"):
        image_folder_dataset(image_folder, on_error="raise")


def test_files_tensorflow_cannot_decode_are_skipped(image_folder):
    pixels = np.zeros((8, 8), np.uint8)
    Image.fromarray(pixels).convert("1").save(image_folder / "cat" / "mono.bmp")
    Image.fromarray(pixels).save(image_folder / "cat" / "tiff.png", format="TIFF")
    with pytest.warns(UserWarning, match="Skipped 2"):
        splits = image_folder_dataset(image_folder, image_size=(8, 8))
    reasons = {os.path.basename(s["path"]): s["reason"] for s in splits.info["skipped"]}
    assert "1-bit BMP" in reasons["mono.bmp"] and "TIFF" in reasons["tiff.png"]


def test_folder_errors(tmp_path, image_folder):
    with pytest.raises(FileNotFoundError, match="missing"):
        image_folder_dataset(tmp_path / "missing")
    (image_folder / "empty").mkdir()
    with pytest.raises(ValueError, match="class folder 'empty' has no images"):
        image_folder_dataset(image_folder)
    _save(tmp_path / "flat" / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no subfolders"):
        image_folder_dataset(tmp_path / "flat")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_error": "ignore"}, "Received: on_error='ignore'"),
        ({"validation_split": 1.0}, "Received: validation_split=1.0"),
        ({"validation_split": 0.6, "test_split": 0.5}, r"validation_split \+ test_split"),
        ({"image_size": (0, 8)}, r"Received: image_size=\(0, 8\)"),
        ({"batch_size": 0}, "Received: batch_size=0"),
    ],
)
def test_folder_argument_errors(image_folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        image_folder_dataset(image_folder, **kwargs)


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [((20, 6, 6), "uint8"), ((20, 6, 6, 1), "float64"), ((20, 6, 6, 3), "int32")],
)
def test_array_dataset_shapes(shape, dtype):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, shape).astype(dtype)
    labels = np.arange(20) % 4
    splits = array_dataset(
        images, labels, image_size=(10, 10), batch_size=8, validation_split=0.25, test_split=0.25
    )
    assert splits.class_names == ["0", "1", "2", "3"]
    assert splits.info["counts"] == {"train": 12, "validation": 4, "test": 4}
    train_images, train_labels = _collect(splits.train)
    assert train_images.shape == (12, 10, 10, 3) and train_images.dtype == np.float32
    assert train_labels.dtype == np.int32 and np.bincount(train_labels).tolist() == [3] * 4
    assert train_images.min() >= 0 and train_images.max() <= 255
    rows = np.concatenate(list(splits.info["indices"].values()))
    assert sorted(rows) == list(range(20))


def test_array_dataset_keeps_size_and_seed_decides_split():
    images = np.arange(10 * 4 * 4).reshape(10, 4, 4) % 256
    labels = np.arange(10) % 2
    a, b = (array_dataset(images, labels, class_names=["a", "b"], seed=3) for _ in range(2))
    c = array_dataset(images, labels, seed=4)
    assert a.class_names == ["a", "b"] and c.class_names == ["0", "1"]
    x, y = _collect(a.validation)
    assert x.shape == (2, 4, 4, 3) and sorted(y) == [0, 1]
    np.testing.assert_array_equal(a.info["indices"]["train"], b.info["indices"]["train"])
    np.testing.assert_array_equal(_collect(a.train)[1], _collect(b.train)[1])
    assert a.info["indices"]["train"].tolist() != c.info["indices"]["train"].tolist()


@pytest.mark.parametrize(
    ("images", "labels", "kwargs", "match"),
    [
        (np.zeros((4, 8, 8, 2)), np.zeros(4, int), {}, "1|3"),
        (np.zeros((4, 8, 8)), np.zeros(3, int), {}, "one label per image"),
        (np.full((4, 8, 8), 300), np.zeros(4, int), {}, r"0..255. Received: values in \[300"),
        (np.zeros((4, 8, 8)), np.arange(4), {"class_names": ["a"]}, "must name every label"),
        (np.zeros((4, 8, 8)), np.zeros(4, int), {"image_size": 8}, "Received: image_size=8"),
    ],
)
def test_array_dataset_errors(images, labels, kwargs, match):
    with pytest.raises(ValueError, match=match):
        array_dataset(images, labels, **kwargs)


def test_array_dataset_warns_on_unit_scaled_images():
    with pytest.warns(UserWarning, match="look scaled to 0..1"):
        array_dataset(np.full((4, 8, 8), 0.5), np.arange(4) % 2)


def test_read_idx(tmp_path):
    path = tmp_path / "x-idx2-ubyte.gz"
    values = np.arange(6, dtype=np.uint8).reshape(2, 3)
    with gzip.open(path, "wb") as file:
        file.write(bytes([0, 0, 0x08, 2]) + np.array([2, 3], ">u4").tobytes() + values.tobytes())
    np.testing.assert_array_equal(_read_idx(path), values)
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        _read_idx(bad)


@needs_fashion_mnist
def test_fashion_mnist_small_subset():
    splits = load_dataset(
        "fashion_mnist", image_size=None, max_per_class=3, max_test_per_class=2, batch_size=64
    )
    assert splits.class_names == list(FASHION_MNIST_CLASSES) and splits.num_classes == 10
    assert splits.info["counts"] == {"train": 20, "validation": 10, "test": 20}
    images, labels = _collect(splits.train)
    assert images.shape == (20, 28, 28, 3) and images.dtype == np.float32
    assert images.min() >= 0 and 100 < images.max() <= 255
    assert labels.min() >= 0 and labels.max() <= 9
    test_images, test_labels = _collect(splits.test)
    assert np.bincount(test_labels).tolist() == [2] * 10
    # The test split comes from the official t10k file.
    t10k = _read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))
    flat = t10k.reshape(len(t10k), -1).astype(np.float32)
    for image in test_images[..., 0].reshape(20, -1):
        assert (flat == image).all(axis=1).any()


@needs_fashion_mnist
def test_fashion_mnist_resizes():
    splits = load_dataset("fashion_mnist", image_size=(32, 32), max_per_class=1, batch_size=4)
    images, _ = next(iter(splits.train))
    assert tuple(images.shape) == (4, 32, 32, 3)


def test_digits():
    splits = load_dataset("digits", image_size=None, max_per_class=10, batch_size=256)
    assert splits.class_names == [str(d) for d in range(10)]
    assert splits.info["counts"] == {"train": 70, "validation": 10, "test": 20}
    images, labels = _collect(splits.train)
    assert images.shape == (70, 8, 8, 3)
    assert images.min() == 0 and images.max() == 255
    assert np.bincount(labels).tolist() == [7] * 10


def test_load_dataset_reads_a_folder_and_holds_out_a_test_split(image_folder):
    splits = load_dataset(str(image_folder), image_size=(8, 8), batch_size=2)
    assert splits.class_names == ["cat", "dog"]
    # FOLDER_TEST_SPLIT (0.2) of each class, stratified: one of cat's 5, one of dog's 6.
    assert splits.info["counts"] == {"train": 7, "validation": 2, "test": 2}
    test_paths = splits.info["paths"]["test"]
    assert sorted(os.path.basename(os.path.dirname(p)) for p in test_paths) == ["cat", "dog"]
    assert not set(test_paths) & set(
        splits.info["paths"]["train"] + splits.info["paths"]["validation"]
    )
    again = load_dataset(str(image_folder), image_size=(8, 8), batch_size=2)
    assert again.info["paths"] == splits.info["paths"]  # seeded
    bigger = load_dataset(str(image_folder), image_size=(8, 8), test_split=0.4)
    assert bigger.info["counts"]["test"] == 4
    with pytest.raises(ValueError, match="official test set.*Received: test_split=0.3"):
        load_dataset("fashion_mnist", test_split=0.3)


def test_folder_classes_map_to_given_class_names(image_folder):
    splits = image_folder_dataset(
        image_folder,
        image_size=(8, 8),
        validation_split=0.0,
        shuffle=False,
        class_names=["bird", "dog", "cat"],
    )
    assert splits.class_names == ["bird", "dog", "cat"]
    _, labels = _collect(splits.train)
    by_path = dict(zip(splits.info["paths"]["train"], labels.tolist(), strict=True))
    for path, label in by_path.items():
        assert label == {"dog": 1, "cat": 2}[os.path.basename(os.path.dirname(path))]
    with pytest.raises(ValueError, match=r"\['dog'\].*not classes of the model.*'cat', 'person'"):
        image_folder_dataset(image_folder, class_names=["cat", "person"])


def test_load_dataset_tfds_code_path():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        splits = load_dataset("tfds:mnist", image_size=(12, 12), batch_size=4)
    assert splits.class_names == [str(d) for d in range(10)]
    images, labels = next(iter(splits.train))
    assert tuple(images.shape) == (4, 12, 12, 3) and labels.dtype.name == "int32"


def test_load_dataset_unknown_name_suggests():
    with pytest.raises(ValueError, match="Unknown dataset 'fashion_mnst'.*'fashion_mnist'"):
        load_dataset("fashion_mnst")
    with pytest.raises(FileNotFoundError, match="Image folder not found: '/no/such/photos'"):
        load_dataset("/no/such/photos")
    with pytest.raises(ValueError, match="Received: max_per_class=0"):
        load_dataset("digits", max_per_class=0)


@needs_wordnet
def test_wordnet_nouns():
    texts, labels, names = load_wordnet_nouns()
    assert names == ["animal", "artifact", "food", "plant"]
    assert len(texts) == len(labels) == 29_699
    assert np.bincount(labels).tolist() == [7509, 11587, 2573, 8030]
    by_text = dict(zip(texts, labels, strict=True))
    assert names[by_text["a young dog"]] == "animal"
    assert names[by_text["a motor vehicle with four wheels"]] == "artifact"
    assert all(";" not in text and " | " not in text for text in texts)


@needs_wordnet
def test_wordnet_nouns_subset_is_seeded():
    first = load_wordnet_nouns(("noun.food", "plant"), max_per_class=3, seed=1)
    again = load_wordnet_nouns(("food", "plant"), max_per_class=3, seed=1)
    assert first[0] == again[0] and first[2] == ["food", "plant"]
    assert np.bincount(first[1]).tolist() == [3, 3]
    assert load_wordnet_nouns(("food", "plant"), max_per_class=3, seed=2)[0] != first[0]


def test_wordnet_errors(tmp_path):
    with pytest.raises(ValueError, match="Received: 'animals'. Did you mean 'animal'"):
        load_wordnet_nouns(("animals",), path=tmp_path / "data.noun")
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        load_wordnet_nouns(path=tmp_path / "data.noun")


def test_digits_caps_test_split_per_class():
    splits = load_dataset("digits", image_size=(8, 8), max_test_per_class=2, batch_size=64)
    labels = np.concatenate([y.numpy() for _, y in splits.test])
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10
