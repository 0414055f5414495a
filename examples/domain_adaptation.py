"""Domain adaptation: labelled grey garments, unlabelled colourful ones, one classifier for both.

Offline: Fashion-MNIST. The source domain is the images as they ship; the
target domain is other images of the same classes on random colour
backgrounds (`colour_shift`, an MNIST-M-like shift), given to training
without labels. A small CNN is trained from the same weights, with the same
batches and epochs: with DANN (a domain classifier behind a gradient-reversal
layer, SGD) and with MMD (a kernel discrepancy between the two domains'
features, AdamW), each against the same call on the source alone
(`lambda_max=0`, `weight=0`). Target labels are used only to report target
accuracy after each epoch (`target_eval`); the returned models are plain
classifiers, exported as usual.

    python examples/domain_adaptation.py            # ~1-2 minutes on 2 CPU cores
    python examples/domain_adaptation.py --quick    # a smoke run on a few images
"""

import argparse
import os
import tempfile

import keras_transfer as kt
from keras_transfer.benchmarks.effects import dann as shift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on a few images")
    parser.add_argument("--output", default=tempfile.mkdtemp())
    args = parser.parse_args()
    settings = shift.QUICK if args.quick else shift.FULL

    data = shift.shifted_fashion_mnist(
        0,
        per_class=settings["per_class"],
        target_images=settings["target_images"],
        test_per_class=settings["test_per_class"],
    )
    source, target = data["source"], data["target"]  # target: images only
    options = {
        "epochs": settings["epochs"],
        "batch_size": shift.BATCH_SIZE,
        "lr_spread": 1.0,  # a network trained from scratch: one LR everywhere
        "target_eval": data["target_test"],  # for the report only, never the loss
        "verbose": 0,
    }
    # Each method against its own source-only run: DANN trains with SGD, MMD with AdamW.
    runs = {
        "source only (SGD)": lambda m: kt.techniques.dann(
            m, source, target, lambda_max=0.0, **options
        ),
        "DANN": lambda m: kt.techniques.dann(
            m, source, target, lambda_max=settings["lambda_max"], **options
        ),
        "source only (AdamW)": lambda m: kt.techniques.mmd(
            m, source, target, weight=0.0, **options
        ),
        "MMD": lambda m: kt.techniques.mmd(
            m, source, target, weight=settings["mmd_weight"], **options
        ),
    }
    for name, train in runs.items():
        model = train(shift.small_cnn_classifier(seed=0))
        accuracy = model.history.history["target_accuracy"]
        source_accuracy = model.evaluate(*data["source_test"], verbose=0)[1]
        print(
            f"{name:20s} target accuracy per epoch {[round(a, 3) for a in accuracy]}, "
            f"source test accuracy {source_accuracy:.3f}"
        )
    path = kt.export.saved_model(model, os.path.join(args.output, "adapted"))
    print(f"SavedModel of the last model (MMD, a plain classifier): {path}")


if __name__ == "__main__":
    main()
