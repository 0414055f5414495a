"""keras-transfer: fine-tune, evaluate and use image classifiers from the shell.

Usage:
  keras-transfer demo [--task=image|text] [--quick] [--output_dir=runs/demo]
      Offline transfer learning: EfficientNet-Lite0 (ImageNet) on Fashion-MNIST,
      or all-MiniLM-L6-v2 on WordNet glosses (--task=text), vs the same network
      from random weights; prints both test accuracies.
  keras-transfer train --data=DATA --output_dir=DIR [--backbone=...] [--recipe=...]
      DATA: fashion_mnist | digits | tfds:<name> | an image folder (one
      subfolder per class). Writes a run directory (model, report, plots).
      With --task=text --backbone=minilm: wordnet_nouns | a .csv, .tsv or
      .jsonl file (--text_column, --label_column) | a folder of per-class
      subfolders of .txt files.
  keras-transfer evaluate --model=RUN_DIR_OR_KERAS --data=DATA
  keras-transfer predict --model=RUN_DIR_OR_KERAS --images=FILE_OR_FOLDER[,...]
      --model=imagenet:efficientnet_lite0 uses the 1000-class ImageNet model.
  keras-transfer export --model=RUN_DIR_OR_KERAS --output=saved_models/NAME
      [--format=saved_model,tflite] [--quantization=none,int8] [--qat_epochs=N]
      SavedModel for TF Serving in NAME/<version>/, LiteRT files with a parity
      report in NAME/litert/. int8 calibrates on the run's training data
      (or --data for a bare .keras file); --qat_epochs fine-tunes with
      quantisation-aware training first.
  keras-transfer benchmark --suite=NAME[,NAME...]|all --output=DIR [--quick]
      Suites: overhead (training throughput vs plain Keras), export (LiteRT,
      SavedModel and Keras latency, size, accuracy), caching (cached features
      vs recomputing the backbone). Writes DIR/results.json and DIR/results.md.

Flags may also come from a file: --flagfile=train.flags
Logs: warnings and errors only; -v 0 shows INFO (export and LiteRT notices included),
TF_CPP_MIN_LOG_LEVEL=0 TensorFlow's C++ start-up lines.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from keras_transfer.builders import AUGMENTATIONS, MIXED_PRECISION
from keras_transfer.distribute import COMMUNICATIONS, STRATEGIES
from keras_transfer.recipes import list_recipes
from keras_transfer.runs import TASKS

FLAGS = flags.FLAGS
COMMANDS = ("train", "evaluate", "predict", "export", "demo", "benchmark")

flags.DEFINE_string("backbone", "efficientnet_lite0", "Backbone name (see list_backbones()).")
flags.DEFINE_string(
    "data",
    "fashion_mnist",
    "Dataset name, tfds:<name>, or image folder; text (--task=text): wordnet_nouns, a "
    ".csv/.tsv/.jsonl file, or a folder of per-class .txt files.",
)
flags.DEFINE_string("output_dir", None, "Run directory to create (train, demo).")
flags.DEFINE_enum("weights", "imagenet", ["imagenet", "none"], "Backbone initialisation.")
flags.DEFINE_enum("recipe", "two_stage", list(list_recipes()), "Fine-tuning recipe.")
flags.DEFINE_list("epochs", ["3", "3"], "Epochs; two values (head, fine-tune) for two_stage.")
flags.DEFINE_float("learning_rate", 1e-3, "Peak learning rate of the head stage.")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("image_size", 224, "Square input size in pixels.")
flags.DEFINE_integer("max_per_class", None, "Use at most this many training images per class.")
flags.DEFINE_integer("max_test_per_class", None, "Use at most this many test images per class.")
flags.DEFINE_string("unfreeze_blocks", "all", "Blocks unfrozen in stage 2: an int or 'all'.")
flags.DEFINE_enum("augmentation", "none", list(AUGMENTATIONS), "Augmentation.")
flags.DEFINE_float("dropout", None, "Dropout before the head (default 0.2 images, 0.1 text).")
flags.DEFINE_enum(
    "mixed_precision",
    None,
    [p for p in MIXED_PRECISION if p],
    "Compute dtype policy: mixed_float16 (GPUs), mixed_bfloat16 (TPUs, recent CPUs).",
)
flags.DEFINE_integer("seed", 0, "Seed for splits and initialisation.")
flags.DEFINE_boolean(
    "cache_features",
    False,
    "Run the frozen backbone once per image and train the head on its features in the "
    "frozen-backbone stages (feature_extraction, stage 1 of two_stage); needs "
    "--augmentation=none.",
)
flags.DEFINE_string(
    "class_weight",
    None,
    "train: 'balanced' weighs each example by n_samples / (n_classes * count) of its class "
    "(for imbalanced data); the weights go in the report.",
)
flags.DEFINE_string(
    "strategy",
    "auto",
    f"tf.distribute strategy (train), one of {', '.join(STRATEGIES)}: auto (Mirrored on several GPUs, OneDevice on one), "
    "one_device, mirrored, multi_worker (TF_CONFIG or --worker_hosts/--task_index), tpu.",
)
flags.DEFINE_list("worker_hosts", [], "multi_worker: every worker's host:port; the first is chief.")
flags.DEFINE_integer("task_index", None, "multi_worker: this worker's index in --worker_hosts.")
flags.DEFINE_enum(
    "communication", "auto", list(COMMUNICATIONS), "multi_worker collectives: auto, ring, nccl."
)
flags.DEFINE_enum(
    "jit_compile", "auto", ["auto", "true", "false"], "XLA-compile the train step (train)."
)
flags.DEFINE_string("model", None, "Run directory, .keras file, or imagenet:efficientnet_lite0.")
flags.DEFINE_list("images", [], "Image files or folders (predict).")
flags.DEFINE_integer("top", 3, "Labels shown per image (predict).")
flags.DEFINE_enum("task", "image", list(TASKS), "image, or text (KerasHub backbone, e.g. minilm).")
flags.DEFINE_integer("sequence_length", 64, "Tokens per text (text task).")
flags.DEFINE_integer("lora_rank", 8, "LoRA adapter rank (--recipe=lora).")
flags.DEFINE_float("lora_alpha", None, "LoRA scale numerator (--recipe=lora; default: the rank).")
flags.DEFINE_string("text_column", "text", "Text column (JSON key) of a --data file (text task).")
flags.DEFINE_string("label_column", "label", "Label column (JSON key) of a --data file (text).")
flags.DEFINE_string(
    "output", None, "Export folder saved_models/<name> (export, demo); results folder (benchmark)."
)
flags.DEFINE_list("format", ["saved_model", "tflite"], "Export formats: saved_model, tflite.")
flags.DEFINE_list("quantization", ["none"], "LiteRT modes: none, dynamic, float16, int8.")
flags.DEFINE_integer(
    "qat_epochs",
    0,
    "export: epochs of quantisation-aware training before an int8 export (0: off); the "
    "QAT-tuned model is what every format exports.",
    lower_bound=0,
)
flags.DEFINE_integer("version", None, "SavedModel version (default: the next free one).")
flags.DEFINE_boolean(
    "overwrite",
    False,
    "export: replace an existing SavedModel version. train: replace a finished run in "
    "--output_dir, or discard an unfinished one started with other settings.",
)
flags.DEFINE_boolean("quick", False, "Shrink the demo or benchmarks to a smoke run (for tests).")
flags.DEFINE_list(
    "suite",
    [],
    "Benchmark suites: overhead, export, caching, time_to_accuracy, pipeline, scale, "
    "utilisation, techniques, or all (benchmark).",
)

flags.DEFINE_float(
    "test_split",
    None,
    "Fraction of each class held out for test where the data has no official test set "
    "(image folders, digits; default 0.2).",
)

# User errors: reported in one line, exit code 2, no traceback.
_USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ConnectionError,
    ImportError,
    KeyError,
)


def _int_list(name):
    """The comma-separated integers of flag `name`, or an error naming the flag."""
    values = getattr(FLAGS, name)
    try:
        numbers = [int(value) for value in values]
    except ValueError:
        raise ValueError(
            f"--{name} must be integers separated by commas, e.g. --{name}=3,3. "
            f"Received: --{name}={','.join(values)}"
        ) from None
    if not numbers:
        raise ValueError(f"--{name} needs at least one value. Received: --{name}=")
    return numbers


def _train():
    from keras_transfer.distribute import get_strategy
    from keras_transfer.runs import RunConfig, train_run

    epochs = _int_list("epochs")
    blocks = FLAGS.unfreeze_blocks
    if not (blocks.isdigit() or blocks == "all"):
        raise ValueError(
            f"--unfreeze_blocks must be an integer >= 0 or 'all'. Received: --unfreeze_blocks={blocks}"
        )
    config = RunConfig(
        task=FLAGS.task,
        backbone=FLAGS.backbone,
        data=FLAGS.data,
        output_dir=FLAGS.output_dir or f"runs/{FLAGS.backbone}",
        weights=FLAGS.weights,
        recipe=FLAGS.recipe,
        epochs=tuple(epochs) if len(epochs) > 1 else epochs[0],
        learning_rate=FLAGS.learning_rate,
        batch_size=FLAGS.batch_size,
        image_size=FLAGS.image_size,
        max_per_class=FLAGS.max_per_class,
        max_test_per_class=FLAGS.max_test_per_class,
        test_split=FLAGS.test_split,
        unfreeze_blocks=int(blocks) if blocks.isdigit() else blocks,
        augmentation=FLAGS.augmentation,
        dropout=FLAGS.dropout,
        sequence_length=FLAGS.sequence_length,
        lora_rank=FLAGS.lora_rank,
        lora_alpha=FLAGS.lora_alpha,
        text_column=FLAGS.text_column,
        label_column=FLAGS.label_column,
        mixed_precision=FLAGS.mixed_precision,
        jit_compile={"true": True, "false": False}.get(FLAGS.jit_compile, "auto"),
        cache_features=FLAGS.cache_features,
        class_weight=FLAGS.class_weight,
        seed=FLAGS.seed,
    )
    # First: a multi-worker strategy must exist before TensorFlow runs anything.
    strategy = get_strategy(
        FLAGS.strategy,
        worker_hosts=FLAGS.worker_hosts or None,
        task_index=FLAGS.task_index,
        communication=FLAGS.communication,
    )
    report = train_run(config, strategy=strategy, overwrite=FLAGS.overwrite)
    if report.get("resumed"):
        print(f"resumed the unfinished run of {config.output_dir}")
    if "accuracy" not in report:
        print(f"worker done ({report['epochs']} epochs); the chief writes {report['run_dir']}")
        return
    if report["split_note"]:
        print(f"note: {report['split_note']}")
    print(
        f"{report['split']} accuracy {report['accuracy']:.3f}; run directory: {report['run_dir']}"
    )


def _evaluate():
    from keras_transfer.evaluation import format_report
    from keras_transfer.predict import load_model_for_prediction
    from keras_transfer.runs import evaluate_model, write_evaluation

    model, class_names = load_model_for_prediction(_required("model"))
    report = evaluate_model(
        model,
        FLAGS.data,
        class_names,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
        max_test_per_class=FLAGS.max_test_per_class,
    )
    if report["split_note"]:
        print(f"note: {report['split_note']}")
    print(format_report(report))
    if FLAGS.output_dir:
        print(f"evaluation: {write_evaluation(report, FLAGS.output_dir)}")


def _predict():
    from keras_transfer.predict import load_model_for_prediction, predict_files

    if not FLAGS.images:
        raise ValueError("predict needs --images=FILE_OR_FOLDER[,...]. Received: images=[]")
    model, class_names = load_model_for_prediction(_required("model"))
    rows = predict_files(model, FLAGS.images, class_names, top=FLAGS.top)
    width = max(len(row["file"]) for row in rows)
    print(f"{'file':<{width}}  {'label':<28} probability")
    for row in rows:
        for rank, (label, probability) in enumerate(row["labels"]):
            name = row["file"] if rank == 0 else ""
            print(f"{name:<{width}}  {label:<28} {probability:.3f}")
    skipped = [row for row in rows if row.get("error")]
    if skipped:
        print(f"skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        for row in skipped:
            print(f"  {row['error']}", file=sys.stderr)


def _export():
    from keras_transfer.runs import export_run

    result = export_run(
        _required("model"),
        _required("output"),
        formats=FLAGS.format,
        quantizations=FLAGS.quantization,
        data=FLAGS.data if FLAGS["data"].present else None,
        version=FLAGS.version,
        overwrite=FLAGS.overwrite,
        qat_epochs=FLAGS.qat_epochs,
        data_options={
            key: getattr(FLAGS, key)
            for key in ("batch_size", "seed", "max_per_class", "max_test_per_class", "test_split")
            if getattr(FLAGS, key) is not None
        },
    )
    if result["saved_model"]:
        print(f"SavedModel: {result['saved_model']}")
    for report in result["tflite"]:
        print(f"LiteRT: {report.path}")


def _demo():
    from keras_transfer.demo import run_demo

    default = "runs/demo" if FLAGS.task == "image" else "runs/demo_text"
    run_demo(
        FLAGS.output_dir or default, task=FLAGS.task, quick=FLAGS.quick, export_dir=FLAGS.output
    )


def _benchmark():
    from keras_transfer.benchmarks import format_markdown, run_benchmarks

    output = _required("output")
    results = run_benchmarks(FLAGS.suite, output, quick=FLAGS.quick, print_fn=print)
    print(format_markdown(results))
    print(f"results: {output}/results.json, {output}/results.md")


def _required(name):
    value = getattr(FLAGS, name)
    if not value:
        raise ValueError(f"--{name} is required for this command. Received: {name}={value!r}")
    return value


def main(argv):
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"error: give one command of {COMMANDS}. Received: {commands}", file=sys.stderr)
        return 2
    import tensorflow as tf

    # absl runs commands at INFO, where TensorFlow and the export log dozens of
    # lines (signature renames, checkpoint sharding, LiteRT notices): the
    # command shows warnings and errors unless --verbosity / -v asks for more.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        tf.get_logger().setLevel("ERROR")  # retracing notices are not for users
    try:
        commands_to_run = {
            "train": _train,
            "evaluate": _evaluate,
            "predict": _predict,
            "export": _export,
            "demo": _demo,
            "benchmark": _benchmark,
        }
        commands_to_run[commands[0]]()
    except _USER_ERRORS as error:
        logging.debug("user error", exc_info=True)
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


def parse_flags(argv: list[str]) -> list[str]:
    """Parses absl flags; a bad flag is reported in one line with exit code 2.

    Args:
        argv: the command line, program name first.

    Returns:
        The arguments that are not flags (program name, command).

    Example:

    >>> FLAGS.unparse_flags()
    >>> parse_flags(["keras-transfer", "train", "--epochs=2,2"])
    ['keras-transfer', 'train']
    >>> FLAGS.epochs
    ['2', '2']
    >>> FLAGS.unparse_flags()
    """
    try:
        return FLAGS(argv)
    except flags.Error as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def run():
    """Console-script entry point."""
    # absl prints the __main__ module's docstring for --help; the console
    # script's wrapper has none.
    sys.modules["__main__"].__doc__ = f"{__doc__}\nFlags:\n{FLAGS.module_help(__name__)}"
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
