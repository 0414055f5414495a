"""The data and models the suites measure: Fashion-MNIST arrays, full and tiny classifiers.

Full runs use what a user of this package would: EfficientNet-Lite0 with its
ImageNet weights (offline) on Fashion-MNIST at 96 px. Quick runs (`quick=True`,
for tests) use a tiny random MobileNetV3-Small at 32 px and a handful of
images, so that every code path runs in seconds.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from keras_transfer.builders import build_image_classifier
from keras_transfer.data import load_dataset

# The full workload: the EfficientNet-Lite0 demo model (ImageNet weights ship
# offline) at 96 px, 30 labelled images per class, 20 test images per class.
FULL_BACKBONE = "efficientnet_lite0"
FULL_IMAGE_SIZE = 96
FULL_PER_CLASS = 30
FULL_TEST_PER_CLASS = 20
# The quick workload: the test suite's tiny model (alpha 0.75, minimalistic,
# ~0.3 M parameters) at 32 px, random weights, 4 images per class.
QUICK_BACKBONE = "mobilenet_v3_small"
QUICK_BACKBONE_KWARGS = {"alpha": 0.75, "minimalistic": True}
QUICK_IMAGE_SIZE = 32
QUICK_PER_CLASS = 4
QUICK_TEST_PER_CLASS = 2
SEED = 0


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A labelled image set held in memory, as `fit` and the suites take it.

    Args:
        x_train: float32 images `[n, h, w, 3]`, pixels 0..255.
        y_train: int labels `[n]`.
        x_test: held-out images.
        y_test: held-out labels.
        class_names: label `i` is `class_names[i]`.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        """`(x_train, y_train)`."""
        return self.x_train, self.y_train

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """`(height, width, 3)`."""
        return tuple(self.x_train.shape[1:])


def _arrays(dataset):
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset), strict=True)
    return np.concatenate(images).astype("float32"), np.concatenate(labels)


def fashion_mnist(quick: bool = False) -> ImageData:
    """Fashion-MNIST as arrays: a few labelled images per class and a small test set.

    Args:
        quick: the quick workload's size (32 px, 4 + 2 images per class);
            otherwise 96 px, 30 + 20 per class.

    Returns:
        An `ImageData` (train images in a seeded, shuffled order).

    Example:

    >>> data = fashion_mnist(quick=True)
    >>> data.x_train.shape, len(data.y_test)
    ((40, 32, 32, 3), 20)
    """
    size, per_class, test_per_class = (
        (QUICK_IMAGE_SIZE, QUICK_PER_CLASS, QUICK_TEST_PER_CLASS)
        if quick
        else (FULL_IMAGE_SIZE, FULL_PER_CLASS, FULL_TEST_PER_CLASS)
    )
    splits = load_dataset(
        "fashion_mnist",
        image_size=(size, size),
        validation_split=0.0,
        seed=SEED,
        max_per_class=per_class,
        max_test_per_class=test_per_class,
    )
    x_train, y_train = _arrays(splits.train)
    x_test, y_test = _arrays(splits.test)
    return ImageData(x_train, y_train, x_test, y_test, list(splits.class_names))


def classifier(num_classes: int, quick: bool = False) -> keras.Model:
    """The workload's classifier, backbone frozen, seeded.

    Args:
        num_classes: classes of the softmax head.
        quick: the tiny random MobileNetV3-Small at 32 px; otherwise
            EfficientNet-Lite0 with ImageNet weights at 96 px.

    Returns:
        A model from `build_image_classifier`.

    Example:

    >>> classifier(3, quick=True).input_shape
    (None, 32, 32, 3)
    """
    keras.utils.set_random_seed(SEED)
    if quick:
        return build_image_classifier(
            QUICK_BACKBONE,
            num_classes,
            weights=None,
            input_shape=(QUICK_IMAGE_SIZE, QUICK_IMAGE_SIZE, 3),
            **QUICK_BACKBONE_KWARGS,
        )
    return build_image_classifier(
        FULL_BACKBONE,
        num_classes,
        weights="imagenet",
        input_shape=(FULL_IMAGE_SIZE, FULL_IMAGE_SIZE, 3),
    )


def without_feature_cache() -> dict:
    """`fine_tune` options that keep every epoch end-to-end (no feature cache).

    Returns:
        `{"cache_features": False}` (explicit, should the default change).

    Example:

    >>> without_feature_cache()
    {'cache_features': False}
    """
    return {"cache_features": False}


def smoke_classifier(num_classes: int, image_size: int = QUICK_IMAGE_SIZE, **kwargs) -> keras.Model:
    """A classifier on two small convolutions: for quick runs, whose point is the code path.

    Tracing a MobileNetV3 training step takes seconds per `fit`; this
    backbone traces in a fraction of that, so a quick suite that trains many
    models stays a few seconds long.

    Args:
        num_classes: classes of the softmax head.
        image_size: the side of the square RGB input.
        **kwargs: passed to `build_image_classifier`.

    Returns:
        A model from `build_image_classifier`, backbone frozen, random weights.

    Example:

    >>> smoke_classifier(3).count_params() < 2000
    True
    """
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv_1")(inputs)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_2")(x)
    backbone = keras.Model(inputs, x, name="smoke_backbone")
    return build_image_classifier(
        backbone, num_classes, weights=None, input_shape=(image_size, image_size, 3), **kwargs
    )
