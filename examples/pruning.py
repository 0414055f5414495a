"""Magnitude pruning for Keras 3: prune a fine-tuned model to 50% and ship a smaller file.

Offline: Fashion-MNIST (28 px) and the small CNN of the pruning benchmark
(`keras_transfer/benchmarks/effects/pruning.py`: Conv, DepthwiseConv and
Dense kernels). The classifier is fine-tuned, then trained on twice from
those weights for the same epochs: once plainly and once through
`kt.techniques.prune(sparsity=0.5, layers=...)`, which zeroes the
smallest-magnitude half of each named layer's kernel along a polynomial
schedule and keeps it at exactly zero after every step. The report compares
the two: sparsity per kernel, test accuracy, and the gzip size of the
`.keras` and LiteRT files. The stripped model (no optimizer state; the masks
were never in the model) is saved and exported as usual.

    python examples/pruning.py            # ~30 seconds on 2 CPU cores
    python examples/pruning.py --quick    # a smoke run on a few images

Pruning pretrained weights needs more data than this: EfficientNet-Lite0
(ImageNet weights, 64 px, 60 images per class) fine-tuned, then trained 4
more epochs, scored 0.766, and 0.538 when half of its 1x1 convolutions'
weights were pruned over those epochs.
"""

import argparse
import os
import tempfile

import numpy as np

import keras_transfer as kt
from keras_transfer.benchmarks.effects import pruning as setup
from keras_transfer.techniques import pruning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on a few images")
    parser.add_argument("--output", default=tempfile.mkdtemp())
    args = parser.parse_args()
    settings = setup.QUICK if args.quick else setup.FULL

    train, (x_test, y_test) = setup.fashion_mnist_28(
        0, per_class=settings["per_class"], test_per_class=settings["test_per_class"]
    )
    options = {
        "recipe": "full",  # everything trains
        "epochs": settings["epochs"],
        "learning_rate": setup.LEARNING_RATE,
        "lr_spread": 1.0,  # a network trained from scratch: one LR everywhere
        "batch_size": setup.BATCH_SIZE,
        "verbose": 0,
    }
    fine_tuned = setup.small_cnn_classifier(seed=0)
    kt.fine_tune(fine_tuned, train, **options)
    # Both go on from the fine-tuned weights for the same epochs, one of them pruned;
    # the first convolution and the head stay dense.
    dense, pruned = setup.small_cnn_classifier(seed=0), setup.small_cnn_classifier(seed=0)
    for model in (dense, pruned):
        model.set_weights(fine_tuned.get_weights())
    kt.fine_tune(dense, train, **options)
    kt.techniques.prune(pruned, train, sparsity=0.5, layers=setup.PRUNED_LAYERS, **options)
    print("schedule sparsity per epoch:", pruned.history.history["sparsity"])

    for name, model in (("dense", dense), ("pruned", pruned)):
        predictions = np.argmax(model.predict(x_test, verbose=0), axis=-1)
        print(f"{name}: test accuracy {np.mean(predictions == y_test):.3f}")
    print(pruning.pruning_report(pruned, dense).format())

    plain = kt.techniques.strip_pruning(pruned)
    plain.save(os.path.join(args.output, "pruned.keras"))
    path = kt.export.saved_model(plain, os.path.join(args.output, "pruned"))
    print(f"SavedModel {path}; .keras file {os.path.join(args.output, 'pruned.keras')}")


if __name__ == "__main__":
    main()
