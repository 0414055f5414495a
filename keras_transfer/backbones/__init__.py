"""Backbones: the registry, the keras.applications specs, KerasHub, blocks, preprocessing."""

from keras_transfer.backbones import (  # noqa: F401  (register specs)
    applications,
    efficientnet_lite,
)
from keras_transfer.backbones.blocks import (
    Block,
    backbone_blocks,
    detect_block_rule,
    get_backbone,
)
from keras_transfer.backbones.kerashub_image import (
    KerasHubImageBackbone,
    create_kerashub_image_backbone,
    list_kerashub_image_presets,
)
from keras_transfer.backbones.preprocessing import (
    PREPROCESSING_MODES,
    ImagePreprocessing,
)
from keras_transfer.backbones.registry import (
    BACKBONE_NAME,
    BackboneSpec,
    create_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)

__all__ = [
    "BACKBONE_NAME",
    "PREPROCESSING_MODES",
    "Block",
    "BackboneSpec",
    "ImagePreprocessing",
    "KerasHubImageBackbone",
    "backbone_blocks",
    "create_backbone",
    "create_kerashub_image_backbone",
    "detect_block_rule",
    "get_backbone",
    "get_backbone_spec",
    "list_backbones",
    "list_kerashub_image_presets",
    "register_backbone",
]
