import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_transfer as kt  # noqa: E402

SIZE = 32
TINY = {"alpha": 0.75, "minimalistic": True}


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def tiny_classifier(num_classes=3, **kwargs):
    """MobileNetV3-Small (alpha 0.75, minimalistic) at 32 px: ~0.3 M parameters."""
    kwargs.setdefault("weights", None)
    kwargs.setdefault("input_shape", (SIZE, SIZE, 3))
    return kt.build_image_classifier(
        "mobilenet_v3_small", num_classes=num_classes, **TINY, **kwargs
    )


def image_batch(n=8, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def labels(n=8, num_classes=3):
    return np.arange(n) % num_classes


def weights_by_path(layer_or_model):
    return {v.path: np.array(v.numpy()) for v in layer_or_model.weights}


def assert_round_trip(model, x, tmp_path, atol=1e-6):
    """Saves to .keras, reloads with safe_mode=True, checks predictions; returns the copy."""
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=atol, rtol=0
    )
    return loaded
