"""Quantisation-aware training (QAT) for Keras 3: fine-tune so that full-integer int8 keeps accuracy.

Keras 3 has no QAT API, and tensorflow-model-optimization works only with
Keras 2. `quantization_aware(model, train, epochs=...)` builds a training-only
copy of the model's graph that simulates what the LiteRT converter will do in
full-integer int8, trains it for a few epochs at a small LR, and leaves the
result in `model`'s own variables: a plain float model that
`kt.export.tflite(model, path, "int8", representative_data=...)` converts as
usual.

What is simulated (the converter's int8 scheme):

- Weights: per-channel symmetric int8 (`[-127, 127]`, one scale per output
  channel) for `Conv2D`, `DepthwiseConv2D` and `Dense`, with the
  `BatchNormalization` that follows a convolution folded into its kernel and
  bias first (`kernel * gamma / sqrt(var + eps)`, as the converter folds it).
  BatchNorm runs on its moving statistics throughout, so the folded kernel is
  exactly the one the converter quantises (tfmot's batch-statistics phase is
  left out: a few epochs at a small LR do not need it).
- Activations: per-tensor asymmetric int8 (`fake_quant_with_min_max_vars`,
  straight-through gradients) at every tensor the LiteRT file quantises: the
  input, the output of each convolution (after a fused ReLU/ReLU6),
  addition, multiplication, pooling and activation; a ReLU after a
  convolution, a BatchNorm or an addition is fused, as the converter fuses
  it. Softmax and sigmoid outputs get the fixed range `[0, 1]` (the
  converter's 1/256 scale), except the model's own output probabilities (a
  loss on probabilities rounded to 1/256, zeros included, is ill-behaved).
  A `Rescaling` with an offset is quantised after its multiplication and
  after its addition, the two ops it becomes. The ranges are the converter's
  calibration: the
  min/max of each tensor over the calibration images, measured on the float
  graph before every epoch (the tracked ranges are the ones the final
  conversion will calibrate, rather than a moving average of batch extremes
  that it would not reproduce). An op the converter lowers to several kernels
  (hard-swish, a standalone BatchNorm) is quantised at its output only.

Every weight of a quantised layer trains (kernels, biases, BatchNorm
`gamma`/`beta`), whatever the layers' `trainable` flags (restored
afterwards); BatchNorm statistics stay fixed. Layers QAT does not know
(attention, recurrent, `SeparableConv2D`, custom layers) are refused by
name: the converter's treatment of them is not simulated. The loss is the
one the model was compiled with (the one it was fine-tuned with): QAT
under another objective, say with label smoothing added, moves the model
off its optimum (measured: 2 points of accuracy lost on a small CNN).

Measured (benchmarks/effects/quantization.py, seeds 0-2): on the demo's
EfficientNet-Lite0 the int8 file's logits SQNR goes from 16.3-17.5 dB
(post-training quantisation) to 20.2-21.3 dB (the same fine-tuning without
fake quantisation: 18.3-19.0), its accuracy from 1.3 points below float on
average to 1.7 above; top-1 agreement 0.951-0.965 (control 0.940-0.962).
Where int8 already matches float (small CNNs, MobileNetV3-Large on digits)
QAT gains nothing over the plain fine-tuning.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_transfer import stages
from keras_transfer.techniques.quantization_graph import check_quantizable, simulate_int8
from keras_transfer.training import (
    check_number,
    compile_arguments,
    positive_number,
    prepare_training,
)

# A few epochs at a tenth of the head LR. Measured on the demo model (seed
# 0, 1000 test images; int8 top-1 agreement with the Keras model, PTQ 0.928):
# 2 epochs at 1e-4 0.962, 3 at 3e-5 0.954, 3 at 1e-4 0.969, 2 at 3e-4 0.958.
DEFAULT_QAT_EPOCHS = 3
DEFAULT_QAT_LEARNING_RATE = 1e-4
# The calibration images: as many as `kt.export.tflite` calibrates on, so
# that QAT's ranges are those of the final conversion.
DEFAULT_CALIBRATION_SAMPLES = 100


class _Calibration(keras.callbacks.Callback):
    """Before every epoch: the quantizers' ranges from the float graph on the images."""

    def __init__(self, simulation, images, batch_size):
        super().__init__()
        self.simulation, self.images, self.batch_size = simulation, images, batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self.simulation.calibrate(self.images, self.batch_size)


def _calibration_images(train, representative_data, count):
    """The first `count` images of `representative_data` (else of `train`), as an array."""
    import tensorflow as tf

    data = train if representative_data is None else representative_data
    if isinstance(data, tf.data.Dataset):
        images = []
        for batch in data:
            images.append(np.asarray(batch[0] if isinstance(batch, tuple) else batch))
            if sum(len(b) for b in images) >= count:
                break
        return np.concatenate(images)[:count].astype("float32")
    images = data[0] if isinstance(data, tuple) else data
    return np.asarray(images[:count], "float32")


def quantization_aware(
    model: keras.Model,
    train,
    validation=None,
    *,
    epochs: int = DEFAULT_QAT_EPOCHS,
    loss=None,
    learning_rate: float = DEFAULT_QAT_LEARNING_RATE,
    representative_data=None,
    num_calibration_samples: int = DEFAULT_CALIBRATION_SAMPLES,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
    strategy=None,
    fake_quantize: bool = True,
    jit_compile="auto",
    verbose="auto",
) -> keras.Model:
    """Fine-tunes `model` with its int8 quantisation simulated, so that int8 keeps its accuracy.

    See the module docstring for what is simulated. The optimizer is a
    recipe stage's (AdamW, warm-up then cosine decay from `learning_rate`);
    the loss is the one the model was compiled with. Convert the result
    with `kt.export.tflite(model, path, "int8", representative_data=...)`
    calibrated on the same images as `representative_data` here.

    Args:
        model: a functional image model (from `kt.build_image_classifier`,
            or any of Conv2D, DepthwiseConv2D, Dense, BatchNormalization,
            ReLU, elementwise, pooling and activation layers), already
            fine-tuned.
        train: a batched `tf.data.Dataset` of `(images, labels)` or a tuple
            of arrays.
        validation: the same for validation (reported only), or None.
        epochs: QAT epochs, >= 1.
        loss: the training loss; None: the model's compiled loss if it has
            one (the loss it was fine-tuned with), else its head's default
            (`training.compile_arguments`).
        learning_rate: peak LR, > 0: a fraction of the fine-tuning LR.
        representative_data: calibration images (array or dataset), the
            ones the int8 conversion will use; None: the first training
            images.
        num_calibration_samples: images calibrated on.
        batch_size: batch size for arrays.
        weight_decay: AdamW decoupled weight decay.
        seed: seed of the array shuffle.
        strategy: a `tf.distribute.Strategy`; None: the model's own.
        fake_quantize: False trains the same graph (BatchNorm folded, on its
            moving statistics) without fake quantisation: the plain
            fine-tuning a QAT run is measured against.
        jit_compile: passed to `compile`.
        verbose: passed to `fit`.

    Returns:
        `model` itself, its weights fine-tuned: a plain float Keras model
        (no quantisation layers), with its training `History` as
        `model.history`.

    Raises:
        ValueError: bad arguments, or layers QAT cannot simulate (named).

    Example:
    >>> import keras, numpy as np, keras_transfer as kt
    >>> inputs = keras.Input((8, 8, 3), name="image")
    >>> x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    >>> x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    >>> x = keras.layers.GlobalAveragePooling2D()(x)
    >>> model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    >>> data = (np.random.rand(8, 8, 8, 3) * 255, np.arange(8) % 2)
    >>> kt.techniques.quantization_aware(model, data, epochs=1, jit_compile=False,
    ...                                  verbose=0) is model
    True
    """
    check_number("epochs", epochs, 1, integer=True)
    check_number("num_calibration_samples", num_calibration_samples, 1, integer=True)
    if not positive_number(learning_rate):
        raise ValueError(f"`learning_rate` must be > 0. Received: learning_rate={learning_rate!r}")
    layers = check_quantizable(model)
    inputs = prepare_training(
        model,
        train,
        validation,
        batch_size=batch_size,
        patience=None,
        weight_decay=weight_decay,
        seed=seed,
        strategy=strategy,
    )
    images = _calibration_images(train, representative_data, num_calibration_samples)
    if loss is None:
        # The loss the model was trained with: QAT that changes the objective
        # (say, adds label smoothing) moves the model off its optimum.
        compiled = getattr(model, "compiled", False) and model.loss is not None
        loss = model.loss if compiled else compile_arguments(model)["loss"]
    flags = [(layer, layer.trainable) for layer in layers]
    try:
        for layer, _ in flags:
            layer.trainable = True
        with inputs.strategy.scope():
            simulation = simulate_int8(model)
            trained = simulation.model if fake_quantize else simulation.float_model
            trained.compile(
                optimizer=stages.stage_optimizer(
                    model,
                    stages.Stage("qat", epochs, learning_rate),
                    inputs.steps,
                    weight_decay=weight_decay,
                    lr_scale=inputs.lr_scale,
                ),
                loss=next(iter(loss.values())) if isinstance(loss, dict) else loss,
                metrics=["accuracy"],
                jit_compile=jit_compile,
            )
        model.history = trained.fit(
            inputs.train,
            validation_data=inputs.validation,
            epochs=epochs,
            callbacks=[_Calibration(simulation, images, batch_size)],
            shuffle=False,
            verbose=verbose,
        )
    finally:
        for layer, trainable in flags:
            layer.trainable = trainable
    return model
