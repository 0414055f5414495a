"""keras_transfer: transfer learning with TensorFlow and Keras 3.

Every function takes and returns plain Keras / TensorFlow objects. Importing
the package registers its custom layers, losses and optimizers with Keras, so
`import keras_transfer` must come before `keras.models.load_model` on a model
it built.
"""

from keras_transfer import _startup

# Before anything imports TensorFlow: the command keeps its C++ notices quiet.
if _startup.is_command():
    _startup.import_tensorflow_quietly()

# `distribute` first: it sets up logical CPU devices before TensorFlow starts.
from keras_transfer import distribute  # isort: skip
from keras_transfer import (
    checkpoints,
    data,
    export,
    feature_cache,
    runs,
    serving,
    stages,
    techniques,
    training,
)
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
    build_text_classifier,
    make_augmentation,
)
from keras_transfer.callbacks import LRFinderResult, ProgressiveUnfreezing, lr_find
from keras_transfer.evaluation import confusion_matrix, evaluate_classifier, format_report
from keras_transfer.feature_cache import FeatureCache
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
from keras_transfer.plots import plot_confusion_matrix, plot_training_curves
from keras_transfer.recipes import (
    RECIPES,
    Recipe,
    RecipeSettings,
    fine_tune,
    get_recipe,
    list_recipes,
    plan_recipe,
    register_recipe,
)
from keras_transfer.reports import save_history_json, write_run_report
from keras_transfer.runs import RunConfig, train_run
from keras_transfer.stages import Stage, fit_stage
from keras_transfer.techniques import lora

__version__ = "0.1.0"

__all__ = [
    "BN_POLICIES",
    "HEAD_TYPES",
    "PREPROCESSING_MODES",
    "RECIPES",
    "BackboneSpec",
    "Block",
    "FeatureCache",
    "ImagePreprocessing",
    "LRFinderResult",
    "LayerwiseLearningRateMixin",
    "OneCycle",
    "ProgressiveUnfreezing",
    "Recipe",
    "RecipeSettings",
    "RunConfig",
    "SparseCategoricalCrossentropyWithSmoothing",
    "Stage",
    "backbone_blocks",
    "build_feature_extractor",
    "build_image_classifier",
    "build_text_classifier",
    "confusion_matrix",
    "create_backbone",
    "checkpoints",
    "data",
    "distribute",
    "discriminative_multipliers",
    "discriminative_optimizer",
    "evaluate_classifier",
    "export",
    "feature_cache",
    "fine_tune",
    "fit_stage",
    "format_report",
    "freeze_backbone",
    "get_backbone",
    "get_backbone_spec",
    "get_recipe",
    "layerwise_optimizer",
    "list_backbones",
    "list_recipes",
    "lora",
    "lr_find",
    "make_augmentation",
    "make_head",
    "plot_confusion_matrix",
    "plan_recipe",
    "plot_training_curves",
    "prepare_for_unfreezing",
    "register_backbone",
    "register_recipe",
    "runs",
    "save_history_json",
    "serving",
    "stages",
    "techniques",
    "train_run",
    "training",
    "trainable_summary",
    "unfreeze",
    "warmup_cosine",
    "write_run_report",
]
