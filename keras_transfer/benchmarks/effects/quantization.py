"""Effect of quantisation-aware training: int8 files that keep the float accuracy.

`measure` (the `techniques` suite, ~15 s a seed) trains a small CNN on
scikit-learn's digits at 16 px (20 epochs of Adam; 359 test images) that
post-training int8 really hurts (`dead_channel_cnn`: a dead ReLU channel
under a stale weight of 60, which sets every per-channel int8 scale of the
next convolution to about twice its real weights). From the same trained
weights:

- PTQ: full-integer int8 calibrated on the first 100 training images (what
  `kt.export.tflite` does by default);
- QAT: `quantization_aware` for `QAT_EPOCHS`, then the same int8 conversion;
- control: the same fine-tuning without fake quantisation
  (`fake_quantize=False`: same graph, optimizer, LR, epochs, data and
  seed), then the same conversion. QAT beating the control shows the gain
  comes from the simulated rounding, not from the extra epochs.

`measure_models` runs the same comparison on the two real models of issue
19 (9-21 minutes a seed, so it is not part of the suite; `python -m
keras_transfer.benchmarks.effects.quantization --seeds=0,1,2` runs it): the
demo's EfficientNet-Lite0 (ImageNet weights, fine-tuned two-stage on
Fashion-MNIST at 112 px, 50 images per class: `demo.IMAGE_DEMO`, 1000 test
images) and MobileNetV3-Large trained from scratch on digits at 32 px (3
epochs, as tests/test_export_families.py; 359 test images). On those
models PTQ already keeps the accuracy within about a point (the `export`
suite measures PTQ on its model too).

Figures of `compare`: the float model's test accuracy, each int8 file's test
accuracy, top-1 agreement with the Keras model it was converted from and ops
left in float, the SQNR of its head's logits against the float model's
(`quantization_report`, 64 test images: the precision lost, before the
argmax hides it), the file size ratio int8 / float, and the margins
`int8_minus_float_accuracy` (the QAT int8 file against the float model
before QAT, what a user had) and `qat_minus_control_accuracy` (of the int8
files). `quick=True` runs `measure` on a few images for 2 epochs (seconds;
the effect need not show).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import keras
import numpy as np

from keras_transfer.builders import build_image_classifier
from keras_transfer.data import load_dataset
from keras_transfer.export.parity import _as_arrays
from keras_transfer.export.quantization_report import quantization_report
from keras_transfer.export.tflite import tflite
from keras_transfer.techniques.quantization import quantization_aware

# The margins of `measure` (the dead-channel CNN, where PTQ loses).
TARGETS = {
    "int8_minus_float_accuracy": ">= -0.02",
    "qat_minus_control_accuracy": ">= 0.1",
}
# The margins of `measure_models` (issue 19's targets on the real models).
MODEL_TARGETS = {
    "lite0_int8_minus_float_accuracy": ">= -0.01",
    "lite0_top1_agreement": ">= 0.97",
    "lite0_size_ratio": "<= 0.3",
    "mobilenet_v3_int8_minus_float_accuracy": ">= -0.01",
    "mobilenet_v3_top1_agreement": ">= 0.97",
    "mobilenet_v3_size_ratio": "<= 0.3",
}
# Measured on the demo model (seed 0): 3 epochs at 1e-4 gave the best
# agreement of {2, 3} epochs x {3e-5, 1e-4, 3e-4} (0.969; PTQ 0.928).
QAT_EPOCHS = 3
QAT_LEARNING_RATE = 1e-4
# The dead-channel CNN: its side, training and QAT settings.
CNN = {"image_size": 16, "epochs": 20, "learning_rate": 3e-3, "qat_learning_rate": 1e-3}
CNN_QUICK = {"image_size": 16, "epochs": 2, "learning_rate": 3e-3, "qat_learning_rate": 1e-3}
CALIBRATION_SAMPLES = 100
# Test images the per-layer report compares the head's logits on.
REPORT_SAMPLES = 64


def dead_channel_cnn(
    filters: int = 8,
    num_classes: int = 3,
    *,
    stale_weight: float = 30.0,
    stem: bool = False,
    live_bias: float | None = None,
    image_size: int = 16,
    seed: int = 0,
) -> keras.Model:
    """[conv_0 ->] conv_a -> conv_b -> pooling -> head, where conv_b's int8 kernel is ruined.

    Channel 0 of `conv_a` is dead (zero kernel, bias -1, ReLU), as ReLU
    units die in training, and `conv_b` keeps a stale weight of
    `stale_weight` on it in every output channel. Neither gets a gradient
    (the channel is always 0), so float training is unaffected; but each of
    `conv_b`'s per-channel int8 scales becomes `stale_weight / 127`, larger
    than its real weights, which post-training quantisation rounds away.

    Args:
        filters: channels of every convolution.
        num_classes: classes of the softmax head.
        stale_weight: the weight `conv_b` keeps on the dead channel.
        stem: adds a 3x3 convolution `conv_0` before `conv_a` (which then
            has stride 2).
        live_bias: the bias of `conv_a`'s other channels (None: as
            initialised, zero).
        image_size: the side of the square RGB input (0-255 pixels).
        seed: initialisation seed.

    Returns:
        A functional model, input named `"image"`.

    Example:

    >>> model = dead_channel_cnn(8, 3)
    >>> float(model.get_layer("conv_b").kernel.numpy()[0, 0, 0].min())
    30.0
    """
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = layers.Rescaling(1 / 255.0)(inputs)
    if stem:
        x = layers.Conv2D(filters, 3, activation="relu", name="conv_0")(x)
    x = layers.Conv2D(filters, 3, strides=2 if stem else 1, activation="relu", name="conv_a")(x)
    x = layers.Conv2D(filters, 1, activation="relu", name="conv_b")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    model = keras.Model(inputs, layers.Dense(num_classes, activation="softmax", name="head")(x))
    conv_a, conv_b = model.get_layer("conv_a"), model.get_layer("conv_b")
    kernel, bias = conv_a.kernel.numpy(), conv_a.bias.numpy()
    if live_bias is not None:
        bias[:] = live_bias
    kernel[..., 0], bias[0] = 0.0, -1.0
    conv_a.kernel.assign(kernel)
    conv_a.bias.assign(bias)
    kernel = conv_b.kernel.numpy()
    kernel[0, 0, 0, :] = stale_weight
    conv_b.kernel.assign(kernel)
    return model


def _int8_figures(model, train_images, test, folder, name):
    """`{accuracy, agreement, size}` of the model's int8 file on the test images."""
    report = tflite(
        model,
        os.path.join(folder, f"{name}.tflite"),
        "int8",
        representative_data=train_images[:CALIBRATION_SAMPLES],
        evaluation_data=test,
        verbose=False,
    )
    layers = quantization_report(model, report.path, test, num_samples=REPORT_SAMPLES)
    head = max((t for t in layers.tensors if t.op == "FULLY_CONNECTED"), key=lambda t: t.order)
    return {
        "int8_accuracy": report.tflite_accuracy,
        "float_accuracy": report.keras_accuracy,
        "agreement": report.top1_agreement,
        "logits_sqnr_db": head.sqnr_db,
        "float_ops": float(len(report.float_ops)),
        "size": float(report.size_bytes),
    }


def compare(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int = QAT_EPOCHS,
    learning_rate: float = QAT_LEARNING_RATE,
    seed: int = 0,
    jit_compile="auto",
) -> dict[str, float]:
    """PTQ, QAT and the control on one trained model; returns every figure.

    Args:
        model: a trained image classifier (its weights are restored at the end).
        train: `(images, labels)` to fine-tune and calibrate on.
        test: held-out `(images, labels)`.
        epochs: QAT (and control) epochs.
        learning_rate: their peak LR.
        seed: shuffle seed of the fine-tuning.
        jit_compile: passed to `quantization_aware` (False is faster for
            models of a few layers).

    Returns:
        `float_accuracy`, `size_ratio`, and for `ptq`, `qat` and `control`:
        `<name>_int8_accuracy`, `<name>_float_accuracy` (of the model
        converted), `<name>_agreement`, `<name>_logits_sqnr_db`,
        `<name>_float_ops` (ops of the int8 file left in float);
        `int8_minus_float_accuracy`, `qat_minus_control_accuracy` and
        `top1_agreement` (QAT).

    Example:

    >>> import numpy as np
    >>> data = (np.zeros((4, 16, 16, 3), "float32"), np.arange(4) % 2)
    >>> figures = compare(dead_channel_cnn(8, 2), data, data, epochs=1)  # doctest: +SKIP
    """
    weights = model.get_weights()
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        float_report = tflite(model, os.path.join(folder, "float.tflite"), verbose=False)
        runs = (("ptq", None), ("control", False), ("qat", True))
        for name, fake_quantize in runs:
            model.set_weights(weights)
            if fake_quantize is not None:
                quantization_aware(
                    model,
                    train,
                    epochs=epochs,
                    learning_rate=learning_rate,
                    representative_data=train[0][:CALIBRATION_SAMPLES],
                    fake_quantize=fake_quantize,
                    seed=seed,
                    jit_compile=jit_compile,
                    verbose=0,
                )
            for key, value in _int8_figures(model, train[0], test, folder, name).items():
                figures[f"{name}_{key}"] = value
    model.set_weights(weights)
    figures["float_accuracy"] = figures["ptq_float_accuracy"]
    figures["size_ratio"] = figures.pop("qat_size") / float_report.size_bytes
    for name in ("ptq", "control"):
        figures.pop(f"{name}_size")
    figures["int8_minus_float_accuracy"] = figures["qat_int8_accuracy"] - figures["float_accuracy"]
    figures["qat_minus_control_accuracy"] = (
        figures["qat_int8_accuracy"] - figures["control_int8_accuracy"]
    )
    figures["top1_agreement"] = figures["qat_agreement"]
    return figures


def _lite0_demo(seed, folder):
    from keras_transfer.demo import IMAGE_DEMO
    from keras_transfer.runs import load_run_model, load_run_splits, train_run

    config = dataclasses.replace(IMAGE_DEMO, output_dir=os.path.join(folder, "lite0"), seed=seed)
    train_run(config, verbose=0)
    model, _ = load_run_model(config.output_dir)
    splits = load_run_splits(config)
    return model, _as_arrays(splits.train), _as_arrays(splits.test)


def _mobilenet_v3_digits(seed):
    from keras_transfer.recipes import fine_tune

    keras.utils.set_random_seed(seed)
    splits = load_dataset("digits", image_size=(32, 32), batch_size=32, seed=seed)
    model = build_image_classifier(
        "mobilenet_v3_large",
        splits.num_classes,
        weights=None,
        input_shape=(32, 32, 3),
        freeze_backbone=False,
        bn_policy="train",
    )
    for layer in model.get_layer("backbone").layers:
        if hasattr(layer, "momentum"):
            layer.momentum = 0.9
    fine_tune(
        model,
        splits.train,
        recipe="full",
        epochs=3,
        learning_rate=1e-2,
        bn_policy="train",
        lr_spread=1.0,
        patience=None,
        seed=seed,
        verbose=0,
    )
    return model, _as_arrays(splits.train), _as_arrays(splits.test)


def measure(seed: int, quick: bool = False) -> dict[str, float]:
    """Trains the dead-channel CNN on digits, then compares PTQ, QAT and the control.

    Args:
        seed: initialisation, split and shuffle seed.
        quick: a smoke run (a few images, 2 epochs; the effect need not show).

    Returns:
        `compare`'s figures (3 QAT epochs at 1e-3).

    Example (~15 s; `measure(0, quick=True)` ~5 s):

    >>> sorted(TARGETS)
    ['int8_minus_float_accuracy', 'qat_minus_control_accuracy']
    """
    s = CNN_QUICK if quick else CNN
    size = s["image_size"]
    limits = {"max_per_class": 4, "max_test_per_class": 2} if quick else {}
    splits = load_dataset("digits", image_size=(size, size), batch_size=32, seed=seed, **limits)
    train, test = _as_arrays(splits.train), _as_arrays(splits.test)
    # 32 channels; a stale weight of 60 sets conv_b's int8 scales to 0.47,
    # about twice its real weights after training.
    model = dead_channel_cnn(
        32, splits.num_classes, stale_weight=60.0, stem=True, image_size=size, seed=seed
    )
    model.compile(
        optimizer=keras.optimizers.Adam(s["learning_rate"]),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(*train, epochs=s["epochs"], batch_size=32, verbose=0)
    return compare(
        model,
        train,
        test,
        epochs=QAT_EPOCHS,
        learning_rate=s["qat_learning_rate"],
        seed=seed,
        jit_compile=False,
    )


def measure_models(seed: int) -> dict[str, float]:
    """Trains the demo's Lite0 and MobileNetV3-Large, then compares PTQ, QAT and the control.

    Not part of the `techniques` suite (9-21 minutes a seed on 2 cores).

    Args:
        seed: training, split and shuffle seed.

    Returns:
        `compare`'s figures with the prefixes `lite0_` and `mobilenet_v3_`
        (their margins' targets: `MODEL_TARGETS`).

    Example (from a shell: `python -m keras_transfer.benchmarks.effects.quantization --seeds=0`):

    >>> sorted(MODEL_TARGETS)[0]
    'lite0_int8_minus_float_accuracy'
    """
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        for prefix, make in (
            ("lite0", lambda: _lite0_demo(seed, folder)),
            ("mobilenet_v3", lambda: _mobilenet_v3_digits(seed)),
        ):
            model, train, test = make()
            for key, value in compare(model, train, test, seed=seed).items():
                figures[f"{prefix}_{key}"] = value
    return figures


def _main(argv=None) -> None:
    """`--seeds=0,1,2`: `measure_models` per seed, then the suite's summary, as JSON lines."""
    import argparse
    import json

    from keras_transfer.benchmarks.techniques import summarise

    parser = argparse.ArgumentParser(description=measure_models.__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    seeds = [int(seed) for seed in parser.parse_args(argv).seeds.split(",")]
    per_seed = []
    for seed in seeds:
        per_seed.append(measure_models(seed))
        print(json.dumps({"seed": seed, **per_seed[-1]}), flush=True)
    summary = summarise("quantization_models", per_seed, MODEL_TARGETS)
    print(json.dumps({key: figure.to_dict() for key, figure in summary.items()}))


if __name__ == "__main__":
    _main()
