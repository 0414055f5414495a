"""A training run on disk: data -> model -> recipe -> evaluation -> run directory.

`train_run` is what `keras-transfer train` and `keras-transfer demo` call. A run
directory holds everything needed to look at, reuse or ship the result:

    config.json        the settings as run
    model.keras        the fine-tuned model (reloads with safe_mode=True)
    labels.txt         class names, one per line, in output order
    history.json       per-epoch metrics, with a "stage" marker
    curves.png         loss and accuracy per epoch, stages marked
    confusion.png      confusion matrix on the test split
    evaluation.json    accuracy, per-class metrics, latency
    report.md          all of the above in one page
    logs/              TensorBoard logs
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time

import keras

from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.builders import build_image_classifier, build_text_classifier
from keras_transfer.data import load_dataset, load_wordnet_nouns, text_dataset
from keras_transfer.evaluation import evaluate_classifier
from keras_transfer.plots import plot_confusion_matrix, plot_training_curves
from keras_transfer.recipes import fine_tune
from keras_transfer.reports import save_history_json, write_run_report

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.json"
# Text runs split the labelled glosses 60/10/30 (train/validation/test).
TEXT_VALIDATION_SPLIT = 0.1
TEXT_TEST_SPLIT = 0.3


@dataclasses.dataclass
class RunConfig:
    """Settings of one training run (also written to `config.json`).

    Args:
        task: `"image"` or `"text"` (KerasHub backbone, e.g. `"minilm"`, on
            `data="wordnet_nouns"`).
        backbone: registry name, e.g. `"efficientnet_lite0"`.
        data: dataset name (`"fashion_mnist"`, `"digits"`, `"tfds:<name>"`) or
            an image folder (one subfolder per class).
        output_dir: run directory to create.
        weights: `"imagenet"` or `"none"` (random initialisation).
        recipe: a `fine_tune` recipe.
        epochs: epochs, or `(head, fine_tune)` for two_stage.
        learning_rate: head learning rate.
        batch_size: batch size.
        image_size: square input side.
        max_per_class: cap on training images per class (None: all).
        max_test_per_class: cap on test images per class (None: all).
        unfreeze_blocks: blocks unfrozen in stage 2 (int or "all").
        augmentation: augmentation preset.
        bn_policy: BatchNorm policy when unfreezing (None: frozen).
        lr_spread: head LR / stem LR when the backbone trains (1: uniform).
        backbone_kwargs: extra backbone constructor arguments.
        patience: early-stopping patience on validation loss (None: off).
        sequence_length: tokens per text (text task).
        seed: seed for splits and initialisation.
    """

    task: str = "image"
    backbone: str = "efficientnet_lite0"
    data: str = "fashion_mnist"
    output_dir: str = "runs/run"
    weights: str = "imagenet"
    recipe: str = "two_stage"
    epochs: tuple | int = (3, 3)
    learning_rate: float = 1e-3
    batch_size: int = 32
    image_size: int = 224
    max_per_class: int | None = None
    max_test_per_class: int | None = None
    unfreeze_blocks: int | str = "all"
    augmentation: str = "none"
    bn_policy: str | None = None
    lr_spread: float = 100.0
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)
    patience: int | None = 3
    sequence_length: int = 64
    seed: int = 0


def load_labels(run_dir: str) -> list[str] | None:
    """Class names saved with a run, or None when the folder has none."""
    path = os.path.join(run_dir, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


TASKS = ("image", "text")
TEXT_DATA = ("wordnet_nouns",)


def _caps(config: RunConfig) -> dict:
    caps = {"max_per_class": config.max_per_class, "max_test_per_class": config.max_test_per_class}
    return {key: value for key, value in caps.items() if value is not None}


def load_run_config(run_dir: str) -> RunConfig:
    """The `RunConfig` a run directory was trained with (its `config.json`).

    Args:
        run_dir: a run directory written by `train_run`.

    Returns:
        The `RunConfig`.

    Raises:
        FileNotFoundError: the folder has no `config.json`.

    Example:

    >>> import tempfile, dataclasses, json
    >>> folder = tempfile.mkdtemp()
    >>> with open(f"{folder}/config.json", "w") as f:
    ...     json.dump(dataclasses.asdict(RunConfig(data="digits")), f)
    >>> load_run_config(folder).data
    'digits'
    """
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Not a run directory (no {CONFIG_FILE}). Received: {run_dir!r}")
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    fields = {field.name for field in dataclasses.fields(RunConfig)}
    settings = {key: value for key, value in settings.items() if key in fields}
    if isinstance(settings.get("epochs"), list):
        settings["epochs"] = tuple(settings["epochs"])
    return RunConfig(**settings)


def load_run_splits(config: RunConfig):
    """The train / validation / test splits a run was trained and tested on.

    Args:
        config: the run's `RunConfig` (see `load_run_config`).

    Returns:
        A `DatasetSplits`, with the same subset and seed as the run.
    """
    if config.task not in TASKS:
        raise ValueError(f"`task` must be one of {TASKS}. Received: task={config.task!r}")
    if config.task == "image":
        size = (config.image_size, config.image_size)
        return load_dataset(
            config.data,
            image_size=size,
            batch_size=config.batch_size,
            seed=config.seed,
            **_caps(config),
        )
    if config.data not in TEXT_DATA:
        raise ValueError(f"Text data must be one of {TEXT_DATA}. Received: data={config.data!r}")
    texts, labels, names = load_wordnet_nouns(max_per_class=config.max_per_class, seed=config.seed)
    preprocessor = text_preprocessor(config.backbone, config.sequence_length)
    return text_dataset(
        texts,
        labels,
        preprocessor,
        class_names=names,
        batch_size=config.batch_size,
        validation_split=TEXT_VALIDATION_SPLIT,
        test_split=TEXT_TEST_SPLIT,
        seed=config.seed,
    )


def _build_model(config: RunConfig, num_classes: int, weights):
    if config.task == "text":
        return build_text_classifier(
            config.backbone,
            num_classes,
            weights="pretrained" if weights is not None else None,
            **config.backbone_kwargs,
        )
    size = (config.image_size, config.image_size)
    return build_image_classifier(
        config.backbone,
        num_classes=num_classes,
        weights=weights,
        input_shape=(*size, 3),
        augmentation=config.augmentation,
        **config.backbone_kwargs,
    )


def train_run(config: RunConfig, *, verbose: int | str = "auto") -> dict:
    """Trains, evaluates and writes a run directory; returns the evaluation report.

    The directory is built in a temporary folder beside `output_dir` and moved
    into place at the end, so a failed run leaves nothing half-written.

    Args:
        config: a `RunConfig`.
        verbose: Keras `fit` verbosity (progress bars with "auto" or 1).

    Returns:
        The evaluation report (see `evaluate_classifier`), plus `run_dir` and
        `train_seconds`.

    Example:
    >>> import tempfile, os, keras_transfer as kt
    >>> out = os.path.join(tempfile.mkdtemp(), "digits_run")
    >>> report = kt.train_run(kt.RunConfig(
    ...     backbone="mobilenet_v3_small", data="digits", weights="none",
    ...     output_dir=out, epochs=(1, 0), image_size=32, max_per_class=5,
    ...     max_test_per_class=2), verbose=0)
    >>> sorted(os.listdir(out))[:4]
    ['config.json', 'confusion.png', 'curves.png', 'evaluation.json']
    """
    if os.path.exists(config.output_dir):
        raise FileExistsError(
            f"Run directory already exists; choose another --output_dir. "
            f"Received: output_dir={config.output_dir!r}"
        )
    keras.utils.set_random_seed(config.seed)
    weights = None if str(config.weights).lower() in ("none", "random") else config.weights
    splits = load_run_splits(config)
    parent = os.path.dirname(os.path.abspath(config.output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".partial-", dir=parent)
    try:
        model = _build_model(config, len(splits.class_names), weights)
        epochs = tuple(config.epochs) if isinstance(config.epochs, list) else config.epochs
        start = time.perf_counter()
        history = fine_tune(
            model,
            splits.train,
            splits.validation,
            recipe=config.recipe,
            epochs=epochs,
            learning_rate=config.learning_rate,
            unfreeze_blocks=config.unfreeze_blocks,
            bn_policy=config.bn_policy,
            lr_spread=config.lr_spread,
            patience=config.patience,
            callbacks=[keras.callbacks.TensorBoard(os.path.join(staging, "logs"))],
            verbose=verbose,
        )
        train_seconds = time.perf_counter() - start
        test = splits.test if splits.test is not None else splits.validation
        evaluation = evaluate_classifier(model, test, splits.class_names)
        model.save(os.path.join(staging, MODEL_FILE))
        with open(os.path.join(staging, LABELS_FILE), "w", encoding="utf-8") as f:
            f.write("\n".join(splits.class_names) + "\n")
        settings = dataclasses.asdict(config)
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
        with open(os.path.join(staging, "evaluation.json"), "w", encoding="utf-8") as f:
            json.dump(evaluation, f, indent=2)
        save_history_json(history.history, os.path.join(staging, "history.json"))
        images = {
            "Training curves": plot_training_curves(
                history.history,
                os.path.join(staging, "curves.png"),
                title=f"{config.backbone} on {config.data} ({config.weights} weights)",
            ),
            "Confusion matrix": plot_confusion_matrix(
                evaluation["confusion_matrix"],
                splits.class_names,
                os.path.join(staging, "confusion.png"),
                title=f"Confusion matrix: {config.backbone}, test split",
            ),
        }
        images = {k: os.path.basename(v) for k, v in images.items()}
        write_run_report(
            staging,
            config=settings,
            history=history.history,
            evaluation=evaluation,
            images=images,
            title=f"Run: {config.backbone} on {config.data}",
        )
        os.replace(staging, config.output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    evaluation.update({"run_dir": config.output_dir, "train_seconds": train_seconds})
    return evaluation
