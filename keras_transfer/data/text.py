"""Text datasets: WordNet noun glosses labelled by category (offline).

A real text classification task from a Debian package (`wordnet-base`), for
text transfer learning without downloads (see OFFLINE_ASSETS.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_transfer.data.splits import (
    DatasetSplits,
    cap_per_class,
    stratified_split,
    suggest,
    validate_max,
    validate_split_options,
)

# Debian package `wordnet-base` (WordNet 3.0).
WORDNET_NOUN_PATH = "/usr/share/wordnet/data.noun"
# The 45 lexicographer files in file-number order (WordNet's lexnames(5WN) page).
WORDNET_LEXNAMES = (
    *("adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal"),
    *("noun.artifact", "noun.attribute", "noun.body", "noun.cognition"),
    *("noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group"),
    *("noun.location", "noun.motive", "noun.object", "noun.person", "noun.phenomenon"),
    *("noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation"),
    *("noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body"),
    *("verb.change", "verb.cognition", "verb.communication", "verb.competition"),
    *("verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion"),
    *("verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather"),
    "adj.ppl",
)
WORDNET_NOUN_CATEGORIES = tuple(n[5:] for n in WORDNET_LEXNAMES if n.startswith("noun."))


def load_wordnet_nouns(
    categories: Sequence[str] = ("animal", "artifact", "food", "plant"),
    *,
    max_per_class: int | None = None,
    seed: int = 0,
    path: str | os.PathLike = WORDNET_NOUN_PATH,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Loads WordNet 3.0 noun glosses labelled by their lexicographer category.

    A real, offline text classification task: each text is the definition of
    a noun synset (the gloss up to its first `;`), its label the synset's
    category (`noun.animal`, `noun.artifact`, ...). The four default
    categories give 29,699 texts.

    Args:
        categories: noun categories, short (`"animal"`) or full
            (`"noun.animal"`); one of `WORDNET_NOUN_CATEGORIES` each.
        max_per_class: keep at most this many texts per category (a seeded
            choice); None keeps all.
        seed: seed of the choice and of the order of the texts (shuffled).
        path: WordNet's `data.noun` file.

    Returns:
        `(texts, labels, class_names)`: a list of str, an int32 array and
        the short category names (label `i` is `class_names[i]`).

    Raises:
        FileNotFoundError: `path` is missing (`apt-get install wordnet-base`).

    Example:
    >>> from keras_transfer.data import load_wordnet_nouns
    >>> texts, labels, names = load_wordnet_nouns(("animal", "food"), max_per_class=2)
    >>> len(texts), names
    (4, ['animal', 'food'])
    """
    validate_max("max_per_class", max_per_class)
    categories = [categories] if isinstance(categories, str) else list(categories)
    class_names = [str(c).removeprefix("noun.") for c in categories]
    for category, short in zip(categories, class_names, strict=True):
        if short not in WORDNET_NOUN_CATEGORIES:
            raise ValueError(
                f"`categories` must be WordNet noun categories from {WORDNET_NOUN_CATEGORIES}. "
                f"Received: {category!r}.{suggest(short, WORDNET_NOUN_CATEGORIES)}"
            )
    if not class_names or len(set(class_names)) != len(class_names):
        raise ValueError(f"`categories` must be distinct and not empty. Received: {categories}")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"WordNet noun file not found: '{os.fspath(path)}'. Install it with "
            "`apt-get install wordnet-base` (Debian/Ubuntu) or pass `path=`."
        )
    label_of = {WORDNET_LEXNAMES.index(f"noun.{n}"): i for i, n in enumerate(class_names)}
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as file:
        for line in file:
            if line.startswith("  ") or " | " not in line:  # license header
                continue
            label = label_of.get(int(line.split(" ", 2)[1]))  # lex_filenum
            gloss = line.split(" | ", 1)[1].split(";", 1)[0].strip()
            if label is not None and gloss:
                texts.append(gloss)
                labels.append(label)
    labels = np.array(labels, np.int32)
    rows = cap_per_class(labels, max_per_class, seed)
    return [texts[i] for i in rows], labels[rows], class_names


def text_dataset(
    texts: Sequence[str],
    labels,
    preprocessor,
    *,
    class_names: Sequence[str],
    batch_size: int = 32,
    validation_split: float = 0.1,
    test_split: float = 0.2,
    seed: int = 0,
) -> DatasetSplits:
    """Tokenised, batched text splits (stratified, seeded) for a text classifier.

    Args:
        texts: the strings.
        labels: integer class per string.
        preprocessor: a KerasHub `TextClassifierPreprocessor` (maps
            `(strings, labels)` to `(token dict, labels)` inside `tf.data`).
        class_names: names in label order.
        batch_size: batch size.
        validation_split: fraction for validation.
        test_split: fraction for test.
        seed: split and shuffle seed.

    Returns:
        A `DatasetSplits` of `(token dict, labels)` batches.

    Example:
    >>> from keras_transfer.data import load_wordnet_nouns, text_dataset
    >>> from keras_transfer.backbones.kerashub import text_preprocessor
    >>> texts, labels, names = load_wordnet_nouns(max_per_class=5)
    >>> splits = text_dataset(texts, labels, text_preprocessor("minilm", 16),
    ...                       class_names=names, batch_size=4)
    >>> sorted(splits.train.element_spec[0])
    ['padding_mask', 'segment_ids', 'token_ids']
    """
    validate_split_options(batch_size, validation_split, test_split)
    labels = np.asarray(labels, dtype=np.int32)
    if len(texts) != len(labels) or not len(texts):
        raise ValueError(
            "`texts` and `labels` must be non-empty and the same length. "
            f"Received: {len(texts)} texts and {len(labels)} labels"
        )
    texts = np.asarray(texts, dtype=object)
    parts = stratified_split(labels, validation_split, test_split, seed)

    def make(indices, training):
        if not len(indices):
            return None
        dataset = tf.data.Dataset.from_tensor_slices(
            (tf.constant(texts[indices].tolist(), tf.string), labels[indices])
        )
        if training:
            dataset = dataset.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size).map(preprocessor, num_parallel_calls=tf.data.AUTOTUNE)
        return dataset.prefetch(tf.data.AUTOTUNE)

    train, validation, test = (make(part, i == 0) for i, part in enumerate(parts))
    counts = {
        name: int(len(part))
        for name, part in zip(("train", "validation", "test"), parts, strict=True)
    }
    return DatasetSplits(
        train, validation, test, list(class_names), {"source": "text", "counts": counts}
    )
