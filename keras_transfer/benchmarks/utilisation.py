"""Suite `utilisation`: achieved FLOP/s in training and inference vs this machine's matmul peak.

The forward pass's floating-point operations per image are counted by
TensorFlow's graph profiler on the model's frozen inference graph (a
multiply-add counts as 2). Training does about 3 times the forward work per
image (forward, and a backward pass of about twice its cost), so achieved
training FLOP/s = forward FLOPs x 3 x images/s of `fine_tune(recipe="full")`
(every layer trains), timed after the first epoch. Inference FLOP/s =
forward FLOPs x images/s of `predict_on_batch` at batch 32. The peak is the
best rate of a dense float32 2048 x 2048 matmul (`tf.matmul`) measured in the
same run. The fractions say how much of the machine's dense arithmetic the
workload turns into model work; depthwise convolutions, BatchNorm and
activations are memory-bound, so mobile networks sit far below 1.
"""

from __future__ import annotations

import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.benchmarks import workloads
from keras_transfer.benchmarks.figures import Figure
from keras_transfer.benchmarks.timing import EpochTimes, Samples, interleave, seconds_per_call
from keras_transfer.recipes import fine_tune

FULL = {"matmul": 2048, "images": 256, "batch_size": 32, "epochs": 3, "repeats": 3}
QUICK = {"matmul": 256, "images": 32, "batch_size": 16, "epochs": 2, "repeats": 3}
NUM_CLASSES = 10
# Training work per image relative to the forward pass.
TRAINING_FLOPS_FACTOR = 3


def forward_flops(model: keras.Model) -> int:
    """Floating-point operations of one image's forward pass (inference mode).

    Args:
        model: a model with one image input of fixed size.

    Returns:
        FLOPs per image, counted by `tf.compat.v1.profiler` on the frozen
        graph (a multiply-add is 2 FLOPs).

    Example:

    >>> inputs = keras.Input((4,))
    >>> forward_flops(keras.Model(inputs, keras.layers.Dense(3)(inputs)))  # 4 x 3 x 2 + bias
    27
    """
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    spec = tf.TensorSpec([1, *model.input_shape[1:]], tf.float32)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    graph_def = convert_variables_to_constants_v2(function).graph.as_graph_def()
    graph = tf.Graph()
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # The v1 profiler logs deprecation notices of its own internals.
    try:
        with graph.as_default(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tf.graph_util.import_graph_def(graph_def, name="")
            options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
            options["output"] = "none"
            profile = tf.compat.v1.profiler.profile(
                graph=graph, run_meta=tf.compat.v1.RunMetadata(), cmd="op", options=options
            )
    finally:
        logger.setLevel(level)
    return int(profile.total_float_ops)


def matmul_peak(size: int = FULL["matmul"], repeats: int = 5) -> float:
    """This machine's dense float32 matmul rate, FLOP/s (best of `repeats`).

    Args:
        size: the side of the square matrices.
        repeats: timed calls after one warm-up.

    Returns:
        `2 * size**3 / best seconds`.

    Example:

    >>> matmul_peak(64, repeats=3) > 0
    True
    """
    a = tf.random.stateless_normal([size, size], seed=[0, 1])
    b = tf.random.stateless_normal([size, size], seed=[0, 2])
    matmul = tf.function(tf.matmul)
    matmul(a, b).numpy()
    best = min(seconds_per_call(lambda: matmul(a, b).numpy(), 1) for _ in range(repeats))
    return 2 * size**3 / best


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `utilisation` suite.

    Args:
        quick: `workloads.smoke_classifier` at 32 px and a small matmul (for
            tests).

    Returns:
        Figures: `forward_gflops_per_image`, `peak_gflops`,
        `training_gflops`, `training_fraction`, `inference_gflops`,
        `inference_fraction`.

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["utilisation"] is run  # `keras-transfer benchmark --suite=utilisation`
    True
    """
    settings = QUICK if quick else FULL
    batch, epochs = settings["batch_size"], settings["epochs"]
    model = workloads.smoke_classifier(NUM_CLASSES) if quick else workloads.classifier(NUM_CLASSES)
    shape = model.input_shape[1:]
    rng = np.random.default_rng(workloads.SEED)
    x = rng.uniform(0, 255, (settings["images"], *shape)).astype("float32")
    y = np.arange(settings["images"]) % NUM_CLASSES
    flops = forward_flops(model)
    steps = settings["images"] // batch
    timer = EpochTimes()

    def train():
        fine_tune(
            model,
            (x, y),
            recipe="full",
            epochs=epochs,
            batch_size=batch,
            callbacks=[timer],
            verbose=0,
            jit_compile=False if quick else "auto",
        )
        return {"images_per_s": steps * batch * (epochs - 1) / sum(timer.seconds[1:])}

    batch_x = x[:32]
    model.predict_on_batch(batch_x)

    def infer():
        calls = 2 if quick else 10
        return {
            "images_per_s": len(batch_x)
            / seconds_per_call(lambda: model.predict_on_batch(batch_x), calls)
        }

    peaks = []

    def peak():
        peaks.append(matmul_peak(settings["matmul"]))
        return {}

    start = time.perf_counter()
    timings = interleave(
        {"peak": peak, "training": train, "inference": infer}, repeats=settings["repeats"]
    )
    seconds = time.perf_counter() - start
    peak_rate = Samples(tuple(peaks)).median
    setup = (
        f"{'the smoke model' if quick else 'EfficientNet-Lite0'} at {shape[0]} px; peak: "
        f"float32 {settings['matmul']}^2 matmul, median of the best-of-5 of {settings['repeats']} "
        f"interleaved rounds ({seconds:.0f} s in all)."
    )
    figures = {
        "forward_gflops_per_image": Figure(
            round(flops / 1e9, 4), "GFLOP", notes="tf.compat.v1.profiler on the frozen graph."
        ),
        "peak_gflops": Figure(round(peak_rate / 1e9, 1), "GFLOP/s", notes=setup),
    }
    for side, factor, how in (
        ("training", TRAINING_FLOPS_FACTOR, "fine_tune(recipe='full'), epochs after the first"),
        ("inference", 1, "predict_on_batch at batch 32"),
    ):
        rate = timings[side]["images_per_s"].median * flops * factor
        figures[f"{side}_gflops"] = Figure(
            round(rate / 1e9, 2),
            "GFLOP/s",
            notes=f"{factor} x forward FLOPs x median images/s of {how}. {setup}",
        )
        figures[f"{side}_fraction"] = Figure(
            round(rate / peak_rate, 4), "", notes=f"{side} GFLOP/s / peak GFLOP/s."
        )
    return figures
