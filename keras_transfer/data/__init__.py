"""Datasets: image folders, numpy arrays, named datasets and text as batched `tf.data`.

Image loaders return plain `tf.data.Dataset`s of `(float32 RGB 0..255, int32)`
batches, text loaders `(token dict, int32)` batches, gathered in a
`DatasetSplits`.
"""

from keras_transfer.data.catalog import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FOLDER_TEST_SPLIT,
    TEXT_DATASET_NAMES,
    fashion_mnist_arrays,
    load_dataset,
)
from keras_transfer.data.images import (
    IMAGE_CACHE_BUDGET,
    IMAGE_EXTENSIONS,
    array_dataset,
    decode_image_bytes,
    image_cache_budget,
    image_folder_dataset,
    plan_image_cache,
)
from keras_transfer.data.splits import DatasetSplits
from keras_transfer.data.text import WORDNET_NOUN_CATEGORIES, load_wordnet_nouns, text_dataset
from keras_transfer.data.text_files import TEXT_FILE_EXTENSIONS, load_text_files

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FOLDER_TEST_SPLIT",
    "IMAGE_CACHE_BUDGET",
    "IMAGE_EXTENSIONS",
    "TEXT_DATASET_NAMES",
    "TEXT_FILE_EXTENSIONS",
    "WORDNET_NOUN_CATEGORIES",
    "DatasetSplits",
    "array_dataset",
    "decode_image_bytes",
    "fashion_mnist_arrays",
    "image_cache_budget",
    "image_folder_dataset",
    "load_dataset",
    "load_text_files",
    "load_wordnet_nouns",
    "plan_image_cache",
    "text_dataset",
]
