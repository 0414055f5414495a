"""Continual learning: learn digits 5-9 on a network that knows digits 0-4, without forgetting them.

Offline, on scikit-learn's 8x8 digits. A small MLP backbone and head learn
task A (digits 0-4); `add_task` adds a second head for task B (digits 5-9) on
the same features; then the backbone and both heads train on B's data alone
three ways, from the same A weights and with the same stage (LR, epochs,
optimizer): naive fine-tuning, Learning without Forgetting (the old head's
recorded outputs on B's images are distilled) and EWC (the Fisher information
of A, estimated on A's images, anchors the weights that mattered to A).
The table shows A's test accuracy before and after, and B's; the LwF model,
with both heads, is saved, reloaded and exported as one SavedModel.

    python examples/continual.py            # ~20 s on 2 CPU cores
    python examples/continual.py --quick    # a smoke run in seconds
"""

import argparse
import os
import tempfile

import keras

import keras_transfer as kt
from keras_transfer.benchmarks.effects.continual import (
    FULL,
    QUICK,
    SPLIT,
    mlp_classifier,
    split_digits,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    parser.add_argument("--output", default=tempfile.mkdtemp())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    keras.utils.set_random_seed(args.seed)  # the loaders' order follows it
    tasks = split_digits(settings["per_class"])
    (a_train, a_test), (b_train, b_test) = tasks["a"], tasks["b"]

    model = mlp_classifier(SPLIT, settings["hidden"], args.seed)
    kt.fit_stage(
        model,
        a_train,
        stage=kt.Stage(
            "task_a", settings["task_a_epochs"], settings["task_a_learning_rate"], "all"
        ),
        patience=None,
        verbose=0,
    )
    task_a = model.get_weights()
    print(f"{'method':<8} {'A before':>9} {'A after':>8} {'B':>6}")
    for method in ("naive", "lwf", "ewc"):
        model = mlp_classifier(SPLIT, settings["hidden"], args.seed)
        model.set_weights(task_a)
        keras.utils.set_random_seed(args.seed)
        result = kt.techniques.learn_new_task(
            kt.techniques.add_task(model, "digits_5_to_9", 10 - SPLIT),
            b_train,
            b_test,
            task="digits_5_to_9",
            method=method,
            old_data=a_train if method == "ewc" else None,
            old_test=a_test,
            epochs=settings["epochs"],
            learning_rate=settings["learning_rate"],
            lr_spread=1.0,
            ewc_lambda=settings["ewc_lambda"],
            seed=args.seed,
            verbose=0,
        )
        print(
            f"{method:<8} {result.old_accuracy_before['head']:>9.3f} "
            f"{result.old_accuracy_after['head']:>8.3f} {result.new_accuracy:>6.3f}"
        )
        if method == "lwf":
            path = os.path.join(args.output, "digits_lwf.keras")
            result.model.save(path)
            reloaded = keras.saving.load_model(path, safe_mode=True)
            export = kt.export.saved_model(reloaded, os.path.join(args.output, "digits"))
            print(f"two-head model: {reloaded.output_names} -> {path}; SavedModel {export}")


if __name__ == "__main__":
    main()
