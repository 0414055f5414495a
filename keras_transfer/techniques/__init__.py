"""Techniques beyond plain fine-tuning, each a module: `kt.techniques.lora`, ...

Every technique takes and returns plain Keras models, composes with the
builders and recipes, and exports through `kt.export`.
"""

from keras_transfer.techniques import (
    continual,
    distillation,
    domain_adaptation,
    ewc,
    lora,
    lwf,
    multitask,
    pruning,
    quantization,
)
from keras_transfer.techniques.continual import add_task, learn_new_task
from keras_transfer.techniques.distillation import distill
from keras_transfer.techniques.domain_adaptation import dann, mmd
from keras_transfer.techniques.multitask import build_multitask_model
from keras_transfer.techniques.pruning import PruningCallback, prune, strip_pruning
from keras_transfer.techniques.quantization import quantization_aware

# The module `ensemble` is imported for its function of the same name, which
# takes the name here (`kt.techniques.ensemble(models)`); the module stays
# importable as `keras_transfer.techniques.ensemble`. `distillation` and
# `continual` import `stages` as a module (`from keras_transfer import stages`),
# which the cycle through `stages` -> `lora` tolerates, so they load here.
from keras_transfer.techniques.ensemble import ensemble  # isort: skip

__all__ = [
    "PruningCallback",
    "add_task",
    "build_multitask_model",
    "continual",
    "dann",
    "distill",
    "distillation",
    "domain_adaptation",
    "ensemble",
    "ewc",
    "learn_new_task",
    "lora",
    "lwf",
    "mmd",
    "multitask",
    "prune",
    "pruning",
    "quantization",
    "quantization_aware",
    "strip_pruning",
]
