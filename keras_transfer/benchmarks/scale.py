"""Suite `scale`: the image-folder pipeline on folders of 1k, 10k and 50k JPEG files.

The suite writes the folders itself (Fashion-MNIST training images as 64 px
JPEGs, ten class folders; the smaller folders are hard links into the
largest) and reads each with `image_folder_dataset` at 128 px in a fresh
Python process, so that each peak resident memory (`ru_maxrss`) belongs to one
folder alone. Figures per folder: the start-up scan (listing and checking
every file) in total and per file, images/s of the first epoch (decoding) and
of the second (from the cache, or decoding again), and peak memory above the
process's memory after its imports.

The pipeline's default, `cache="auto"`, keeps decoded images in memory only
when they fit `image_cache_budget()` (1 GiB): the 1k and 10k folders are
cached, the 50k folder (2.3 GiB decoded) is decoded every epoch from a
shuffled file list through a bounded buffer. Before this default, every split
was cached in memory and shuffled in a buffer of the whole split, so the 50k
folder would hold about twice its decoded size. At 1k files the new default
is compared with that old setting (`cache=True`), interleaved.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from keras_transfer.benchmarks.figures import Figure
from keras_transfer.benchmarks.pipeline import write_jpeg_folder
from keras_transfer.benchmarks.timing import Samples

FULL = {"sizes": (1_000, 10_000, 50_000), "image_size": 128, "repeats": 5}
# Passes over each folder: the first decodes, the others read the cache (if any).
EPOCHS = 3
QUICK = {"sizes": (40, 80), "image_size": 32, "repeats": 1}
SOURCE_SIZE = 64
BATCH_SIZE = 64
# Throughput of the default at the smallest folder vs the old in-memory setting
# (5 interleaved fresh processes per side: a process reads 1k files in about a second).
THROUGHPUT_TARGET = ">= 0.9"


def _link_subset(source: str, folder: str, count: int) -> None:
    """A folder of the first `count` files of `source` (by index), as hard links."""
    for label in sorted(os.listdir(source)):
        os.makedirs(os.path.join(folder, label), exist_ok=True)
    for label in sorted(os.listdir(source)):
        for name in os.listdir(os.path.join(source, label)):
            if int(name.split(".")[0]) < count:
                os.link(os.path.join(source, label, name), os.path.join(folder, label, name))


def _status_mib(field: str) -> float | None:
    """A memory field of `/proc/self/status` (`VmRSS`, `VmHWM`) in MiB, or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_mib() -> float:
    """This process's peak resident memory so far, MiB.

    `VmHWM` belongs to the process image and starts afresh at `exec`;
    `ru_maxrss` (the fallback) keeps the parent's peak across fork + exec,
    which would charge the benchmark command's own memory to the worker.
    """
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mib() -> float:
    """This process's resident memory now, MiB (the peak where `/proc` is absent)."""
    current = _status_mib("VmRSS")
    return current if current is not None else _peak_mib()


def measure_folder(directory: str, image_size: int, cache, epochs: int = EPOCHS) -> dict:
    """Reads a folder with `image_folder_dataset` and times its scan and epochs.

    Meant to run in a fresh process (`python -m keras_transfer.benchmarks.scale`),
    so that the peak memory is this folder's alone.

    Args:
        directory: a folder of class folders.
        image_size: the side images are resized to.
        cache: `image_folder_dataset`'s `cache` argument.
        epochs: full passes over the training split.

    Returns:
        `{"files", "scan_s", "images_per_s": [per epoch], "baseline_mib",
        "peak_mib", "cache_mode"}`.

    Example:

    >>> measure_folder("flowers/", 128, "auto")  # doctest: +SKIP
    {'files': 3670, 'scan_s': 1.9, 'images_per_s': [1530.2, 9805.5], ...}
    """
    from keras_transfer.data.images import image_folder_dataset

    baseline = _current_mib()
    start = time.perf_counter()
    splits = image_folder_dataset(
        directory,
        image_size=(image_size, image_size),
        batch_size=BATCH_SIZE,
        validation_split=0.0,
        cache=cache,
    )
    scan = time.perf_counter() - start
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for images, _ in splits.train:
            seen += int(images.shape[0])
        rates.append(seen / (time.perf_counter() - start))
    return {
        "files": splits.info["counts"]["train"],
        "scan_s": scan,
        "images_per_s": rates,
        "baseline_mib": baseline,
        "peak_mib": _peak_mib(),
        "cache_mode": splits.info["cache"]["mode"],
    }


def _overall_rate(measured: dict) -> float:
    """Images/s over all epochs of a `measure_folder` result."""
    return len(measured["images_per_s"]) / sum(1 / rate for rate in measured["images_per_s"])


def _in_fresh_process(directory: str, image_size: int, cache, quick: bool = False) -> dict:
    if quick:  # Seconds for tests: no new process (its peak memory is the test run's).
        return measure_folder(directory, image_size, cache)
    arguments = json.dumps({"directory": directory, "image_size": image_size, "cache": cache})
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "keras_transfer.benchmarks.scale", arguments],
        capture_output=True,
        text=True,
        env=environment,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"The scale worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `scale` suite.

    Args:
        quick: two folders of 40 and 80 files at 32 px (for tests).

    Returns:
        Figures per folder size `<n>`: `<n>.scan_s`, `<n>.scan_ms_per_file`,
        `<n>.first_epoch_images_per_s`, `<n>.images_per_s` (second epoch),
        `<n>.peak_mib` (above the imports; the largest folder's target is the
        cache budget) and `<n>.cache`; `throughput_vs_memory_cache` at the
        smallest size (target `THROUGHPUT_TARGET`).

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["scale"] is run  # `keras-transfer benchmark --suite=scale`
    True
    """
    from keras_transfer.data.images import image_cache_budget

    settings = QUICK if quick else FULL
    sizes, image_size = settings["sizes"], settings["image_size"]
    budget_mib = image_cache_budget() / 2**20
    root = tempfile.mkdtemp(prefix="kt_scale_")
    figures: dict[str, Figure] = {}
    try:
        largest = os.path.join(root, str(sizes[-1]))
        start = time.perf_counter()
        write_jpeg_folder(largest, sizes[-1], SOURCE_SIZE)
        for size in sizes[:-1]:
            _link_subset(largest, os.path.join(root, str(size)), size)
        setup = (
            f"Fashion-MNIST images as {SOURCE_SIZE} px JPEGs, read at {image_size} px, batch "
            f"{BATCH_SIZE}, no model; writing the folders took {time.perf_counter() - start:.0f} s."
        )
        smallest = os.path.join(root, str(sizes[0]))
        default, old = [], []
        for _ in range(settings["repeats"]):
            default.append(_in_fresh_process(smallest, image_size, "auto", quick))
            old.append(_in_fresh_process(smallest, image_size, True, quick))
        ours = Samples(tuple(_overall_rate(run) for run in default))
        theirs = Samples(tuple(_overall_rate(run) for run in old))
        figures["throughput_vs_memory_cache"] = Figure(
            round(ours.median / theirs.median, 3),
            "x",
            THROUGHPUT_TARGET,
            f"Images/s over {EPOCHS} epochs at {sizes[0]} files: cache='auto' / cache=True (the old "
            f"default), medians of {settings['repeats']} interleaved fresh processes. {setup}",
        )
        for size in sizes:
            measured = default[0] if size == sizes[0] else None
            if measured is None:
                measured = _in_fresh_process(
                    os.path.join(root, str(size)), image_size, "auto", quick
                )
            decoded_mib = size * image_size * image_size * 3 / 2**20
            peak = measured["peak_mib"] - measured["baseline_mib"]
            is_largest = size == sizes[-1]
            figures.update(
                {
                    f"{size}.scan_s": Figure(round(measured["scan_s"], 2), "s", notes=setup),
                    f"{size}.scan_ms_per_file": Figure(
                        round(1000 * measured["scan_s"] / size, 3),
                        "ms",
                        notes="Listing the class folders and opening every file with Pillow.",
                    ),
                    f"{size}.first_epoch_images_per_s": Figure(
                        round(measured["images_per_s"][0], 1), "images/s", notes="Decoding."
                    ),
                    f"{size}.images_per_s": Figure(
                        round(measured["images_per_s"][1], 1),
                        "images/s",
                        notes=f"Second epoch, cache mode {measured['cache_mode']!r}.",
                    ),
                    f"{size}.peak_mib": Figure(
                        round(peak, 1),
                        "MiB",
                        f"<= {budget_mib:.0f}" if is_largest else None,
                        f"Peak resident memory above the imports; decoded size {decoded_mib:.0f} "
                        f"MiB, cache mode {measured['cache_mode']!r}, memory budget "
                        f"{budget_mib:.0f} MiB. The old default (cache in memory, shuffle buffer "
                        f"of the whole split) would hold ~{2 * decoded_mib:.0f} MiB.",
                    ),
                }
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures


if __name__ == "__main__":
    _options = json.loads(sys.argv[1])
    print(json.dumps(measure_folder(**_options)))
