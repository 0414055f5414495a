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
from keras_transfer.backbones.kerashub import create_text_backbone, text_preprocessor
from keras_transfer.backbones.kerashub_image import (
    create_kerashub_image_backbone,
    image_converter_layer,
    kerashub_image_source,
)
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
# The random augmentation block's name (feature caching looks for it).
AUGMENTATION_NAME = "augmentation"
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
    return keras.Sequential(layers, name=AUGMENTATION_NAME)


def _validate_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {allowed}. Received: {name}={value!r}")


# Global pooling by (rank of the backbone's output, `pooling`).
_GLOBAL_POOLS = {
    (4, "avg"): keras.layers.GlobalAveragePooling2D,
    (4, "max"): keras.layers.GlobalMaxPooling2D,
    (3, "avg"): keras.layers.GlobalAveragePooling1D,
    (3, "max"): keras.layers.GlobalMaxPooling1D,
}


def _preprocessing_layer(preprocessing) -> keras.layers.Layer | None:
    """The layer for an explicit `preprocessing`: a mode name or a KerasHub ImageConverter."""
    if isinstance(preprocessing, keras.layers.Layer):
        return image_converter_layer(preprocessing)
    if preprocessing == "none":
        return None
    return ImagePreprocessing(preprocessing, name="preprocessing")


def image_features(
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
    """Builds input -> [augmentation] -> [preprocessing] -> backbone -> pooling.

    The trunk every image builder shares (`build_image_classifier`,
    `build_feature_extractor`, `techniques.build_multitask_model`); call it
    under `build_scope`. Arguments are those of `build_image_classifier`,
    with the backbone's own keyword arguments as one dict.

    Returns:
        `(inputs, features, backbone, name)`: the `keras.Input`, the pooled
        features, the nested backbone model and the registry or preset name
        (`"custom"` for a user's model).

    Example:

    >>> inputs, features, base, name = image_features(
    ...     "mobilenet_v3_small", weights=None, input_shape=(32, 32, 3), pooling="avg",
    ...     augmentation=None, bn_policy="frozen", preprocessing=None, backbone_kwargs={})
    >>> features.shape, base.name, name
    ((None, 576), 'backbone', 'mobilenet_v3_small')
    """
    _validate_choice("pooling", pooling, POOLINGS)
    _validate_choice("bn_policy", bn_policy, BN_POLICIES)
    augment = make_augmentation(augmentation)
    preprocess = _preprocessing_layer(preprocessing) if preprocessing is not None else None
    source = kerashub_image_source(backbone)
    class_token = False
    if source is not None:
        hub = create_kerashub_image_backbone(
            source,
            input_shape=input_shape,
            weights=weights,
            # A converter passed in also gives the default input size.
            converter=preprocessing if isinstance(preprocessing, keras.layers.Layer) else None,
            load_converter=preprocessing is None,
            **backbone_kwargs,
        )
        base, shape, label, class_token = hub.model, hub.input_shape, hub.name, hub.class_token
        if preprocessing is None:
            preprocess = hub.preprocessing
    else:
        base, spec = create_backbone(
            backbone, input_shape=input_shape, weights=weights, **backbone_kwargs
        )
        shape, label = tuple(base.input_shape[1:]), spec.name if spec else "custom"
        if preprocessing is None and spec is not None:
            preprocess = _preprocessing_layer(spec.preprocessing)
    inputs = keras.Input(shape=shape, name=INPUT_NAME)
    x = inputs
    # Augment in raw 0-255 pixel space so value ranges are the same for every
    # family; then map pixels to the backbone's convention.
    if augment is not None:
        x = augment(x)
    if preprocess is not None:
        x = preprocess(x)
    # Keras 3 functional models pass the outer `training` flag down to nested
    # models (a `training=False` baked into the call is overridden by `fit`),
    # so BatchNorm's mode follows its `trainable` flag ("frozen": never
    # trainable, so always in inference mode) or, for "affine", its class.
    if bn_policy == "affine":
        base = _with_inference_batch_norm(base)
    x = base(x)
    if len(x.shape) == 3 and class_token:
        # ViT's class token, what KerasHub's ViTImageClassifier pools ("token").
        x = ClassTokenPooling(name="class_token_pool")(x)
    elif (len(x.shape), pooling) in _GLOBAL_POOLS:  # a feature map, or tokens
        x = _GLOBAL_POOLS[len(x.shape), pooling](name=f"{pooling}_pool")(x)
    return inputs, x, base, label


def build_image_classifier(
    backbone: str | os.PathLike | keras.Model,
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
    preprocessing: str | keras.layers.Layer | None = None,
    name: str | None = None,
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds a functional image classifier (or regressor) on a backbone.

    The graph is `image (raw 0-255 RGB) -> augmentation (training only) ->
    preprocessing -> backbone -> pooling -> dropout -> head`. The backbone is a
    nested layer named `"backbone"`; the output layer is named `"head"`.

    KerasHub backbones: `backbone` may be a KerasHub image preset name
    (`"resnet_18_imagenet"`, `"efficientnet_b0_ra_imagenet"`,
    `"mobilenet_v3_small_100_imagenet"`, `"vit_base_patch16_224_imagenet"`;
    see `keras_transfer.backbones.list_kerashub_image_presets()`; downloads),
    a `kaggle://` / `hf://` handle, a local preset directory (written by
    `Backbone.save_to_preset` plus the image converter's `save_to_preset`),
    or a `keras_hub.models.Backbone`. Registry names win over KerasHub names.
    The preset's `ImageConverter` scale and offset (ImageNet mean/std folded
    in) become the `"preprocessing"` layer, so the model still takes raw
    0-255 pixels; `input_shape` (default: the converter's size) fixes the
    size, nothing resizes inside. Blocks are the stages (ResNet stacks,
    EfficientNet blocks, MobileNet stages) or ViT's transformer layers. A
    ViT's token sequence is pooled by its class token (as KerasHub's
    ViTImageClassifier does), or by `pooling` over tokens when it has none.

    Args:
        backbone: a registry name (see `list_backbones()`), a KerasHub image
            preset name, handle or directory, or a `keras.Model` (a KerasHub
            `Backbone` included) that maps images to a feature map, a token
            sequence or a feature vector.
        num_classes: number of outputs: classes (`"softmax"`), labels
            (`"multi_label"`) or targets (`"regression"`).
        weights: `"imagenet"` (download), `None` (random init) or the path of
            a weights file for the backbone. For a KerasHub preset,
            `"imagenet"` or `"pretrained"` loads the preset's weights and
            None initialises at random; a KerasHub `Backbone` object keeps
            its own weights.
        input_shape: `(height, width, 3)`; defaults to the backbone's size.
        head: `"softmax"`, `"multi_label"` (sigmoid) or `"regression"`.
        pooling: `"avg"` or `"max"` global pooling of the feature map (or of
            the tokens of a transformer without a class token).
        dropout: dropout rate before the head, in [0, 1).
        augmentation: see `make_augmentation`; None by default.
        bn_policy: `"affine"` builds BatchNorm layers that always normalise
            with their moving statistics (so gamma/beta can train while the
            statistics stay fixed). `"frozen"` (default) and `"train"` build
            ordinary BatchNorm; pick between them when unfreezing
            (`kt.unfreeze(..., bn_policy=...)`, `kt.fine_tune`).
        freeze_backbone: start with the backbone frozen (feature extraction).
        preprocessing: override the spec's preprocessing mode (required for a
            custom backbone that expects scaled input; default `"none"`), or
            a `keras_hub.layers.ImageConverter` whose scale and offset to
            apply (a KerasHub `Backbone` object has none of its own).
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

    A KerasHub backbone (a tiny random ViT here; a preset name works the
    same way online):

    >>> import keras_hub
    >>> vit = keras_hub.models.ViTBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
    ...     hidden_dim=16, mlp_dim=32)
    >>> model = kt.build_image_classifier(
    ...     vit, num_classes=3,
    ...     preprocessing=keras_hub.layers.ViTImageConverter(scale=1 / 127.5, offset=-1.0))
    >>> [block.name for block in kt.backbone_blocks(model)]
    ['stem', 'layer0', 'layer1', 'top']
    """
    validate_head(head, num_classes)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    with build_scope(strategy, mixed_precision):
        inputs, x, base, label = image_features(
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
            name = f"{label}_classifier"
        return keras.Model(inputs, outputs, name=name)


def build_feature_extractor(
    backbone: str | os.PathLike | keras.Model,
    *,
    weights: str | os.PathLike | None = "imagenet",
    input_shape: Sequence[int] | None = None,
    pooling: str = "avg",
    preprocessing: str | keras.layers.Layer | None = None,
    name: str = "feature_extractor",
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds a frozen model that maps raw images to pooled feature vectors.

    Args:
        backbone: a registry name, a KerasHub image preset (name, handle or
            directory) or a `keras.Model` (see `build_image_classifier`).
        weights: `"imagenet"`, `None` or a weights file path (KerasHub
            presets: see `build_image_classifier`).
        input_shape: `(height, width, 3)`; defaults to the backbone's size.
        pooling: `"avg"` or `"max"`.
        preprocessing: override the spec's preprocessing mode, or a KerasHub
            `ImageConverter`.
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
        inputs, x, base, _ = image_features(
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


TEXT_POOLINGS = ("mean", "cls")


@keras.saving.register_keras_serializable(package="keras_transfer")
class ClassTokenPooling(keras.layers.Layer):
    """The vector of the first token (BERT's `[CLS]`) of each sequence.

    Example:
    >>> import numpy as np
    >>> from keras_transfer.builders import ClassTokenPooling
    >>> x = np.array([[[1.0], [3.0], [100.0]]])
    >>> float(ClassTokenPooling()(x)[0, 0])
    1.0
    """

    def call(self, inputs):
        return inputs[:, 0, :]

    def compute_output_shape(self, inputs_shape):
        return (inputs_shape[0], inputs_shape[-1])


def build_text_classifier(
    backbone: str,
    num_classes: int,
    *,
    weights: str | None = "pretrained",
    sequence_length: int = 64,
    pooling: str = "mean",
    head: str = "softmax",
    dropout: float = 0.1,
    freeze_backbone: bool = True,
    name: str = "text_classifier",
    strategy: tf.distribute.Strategy | None = None,
    mixed_precision: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds a functional text classifier on a KerasHub backbone.

    The graph is `token inputs (dict) -> backbone (token vectors) -> pooling
    -> dropout -> head`. The matching KerasHub preprocessor (tokenizer and
    packer, `sequence_length` tokens) is attached as `model.preprocessor`:
    map it over raw strings in `tf.data` (`keras_transfer.data.text_dataset`
    does), and `kt.export.saved_model` bakes it into a signature that takes
    raw strings. The attribute is not saved in `.keras` files; rebuild it with
    `keras_transfer.backbones.kerashub.text_preprocessor(preset, length)`.
    The backbone's transformer layers are its blocks (freezing,
    discriminative learning rates, `ProgressiveUnfreezing`).

    Args:
        backbone: KerasHub preset name (e.g. `"bert_base_en"`, downloads),
            `kaggle://` / `hf://` handle, local preset or Hugging Face
            directory, or `"minilm"` (offline all-MiniLM-L6-v2).
        num_classes: number of outputs.
        weights: `"pretrained"` or None (random initialisation).
        sequence_length: tokens per text, at most the backbone's
            `max_sequence_length`.
        pooling: `"mean"` (masked mean of the token vectors, what sentence
            encoders such as MiniLM are trained with) or `"cls"` (the first
            token's vector, BERT's classification token).
        head: `"softmax"`, `"multi_label"` or `"regression"`.
        dropout: dropout rate before the head.
        freeze_backbone: start with the backbone frozen.
        name: model name.
        strategy: see `build_image_classifier`.
        mixed_precision: see `build_image_classifier`.
        **backbone_kwargs: config overrides for the KerasHub backbone (e.g.
            `dropout=0.0`), passed to `Backbone.from_preset`.

    Returns:
        A `keras.Model` taking the backbone's input dict, with the
        preprocessor as `model.preprocessor`.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_text_classifier("minilm", num_classes=4, weights=None,
    ...                                  sequence_length=16, num_layers=1)
    >>> model.output_shape
    (None, 4)
    >>> model.predict(model.preprocessor(["a small dog"]), verbose=0).shape
    (1, 4)
    """
    validate_head(head, num_classes)
    _validate_choice("pooling", pooling, TEXT_POOLINGS)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
    if (
        isinstance(sequence_length, bool)
        or not isinstance(sequence_length, int)
        or (sequence_length < 2)
    ):
        raise ValueError(
            "`sequence_length` must be an integer >= 2 (the special tokens take two). "
            f"Received: sequence_length={sequence_length!r}"
        )
    with build_scope(strategy, mixed_precision):
        base = create_text_backbone(
            backbone, weights=weights, sequence_length=sequence_length, **backbone_kwargs
        )
        inputs = {
            key: keras.Input(shape=(None,), dtype=tensor.dtype, name=key)
            for key, tensor in base.input.items()
        }
        tokens = base(inputs)
        if pooling == "mean":
            x = MaskedMeanPooling(name="mean_pool")(tokens, inputs["padding_mask"])
        else:
            x = ClassTokenPooling(name="cls_pool")(tokens)
        if dropout:
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        outputs = make_head(head, num_classes, name=HEAD_NAME)(x)
        base.trainable = not freeze_backbone
        model = keras.Model(inputs, outputs, name=name)
    # Not tracked as a sublayer: the preprocessor is not part of the model's
    # weights, `.keras` file or `summary()`; export tracks it where it is used.
    object.__setattr__(model, "preprocessor", text_preprocessor(backbone, sequence_length))
    return model
