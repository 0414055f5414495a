"""Suite `pipeline`: training from a folder of JPEG files vs from images already in memory.

The suite writes Fashion-MNIST training images as JPEG files in ten class
folders and decodes the same files once into an array. Side A trains from the
folder with `image_folder_dataset` (JPEG decoding, resizing, the in-memory
cache, shuffling, batching and prefetching, parallel maps); side B trains the
same model on the array (`fine_tune` turns it into a `tf.data` pipeline of
in-memory tensors). Both run `fine_tune(recipe="feature_extraction")` on the
workload's classifier from the same initial weights, interleaved; the folder
dataset is built afresh (untimed) before each of its runs, so its first epoch
decodes every file. The figure is the ratio of training images/s over the
epochs after the first (compilation, and for the folder its decoding pass);
the first epoch's ratio and the pipeline's own rate (no model) are reported
too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.benchmarks import workloads
from keras_transfer.benchmarks.figures import Figure
from keras_transfer.benchmarks.timing import EpochTimes, interleave, ratio_figures, spread_figures
from keras_transfer.data.catalog import fashion_mnist_arrays
from keras_transfer.data.images import decode_image_bytes, image_folder_dataset
from keras_transfer.recipes import fine_tune

TARGET = ">= 0.95"
# Full: 640 images (64 per class) as 128 px JPEGs, read at the workload's 96 px.
FULL = {"images": 640, "jpeg_size": 128, "epochs": 4, "repeats": 3, "batch_size": 32}
QUICK = {"images": 40, "jpeg_size": 48, "epochs": 2, "repeats": 3, "batch_size": 8}
NUM_CLASSES = 10
JPEG_QUALITY = 90


def write_jpeg_folder(folder: str, count: int, size: int) -> None:
    """The first `count` Fashion-MNIST training images as `size` px RGB JPEGs, a folder per class.

    Files are named by their index (`000123.jpg`), so a subset is easy to pick.

    Args:
        folder: where the class folders `class_0` ... `class_9` go.
        count: how many images (up to 60,000).
        size: the side of each JPEG (upscaled from 28 px, bilinear).

    Returns:
        None.

    Example:

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> write_jpeg_folder(folder, 20, 32)
    >>> sum(len(files) for _, _, files in os.walk(folder))
    20
    """
    from PIL import Image

    (images, labels), _ = fashion_mnist_arrays()
    for label in np.unique(labels[:count]):
        os.makedirs(os.path.join(folder, f"class_{label}"), exist_ok=True)

    def write(index):
        image = Image.fromarray(images[index]).convert("RGB").resize((size, size))
        path = os.path.join(folder, f"class_{labels[index]}", f"{index:06d}.jpg")
        image.save(path, quality=JPEG_QUALITY)

    with ThreadPoolExecutor() as pool:  # Pillow releases the GIL while encoding.
        list(pool.map(write, range(count)))


def _decoded_arrays(splits, image_size):
    """The folder's training files decoded once, in the folder's file order."""
    paths = splits.info["paths"]["train"]
    images = np.stack(
        [decode_image_bytes(tf.io.read_file(path), image_size).numpy() for path in paths]
    )
    names = splits.class_names
    labels = np.array([names.index(os.path.basename(os.path.dirname(p))) for p in paths])
    return np.round(images).astype("float32"), labels.astype("int32")


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `pipeline` suite.

    Args:
        quick: `workloads.smoke_classifier` at 32 px and 40 small JPEGs
            (for tests).

    Returns:
        Figures: `ratio` (folder / in-memory training images/s after the
        first epoch, ratio of medians, target `TARGET`), `ratio_of_mins`,
        `first_epoch_ratio`, `<side>.images_per_s`, `<side>.step_ms_*`, and
        `decode_images_per_s` / `cached_images_per_s` (the folder pipeline
        alone, first and second epoch).

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["pipeline"] is run  # `keras-transfer benchmark --suite=pipeline`
    True
    """
    settings = QUICK if quick else FULL
    size = workloads.QUICK_IMAGE_SIZE if quick else workloads.FULL_IMAGE_SIZE
    batch, epochs = settings["batch_size"], settings["epochs"]
    root = tempfile.mkdtemp(prefix="kt_pipeline_")
    try:
        write_jpeg_folder(root, settings["images"], settings["jpeg_size"])

        def folder_splits():
            return image_folder_dataset(
                root, image_size=(size, size), batch_size=batch, validation_split=0.0
            )

        splits = folder_splits()
        rates = []
        for _ in range(2):
            start, seen = time.perf_counter(), 0
            for images, _ in splits.train:
                seen += int(images.shape[0])
            rates.append(seen / (time.perf_counter() - start))
        x, y = _decoded_arrays(splits, (size, size))
        model = (
            workloads.smoke_classifier(NUM_CLASSES, size)
            if quick
            else workloads.classifier(NUM_CLASSES)
        )
        initial = model.get_weights()
        timer = EpochTimes()
        steps = -(-len(y) // batch)

        def side(data_fn):
            def run_side():
                data = data_fn()
                model.set_weights(initial)
                keras.utils.set_random_seed(workloads.SEED)
                fine_tune(
                    model,
                    data,
                    recipe="feature_extraction",
                    epochs=epochs,
                    batch_size=batch,
                    callbacks=[timer],
                    verbose=0,
                    # Quick runs skip XLA compilation (seconds per fit); full runs use the default.
                    jit_compile=False if quick else "auto",
                    **workloads.without_feature_cache(),
                )
                return {
                    "step": sum(timer.seconds[1:]) / (steps * (epochs - 1)),
                    "first_epoch": timer.seconds[0],
                }

            return run_side

        timings = interleave(
            {"folder": side(lambda: folder_splits().train), "memory": side(lambda: (x, y))},
            repeats=settings["repeats"],
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    setup = (
        f"{len(y)} Fashion-MNIST images as {settings['jpeg_size']} px JPEGs read at {size} px; "
        f"{'the smoke model' if quick else 'EfficientNet-Lite0'}, backbone frozen, "
        f"batch {batch}, {epochs - 1} timed epochs per fit."
    )
    figures = ratio_figures(
        "ratio",
        timings["memory"]["step"],
        timings["folder"]["step"],
        target=TARGET,
        notes=f"Training images/s from the JPEG folder / from in-memory arrays. {setup}",
    )
    figures["first_epoch_ratio"] = Figure(
        round(timings["memory"]["first_epoch"].median / timings["folder"]["first_epoch"].median, 3),
        "x",
        notes="First epoch (compilation for both; JPEG decoding for the folder), in-memory "
        "time / folder time.",
    )
    for name in ("folder", "memory"):
        step = timings[name]["step"]
        figures[f"{name}.images_per_s"] = Figure(
            round(batch / step.median, 1), "images/s", notes=f"Median step time. {setup}"
        )
        figures.update(spread_figures(f"{name}.step_ms", step, "ms", f"{name}.", scale=1000))
    figures["decode_images_per_s"] = Figure(
        round(rates[0], 1), "images/s", notes="The folder pipeline alone, first epoch (decoding)."
    )
    figures["cached_images_per_s"] = Figure(
        round(rates[1], 1), "images/s", notes="The folder pipeline alone, second epoch (cache)."
    )
    return figures
