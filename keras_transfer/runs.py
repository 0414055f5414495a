"""A training run on disk: data -> model -> recipe -> evaluation -> run directory.

`train_run` is what `keras-transfer train` and `keras-transfer demo` call;
`evaluate_model` and `export_run` serve `evaluate` and `export`. A run
directory holds everything needed to look at, reuse or ship the result:

    config.json        the settings as run
    model.keras        the fine-tuned model (reloads with safe_mode=True
                       once `keras_transfer` is imported)
    adapters.lora.npz  LoRA runs only: the adapters (`kt.lora.load_adapters`);
                       model.keras then holds the merged model
    labels.txt         class names, one per line, in output order
    history.json       per-epoch metrics, with a "stage" marker
    curves.png         loss and accuracy per epoch, stages marked
    confusion.png      confusion matrix on the held-out split
    reliability.png    accuracy vs confidence per bin (calibration, ECE)
    mistakes.png       image runs: the most confident mistakes (file names for folders)
    evaluation.json    accuracy, per-class metrics, latency, and the split
                       they were measured on ("test", or "validation" when
                       the data was too small for a test split)
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
import zipfile

import keras

from keras_transfer import staging
from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.builders import (
    AUGMENTATIONS,
    BN_POLICIES,
    MIXED_PRECISION,
    build_image_classifier,
    build_text_classifier,
)
from keras_transfer.checkpoints import STATE_FILE
from keras_transfer.class_weights import CLASS_WEIGHT_MODES
from keras_transfer.data import (
    DatasetSplits,
    image_folder_dataset,
    load_dataset,
)
from keras_transfer.distribute import is_chief, is_multi_worker
from keras_transfer.evaluation import evaluate_classifier
from keras_transfer.export import export_model, export_options
from keras_transfer.feature_cache import FEATURE_CACHE_MODES, FeatureCache
from keras_transfer.plots import (
    plot_confusion_matrix,
    plot_misclassified,
    plot_reliability_diagram,
    plot_training_curves,
)
from keras_transfer.recipes import DEFAULT_LORA_RANK, fine_tune, list_recipes
from keras_transfer.reports import save_history_json, write_run_report
from keras_transfer.techniques import lora, quantization
from keras_transfer.training import check_number, positive_number

MODEL_FILE = "model.keras"
RELIABILITY_FILE = "reliability.png"
MISTAKES_FILE = "mistakes.png"
# The most confident mistakes drawn in mistakes.png (evaluation.json lists more).
MISTAKES_SHOWN = 16
# LoRA runs: the trained adapters, apart from the (merged) model.
ADAPTERS_FILE = "adapters.lora.npz"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.json"
EVALUATION_FILE = "evaluation.json"
# Text runs split the labelled glosses 60/10/30 (train/validation/test).
TEXT_VALIDATION_SPLIT = 0.1
TEXT_TEST_SPLIT = 0.3
# A run is built in `<parent>/.partial-<name>` (the same command finds it again
# to resume), its training state in `checkpoint/`; the completion marker is
# written last, then the folder is renamed to `<name>`.
_PARTIAL_PREFIX = ".partial-"
CHECKPOINT_DIR = "checkpoint"
COMPLETE_FILE = "run_complete.json"


@dataclasses.dataclass
class RunConfig:
    """Settings of one training run (also written to `config.json`).

    Args:
        task: `"image"` or `"text"` (KerasHub backbone, e.g. `"minilm"`).
        backbone: registry name, e.g. `"efficientnet_lite0"`.
        data: images: a dataset name (`"fashion_mnist"`, `"digits"`,
            `"tfds:<name>"`) or an image folder (one subfolder per class);
            text: `"wordnet_nouns"`, a `.csv`, `.tsv` or `.jsonl` file, or a
            folder of per-class subfolders of `.txt` files (see
            `kt.data.load_dataset`).
        output_dir: run directory to create.
        weights: `"imagenet"` or `"none"` (random initialisation).
        recipe: a `fine_tune` recipe.
        epochs: epochs, or `(head, fine_tune)` for two_stage.
        learning_rate: head learning rate.
        batch_size: batch size.
        image_size: square input side.
        max_per_class: cap on training images per class (None: all).
        max_test_per_class: cap on test images per class (None: all).
        test_split: fraction of each class held out for test where the data
            has no official test set (None: the source's default, 0.2 for
            folders and digits, 0.3 for text).
        unfreeze_blocks: blocks unfrozen in stage 2 (int or "all").
        augmentation: augmentation preset.
        dropout: dropout before the head, in [0, 1) (None: the builder's
            default, 0.2 for images, 0.1 for text).
        bn_policy: BatchNorm policy when unfreezing (None: frozen).
        lr_spread: head LR / stem LR when the backbone trains (1: uniform).
        backbone_kwargs: extra backbone constructor arguments.
        patience: early-stopping patience on validation loss (None: off).
        sequence_length: tokens per text (text task).
        lora_rank: LoRA adapter rank (recipe `"lora"` only).
        lora_alpha: LoRA scale numerator; None: the rank (recipe `"lora"`).
        text_column: the text's column (JSON key) in a CSV, TSV or JSONL file.
        label_column: the label's column (JSON key) in such a file.
        mixed_precision: `"mixed_float16"`, `"mixed_bfloat16"` or None.
        jit_compile: XLA compilation of the train step: `"auto"`, True or
            False (passed to `compile`).
        cache_features: compute the frozen backbone's features once and
            train the head on them in the frozen-backbone stages (see
            `fine_tune`): False, True (`"auto"`), `"memory"` or `"disk"`.
            Disk caches go in the run's checkpoint folder, removed when it
            finishes. Needs `augmentation="none"`.
        class_weight: None, or `"balanced"`: weigh each training example
            by `n_samples / (n_classes * count_c)` of its class (see
            `fine_tune`); the weights go in the report and in the returned
            report's `class_weights`.
        seed: seed for splits and initialisation.

    Every value is checked when the config is made; choices come from the
    library (`list_recipes()`, `AUGMENTATIONS`, `BN_POLICIES`, ...).

    Example:

    >>> RunConfig(recipe="fast")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `recipe` must be one of ('feature_extraction', ...). Received: recipe='fast'
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
    test_split: float | None = None
    unfreeze_blocks: int | str = "all"
    augmentation: str = "none"
    dropout: float | None = None
    bn_policy: str | None = None
    lr_spread: float = 100.0
    backbone_kwargs: dict = dataclasses.field(default_factory=dict)
    patience: int | None = 3
    sequence_length: int = 64
    lora_rank: int = DEFAULT_LORA_RANK
    lora_alpha: float | None = None
    text_column: str = "text"
    label_column: str = "label"
    mixed_precision: str | None = None
    jit_compile: bool | str = "auto"
    cache_features: bool | str = False
    class_weight: str | None = None
    seed: int = 0

    def __post_init__(self):
        _choice("task", self.task, TASKS)
        _choice("recipe", self.recipe, list_recipes())
        _choice("augmentation", self.augmentation, AUGMENTATIONS)
        _choice("bn_policy", self.bn_policy, (None, *BN_POLICIES))
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("jit_compile", self.jit_compile, JIT_COMPILE)
        _choice("class_weight", self.class_weight, (None, *CLASS_WEIGHT_MODES))
        if not isinstance(self.cache_features, bool) and (
            self.cache_features not in FEATURE_CACHE_MODES
        ):
            raise ValueError(
                f"`cache_features` must be one of {(False, True, *FEATURE_CACHE_MODES)}. "
                f"Received: cache_features={self.cache_features!r}"
            )
        if self.cache_features and self.augmentation != "none":
            raise ValueError(
                "Random augmentation cannot be cached (the backbone runs once per image): "
                "`cache_features` needs augmentation='none'. Received: "
                f"cache_features={self.cache_features!r}, augmentation={self.augmentation!r}"
            )
        epochs = self.epochs if isinstance(self.epochs, (tuple, list)) else (self.epochs,)
        if not epochs or not all(
            isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in epochs
        ):
            raise ValueError(
                "`epochs` must be an integer or a tuple of integers >= 0. "
                f"Received: epochs={self.epochs!r}"
            )
        if not positive_number(self.learning_rate):
            raise ValueError(
                f"`learning_rate` must be > 0. Received: learning_rate={self.learning_rate!r}"
            )
        for name in ("batch_size", "image_size", "sequence_length"):
            check_number(name, getattr(self, name), 1, integer=True)
        for name in ("max_per_class", "max_test_per_class"):
            check_number(name, getattr(self, name), 1, optional=True, integer=True)
        check_number("test_split", self.test_split, 0, 1, optional=True)
        check_number("dropout", self.dropout, 0, 1, optional=True)
        check_number("lr_spread", self.lr_spread, 1)
        check_number("patience", self.patience, 0, optional=True, integer=True)
        check_number("seed", self.seed, 0, integer=True)
        if self.unfreeze_blocks != "all":
            check_number("unfreeze_blocks", self.unfreeze_blocks, 1, integer=True)
        if self.recipe == "lora":
            lora.check_options(self.lora_rank, self.lora_alpha, prefix="lora_")
        for name in ("text_column", "label_column"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(
                    f"`{name}` must be a non-empty string. Received: {name}={getattr(self, name)!r}"
                )
        if not isinstance(self.backbone_kwargs, dict):
            raise ValueError(
                f"`backbone_kwargs` must be a dict. Received: backbone_kwargs={self.backbone_kwargs!r}"
            )


TASKS = ("image", "text")
JIT_COMPILE = ("auto", True, False)


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}. Received: {name}={value!r}")


def load_labels(run_dir: str) -> list[str] | None:
    """Class names saved with a run, or None when the folder has none.

    Args:
        run_dir: a run directory (or the folder of a `.keras` file).

    Returns:
        The names in `labels.txt`, one per line, or None.

    Example:

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> _ = open(f"{folder}/labels.txt", "w").write("cat\\ndog\\n")
    >>> load_labels(folder)
    ['cat', 'dog']
    """
    path = os.path.join(run_dir, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


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


def _caps(config: RunConfig) -> dict:
    caps = {
        "max_per_class": config.max_per_class,
        "max_test_per_class": config.max_test_per_class,
        "test_split": config.test_split,
    }
    return {key: value for key, value in caps.items() if value is not None}


def load_run_splits(config: RunConfig) -> DatasetSplits:
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
    # Unknown text data is refused by `load_dataset`, naming the text sources.
    return load_dataset(
        config.data,
        preprocessor=text_preprocessor(config.backbone, config.sequence_length),
        text_column=config.text_column,
        label_column=config.label_column,
        batch_size=config.batch_size,
        validation_split=TEXT_VALIDATION_SPLIT,
        test_split=TEXT_TEST_SPLIT if config.test_split is None else config.test_split,
        seed=config.seed,
        max_per_class=config.max_per_class,
    )


def held_out_split(splits: DatasetSplits) -> tuple[str, object, str | None]:
    """The split that figures are measured on: test, else validation, else train.

    Args:
        splits: a `DatasetSplits`.

    Returns:
        `(name, dataset, note)`: `note` says why it is not the test split
        (None when it is).

    Example:

    >>> import numpy as np
    >>> from keras_transfer.data import array_dataset
    >>> splits = array_dataset(np.zeros((4, 8, 8), "uint8"), np.arange(4) % 2)
    >>> held_out_split(splits)[0]
    'validation'
    """
    if splits.test is not None:
        return "test", splits.test, None
    if splits.validation is not None:
        return (
            "validation",
            splits.validation,
            "No test split (too few examples per class to hold one out): the figures come "
            "from the validation split, which also chose the restored weights.",
        )
    return "train", splits.train, "No held-out split: the figures come from the training data."


def _build_model(config: RunConfig, num_classes: int, weights, strategy):
    common = {"strategy": strategy, "mixed_precision": config.mixed_precision}
    if config.dropout is not None:
        common["dropout"] = config.dropout
    if config.task == "text":
        return build_text_classifier(
            config.backbone,
            num_classes,
            weights="pretrained" if weights is not None else None,
            sequence_length=config.sequence_length,
            **common,
            **config.backbone_kwargs,
        )
    size = (config.image_size, config.image_size)
    return build_image_classifier(
        config.backbone,
        num_classes=num_classes,
        weights=weights,
        input_shape=(*size, 3),
        augmentation=config.augmentation,
        **common,
        **config.backbone_kwargs,
    )


def staging_folder(output_dir: str) -> str:
    """Where an unfinished run of `output_dir` lives: `<parent>/.partial-<name>`.

    Args:
        output_dir: the run directory.

    Returns:
        The staging folder's path (the same for the same `output_dir`).

    Example:

    >>> staging_folder("/runs/flowers")
    '/runs/.partial-flowers'
    """
    parent, name = os.path.split(os.path.abspath(output_dir))
    return os.path.join(parent, f"{_PARTIAL_PREFIX}{name}")


def is_finished_run(path: str) -> bool:
    """Whether `path` is a run directory that `train_run` finished (its marker is there).

    Args:
        path: a folder.

    Returns:
        True when the completion marker, written last, exists.

    Example:

    >>> is_finished_run("/no/such/run")
    False
    """
    return os.path.isfile(os.path.join(path, COMPLETE_FILE))


def _settings(config: RunConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _check_output_dir(config: RunConfig, output_dir: str, overwrite: bool) -> None:
    if not os.path.exists(output_dir):
        return
    if not is_finished_run(output_dir):
        raise FileExistsError(
            f"--output_dir={config.output_dir!r} exists and is not a finished run of "
            "keras-transfer (no run_complete.json), so it is left alone: choose another "
            "--output_dir."
        )
    if not overwrite:
        raise FileExistsError(
            f"--output_dir={config.output_dir!r} holds a finished run: pass --overwrite "
            "(overwrite=True) to replace it, or choose another --output_dir."
        )


def _resumable(config: RunConfig, folder: str, overwrite: bool) -> bool:
    """Whether to resume the unfinished run in `folder` (else it is started afresh)."""
    if not os.path.isdir(folder):
        return False
    saved = os.path.join(folder, CONFIG_FILE)
    if overwrite or not os.path.isfile(saved):
        shutil.rmtree(folder)  # discarded on request, or killed before it began
        return False
    with open(saved, encoding="utf-8") as f:
        before = json.load(f)
    settings = _settings(config)
    if before != settings:
        changed = sorted(
            k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k)
        )
        raise FileExistsError(
            f"An unfinished run of --output_dir={config.output_dir!r} with other settings "
            f"({', '.join(changed)}) is in {folder!r}: run the command that started it "
            "to resume it, or pass --overwrite to discard it."
        )
    return True


def train_run(
    config: RunConfig,
    *,
    strategy=None,
    overwrite: bool = False,
    verbose: int | str = "auto",
) -> dict:
    """Trains, evaluates and writes a run directory; returns the evaluation report.

    The run is built in `<parent>/.partial-<name>` beside `output_dir`, with
    its training state saved after every epoch; a completion marker
    (`run_complete.json`) is written last and the folder renamed into place.
    A run killed at any point is resumed by the same call (same settings):
    from its last finished epoch, in the right stage, with the optimizer's
    state. A run that fails before finishing an epoch leaves nothing behind
    (parent folders it created included). The figures are measured on the
    test split; where the data is too small to hold one out they come from
    the validation split, and `report["split"]` and the report say so.

    Args:
        config: a `RunConfig`.
        strategy: a `tf.distribute.Strategy` to build and train under (None:
            the current one); `config.batch_size` is the global batch. Under
            a multi-worker strategy every worker calls `train_run`; only the
            chief writes.
        overwrite: replace a finished run in `output_dir`, or discard an
            unfinished one with other settings.
        verbose: Keras `fit` verbosity (progress bars with "auto" or 1).

    Returns:
        The evaluation report (see `evaluate_classifier`), plus `split`,
        `run_dir`, `train_seconds` and `resumed` (on workers other than the
        chief: `run_dir` and `resumed` only).

    Raises:
        FileExistsError: `output_dir` holds a finished run (without
            `overwrite`) or something else, or an unfinished run of it has
            other settings.
        PermissionError: `output_dir` cannot be written.

    Example:
    >>> import tempfile, os, keras_transfer as kt
    >>> out = os.path.join(tempfile.mkdtemp(), "digits_run")
    >>> report = kt.train_run(kt.RunConfig(
    ...     backbone="mobilenet_v3_small", data="digits", weights="none",
    ...     output_dir=out, epochs=(1, 0), image_size=32, max_per_class=5,
    ...     max_test_per_class=2, backbone_kwargs={"alpha": 0.75}), verbose=0)
    >>> sorted(os.listdir(out))[:4], report["split"]
    (['config.json', 'confusion.png', 'curves.png', 'evaluation.json'], 'test')
    """
    output_dir = os.path.abspath(config.output_dir)
    if not is_chief(strategy):
        return _train_as_worker(config, strategy, verbose)
    _check_output_dir(config, output_dir, overwrite)
    folder = staging_folder(output_dir)
    resumed = _resumable(config, folder, overwrite)
    created = []
    if not resumed:
        created = staging.writable_folder(os.path.dirname(output_dir), "a run directory")
        os.mkdir(folder)
        staging.write_atomic(
            os.path.join(folder, CONFIG_FILE), json.dumps(_settings(config), indent=2)
        )
    try:
        report = _train_into(config, folder, strategy, verbose)
        staging.write_atomic(
            os.path.join(folder, COMPLETE_FILE),
            json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}),
        )
        shutil.rmtree(os.path.join(folder, CHECKPOINT_DIR), ignore_errors=True)
        # A finished run in the way (overwrite) is swapped out, then deleted.
        staging.move_into_place(folder, output_dir, f"{_PARTIAL_PREFIX}old-")
    except BaseException:
        if not os.path.isfile(os.path.join(folder, CHECKPOINT_DIR, STATE_FILE)):
            staging.discard(folder, created)  # nothing worth resuming
        raise
    report.update({"run_dir": config.output_dir, "resumed": resumed})
    return report


def _train_as_worker(config: RunConfig, strategy, verbose) -> dict:
    """A worker other than the chief: trains in step with it, writes nothing."""
    with tempfile.TemporaryDirectory() as folder:
        splits, model = _data_and_model(config, strategy)
        history = _fine_tune_run(config, model, splits, folder, strategy, verbose)
    return {"run_dir": config.output_dir, "epochs": len(history.epoch)}


def _data_and_model(config: RunConfig, strategy):
    keras.utils.set_random_seed(config.seed)
    weights = None if str(config.weights).lower() in ("none", "random") else config.weights
    splits = load_run_splits(config)
    if splits.num_classes < 2:
        raise ValueError(
            f"A classifier needs at least 2 classes; {config.data!r} has "
            f"{splits.num_classes}: {splits.class_names}. Add one subfolder per class."
        )
    return splits, _build_model(config, splits.num_classes, weights, strategy)


def _fine_tune_run(config: RunConfig, model, splits, folder: str, strategy, verbose):
    epochs = tuple(config.epochs) if isinstance(config.epochs, list) else config.epochs
    lora_options = {}
    if config.recipe == "lora":
        lora_options = {"lora_rank": config.lora_rank, "lora_alpha": config.lora_alpha}
    cache = False
    if config.cache_features:
        # Beside the training state, which is removed when the run finishes.
        cache = FeatureCache(
            "auto" if config.cache_features is True else config.cache_features,
            directory=os.path.join(folder, CHECKPOINT_DIR),
        )
    return fine_tune(
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
        batch_size=config.batch_size,
        seed=config.seed,
        strategy=strategy,
        jit_compile=config.jit_compile,
        callbacks=[keras.callbacks.TensorBoard(os.path.join(folder, "logs"))],
        backup_dir=os.path.join(folder, CHECKPOINT_DIR),
        cache_features=cache,
        class_weight=config.class_weight,
        verbose=verbose,
        **lora_options,
    )


def _train_into(config: RunConfig, folder: str, strategy, verbose) -> dict:
    splits, model = _data_and_model(config, strategy)
    start = time.perf_counter()
    history = _fine_tune_run(config, model, splits, folder, strategy, verbose)
    train_seconds = time.perf_counter() - start
    model_path = os.path.join(folder, MODEL_FILE)
    if lora.lora_layers(model):
        # The adapters on their own, and a plain model (merged kernels) that
        # reloads without Keras re-adding empty adapters (see kt.lora).
        lora.save_adapters(model, os.path.join(folder, ADAPTERS_FILE))
        model = lora.merge(model)
    model.save(model_path)
    if is_multi_worker(strategy):
        # Evaluated here alone: a copy outside the strategy needs no other worker.
        model = keras.models.load_model(model_path)
    split, dataset, note = held_out_split(splits)
    evaluation = evaluate_classifier(
        model, dataset, splits.class_names, paths=_split_paths(splits, split)
    )
    evaluation.update({"split": split, "split_note": note})
    with open(os.path.join(folder, LABELS_FILE), "w", encoding="utf-8") as f:
        f.write("\n".join(splits.class_names) + "\n")
    settings = _settings(config)
    weights = (history.params or {}).get("class_weight")
    if weights:
        settings["class_weights"] = {splits.class_names[c]: w for c, w in weights.items()}
    with open(os.path.join(folder, EVALUATION_FILE), "w", encoding="utf-8") as f:
        json.dump(evaluation, f, indent=2)
    save_history_json(history.history, os.path.join(folder, "history.json"))
    images = {
        "Training curves": plot_training_curves(
            history.history,
            os.path.join(folder, "curves.png"),
            title=f"{config.backbone} on {config.data} ({config.weights} weights)",
        ),
        "Confusion matrix": plot_confusion_matrix(
            evaluation["confusion_matrix"],
            splits.class_names,
            os.path.join(folder, "confusion.png"),
            title=f"Confusion matrix: {config.backbone}, {split} split",
        ),
        "Reliability": plot_reliability_diagram(
            evaluation["calibration"],
            os.path.join(folder, RELIABILITY_FILE),
            title=f"Reliability: {config.backbone}, {split} split",
        ),
    }
    if config.task == "image":  # a grid of pictures; text mistakes are listed in the report
        images["Most confident mistakes"] = plot_misclassified(
            dataset,
            evaluation["misclassified"][:MISTAKES_SHOWN],
            os.path.join(folder, MISTAKES_FILE),
        )
    write_run_report(
        folder,
        config=settings,
        history=history.history,
        evaluation=evaluation,
        images={k: os.path.basename(v) for k, v in images.items()},
        title=f"Run: {config.backbone} on {config.data}",
    )
    evaluation["train_seconds"] = train_seconds
    if weights:
        evaluation["class_weights"] = settings["class_weights"]
    return evaluation


def load_run_model(path: str) -> tuple[keras.Model, list[str] | None]:
    """Loads a run directory's model (or a `.keras` file) and its class names.

    Args:
        path: a run directory or a `.keras` file (class names then come from
            a `labels.txt` beside it, if any).

    Returns:
        `(model, class_names)`; class names are None without `labels.txt`.

    Raises:
        FileNotFoundError: no model file at `path`.
        ValueError: the file is not a complete `.keras` archive, or
            `labels.txt` does not name every output of the model.

    Example:

    >>> import tempfile, keras
    >>> folder = tempfile.mkdtemp()
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    >>> model.save(f"{folder}/model.keras")
    >>> _ = open(f"{folder}/labels.txt", "w").write("no\\nyes\\n")
    >>> load_run_model(folder)[1]
    ['no', 'yes']
    """
    if os.path.isdir(path):
        model_path, labels_dir = os.path.join(path, MODEL_FILE), path
    else:
        model_path, labels_dir = path, os.path.dirname(os.path.abspath(path))
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"No model at {model_path!r}: give a run directory or a .keras file. "
            f"Received: model={path!r}"
        )
    broken = (
        f"{model_path!r} is not a complete .keras file (a .keras file is a zip archive; this "
        "one is truncated or corrupt). Copy or train it again."
    )
    if not zipfile.is_zipfile(model_path):
        raise ValueError(broken)
    try:
        model = keras.saving.load_model(model_path, safe_mode=True)
    except (zipfile.BadZipFile, EOFError) as error:
        raise ValueError(f"{broken} ({error})") from None
    class_names = load_labels(labels_dir)
    outputs = model.output_shape[-1] if isinstance(model.output_shape, tuple) else None
    if class_names is not None and outputs not in (None, len(class_names)):
        raise ValueError(
            f"{os.path.join(labels_dir, LABELS_FILE)!r} has {len(class_names)} class names but "
            f"the model has {outputs} outputs: give one name per output, one per line."
        )
    return model, class_names


def evaluate_model(
    model: keras.Model,
    data: str,
    class_names: list[str] | None = None,
    *,
    batch_size: int = 32,
    seed: int = 0,
    max_test_per_class: int | None = None,
) -> dict:
    """Evaluates an image classifier on a dataset or on a folder of labelled images.

    A folder is evaluated whole, each subfolder labelled by its name's place
    in `class_names` (a folder may hold any subset of the model's classes; a
    name the model does not know is an error). A named dataset is evaluated
    on its test split (on validation, said in `report["split"]`, when it has
    none).

    Args:
        model: a classifier taking raw 0-255 RGB images.
        data: a folder of class subfolders, or a `load_dataset` name.
        class_names: the model's classes in output order (from the run's
            `labels.txt`); None: the data's own class names.
        batch_size: examples per batch.
        seed: seed of the dataset's split.
        max_test_per_class: cap on test images per class (named datasets).

    Returns:
        The `evaluate_classifier` report plus `split` and `data`.

    Example:

    >>> import os, tempfile, numpy as np
    >>> from PIL import Image
    >>> import keras_transfer as kt
    >>> folder = tempfile.mkdtemp()
    >>> os.makedirs(f"{folder}/dog")
    >>> Image.fromarray(np.zeros((8, 8, 3), "uint8")).save(f"{folder}/dog/a.png")
    >>> model = kt.build_image_classifier("mobilenet_v3_small", 2, weights=None,
    ...                                   input_shape=(32, 32, 3), alpha=0.75)
    >>> report = evaluate_model(model, folder, ["cat", "dog"])
    >>> report["split"], report["per_class"][1]["support"]
    ('all', 1)
    """
    size = tuple(model.input_shape[1:3])
    if os.path.isdir(data):
        splits = image_folder_dataset(
            data,
            image_size=size,
            batch_size=batch_size,
            validation_split=0.0,
            shuffle=False,
            class_names=class_names,
        )
        split, dataset, note = "all", splits.train, None
    else:
        caps = {"max_test_per_class": max_test_per_class} if max_test_per_class else {}
        splits = load_dataset(data, image_size=size, batch_size=batch_size, seed=seed, **caps)
        if class_names is not None and list(class_names) != splits.class_names:
            raise ValueError(
                f"The model's classes {class_names} are not the classes of {data!r} "
                f"({splits.class_names}). Evaluate on data with the model's classes."
            )
        split, dataset, note = held_out_split(splits)
    report = evaluate_classifier(
        model, dataset, class_names or splits.class_names, paths=_split_paths(splits, split)
    )
    report.update({"split": split, "split_note": note, "data": os.fspath(data)})
    return report


def _split_paths(splits, split):
    """The files of a split in its order (image folders), or None."""
    return splits.info.get("paths", {}).get("train" if split == "all" else split)


def write_evaluation(report: dict, output_dir: str) -> str:
    """Writes a report as `<output_dir>/evaluation.json` (the folder is created).

    Beside it: `reliability.png` and, when the report names files (image
    folders), `mistakes.png` with the most confident mistakes.

    Args:
        report: a report from `evaluate_model` / `evaluate_classifier`.
        output_dir: a folder; an existing `evaluation.json` in it is kept
            (an error), so a run's own evaluation is never overwritten.

    Returns:
        The path of the file.

    Raises:
        FileExistsError: `output_dir` is a file, or already holds an
            `evaluation.json`.

    Example:

    >>> import tempfile
    >>> path = write_evaluation({"accuracy": 1.0}, f"{tempfile.mkdtemp()}/eval")
    >>> os.path.basename(path)
    'evaluation.json'
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(
            f"--output_dir must be a folder (evaluation.json is written inside); this is a "
            f"file. Received: output_dir={output_dir!r}"
        )
    path = os.path.join(output_dir, EVALUATION_FILE)
    if os.path.exists(path):
        raise FileExistsError(
            f"{path!r} already exists; choose another --output_dir. Received: "
            f"output_dir={output_dir!r}"
        )
    staging.writable_folder(output_dir, "an evaluation")
    if report.get("calibration"):
        plot_reliability_diagram(report["calibration"], os.path.join(output_dir, RELIABILITY_FILE))
    rows = [row for row in report.get("misclassified") or [] if row.get("path")]
    if rows:  # image folders: the files are read again for the grid
        plot_misclassified(None, rows[:MISTAKES_SHOWN], os.path.join(output_dir, MISTAKES_FILE))
    staging.write_atomic(path, json.dumps(report, indent=2))
    return path


def export_run(
    run_dir: str,
    output: str,
    *,
    formats=("saved_model", "tflite"),
    quantizations=("none",),
    data: str | DatasetSplits | None = None,
    version: int | None = None,
    overwrite: bool = False,
    num_evaluation_samples: int | None = None,
    data_options: dict | None = None,
    qat_epochs: int = 0,
    verbose: bool = True,
) -> dict:
    """Exports a run (or a `.keras` file) with `kt.export.export_model`.

    Data is loaded only where it is needed: LiteRT files are calibrated
    (int8) on the training split and compared with the Keras model (parity)
    on the held-out split of `data`, or of the run's own data when `data` is
    None. A SavedModel needs no data, so a run copied without its data
    still exports. A text run's preprocessor is rebuilt from its
    `config.json` (`backbone`, `sequence_length`), so its SavedModel takes
    raw strings (a bare `.keras` text model exports on token ids only).

    Args:
        run_dir: a run directory from `train_run`, or a `.keras` file.
        output: the model's export folder, `saved_models/<name>`.
        formats: any of `kt.export.FORMATS`.
        quantizations: LiteRT modes.
        data: a `load_dataset` name or folder, or `DatasetSplits`, to use
            instead of the run's data (needed for int8 from a bare `.keras`
            file, or when the run's data has moved).
        version: SavedModel version (None: the next free one).
        overwrite: replace an existing SavedModel version.
        num_evaluation_samples: cap on parity images (None: all).
        data_options: `load_dataset` arguments for a `data` name or folder
            (`batch_size`, `seed`, `max_per_class`, ...).
        qat_epochs: epochs of quantisation-aware training
            (`kt.techniques.quantization_aware`, on the training split,
            calibrated like the int8 file) before exporting; 0: none. Needs
            "int8" among `quantizations`; every format then exports the
            QAT-tuned model (the run's own `model.keras` is not changed).
        verbose: print the parity table.

    Returns:
        `export_model`'s result: `{"saved_model": path or None, "tflite": [...]}`.

    Raises:
        ValueError: LiteRT export needs data that cannot be loaded; the
            message names the flag (`--data=`) that supplies it.

    Example:

    >>> import keras_transfer as kt
    >>> result = kt.runs.export_run(  # doctest: +SKIP
    ...     "runs/flowers", "saved_models/flowers", formats=["saved_model"])
    >>> result["saved_model"]  # doctest: +SKIP
    '.../saved_models/flowers/1'
    """
    # Bad options and an unwritable output fail at once, before any data loads.
    formats, quantizations = export_options(formats, quantizations)
    check_number("qat_epochs", qat_epochs, 0, integer=True)
    if qat_epochs and ("int8" not in quantizations or "tflite" not in formats):
        raise ValueError(
            "Quantisation-aware training prepares an int8 LiteRT file: pass --format=tflite "
            "and --quantization=int8 with --qat_epochs. Received: "
            f"formats={formats}, quantizations={quantizations}, qat_epochs={qat_epochs}"
        )
    model, class_names = load_run_model(run_dir)
    preprocessor = _run_preprocessor(run_dir)
    created = staging.writable_folder(output, "an export")
    try:
        splits = data if isinstance(data, DatasetSplits) else None
        if "tflite" in formats and splits is None:
            splits = _export_data(
                model, run_dir, data, quantizations, data_options or {}, preprocessor
            )
        if splits is not None and class_names is None:
            class_names = splits.class_names
        if qat_epochs:
            quantization.quantization_aware(
                model,
                splits.train,
                epochs=qat_epochs,
                verbose=2 if verbose else 0,
            )
        return export_model(
            model,
            output,
            formats=formats,
            quantizations=quantizations,
            labels=class_names,
            representative_data=None if splits is None else splits.train,
            evaluation_data=None if splits is None else held_out_split(splits)[1],
            version=version,
            overwrite=overwrite,
            num_evaluation_samples=num_evaluation_samples,
            preprocessor=preprocessor,
            verbose=verbose,
        )
    except BaseException:
        staging.remove_empty(created)
        raise


def _run_preprocessor(run_dir):
    """A text run's preprocessor, rebuilt from its config (`.keras` files do not keep it)."""
    if not os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        return None
    config = load_run_config(run_dir)
    if config.task != "text":
        return None
    return text_preprocessor(config.backbone, config.sequence_length)


def _export_data(model, run_dir, data, quantizations, data_options, preprocessor=None):
    """The splits LiteRT export calibrates and measures on, or None if there are none."""
    if data is not None:
        if preprocessor is not None:
            return load_dataset(data, preprocessor=preprocessor, **data_options)
        return load_dataset(data, image_size=tuple(model.input_shape[1:3]), **data_options)
    config = None
    if os.path.isfile(os.path.join(run_dir, CONFIG_FILE)):
        config = load_run_config(run_dir)
    if config is not None:
        try:
            return load_run_splits(config)
        except (FileNotFoundError, ValueError) as error:
            raise ValueError(
                f"LiteRT export calibrates (int8) and checks parity on the run's data, which "
                f"cannot be loaded ({error}). Pass the data with --data=<dataset or image "
                "folder> (data= in Python), or export with --format=saved_model only."
            ) from None
    if "int8" in quantizations:
        raise ValueError(
            "int8 needs training images to calibrate on: pass --data=<dataset or image folder> "
            f"(data= in Python). Received: model={run_dir!r} without a run's data"
        )
    return None
