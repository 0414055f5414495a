"""Suite `overhead`: training throughput of keras_transfer vs the same model in plain Keras.

Side A: `kt.build_image_classifier("mobilenet_v3_small")` trained with
`kt.fine_tune(recipe="feature_extraction")`. Side B: what a user writes from
the Keras transfer-learning guide: `keras.applications.MobileNetV3Small(
include_top=False, pooling="avg")`, frozen, then Dropout and a softmax Dense,
compiled with AdamW and trained with `model.fit`. Same layers and sizes, same
float32 policy, same `jit_compile`, same in-memory arrays, batch size and
steps per epoch; random weights (the weights do not change the cost).

What keras_transfer adds, and is measured: its seeded `tf.data` shuffle, the
layer-wise AdamW (a per-variable LR scale) with its warm-up + cosine schedule,
and the label-smoothing loss. The first epoch of every `fit` (compilation,
tracing) is left out; throughput is images over the later epochs' time.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_transfer.benchmarks import workloads
from keras_transfer.benchmarks.figures import Figure
from keras_transfer.benchmarks.timing import EpochTimes, interleave, ratio_figures, spread_figures
from keras_transfer.builders import build_image_classifier
from keras_transfer.optimizers import DEFAULT_WEIGHT_DECAY
from keras_transfer.recipes import DEFAULT_LEARNING_RATE, fine_tune

# The target: keras_transfer trains at least 98% as fast as plain Keras.
TARGET = ">= 0.98"
# Both sides compile with the same setting ("auto": XLA where Keras judges it
# safe, which it resolves the same way for both).
JIT_COMPILE = "auto"
NUM_CLASSES = 10
DROPOUT = 0.2  # the builder's default
# Full run: MobileNetV3-Small at its native 224 px, 8 steps of 32 per epoch,
# 4 epochs per fit (the first untimed), 7 interleaved fits per side: on a
# shared 2-core machine single fits varied by 2x (other jobs), and 5 fits per
# side still let one burst of load move the median ratio by 0.2.
FULL = {"image_size": 224, "images": 256, "batch_size": 32, "epochs": 4, "repeats": 7}
# Quick run: the tiny model at 32 px, 4 steps of 16.
QUICK = {"image_size": 32, "images": 64, "batch_size": 16, "epochs": 3, "repeats": 3}


def plain_keras_classifier(
    num_classes: int, input_shape: tuple[int, int, int], **backbone_kwargs
) -> keras.Model:
    """The plain-Keras twin of `build_image_classifier("mobilenet_v3_small", ...)`.

    Args:
        num_classes: classes of the softmax output.
        input_shape: `(height, width, 3)`.
        **backbone_kwargs: passed to `keras.applications.MobileNetV3Small`.

    Returns:
        An uncompiled functional model with a frozen backbone.

    Example:

    >>> model = plain_keras_classifier(3, (32, 32, 3), alpha=0.75, minimalistic=True)
    >>> model.output_shape, model.layers[1].trainable
    ((None, 3), False)
    """
    inputs = keras.Input(shape=input_shape)
    backbone = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=input_shape, pooling="avg", **backbone_kwargs
    )
    backbone.trainable = False
    x = keras.layers.Dropout(DROPOUT)(backbone(inputs))
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `overhead` suite.

    Args:
        quick: the tiny model, 32 px, a few steps (for tests).

    Returns:
        Figures: `ratio` (keras_transfer images/s / plain Keras images/s,
        ratio of medians, target `TARGET`), `ratio_of_mins`, and for each
        side `<side>.images_per_s` and `<side>.step_ms_min` / `_median`.

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["overhead"] is run  # `keras-transfer benchmark --suite=overhead`
    True
    """
    settings = QUICK if quick else FULL
    size, batch, epochs = settings["image_size"], settings["batch_size"], settings["epochs"]
    shape = (size, size, 3)
    kwargs = workloads.QUICK_BACKBONE_KWARGS if quick else {}
    rng = np.random.default_rng(workloads.SEED)
    x = rng.uniform(0, 255, (settings["images"], *shape)).astype("float32")
    y = np.arange(settings["images"]) % NUM_CLASSES
    steps = settings["images"] // batch
    timed_steps = steps * (epochs - 1)

    keras.utils.set_random_seed(workloads.SEED)
    ours = build_image_classifier(
        "mobilenet_v3_small", NUM_CLASSES, weights=None, input_shape=shape, **kwargs
    )
    keras.utils.set_random_seed(workloads.SEED)
    plain = plain_keras_classifier(NUM_CLASSES, shape, **kwargs)
    plain.compile(
        optimizer=keras.optimizers.AdamW(DEFAULT_LEARNING_RATE, weight_decay=DEFAULT_WEIGHT_DECAY),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=JIT_COMPILE,
    )
    timer = EpochTimes()

    def run_ours():
        fine_tune(
            ours,
            (x, y),
            recipe="feature_extraction",
            epochs=epochs,
            batch_size=batch,
            jit_compile=JIT_COMPILE,
            callbacks=[timer],
            verbose=0,
            **workloads.without_feature_cache(),
        )
        return {"step": sum(timer.seconds[1:]) / timed_steps}

    def run_plain():
        plain.fit(x, y, batch_size=batch, epochs=epochs, callbacks=[timer], verbose=0)
        return {"step": sum(timer.seconds[1:]) / timed_steps}

    timings = interleave(
        {"keras_transfer": run_ours, "keras": run_plain}, repeats=settings["repeats"]
    )
    setup = (
        f"MobileNetV3-Small{' (alpha 0.75, minimalistic)' if quick else ''} at {size} px, "
        f"backbone frozen, batch {batch}, {steps} steps per epoch, {epochs - 1} timed epochs "
        f"per fit (the first is compilation), jit_compile={ours.jit_compile} (keras_transfer) "
        f"/ {plain.jit_compile} (plain Keras)."
    )
    figures = ratio_figures(
        "ratio",
        timings["keras"]["step"],
        timings["keras_transfer"]["step"],
        target=TARGET,
        notes=f"Training throughput of keras_transfer / plain Keras. {setup}",
    )
    for side, label in (("keras_transfer", "kt.fine_tune"), ("keras", "plain model.fit")):
        step = timings[side]["step"]
        figures[f"{side}.images_per_s"] = Figure(
            round(batch / step.median, 1),
            "images/s",
            notes=f"{label}: batch / median step time. {setup}",
        )
        figures.update(spread_figures(f"{side}.step_ms", step, "ms", f"{label}.", scale=1000))
    return figures
