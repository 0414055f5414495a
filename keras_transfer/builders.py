"""Functional model builders: input -> augmentation -> preprocessing -> backbone -> head."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence

import keras
import tensorflow as tf
from keras import ops

from keras_transfer.backbones import ImagePreprocessing, create_backbone
from keras_transfer.backbones.kerashub import create_text_backbone
from keras_transfer.heads import HEAD_NAME, make_head, validate_head

BN_POLICIES = ("frozen", "affine", "train")
POOLINGS = ("avg", "max")
AUGMENTATIONS = ("none", "light", "standard")
# Mild geometric and photometric jitter: the Keras transfer-learning guide
# uses flip + rotation 0.1; zoom/contrast 0.1 follow MediaPipe Model Maker's
# image classifier augmentation strength.
_ROTATION = 0.05
_ZOOM = 0.1
_CONTRAST = 0.1
INPUT_NAME = "image"
# Keras dtype policies a builder may build under (None: the current one).
MIXED_PRECISION = (None, "mixed_float16", "mixed_bfloat16")


@contextlib.contextmanager
def build_scope(
    strategy: tf.distribute.Strategy | None = None, mixed_precision: str | None = None
) -> Iterator[None]:
    """Builds what is inside under a strategy's scope and a mixed-precision policy.

    Variables made inside belong to `strategy` (so `fit` runs distributed),
    and layers compute in `mixed_precision` (the Keras dtype policy must be
    in force when layers are built); the previous policy is restored after.
    Heads still compute in float32. `"mixed_float16"` on a machine without a
    GPU is allowed but warns: it is slower there than float32.

    Args:
        strategy: a `tf.distribute.Strategy`, or None (the current one).
        mixed_precision: one of `MIXED_PRECISION`.

    Yields:
        None.

    Example:

    >>> with build_scope(mixed_precision="mixed_bfloat16"):
    ...     layer = keras.layers.Dense(2)
    >>> layer.compute_dtype, keras.config.dtype_policy().name
    ('bfloat16', 'float32')
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"`mixed_precision` must be one of {MIXED_PRECISION}. "
            f"Received: mixed_precision={mixed_precision!r}"
        )
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            f"`strategy` must be a tf.distribute.Strategy. Received: {type(strategy).__name__}"
        )
    if mixed_precision == "mixed_float16" and not tf.config.list_physical_devices("GPU"):
        warnings.warn(
            "mixed_float16 without a GPU computes slower than float32 (CPUs have no fast "
            "float16 math); use it on GPUs, or mixed_bfloat16 on recent CPUs and TPUs.",
            stacklevel=3,
        )
    previous = keras.config.dtype_policy()
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    try:
        if mixed_precision is not None:
            keras.config.set_dtype_policy(mixed_precision)
        with scope:
            yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="keras_transfer")
class InferenceBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that always normalises with its moving statistics.

    Gamma and beta still train when the layer is trainable; the moving mean
    and variance never change. This is the `"affine"` BatchNorm policy.
    """

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


def _with_inference_batch_norm(base: keras.Model) -> keras.Model:
    """A copy of `base` (same weights) whose BatchNorm layers stay in inference mode."""

    def clone(layer):
        config = layer.get_config()
        if type(layer) is keras.layers.BatchNormalization:
            return InferenceBatchNormalization.from_config(config)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(base, clone_function=clone)
    copy.set_weights(base.get_weights())
    copy.name = base.name
    return copy


def make_augmentation(augmentation) -> keras.layers.Layer | None:
    """Returns the augmentation block for a name, a layer, or a list of layers.

    Augmentation layers are active only in training (`fit`), never in
    `predict`, evaluation or export.

    Args:
        augmentation: `None`/`"none"`, `"light"` (horizontal flip),
            `"standard"` (flip, small rotation, zoom, contrast), a
            `keras.layers.Layer`, or a list of layers.

    Returns:
        A `keras.Sequential` named `"augmentation"`, or None.

    Example:
    >>> from keras_transfer import make_augmentation
    >>> [layer.name for layer in make_augmentation("light").layers]
    ['random_flip']
    """
    if augmentation is None or augmentation == "none":
        return None
    if isinstance(augmentation, str):
        if augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"`augmentation` must be one of {AUGMENTATIONS}, a layer or a list "
                f"of layers. Received: augmentation={augmentation!r}"
            )
        layers = [keras.layers.RandomFlip("horizontal", name="random_flip")]
        if augmentation == "standard":
            layers += [
                keras.layers.RandomRotation(_ROTATION, name="random_rotation"),
                keras.layers.RandomZoom(_ZOOM, name="random_zoom"),
                keras.layers.RandomContrast(_CONTRAST, name="random_contrast"),
            ]
    elif isinstance(augmentation, keras.layers.Layer):
        layers = [augmentation]
    elif isinstance(augmentation, Sequence) and all(
        isinstance(layer, keras.layers.Layer) for layer in augmentation
    ):
        layers = list(augmentation)
    else:
        raise ValueError(
            f"`augmentation` must be one of {AUGMENTATIONS}, a layer or a list of "
            f"layers. Received: augmentation={augmentation!r}"
        )
    return keras.Sequential(layers, name="augmentation")


def _validate_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}. Received: {name}={value!r}")


def _features(
    backbone,
    *,
    weights,
    input_shape,
    pooling,
    augmentation,
    bn_policy,
    preprocessing,
    backbone_kwargs,
):
    """Builds input -> [augmentation] -> [preprocessing] -> backbone -> pooling."""
    _validate_choice("pooling", pooling, POOLINGS)
    _validate_choice("bn_policy", bn_policy, BN_POLICIES)
    augment = make_augmentation(augmentation)
    base, spec = create_backbone(
        backbone, input_shape=input_shape, weights=weights, **backbone_kwargs
    )
    mode = preprocessing if preprocessing is not None else (spec.preprocessing if spec else "none")
    shape = tuple(base.input_shape[1:])
    inputs = keras.Input(shape=shape, name=INPUT_NAME)
    x = inputs
    # Augment in raw 0-255 pixel space so value ranges are the same for every
    # family; then map pixels to the backbone's convention.
    if augment is not None:
        x = augment(x)
    if mode != "none":
        x = ImagePreprocessing(mode, name="preprocessing")(x)
    # Keras 3 functional models pass the outer `training` flag down to nested
    # models (a `training=False` baked into the call is overridden by `fit`),
    # so BatchNorm's mode follows its `trainable` flag ("frozen": never
    # trainable, so always in inference mode) or, for "affine", its class.
    if bn_policy == "affine":
        base = _with_inference_batch_norm(base)
    x = base(x)
    if len(x.shape) == 4:
        pool = (
            keras.layers.GlobalAveragePooling2D
            if pooling == "avg"
            else keras.layers.GlobalMaxPooling2D
        )
        x = pool(name=f"{pooling}_pool")(x)
    return inputs, x, base, spec


def build_image_classifier(
    backbone: str | keras.Model,
    num_classes: int,
    *,
    weights: str | os.PathLike | None = "imagenet",
    input_shape: Sequence[int] | None = None,
    head: str = "softmax",
    pooling: str = "avg",
    dropout: float = 0.2,
    augmentation=None,
    bn_policy: str = "frozen",
    freeze_backbone: bool = True,
    preprocessing: str | None = None,
    name: str | None = None,
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds a functional image classifier (or regressor) on a backbone.

    The graph is `image (raw 0-255 RGB) -> augmentation (training only) ->
    preprocessing -> backbone -> pooling -> dropout -> head`. The backbone is a
    nested layer named `"backbone"`; the output layer is named `"head"`.

    Args:
        backbone: a registry name (see `list_backbones()`) or a `keras.Model`
            that maps images to a feature map or a feature vector.
        num_classes: number of outputs: classes (`"softmax"`), labels
            (`"multi_label"`) or targets (`"regression"`).
        weights: `"imagenet"` (download), `None` (random init) or the path of
            a weights file for the backbone.
        input_shape: `(height, width, 3)`; defaults to the backbone's size.
        head: `"softmax"`, `"multi_label"` (sigmoid) or `"regression"`.
        pooling: `"avg"` or `"max"` global pooling of the feature map.
        dropout: dropout rate before the head, in [0, 1).
        augmentation: see `make_augmentation`; None by default.
        bn_policy: `"affine"` builds BatchNorm layers that always normalise
            with their moving statistics (so gamma/beta can train while the
            statistics stay fixed). `"frozen"` (default) and `"train"` build
            ordinary BatchNorm; pick between them when unfreezing
            (`kt.unfreeze(..., bn_policy=...)`, `kt.fine_tune`).
        freeze_backbone: start with the backbone frozen (feature extraction).
        preprocessing: override the spec's preprocessing mode (required for a
            custom backbone that expects scaled input; default `"none"`).
        name: model name; defaults to `"<backbone>_classifier"`.
        strategy: a `tf.distribute.Strategy` to build (and later train) the
            model under; None: the current one.
        mixed_precision: `"mixed_float16"`, `"mixed_bfloat16"` or None (see
            `build_scope`); the head outputs float32 either way.
        **backbone_kwargs: passed to the backbone constructor (e.g.
            `alpha=0.75`, `minimalistic=True`).

    Returns:
        A `keras.Model` (functional, uncompiled).

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_image_classifier(
    ...     "mobilenet_v3_small", num_classes=3, weights=None,
    ...     input_shape=(32, 32, 3))
    >>> model.output_shape
    (None, 3)
    """
    validate_head(head, num_classes)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    with build_scope(strategy, mixed_precision):
        inputs, x, base, spec = _features(
            backbone,
            weights=weights,
            input_shape=input_shape,
            pooling=pooling,
            augmentation=augmentation,
            bn_policy=bn_policy,
            preprocessing=preprocessing,
            backbone_kwargs=backbone_kwargs,
        )
        if dropout:
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        outputs = make_head(head, num_classes, name=HEAD_NAME)(x)
        base.trainable = not freeze_backbone
        if name is None:
            name = f"{spec.name if spec else 'custom'}_classifier"
        return keras.Model(inputs, outputs, name=name)


def build_feature_extractor(
    backbone: str | keras.Model,
    *,
    weights: str | os.PathLike | None = "imagenet",
    input_shape: Sequence[int] | None = None,
    pooling: str = "avg",
    preprocessing: str | None = None,
    name: str = "feature_extractor",
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds a frozen model that maps raw images to pooled feature vectors.

    Args:
        backbone: a registry name or a `keras.Model`.
        weights: `"imagenet"`, `None` or a weights file path.
        input_shape: `(height, width, 3)`; defaults to the backbone's size.
        pooling: `"avg"` or `"max"`.
        preprocessing: override the spec's preprocessing mode.
        name: model name.
        strategy: see `build_image_classifier`.
        mixed_precision: see `build_image_classifier`.
        **backbone_kwargs: passed to the backbone constructor.

    Returns:
        A frozen functional `keras.Model` with output `(batch, features)`.

    Example:
    >>> import keras_transfer as kt
    >>> extractor = kt.build_feature_extractor(
    ...     "resnet50_v2", weights=None, input_shape=(32, 32, 3))
    >>> extractor.output_shape
    (None, 2048)
    """
    with build_scope(strategy, mixed_precision):
        inputs, x, base, _ = _features(
            backbone,
            weights=weights,
            input_shape=input_shape,
            pooling=pooling,
            augmentation=None,
            bn_policy="frozen",
            preprocessing=preprocessing,
            backbone_kwargs=backbone_kwargs,
        )
        base.trainable = False
        return keras.Model(inputs, x, name=name)


@keras.saving.register_keras_serializable(package="keras_transfer")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean of token vectors over the real (unpadded) tokens.

    Sentence encoders such as all-MiniLM-L6-v2 are trained with this pooling.

    Example:
    >>> import numpy as np
    >>> from keras_transfer.builders import MaskedMeanPooling
    >>> x = np.array([[[1.0], [3.0], [100.0]]])
    >>> float(MaskedMeanPooling()(x, np.array([[1, 1, 0]]))[0, 0])
    2.0
    """

    def call(self, inputs, padding_mask):
        mask = ops.expand_dims(ops.cast(padding_mask, inputs.dtype), -1)
        total = ops.sum(inputs * mask, axis=1)
        return total / ops.maximum(ops.sum(mask, axis=1), 1.0)

    def compute_output_shape(self, inputs_shape, padding_mask_shape):
        return (inputs_shape[0], inputs_shape[-1])


def build_text_classifier(
    backbone: str,
    num_classes: int,
    *,
    weights: str | None = "pretrained",
    head: str = "softmax",
    dropout: float = 0.1,
    freeze_backbone: bool = True,
    name: str = "text_classifier",
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds a functional text classifier on a KerasHub backbone.

    The graph is `token inputs (dict) -> backbone (token vectors) -> masked
    mean pooling -> dropout -> head`. Tokenisation happens in `tf.data` with
    `keras_transfer.backbones.kerashub.text_preprocessor` (see
    `keras_transfer.data.text_dataset`).

    Args:
        backbone: KerasHub preset name, local preset/HF directory, or
            `"minilm"` (offline all-MiniLM-L6-v2).
        num_classes: number of outputs.
        weights: `"pretrained"` or None (random initialisation).
        head: `"softmax"`, `"multi_label"` or `"regression"`.
        dropout: dropout rate before the head.
        freeze_backbone: start with the backbone frozen.
        name: model name.
        strategy: see `build_image_classifier`.
        mixed_precision: see `build_image_classifier`.
        **backbone_kwargs: config overrides for the KerasHub backbone (e.g.
            `dropout=0.0`), passed to `Backbone.from_preset`.

    Returns:
        A `keras.Model` taking the backbone's input dict.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_text_classifier("minilm", num_classes=4, weights=None)
    >>> model.output_shape
    (None, 4)
    """
    validate_head(head, num_classes)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    with build_scope(strategy, mixed_precision):
        base = create_text_backbone(backbone, weights=weights, **backbone_kwargs)
        inputs = {
            key: keras.Input(shape=(None,), dtype=tensor.dtype, name=key)
            for key, tensor in base.input.items()
        }
        x = MaskedMeanPooling(name="mean_pool")(base(inputs), inputs["padding_mask"])
        if dropout:
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        outputs = make_head(head, num_classes, name=HEAD_NAME)(x)
        base.trainable = not freeze_backbone
        return keras.Model(inputs, outputs, name=name)
