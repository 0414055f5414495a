"""The layer that turns raw 0-255 RGB pixels into what a backbone expects."""

from __future__ import annotations

import keras
from keras import ops

# "tf": scale to [-1, 1] (MobileNet v1/v2, Inception, Xception, NASNet, ResNetV2).
# "torch": [0, 1] then ImageNet mean/std (DenseNet).
# "caffe": RGB->BGR then subtract the ImageNet BGR mean (VGG, ResNet v1).
# "lite": (x - 127) / 128 (EfficientNet-Lite's TFLite convention).
# "none": the backbone normalises inside (EfficientNet, EfficientNetV2,
#         MobileNetV3, ConvNeXt in keras.applications).
# Constants from keras.applications.imagenet_utils.preprocess_input.
PREPROCESSING_MODES = ("none", "tf", "torch", "caffe", "lite")
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_LITE_CENTER = 127.0
_LITE_SCALE = 128.0


@keras.saving.register_keras_serializable(package="keras_transfer")
class ImagePreprocessing(keras.layers.Layer):
    """Maps raw RGB pixels in [0, 255] to a backbone's input convention.

    Baking preprocessing into the model means exported models take raw
    pixels, and nobody has to remember which family wants which scaling.

    Args:
        mode: one of `"none"`, `"tf"`, `"torch"`, `"caffe"`, `"lite"`.
        **kwargs: standard layer arguments (`name`, `dtype`).

    Example:
    >>> import numpy as np
    >>> from keras_transfer import ImagePreprocessing
    >>> layer = ImagePreprocessing(mode="tf")
    >>> [float(v) for v in layer(np.array([[0.0, 127.5, 255.0]]))[0]]
    [-1.0, 0.0, 1.0]
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESSING_MODES:
            raise ValueError(
                f"`mode` must be one of {PREPROCESSING_MODES}. Received: mode={mode!r}"
            )
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
            return ops.flip(x, axis=-1) - mean
        if self.mode == "lite":
            return (x - _LITE_CENTER) / _LITE_SCALE
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"mode": self.mode})
        return config
