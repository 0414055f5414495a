"""Registry of backbone specs: name -> how to build, preprocess and split it."""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Sequence

import keras

from keras_transfer.backbones.preprocessing import PREPROCESSING_MODES

BACKBONE_NAME = "backbone"

# Keras applications accept these `weights` values besides a file path.
_NAMED_WEIGHTS = ("imagenet",)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone and what the rest of the toolkit needs to know.

    Args:
        name: snake_case registry name, e.g. `"mobilenet_v3_small"`.
        family: module-level family, e.g. `"mobilenet_v3"`; families share a
            block rule and a preprocessing convention.
        constructor: callable `(input_shape, weights, name, **kwargs)` that
            returns a headless `keras.Model` whose output is a feature map.
        preprocessing: one of `PREPROCESSING_MODES`; the mode the
            `ImagePreprocessing` layer applies to raw 0-255 pixels. `"none"`
            means the constructor already contains its own preprocessing.
        default_input_size: side of the square input the weights were trained
            at.
        min_input_size: smallest side the architecture accepts.
        block_rule: name of the rule in `backbones.blocks` that splits the
            model into ordered layer groups.
        weights: named weights the constructor can download.
    """

    name: str
    family: str
    constructor: Callable[..., keras.Model]
    preprocessing: str
    default_input_size: int
    min_input_size: int
    block_rule: str
    weights: tuple[str, ...] = _NAMED_WEIGHTS

    def __post_init__(self):
        if self.preprocessing not in PREPROCESSING_MODES:
            raise ValueError(
                f"`preprocessing` must be one of {PREPROCESSING_MODES}. "
                f"Received: preprocessing={self.preprocessing!r}"
            )
        if not 1 <= self.min_input_size <= self.default_input_size:
            raise ValueError(
                "`min_input_size` must be >= 1 and <= `default_input_size`. "
                f"Received: min_input_size={self.min_input_size}, "
                f"default_input_size={self.default_input_size}"
            )


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds a backbone spec to the registry; a name can be registered once.

    Args:
        spec: the `BackboneSpec` to add.

    Returns:
        The spec, so the call can be used inline.

    Raises:
        ValueError: if a spec with the same name is already registered.

    Example:
    >>> import keras_transfer as kt
    >>> spec = kt.get_backbone_spec("resnet50")
    >>> kt.register_backbone(spec)
    Traceback (most recent call last):
    ...
    ValueError: Backbone 'resnet50' is already registered...
    """
    if spec.name in _REGISTRY:
        raise ValueError(
            f"Backbone {spec.name!r} is already registered; names must be "
            f"unique. Received: spec.name={spec.name!r}"
        )
    _REGISTRY[spec.name] = spec
    return spec


def get_backbone_spec(name: str) -> BackboneSpec:
    """Returns the registered spec for a backbone name.

    Args:
        name: registry name, e.g. `"efficientnet_v2_b0"`.

    Returns:
        The `BackboneSpec`.

    Raises:
        ValueError: for an unknown name; the message suggests the closest
            registered names.

    Example:
    >>> import keras_transfer as kt
    >>> kt.get_backbone_spec("mobilenet_v3_small").default_input_size
    224
    """
    if not isinstance(name, str):
        raise TypeError(
            f"`backbone` must be a registry name or a keras.Model. "
            f"Received: backbone={name!r} of type {type(name).__name__}"
        )
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, _REGISTRY, n=3, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(
        f"Unknown backbone {name!r}.{hint} Call `keras_transfer.list_backbones()` "
        f"for all {len(_REGISTRY)} names. Received: backbone={name!r}"
    )


def list_backbones(family: str | None = None) -> list[str]:
    """Lists registered backbone names, sorted.

    Args:
        family: if given, only names of this family (e.g. `"efficientnet"`).

    Returns:
        Sorted list of names.

    Example:
    >>> import keras_transfer as kt
    >>> "resnet50_v2" in kt.list_backbones()
    True
    """
    return sorted(n for n, s in _REGISTRY.items() if family in (None, s.family))


def validate_input_shape(
    input_shape: Sequence[int] | None, spec: BackboneSpec
) -> tuple[int, int, int]:
    """Returns `(height, width, 3)`, defaulting to the spec's size; checks minimums."""
    if input_shape is None:
        size = spec.default_input_size
        return (size, size, 3)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(d, int) for d in shape):
        raise ValueError(
            "`input_shape` must be (height, width, channels) with integer sides. "
            f"Received: input_shape={input_shape!r}"
        )
    height, width, channels = shape
    if channels != 3:
        raise ValueError(
            f"`input_shape` must have 3 (RGB) channels for {spec.name!r}. "
            f"Received: input_shape={shape}"
        )
    if min(height, width) < spec.min_input_size:
        raise ValueError(
            f"`input_shape` sides must be >= {spec.min_input_size} for "
            f"{spec.name!r}. Received: input_shape={shape}"
        )
    return shape


def resolve_weights(weights: str | os.PathLike | None, spec: BackboneSpec | None):
    """Checks `weights`: None, a named set the spec offers, or an existing file.

    Returns:
        `(named, path)`: the name to pass to the constructor (or None) and the
        file to load afterwards (or None).
    """
    if weights is None:
        return None, None
    if spec is not None and weights in spec.weights:
        return weights, None
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if os.path.isfile(path):
            return None, path
        if os.sep in path or path.endswith((".h5", ".keras")) or spec is None:
            raise FileNotFoundError(f"Weights file not found. Received: weights={path!r}")
    allowed = (*spec.weights, None) if spec else (None,)
    raise ValueError(
        f"`weights` must be one of {allowed} or the path of an existing weights "
        f"file. Received: weights={weights!r}"
    )


def create_backbone(
    backbone: str | keras.Model,
    *,
    input_shape: Sequence[int] | None = None,
    weights: str | os.PathLike | None = "imagenet",
    **kwargs,
) -> tuple[keras.Model, BackboneSpec | None]:
    """Builds a headless backbone named `"backbone"`.

    Args:
        backbone: a registry name (see `list_backbones()`) or a `keras.Model`
            (used as is, renamed `"backbone"`).
        input_shape: `(height, width, 3)`; defaults to the spec's size.
        weights: `"imagenet"` (downloads, needs internet), `None` (random
            initialisation), or the path of a weights file.
        **kwargs: passed to the constructor (e.g. `alpha=0.75`).

    Returns:
        `(model, spec)`; `spec` is None for a user's model.

    Raises:
        ConnectionError: named weights could not be downloaded.

    Example:
    >>> import keras_transfer as kt
    >>> model, spec = kt.create_backbone(
    ...     "resnet50_v2", input_shape=(32, 32, 3), weights=None)
    >>> model.name, spec.preprocessing
    ('backbone', 'tf')
    """
    if isinstance(backbone, keras.Model):
        if kwargs:
            raise ValueError(
                "Constructor arguments apply to registry names only. "
                f"Received: {sorted(kwargs)} with a keras.Model backbone"
            )
        named, path = resolve_weights(weights, None)
        if path:
            backbone.load_weights(path)
        backbone.name = BACKBONE_NAME
        return backbone, None
    spec = get_backbone_spec(backbone)
    shape = validate_input_shape(input_shape, spec)
    named, path = resolve_weights(weights, spec)
    try:
        model = spec.constructor(shape, weights=named, name=BACKBONE_NAME, **kwargs)
    except Exception as error:
        # keras.utils.get_file raises a bare Exception("URL fetch failure on ...").
        if named is None or "URL fetch failure" not in str(error):
            raise
        raise ConnectionError(
            f"Could not download the {named!r} weights of {backbone!r} (no internet?): "
            f"{str(error).splitlines()[0]}. Offline, use weights=None (--weights=none: random "
            "initialisation), the path of a local weights file, or backbone "
            "'efficientnet_lite0', whose ImageNet weights install with the package."
        ) from None
    if path:
        model.load_weights(path)
    return model, spec
