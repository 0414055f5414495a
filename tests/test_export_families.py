"""Acceptance of the exports on three families with trained weights and real held-out data.

EfficientNet-Lite0 uses its shipped ImageNet weights (fine-tuned head on
Fashion-MNIST). MobileNetV3-Large and ResNet50V2 have no weights that install
offline, so they are trained from scratch on scikit-learn's digits: real
trained weights and real held-out images, never random weights. Epochs are
the fewest that train them well past the accuracy bar (measured: ResNet50V2
0.91 after 2 epochs, MobileNetV3-Large 0.93 after 3, on the 359 test digits).
"""

import numpy as np
import pytest
import tensorflow as tf
from test_export import jpeg_bytes, run_bytes_signature

import keras_transfer as kt
from keras_transfer import export
from keras_transfer.data import decode_image_bytes

# Parity is measured on the first 100 held-out images: each runs through the
# LiteRT interpreter one by one.
PARITY_SAMPLES = 100
FAMILIES = {
    # name: (backbone, weights, dataset, image size, epochs, extra builder kwargs)
    "efficientnet_lite0": ("efficientnet_lite0", "imagenet", "fashion_mnist", 96, 4, {}),
    "mobilenet_v3_large": ("mobilenet_v3_large", None, "digits", 32, 3, {}),
    "resnet50_v2": ("resnet50_v2", None, "digits", 32, 2, {}),
}


def _train(name):
    backbone, weights, data, size, epochs, kwargs = FAMILIES[name]
    caps = {"max_per_class": 30, "max_test_per_class": 30} if data == "fashion_mnist" else {}
    splits = kt.data.load_dataset(data, image_size=(size, size), batch_size=32, **caps)
    if weights is None:
        # From scratch: every layer trains and BatchNorm learns its statistics
        # (momentum 0.9 so the moving averages catch up within a few epochs).
        model = kt.build_image_classifier(
            backbone,
            splits.num_classes,
            weights=None,
            input_shape=(size, size, 3),
            freeze_backbone=False,
            bn_policy="train",
            **kwargs,
        )
        for layer in model.get_layer("backbone").layers:
            if hasattr(layer, "momentum"):
                layer.momentum = 0.9
        recipe, lr, bn_policy = "full", 1e-2, "train"
    else:
        model = kt.build_image_classifier(
            backbone, splits.num_classes, weights=weights, input_shape=(size, size, 3)
        )
        recipe, lr, bn_policy = "feature_extraction", 1e-3, None
    kt.fine_tune(
        model,
        splits.train,
        recipe=recipe,
        epochs=epochs,
        learning_rate=lr,
        bn_policy=bn_policy,
        lr_spread=1.0,
        patience=None,
        verbose=0,
    )
    return model, splits


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_export_acceptance(name, tmp_path):
    model, splits = _train(name)
    size = model.input_shape[1:3]

    # SavedModel: the TF C++ loader in a clean process, real JPEGs, <= 1e-5.
    images, _ = next(iter(splits.test))
    data = [jpeg_bytes(seed=1)]
    for image in images[:3].numpy().astype("uint8"):
        data.append(tf.io.encode_jpeg(image, quality=90).numpy())
    path = export.saved_model(model, str(tmp_path / name), labels=splits.class_names)
    result, out = run_bytes_signature(path, data, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(out / "probabilities.npy")
    decoded = np.stack([decode_image_bytes(tf.constant(d), size) for d in data])
    assert np.abs(served - model.predict(decoded, verbose=0)).max() <= 1e-5

    # LiteRT float: top-1 agreement >= 99% on the held-out test split. Both
    # files convert from one conversion source (as `export_model` does).
    source = export.write_conversion_source(model, str(tmp_path / "source"))
    float_report = export.tflite(
        model,
        str(tmp_path / "float.tflite"),
        source_dir=source,
        evaluation_data=splits.test,
        num_evaluation_samples=PARITY_SAMPLES,
        verbose=False,
    )
    assert float_report.num_examples == PARITY_SAMPLES
    assert float_report.top1_agreement >= 0.99

    # LiteRT int8, calibrated on training images: <= 0.3x the float file and
    # top-1 accuracy within 2 points of float, every op integer.
    int8_report = export.tflite(
        model,
        str(tmp_path / "int8.tflite"),
        "int8",
        source_dir=source,
        representative_data=splits.train,
        evaluation_data=splits.test,
        num_evaluation_samples=PARITY_SAMPLES,
        verbose=False,
    )
    print(export.format_parity_table([float_report, int8_report]))
    assert int8_report.float_ops == []
    assert int8_report.size_bytes <= 0.3 * float_report.size_bytes
    assert float_report.tflite_accuracy > 0.5  # trained, far above chance (0.1)
    assert abs(int8_report.tflite_accuracy - float_report.tflite_accuracy) <= 0.02
