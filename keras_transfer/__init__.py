"""keras_transfer: transfer learning with TensorFlow and Keras 3.

Every function takes and returns plain Keras / TensorFlow objects.
"""

from keras_transfer.backbones import (
    PREPROCESSING_MODES,
    BackboneSpec,
    Block,
    ImagePreprocessing,
    backbone_blocks,
    create_backbone,
    get_backbone,
    get_backbone_spec,
    list_backbones,
    register_backbone,
)
from keras_transfer.builders import (
    BN_POLICIES,
    build_feature_extractor,
    build_image_classifier,
    make_augmentation,
)
from keras_transfer.callbacks import LRFinderResult, ProgressiveUnfreezing, lr_find
from keras_transfer.freezing import freeze_backbone, trainable_summary, unfreeze
from keras_transfer.heads import (
    HEAD_TYPES,
    SparseCategoricalCrossentropyWithSmoothing,
    make_head,
)
from keras_transfer.optimizers import (
    LayerwiseLearningRateMixin,
    OneCycle,
    discriminative_multipliers,
    discriminative_optimizer,
    layerwise_optimizer,
    prepare_for_unfreezing,
    warmup_cosine,
)
from keras_transfer.recipes import RECIPES, fine_tune

__version__ = "0.1.0"

__all__ = [
    "BN_POLICIES",
    "HEAD_TYPES",
    "PREPROCESSING_MODES",
    "RECIPES",
    "BackboneSpec",
    "Block",
    "ImagePreprocessing",
    "LRFinderResult",
    "LayerwiseLearningRateMixin",
    "OneCycle",
    "ProgressiveUnfreezing",
    "SparseCategoricalCrossentropyWithSmoothing",
    "backbone_blocks",
    "build_feature_extractor",
    "build_image_classifier",
    "create_backbone",
    "discriminative_multipliers",
    "discriminative_optimizer",
    "fine_tune",
    "freeze_backbone",
    "get_backbone",
    "get_backbone_spec",
    "layerwise_optimizer",
    "list_backbones",
    "lr_find",
    "make_augmentation",
    "make_head",
    "prepare_for_unfreezing",
    "register_backbone",
    "trainable_summary",
    "unfreeze",
    "warmup_cosine",
]
