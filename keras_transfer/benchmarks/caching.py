"""Suite `caching`: head-only training on cached features vs recomputing the backbone.

`kt.fine_tune(recipe="feature_extraction", cache_features=True)` runs the
frozen backbone once per image and trains the head on the stored features;
without it every epoch runs the backbone again. Both sides train the same
model from the same initial weights on the same arrays (in the same batch
order), interleaved. Figures: the time of an epoch after the first (the
per-epoch speedup), the whole `fine_tune` call (the end-to-end speedup:
compilation and, when caching, the caching pass included), and the test
accuracy of both, which should agree within sampling noise.
"""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from keras_transfer.benchmarks import workloads
from keras_transfer.benchmarks.figures import Figure
from keras_transfer.benchmarks.timing import EpochTimes, interleave, ratio_figures, spread_figures
from keras_transfer.recipes import fine_tune

# The target: an epoch on cached features is at least 10x faster.
SPEEDUP_TARGET = ">= 10"
# Full run: 10 epochs per fine_tune, 3 interleaved runs per side.
FULL = {"epochs": 10, "repeats": 3}
QUICK = {"epochs": 3, "repeats": 3}
# Accuracies agree "within noise" when they differ by at most two standard
# errors of the difference of two accuracies on the same number of images.
NOISE_STANDARD_ERRORS = 2.0


def _noise_bound(accuracy: float, count: int) -> float:
    """Two standard errors of a difference of two accuracies near `accuracy` on `count` images."""
    variance = 2 * accuracy * (1 - accuracy) / count
    return round(max(NOISE_STANDARD_ERRORS * math.sqrt(variance), 1 / count), 3)


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `caching` suite.

    Args:
        quick: `workloads.smoke_classifier` at 32 px, 3 epochs (for tests).

    Returns:
        Figures: `speedup` (uncached / cached time per epoch after the
        first, ratio of medians, target `SPEEDUP_TARGET`),
        `end_to_end_speedup` (whole `fine_tune` calls), their `_of_mins`,
        `<side>.epoch_ms_*`, `<side>.total_s_*`, `<side>.accuracy` and
        `accuracy_difference` (target: within `NOISE_STANDARD_ERRORS`
        standard errors) for the sides `cached` and `uncached`.

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["caching"] is run  # `keras-transfer benchmark --suite=caching`
    True
    """
    settings = QUICK if quick else FULL
    epochs = settings["epochs"]
    data = workloads.fashion_mnist(quick)
    num_classes = len(data.class_names)
    model = (
        workloads.smoke_classifier(num_classes)
        if quick
        else workloads.classifier(num_classes, quick)
    )
    initial = model.get_weights()
    timer = EpochTimes()

    def side(cache_features):
        def run_side():
            model.set_weights(initial)
            keras.utils.set_random_seed(workloads.SEED)
            start = time.perf_counter()
            fine_tune(
                model,
                data.train,
                recipe="feature_extraction",
                epochs=epochs,
                cache_features=cache_features,
                callbacks=[timer],
                verbose=0,
            )
            total = time.perf_counter() - start
            later = timer.seconds[1:]
            predictions = model.predict(data.x_test, batch_size=32, verbose=0)
            return {
                "epoch": sum(later) / len(later),
                "total": total,
                "accuracy": float(np.mean(predictions.argmax(-1) == data.y_test)),
            }

        return run_side

    timings = interleave(
        {"uncached": side(False), "cached": side(True)}, repeats=settings["repeats"]
    )
    size = "tiny MobileNetV3-Small, 32 px" if quick else "EfficientNet-Lite0 (ImageNet), 96 px"
    setup = f"{size}, {len(data.y_train)} training images, feature_extraction for {epochs} epochs."
    uncached, cached = timings["uncached"], timings["cached"]
    figures = ratio_figures(
        "speedup",
        uncached["epoch"],
        cached["epoch"],
        target=SPEEDUP_TARGET,
        notes=f"Time per epoch after the first, uncached / cached. {setup}",
    )
    figures.update(
        ratio_figures(
            "end_to_end_speedup",
            uncached["total"],
            cached["total"],
            notes=f"Whole fine_tune call (compilation and the caching pass included), "
            f"uncached / cached. {setup}",
        )
    )
    for name, measured in timings.items():
        figures.update(
            spread_figures(f"{name}.epoch_ms", measured["epoch"], "ms", setup, scale=1000)
        )
        figures.update(spread_figures(f"{name}.total_s", measured["total"], "s", setup))
        figures[f"{name}.accuracy"] = Figure(
            measured["accuracy"].median,
            "",
            notes=f"Test accuracy on {len(data.y_test)} images, median of the runs. {setup}",
        )
    mean_accuracy = (uncached["accuracy"].median + cached["accuracy"].median) / 2
    bound = _noise_bound(mean_accuracy, len(data.y_test))
    figures["accuracy_difference"] = Figure(
        round(abs(cached["accuracy"].median - uncached["accuracy"].median), 4),
        "",
        f"<= {bound}",
        f"|cached - uncached| test accuracy; the target is {NOISE_STANDARD_ERRORS:g} standard "
        f"errors of a difference of two accuracies on {len(data.y_test)} images.",
    )
    return figures
