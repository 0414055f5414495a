"""Suite `time_to_accuracy`: the default recipe vs the usual alternatives on the demo task.

The demo task: EfficientNet-Lite0 with its ImageNet weights (offline) on
Fashion-MNIST, 50 labelled images per class for training and 50 for
validation (500 images: the epoch at which a row reaches the target should
not hinge on a handful of images), tested on 100 official test images per
class, at 96 px. Four rows train the same architecture on the same data,
batch 32, in turn:

- `default`: `kt.fine_tune(recipe="two_stage")` with its defaults (head, then
  every block with discriminative LRs), `EPOCHS` per stage;
- `keras_guide`: the Keras transfer-learning guide's recipe in plain Keras:
  the base frozen with Adam 1e-3, then the whole base with Adam 1e-5 (BatchNorm
  kept in inference mode, as the guide does), the same epochs per stage;
- `naive`: everything trains from the start with Adam 1e-3 for the same total
  epochs;
- `scratch`: random weights, capped at twice the default's epochs, with the
  demo's from-scratch settings (recipe "full" at 1e-2, BatchNorm learning
  with momentum 0.9; `demo.RANDOM_INIT_CHANGES`).

Each row records the wall time (compilation included: users pay it) and the
epoch at which validation accuracy first reaches `TARGET_ACCURACY`, and its
final test accuracy. Targets: the default reaches the target in at most half
the naive recipe's time, and its final test accuracy is at least every other
row's.
"""

from __future__ import annotations

import time

import keras

from keras_transfer.benchmarks import workloads
from keras_transfer.benchmarks.figures import Figure
from keras_transfer.builders import build_image_classifier
from keras_transfer.data import load_dataset
from keras_transfer.recipes import fine_tune

FULL = {
    "image_size": 96,
    "per_class": 100,
    "validation_split": 0.5,
    "test_per_class": 100,
    "epochs": 3,
    "target": 0.7,
}
QUICK = {
    "image_size": 32,
    "per_class": 6,
    "validation_split": 0.34,
    "test_per_class": 2,
    "epochs": 1,
    "target": 0.0,
}
BATCH_SIZE = 32
NUM_CLASSES = 10
TIME_RATIO_TARGET = "<= 0.5"
ACCURACY_MARGIN_TARGET = ">= 0"
# The from-scratch row: the demo's settings for training from random weights.
SCRATCH = {
    "recipe": "full",
    "learning_rate": 1e-2,
    "lr_spread": 1.0,
    "bn_policy": "train",
}


class _Clock(keras.callbacks.Callback):
    """Wall time since `start` and validation accuracy at every epoch end, across fits."""

    def __init__(self, target: float):
        super().__init__()
        self.target = target
        self.start = time.perf_counter()
        self.history: list[tuple[float, float]] = []

    def on_epoch_end(self, epoch, logs=None):
        accuracy = float((logs or {}).get("val_accuracy", float("nan")))
        self.history.append((time.perf_counter() - self.start, accuracy))

    def reached(self) -> tuple[int | None, float | None]:
        """(epochs, seconds) when validation accuracy first reached the target, or Nones."""
        for epoch, (seconds, accuracy) in enumerate(self.history, start=1):
            if accuracy >= self.target:
                return epoch, seconds
        return None, None


def _model(quick, weights="imagenet", **kwargs):
    if quick:
        return workloads.smoke_classifier(NUM_CLASSES, QUICK["image_size"])
    keras.utils.set_random_seed(workloads.SEED)
    size = FULL["image_size"]
    return build_image_classifier(
        workloads.FULL_BACKBONE, NUM_CLASSES, weights=weights, input_shape=(size, size, 3), **kwargs
    )


def _plain_fit(model, splits, clock, stages, jit_compile):
    """Plain Keras: `(backbone trainable, learning rate, epochs)` per stage, Adam, no decay."""
    for trainable, learning_rate, epochs in stages:
        model.get_layer("backbone").trainable = trainable
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            jit_compile=jit_compile,
        )
        model.fit(
            splits.train,
            validation_data=splits.validation,
            epochs=epochs,
            # The dataset shuffles itself; Keras warns about its own default here.
            shuffle=False,
            verbose=0,
            callbacks=[clock],
        )


def run(quick: bool = False) -> dict[str, Figure]:
    """Measures the `time_to_accuracy` suite.

    Args:
        quick: `workloads.smoke_classifier` at 32 px, one epoch per stage,
            target 0 (for tests).

    Returns:
        Figures per row (`default`, `keras_guide`, `naive`, `scratch`):
        `<row>.seconds_to_target`, `<row>.epochs_to_target` (None when never
        reached), `<row>.total_seconds`, `<row>.test_accuracy`; and
        `default_vs_naive_time` (target `TIME_RATIO_TARGET`) and
        `default_minus_best_other_accuracy` (target `ACCURACY_MARGIN_TARGET`).

    Example:

    >>> from keras_transfer.benchmarks import SUITES
    >>> SUITES["time_to_accuracy"] is run  # `keras-transfer benchmark --suite=time_to_accuracy`
    True
    """
    settings = QUICK if quick else FULL
    # Quick runs skip XLA compilation (seconds per fit); full runs use the default.
    jit = False if quick else "auto"
    size, epochs, target = settings["image_size"], settings["epochs"], settings["target"]
    splits = load_dataset(
        "fashion_mnist",
        image_size=(size, size),
        batch_size=BATCH_SIZE,
        validation_split=settings["validation_split"],
        seed=workloads.SEED,
        max_per_class=settings["per_class"],
        max_test_per_class=settings["test_per_class"],
    )

    def default(clock):
        model = _model(quick)
        fine_tune(
            model,
            splits.train,
            splits.validation,
            recipe="two_stage",
            epochs=(epochs, epochs),
            patience=None,
            callbacks=[clock],
            verbose=0,
            jit_compile=jit,
        )
        return model

    def keras_guide(clock):
        model = _model(quick)
        _plain_fit(model, splits, clock, [(False, 1e-3, epochs), (True, 1e-5, epochs)], jit)
        return model

    def naive(clock):
        model = _model(quick)
        _plain_fit(model, splits, clock, [(True, 1e-3, 2 * epochs)], jit)
        return model

    def scratch(clock):
        kwargs = {} if quick else {"bn_momentum": 0.9}
        model = _model(quick, weights=None, bn_policy=SCRATCH["bn_policy"], **kwargs)
        fine_tune(
            model,
            splits.train,
            splits.validation,
            epochs=4 * epochs,
            patience=None,
            callbacks=[clock],
            verbose=0,
            jit_compile=jit,
            **SCRATCH,
        )
        return model

    figures: dict[str, Figure] = {}
    rows = {}
    for name, train in (
        ("default", default),
        ("keras_guide", keras_guide),
        ("naive", naive),
        ("scratch", scratch),
    ):
        clock = _Clock(target)
        model = train(clock)
        model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"], jit_compile=jit)
        accuracy = float(model.evaluate(splits.test, verbose=0, return_dict=True)["accuracy"])
        reached_epoch, reached_seconds = clock.reached()
        rows[name] = (reached_seconds, clock.history[-1][0], accuracy)
        never = "" if reached_epoch else " Never reached the target."
        curve = ", ".join(f"{a:.3f}" for _, a in clock.history)
        figures.update(
            {
                f"{name}.seconds_to_target": Figure(
                    None if reached_seconds is None else round(reached_seconds, 1),
                    "s",
                    notes=f"Validation accuracy per epoch: {curve}.{never}",
                ),
                f"{name}.epochs_to_target": Figure(
                    reached_epoch, "epochs", notes=f"Target {target}.{never}"
                ),
                f"{name}.total_seconds": Figure(
                    round(clock.history[-1][0], 1), "s", notes=f"{len(clock.history)} epochs."
                ),
                f"{name}.test_accuracy": Figure(
                    round(accuracy, 4), "", notes=f"{splits.info['counts']['test']} test images."
                ),
            }
        )
    ours, theirs = rows["default"][0], rows["naive"][0]
    if ours is None:
        ratio, note = None, "The default recipe never reached the target."
    elif theirs is None:
        ratio = round(ours / rows["naive"][1], 3)
        note = "The naive recipe never reached the target: its whole run's time is used (a bound)."
    else:
        ratio, note = round(ours / theirs, 3), ""
    figures["default_vs_naive_time"] = Figure(
        ratio,
        "x",
        TIME_RATIO_TARGET,
        f"Seconds to validation accuracy {target}: default / naive. {note}".strip(),
    )
    best_other = max(rows[name][2] for name in rows if name != "default")
    figures["default_minus_best_other_accuracy"] = Figure(
        round(rows["default"][2] - best_other, 4),
        "",
        ACCURACY_MARGIN_TARGET,
        "Final test accuracy of the default recipe minus the best other row's.",
    )
    return figures
