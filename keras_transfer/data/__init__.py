"""Datasets: image folders, numpy arrays and named datasets as batched `tf.data`.

Every loader returns plain `tf.data.Dataset`s of `(float32 RGB 0..255, int32)`
batches, gathered in a `DatasetSplits`.
"""

from keras_transfer.data.catalog import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FOLDER_TEST_SPLIT,
    load_dataset,
)
from keras_transfer.data.images import (
    IMAGE_EXTENSIONS,
    array_dataset,
    decode_image_bytes,
    image_folder_dataset,
)
from keras_transfer.data.splits import DatasetSplits
from keras_transfer.data.text import WORDNET_NOUN_CATEGORIES, load_wordnet_nouns, text_dataset

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FOLDER_TEST_SPLIT",
    "IMAGE_EXTENSIONS",
    "WORDNET_NOUN_CATEGORIES",
    "DatasetSplits",
    "array_dataset",
    "decode_image_bytes",
    "image_folder_dataset",
    "load_dataset",
    "load_wordnet_nouns",
    "text_dataset",
]
