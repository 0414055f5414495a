"""KerasHub image backbones: a preset name (download), a preset directory or a Backbone.

`build_image_classifier` takes these besides registry names. The nested
`"backbone"` is a plain functional model over the KerasHub backbone's own
layers, so its stages (ResNet stacks, EfficientNet blocks, MobileNet stages)
or transformer layers (ViT, whose encoder is unrolled into its blocks) are
the blocks freezing, discriminative LRs and `ProgressiveUnfreezing` act on.

The preset's `keras_hub.layers.ImageConverter` becomes the model's
preprocessing: its `scale` and `offset` (ImageNet mean/std folded in) as a
`keras.layers.Rescaling` layer, so the model takes raw 0-255 pixels like every
other builder model. The converter itself is not put in the graph: it would
resize a second time (the builder's `input_shape` decides the size) and it
pins its ops to the CPU (`tf.device("cpu")` in KerasHub's preprocessing
wrapper), which would cost a copy per step on accelerators.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Sequence
from typing import NamedTuple

import keras
import keras_hub
import numpy as np
from keras_hub.src.models.vit import vit_layers

from keras_transfer.backbones.kerashub import preset_location
from keras_transfer.backbones.registry import BACKBONE_NAME, get_backbone_spec, list_backbones

# `weights` for a preset: a named value loads the preset's weights (ImageNet
# for every built-in KerasHub image classifier preset), None initialises at
# random. A Backbone object keeps the weights it has.
KERASHUB_IMAGE_WEIGHTS = ("imagenet", "pretrained", None)
_CONVERTER_FILE = "image_converter.json"


class KerasHubImageBackbone(NamedTuple):
    """A loaded KerasHub image backbone, ready for the builder.

    Attributes:
        model: functional `keras.Model` named `"backbone"`: image -> feature
            map `(batch, h, w, c)` or token sequence `(batch, tokens, hidden)`.
        input_shape: `(height, width, 3)` the classifier takes.
        preprocessing: the converter's `keras.layers.Rescaling` (raw 0-255
            pixels -> the backbone's range), or None.
        class_token: True when token 0 of the sequence is a class token (ViT
            with `use_class_token`), the vector to pool.
        name: short name for the classifier (the preset or directory name).
    """

    model: keras.Model
    input_shape: tuple[int, int, int]
    preprocessing: keras.layers.Layer | None
    class_token: bool
    name: str


def list_kerashub_image_presets() -> list[str]:
    """Built-in KerasHub presets that come with an image converter, sorted.

    Returns:
        Preset names (e.g. `"resnet_18_imagenet"`); the list is KerasHub's,
        nothing is downloaded.

    Example:
    >>> from keras_transfer.backbones.kerashub_image import list_kerashub_image_presets
    >>> "vit_base_patch16_224_imagenet" in list_kerashub_image_presets()
    True
    """
    return sorted(keras_hub.layers.ImageConverter.presets)


def kerashub_image_source(backbone):
    """What a `backbone` argument means: KerasHub (a handle or object) or not (None).

    Registry names win over KerasHub preset names; then a directory, a
    `kaggle://` / `hf://` / `gs://` / `modelscope://` handle or a built-in
    KerasHub image preset name is KerasHub. A `keras_hub.models.Backbone`
    object is KerasHub; any other `keras.Model` is not.

    Args:
        backbone: what `build_image_classifier` was given.

    Returns:
        The preset handle (str) or the Backbone object, or None for a
        registry name or a plain `keras.Model`.

    Raises:
        ValueError: an unknown name (the message lists the closest registry
            and KerasHub image preset names), a KerasHub preset without an
            image converter (a text model), or a directory that is not a
            KerasHub / Hugging Face preset.
        FileNotFoundError: a path that does not exist.

    Example:
    >>> from keras_transfer.backbones.kerashub_image import kerashub_image_source
    >>> kerashub_image_source("resnet50") is None, kerashub_image_source("resnet_18_imagenet")
    (True, 'resnet_18_imagenet')
    """
    if isinstance(backbone, keras.Model):
        return backbone if isinstance(backbone, keras_hub.models.Backbone) else None
    if isinstance(backbone, os.PathLike):
        backbone = os.fspath(backbone)
    if not isinstance(backbone, str) or not backbone:
        return None  # create_backbone names the type error
    try:
        get_backbone_spec(backbone)
        return None
    except ValueError:
        pass
    if preset_location(backbone, "backbone") is not None:
        return backbone
    presets = list_kerashub_image_presets()
    if backbone in presets:
        return backbone
    if backbone in keras_hub.models.Backbone.presets:
        raise ValueError(
            f"KerasHub preset {backbone!r} has no image converter: it is not an image "
            "model (for text use `build_text_classifier`). "
            f"Received: backbone={backbone!r}"
        )
    close = difflib.get_close_matches(backbone, [*list_backbones(), *presets], n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown backbone {backbone!r}: not a registry name, a KerasHub image preset, "
        f"a preset directory or a kaggle:// / hf:// handle.{hint} See "
        "`keras_transfer.list_backbones()` and `list_kerashub_image_presets()`. "
        f"Received: backbone={backbone!r}"
    )


def image_converter_layer(converter) -> keras.layers.Layer | None:
    """The graph layer that applies an ImageConverter's scale and offset.

    KerasHub converters compute `x * scale + offset` after resizing (mean and
    std are folded into `scale` and `offset`); `keras.layers.Rescaling` does
    the same arithmetic, serialises with the model and exports to SavedModel
    and LiteRT. Resizing is left out: the model's input size is fixed.

    Args:
        converter: a `keras_hub.layers.ImageConverter`.

    Returns:
        A `keras.layers.Rescaling` named `"preprocessing"`, or None when the
        converter neither scales nor offsets.

    Raises:
        TypeError: `converter` is not an ImageConverter.
        ValueError: a converter subclass with its own `call` (more than
            rescaling) or channels-first data.

    Example:
    >>> import keras_hub
    >>> from keras_transfer.backbones.kerashub_image import image_converter_layer
    >>> layer = image_converter_layer(keras_hub.layers.ImageConverter(scale=1 / 255))
    >>> float(layer(keras.ops.ones((1, 1, 1, 3)) * 255.0)[0, 0, 0, 0])
    1.0
    """
    base = keras_hub.layers.ImageConverter
    if not isinstance(converter, base):
        raise TypeError(
            "`preprocessing` must be a mode name or a keras_hub.layers.ImageConverter. "
            f"Received: {type(converter).__name__}"
        )
    if type(converter).call is not base.call:
        raise ValueError(
            f"{type(converter).__name__} does more than rescale pixels; only converters "
            "that resize, scale and offset can be baked into the model. "
            f"Received: {type(converter).__name__}"
        )
    if converter.data_format != "channels_last":
        raise ValueError(
            "The image converter must be channels_last. "
            f"Received: data_format={converter.data_format!r}"
        )
    if converter.scale is None and converter.offset is None:
        return None
    return keras.layers.Rescaling(
        scale=_as_float(converter.scale, 1.0),
        offset=_as_float(converter.offset, 0.0),
        name="preprocessing",
    )


def _as_float(value, default):
    """A float, or a list of per-channel floats, for the Rescaling config."""
    if value is None:
        return default
    values = [float(v) for v in np.ravel(value)]
    return values[0] if len(values) == 1 else values


# KerasHub 0.32's ViT layers write config keys their `__init__` refuses and
# leave out ones it needs. Inside `ViTBackbone` that never shows (the
# backbone rebuilds its layers from its own config); as layers of a plain
# functional model they must reload alone.
_REFUSED_KEYS = ("num_patches", "num_positions", "key_dim")
_MISSING_KEYS = ("use_patch_bias", "data_format")


def _reloadable_config(layer, config: dict) -> dict:
    config = {key: value for key, value in config.items() if key not in _REFUSED_KEYS}
    config.update({key: getattr(layer, key) for key in _MISSING_KEYS if hasattr(layer, key)})
    return config


@keras.saving.register_keras_serializable(package="keras_transfer")
class _ViTPatchingAndEmbedding(vit_layers.ViTPatchingAndEmbedding):
    """KerasHub's ViT patch and position embedding, with a config that reloads.

    Same arguments and weights as `keras_hub`'s layer of this name.
    """

    def get_config(self):
        return _reloadable_config(self, super().get_config())


@keras.saving.register_keras_serializable(package="keras_transfer")
class _ViTEncoderBlock(vit_layers.ViTEncoderBlock):
    """KerasHub's ViT transformer block, with a config that reloads.

    Same arguments and weights as `keras_hub`'s layer of this name.
    """

    def get_config(self):
        return _reloadable_config(self, super().get_config())


def _reloadable(layer, cls, call_input):
    """Calls a `cls` copy (same config and weights) of a built KerasHub layer."""
    copy = cls.from_config(_reloadable_config(layer, layer.get_config()))
    output = copy(call_input)
    copy.set_weights(layer.get_weights())
    return output


def _unrolled_vit(hub) -> keras.Model:
    """ViT with its encoder unrolled: each transformer block is a layer of the model.

    `ViTBackbone` is `images -> vit_patching_and_embedding -> vit_encoder`,
    and `ViTEncoder.call` is dropout -> blocks -> layer norm.
    """
    images = keras.Input(shape=hub.inputs[0].shape[1:], name=hub.inputs[0].name)
    encoder = hub.get_layer("vit_encoder")
    embedding = hub.get_layer("vit_patching_and_embedding")
    x = encoder.dropout(_reloadable(embedding, _ViTPatchingAndEmbedding, images))
    for block in encoder.encoder_layers:
        x = _reloadable(block, _ViTEncoderBlock, x)
    return keras.Model(images, encoder.layer_norm(x), name=BACKBONE_NAME)


def _functional(hub) -> keras.Model:
    """A plain functional model over `hub`'s layers, named `"backbone"`."""
    inputs, outputs = hub.inputs, hub.outputs
    if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4:
        raise ValueError(
            f"A KerasHub image backbone must map one image to one tensor; {hub.name!r} "
            f"has inputs {[tuple(t.shape) for t in inputs]} and outputs "
            f"{[tuple(t.shape) for t in outputs]}."
        )
    if len(outputs[0].shape) not in (3, 4):
        raise ValueError(
            f"{hub.name!r} outputs shape {tuple(outputs[0].shape)}; an image classifier "
            "needs a feature map (batch, h, w, c) or tokens (batch, tokens, hidden)."
        )
    if isinstance(hub, keras_hub.models.ViTBackbone):
        return _unrolled_vit(hub)
    return keras.Model(inputs[0], outputs[0], name=BACKBONE_NAME)


def _check_input_shape(input_shape) -> tuple[int, int, int] | None:
    if input_shape is None:
        return None
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape) or shape[2] != 3:
        raise ValueError(
            "`input_shape` must be (height, width, 3) with positive integer sides. "
            f"Received: input_shape={input_shape!r}"
        )
    return shape


def _input_shape(shape, hub, converter, name) -> tuple[int, int, int]:
    """The checked `shape`, or the converter's size, or the backbone's fixed size."""
    fixed = tuple(hub.inputs[0].shape[1:3])
    if shape is None:
        if converter is not None and converter.image_size is not None:
            shape = (*converter.image_size, 3)
        elif None not in fixed:
            shape = (*fixed, 3)
        else:
            raise ValueError(
                f"KerasHub backbone {name!r} takes any image size and has no converter "
                "size: pass `input_shape=(height, width, 3)`. Received: input_shape=None"
            )
    if any(want not in (None, got) for want, got in zip(fixed, shape[:2], strict=True)):
        raise ValueError(
            f"KerasHub backbone {name!r} takes images of {fixed[0]}x{fixed[1]} pixels only; "
            "for another size rebuild it with a config override (e.g. `image_shape=...`, "
            f"random weights). Received: input_shape={shape}"
        )
    return tuple(int(d) for d in shape)


def _load_converter(handle: str):
    try:
        return keras_hub.layers.ImageConverter.from_preset(handle)
    except FileNotFoundError:
        raise ValueError(
            f"Preset {handle!r} has no image converter ({_CONVERTER_FILE}), so the "
            "model's preprocessing is unknown. Save one with "
            "`converter.save_to_preset(dir)`, or pass `preprocessing=` a mode "
            "('none': the backbone takes raw 0-255 pixels) or an ImageConverter."
        ) from None


def _short_name(source) -> str:
    if isinstance(source, keras.Model):
        name = source.name
    else:
        name = os.path.basename(os.path.normpath(source.split("://")[-1]))
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def create_kerashub_image_backbone(
    backbone,
    *,
    input_shape: Sequence[int] | None = None,
    weights: str | None = "imagenet",
    converter=None,
    load_converter: bool = True,
    **config_overrides,
) -> KerasHubImageBackbone:
    """Loads a KerasHub image backbone and its image converter for the builder.

    Args:
        backbone: a KerasHub image preset name (e.g. `"resnet_18_imagenet"`,
            downloads), a `kaggle://` / `hf://` handle, a local preset
            directory (`Backbone.save_to_preset` plus the converter's
            `save_to_preset`), or a `keras_hub.models.Backbone`.
        input_shape: `(height, width, 3)`; defaults to the converter's image
            size, else the backbone's fixed input size.
        weights: for a preset, `"imagenet"` / `"pretrained"` (load the
            preset's weights) or None (random initialisation); a Backbone
            object keeps its own weights whatever this says. The returned
            model shares the Backbone's layers (a ViT's embedding and
            transformer blocks are copies, see `_reloadable`).
        converter: an ImageConverter to use instead of the preset's.
        load_converter: False to skip the preset's converter (the caller
            preprocesses by another rule).
        **config_overrides: backbone config values to replace, passed to
            `Backbone.from_preset` (presets only).

    Returns:
        A `KerasHubImageBackbone`.

    Raises:
        ValueError: bad `weights`, an input size the backbone cannot take, a
            preset without an image converter (when one is needed), or the
            errors of `kerashub_image_source`.
        ConnectionError: a preset could not be downloaded.

    Example:
    >>> import keras_hub
    >>> from keras_transfer.backbones.kerashub_image import create_kerashub_image_backbone
    >>> vit = keras_hub.models.ViTBackbone(
    ...     image_shape=(32, 32, 3), patch_size=8, num_layers=2, num_heads=2,
    ...     hidden_dim=16, mlp_dim=32)
    >>> loaded = create_kerashub_image_backbone(vit)
    >>> loaded.model.name, loaded.input_shape, loaded.class_token
    ('backbone', (32, 32, 3), True)
    """
    source = kerashub_image_source(backbone)
    if source is None:
        raise ValueError(f"Not a KerasHub image backbone. Received: backbone={backbone!r}")
    if weights not in KERASHUB_IMAGE_WEIGHTS:
        raise ValueError(
            f"`weights` must be one of {KERASHUB_IMAGE_WEIGHTS} for a KerasHub backbone. "
            f"Received: weights={weights!r}"
        )
    shape = _check_input_shape(input_shape)
    if converter is not None:
        image_converter_layer(converter)  # checked before any download
    if isinstance(source, keras.Model):
        if config_overrides:
            raise ValueError(
                "Config overrides apply to KerasHub presets only. "
                f"Received: {sorted(config_overrides)} with a Backbone object"
            )
        hub = source
    else:
        policy = keras.config.dtype_policy().name
        if policy != "float32":
            # Presets store float32 policies; the builder's mixed precision wins.
            config_overrides.setdefault("dtype", policy)
        try:
            hub = keras_hub.models.Backbone.from_preset(
                source, load_weights=weights is not None, **config_overrides
            )
            if converter is None and load_converter:
                converter = _load_converter(source)
        except OSError as error:
            # requests' ConnectionError is an OSError; a missing file is not a network error.
            if isinstance(error, FileNotFoundError) or os.path.isdir(source):
                raise
            raise ConnectionError(
                f"Could not download KerasHub preset {source!r} (no internet?): "
                f"{str(error).splitlines()[0]}. Offline, pass a local preset directory "
                "(written by `save_to_preset`) or a registry name."
            ) from None
    name = _short_name(source)
    model = _functional(hub)
    return KerasHubImageBackbone(
        model=model,
        input_shape=_input_shape(shape, hub, converter, name),
        preprocessing=image_converter_layer(converter) if converter is not None else None,
        class_token=bool(getattr(hub, "use_class_token", False)),
        name=name,
    )
