"""Techniques beyond plain fine-tuning, each a module: `kt.techniques.lora`, ...

Every technique takes and returns plain Keras models, composes with the
builders and recipes, and exports through `kt.export`.
"""

from keras_transfer.techniques import lora

__all__ = ["lora"]
