"""Evaluation of a classifier: accuracy, per-class report, confusion, latency.

Metrics are computed with numpy from one pass over the dataset, so labels and
predictions always come from the same elements (a dataset that reshuffles on
each iteration would misalign two separate passes). The report is a plain,
JSON-serialisable dict that `format_report`, `kt.plots.plot_confusion_matrix`
and `kt.reports.write_run_report` read.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import keras
import numpy as np
import tensorflow as tf

from keras_transfer.heads import head_kind
from keras_transfer.missing_labels import MISSING_CLASS
from keras_transfer.training import output_heads

# Timed calls of the compiled predict function on one batch, after one
# untimed warm-up call (which traces the function). 20 gives a stable p95 for
# small models on CPU in well under a second.
DEFAULT_LATENCY_BATCHES = 20
LATENCY_PERCENTILE = 95
# A single-output sigmoid head predicts class 1 at or above this probability.
BINARY_THRESHOLD = 0.5
# Top-k accuracy reported beside top-1 (ImageNet's usual top-5).
DEFAULT_TOP_K = 5
# Equal-width confidence bins of the expected calibration error (Guo et al.
# 2017 use 15).
DEFAULT_CALIBRATION_BINS = 15
# Misclassified examples listed in a report, most confident mistakes first.
DEFAULT_MISCLASSIFIED = 25


def expected_calibration_error(
    probabilities, labels, num_bins: int = DEFAULT_CALIBRATION_BINS
) -> tuple[float, list[dict]]:
    """Expected calibration error: how far confidence is from accuracy, on average.

    Examples go into `num_bins` equal-width bins by confidence (the top
    probability; `(0, 1/n]`, `(1/n, 2/n]`, ...). ECE is the sum over bins of
    `count / total * |accuracy - mean confidence|` (Guo et al. 2017).

    Args:
        probabilities: `[n, classes]` class probabilities (or `[n]` / `[n, 1]`
            sigmoid outputs of a binary model).
        labels: `[n]` integer true classes.
        num_bins: number of bins (>= 1).

    Returns:
        `(ece, bins)`: bins are dicts `lower`, `upper`, `count`, `confidence`
        (mean) and `accuracy` (None for empty bins).

    Example:
    >>> ece, bins = expected_calibration_error(
    ...     [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], [0, 1, 0, 1], num_bins=2)
    >>> round(ece, 4), [b["count"] for b in bins]
    (0.25, [0, 4])
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"`num_bins` must be an integer >= 1. Received: num_bins={num_bins!r}")
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim == 2 and probabilities.shape[-1] == 1:
        probabilities = probabilities[:, 0]
    if probabilities.ndim == 1:  # binary sigmoid output
        probabilities = np.stack([1.0 - probabilities, probabilities], axis=-1)
    labels = np.asarray(labels).reshape(-1)
    if probabilities.ndim != 2 or len(probabilities) != len(labels) or not len(labels):
        raise ValueError(
            "`probabilities` must be [n, classes] and `labels` [n], n >= 1. Received: "
            f"shapes {probabilities.shape} and {labels.shape}"
        )
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == labels
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    # Bin i holds (edges[i], edges[i + 1]]; a confidence of exactly 0 joins bin 0.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    bins, ece = [], 0.0
    for i in range(num_bins):
        members = index == i
        count = int(members.sum())
        mean_confidence = float(confidence[members].mean()) if count else None
        accuracy = float(correct[members].mean()) if count else None
        if count:
            ece += count / len(labels) * abs(accuracy - mean_confidence)
        bins.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": count,
                "confidence": mean_confidence,
                "accuracy": accuracy,
            }
        )
    return float(ece), bins


def top_k_accuracy(probabilities, labels, k: int = DEFAULT_TOP_K) -> float:
    """The fraction of examples whose true class is among the `k` most probable.

    Args:
        probabilities: `[n, classes]` scores.
        labels: `[n]` integer true classes.
        k: how many top classes count (capped at the number of classes).

    Returns:
        The top-k accuracy.

    Example:
    >>> top_k_accuracy([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]], [1, 0], k=2)
    0.5
    """
    probabilities = np.asarray(probabilities)
    labels = np.asarray(labels).reshape(-1)
    k = max(1, min(int(k), probabilities.shape[-1]))
    # Equal scores rank by class index (a stable sort).
    top = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=-1)))


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """Counts (true class, predicted class) pairs.

    Args:
        labels: 1-D integer array of true classes in `[0, num_classes)`.
        predictions: 1-D integer array of predicted classes, same length.
        num_classes: number of classes (rows and columns of the result).

    Returns:
        An `int64` array of shape `(num_classes, num_classes)`; rows are true
        classes, columns predicted classes.

    Raises:
        ValueError: if the arrays are not 1-D integer arrays of one length,
            or hold a class outside `[0, num_classes)`.

    Example:
    >>> from keras_transfer.evaluation import confusion_matrix
    >>> confusion_matrix([0, 1, 1, 2], [0, 1, 2, 2], num_classes=3).tolist()
    [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(
            f"`num_classes` must be an integer >= 1. Received: num_classes={num_classes!r}"
        )
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    labels = _class_array(labels, "labels", num_classes)
    predictions = _class_array(predictions, "predictions", num_classes)
    if labels.shape != predictions.shape:
        raise ValueError(
            "`labels` and `predictions` must have the same length. Received: "
            f"len(labels)={labels.size}, len(predictions)={predictions.size}"
        )
    flat = labels * num_classes + predictions
    counts = np.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def _class_array(values, name, num_classes):
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"`{name}` must be 1-D. Received: {name}.shape={array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"`{name}` must hold integers. Received: {name}.dtype={array.dtype}")
    array = array.astype(np.int64)
    bad = array[(array < 0) | (array >= num_classes)]
    if bad.size:
        raise ValueError(
            f"`{name}` must be in [0, {num_classes}) for num_classes={num_classes}. "
            f"Received: {name} value {int(bad[0])}"
        )
    return array


def _per_class(matrix, class_names):
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    # Like scikit-learn's `zero_division=0`: no predictions (or no examples)
    # of a class gives 0 rather than NaN, so the report stays valid JSON.
    precision = np.divide(
        true_positives, predicted, out=np.zeros_like(true_positives), where=predicted > 0
    )
    recall = np.divide(
        true_positives, support, out=np.zeros_like(true_positives), where=support > 0
    )
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0
    )
    rows = [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]
    macro = {
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
    }
    return rows, macro


def _predict_on_batch(model, batch):
    """The model's outputs on a batch as numpy (a dict of arrays for several heads)."""
    if model.distribute_strategy.num_replicas_in_sync > 1:
        # Keras 3.15's predict_on_batch under a strategy with several replicas
        # runs the whole batch on each and concatenates the copies.
        return keras.tree.map_structure(np.asarray, model(batch, training=False))
    return keras.tree.map_structure(np.asarray, model.predict_on_batch(batch))


def _predicted_classes(outputs):
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        return (outputs.reshape(-1) >= BINARY_THRESHOLD).astype(np.int64)
    return np.argmax(outputs, axis=-1).astype(np.int64)


def _true_classes(labels, num_classes):
    labels = np.asarray(labels)
    # One-hot labels (from `label_mode="categorical"` datasets).
    if labels.ndim == 2 and labels.shape[-1] == num_classes and num_classes > 1:
        return np.argmax(labels, axis=-1).astype(np.int64)
    labels = labels.reshape(-1)
    if np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels)):
        labels = labels.astype(np.int64)
    return labels


def _output_classes(units):
    return 2 if units == 1 else int(units)


def _num_classes(model):
    # Functional and Sequential models know their output shape; a subclassed
    # model's is found from its first batch of predictions.
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs:
        return None
    if len(outputs) != 1:
        raise ValueError(
            "`model` must have a single classification output. "
            f"Received: a model with {len(outputs)} outputs"
        )
    units = outputs[0].shape[-1]
    return None if units is None else _output_classes(units)


def _measure_latency(model, batch, repeats):
    _predict_on_batch(model, batch)  # warm-up: traces the predict function
    times_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        # predict_on_batch returns numpy, so the timing includes the device sync.
        _predict_on_batch(model, batch)
        times_ms.append((time.perf_counter() - start) * 1000.0)
    # Inputs may be a dict of tensors (several model inputs).
    batch_size = int(tf.nest.flatten(batch)[0].shape[0])
    per_image = np.asarray(times_ms) / batch_size
    return {
        "batch_size": batch_size,
        "repeats": int(repeats),
        "mean_ms_per_image": float(per_image.mean()),
        "p95_ms_per_image": float(np.percentile(per_image, LATENCY_PERCENTILE)),
    }


def evaluate_classifier(
    model: keras.Model,
    dataset: tf.data.Dataset,
    class_names: list[str] | tuple[str, ...] | None = None,
    *,
    latency_batches: int = DEFAULT_LATENCY_BATCHES,
    top_k: int = DEFAULT_TOP_K,
    calibration_bins: int = DEFAULT_CALIBRATION_BINS,
    paths: list[str] | None = None,
    max_misclassified: int = DEFAULT_MISCLASSIFIED,
) -> dict:
    """Evaluates a single-label classifier and measures its latency.

    Predictions come from `model.predict_on_batch` over one pass of the
    dataset; the class is the argmax of the outputs (a one-unit sigmoid head
    predicts class 1 at probability >= 0.5). Latency times the compiled
    predict function on the dataset's first batch, after one warm-up call,
    `latency_batches` times, and reports milliseconds per image.

    A model with several heads (`techniques.build_multitask_model`) gets one
    report per classification head (softmax, or one sigmoid unit): a dict
    `{head: report}`. The dataset then yields `(images, {head: labels})`,
    `class_names` is a dict by head (heads left out are named `"0"`, ...),
    examples whose label is missing (-1 or NaN) are left out of that head's
    report (`paths` still name every example), and the one latency figure is
    in every report. Multi-label (several units) and regression heads are
    not classifications of one label, so they get none.

    Args:
        model: a Keras classifier with one output of shape `(batch, classes)`.
        dataset: a batched `tf.data.Dataset` of `(images, labels)`; labels are
            integer classes (one-hot labels are accepted too).
        class_names: one name per class; defaults to `"0"`, `"1"`, ... (a
            dict of lists by head for a model with several heads).
        latency_batches: timed calls for the latency figures; 0 skips the
            measurement (then `report["latency"]` is None).
        top_k: k of the top-k accuracy (capped at the number of classes).
        calibration_bins: bins of the expected calibration error.
        paths: the file of each example, in the dataset's order (an image
            folder's `splits.info["paths"][split]`; the dataset must not
            reshuffle); named in the misclassified list.
        max_misclassified: how many misclassified examples to list.

    Returns:
        A JSON-serialisable dict (a dict of them by head for several heads)
        with `accuracy`, `num_examples`,
        `class_names`, `per_class` (list of dicts with `class`, `precision`,
        `recall`, `f1`, `support`), `macro_avg` (`precision`, `recall`,
        `f1`), `confusion_matrix` (list of lists, rows true, columns
        predicted), `latency` (`batch_size`, `repeats`,
        `mean_ms_per_image`, `p95_ms_per_image`), `top_k_accuracy` (`k`,
        `accuracy`), `calibration` (`ece`, `bins`, see
        `expected_calibration_error`), `misclassified_count` and
        `misclassified` (the most confident mistakes first: `index` in the
        dataset, `path` when `paths` is given, `true`, `predicted`,
        `confidence`).

    Raises:
        ValueError: for an empty dataset, a `class_names` list whose length
            differs from the model's number of classes, or labels outside
            the classes.

    Example:
    >>> import keras, numpy as np, tensorflow as tf
    >>> from keras_transfer.evaluation import evaluate_classifier
    >>> model = keras.Sequential(
    ...     [keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    >>> data = tf.data.Dataset.from_tensor_slices(
    ...     (np.random.rand(6, 4).astype("float32"), np.arange(6) % 3)).batch(3)
    >>> report = evaluate_classifier(model, data, ["a", "b", "c"],
    ...                              latency_batches=2)
    >>> report["num_examples"], len(report["confusion_matrix"])
    (6, 3)
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            "`dataset` must be a batched tf.data.Dataset of (images, labels). "
            f"Received: {type(dataset).__name__}"
        )
    if isinstance(latency_batches, bool) or not isinstance(latency_batches, (int, np.integer)):
        raise ValueError(
            f"`latency_batches` must be an integer >= 0. Received: latency_batches={latency_batches!r}"
        )
    if latency_batches < 0:
        raise ValueError(
            f"`latency_batches` must be >= 0. Received: latency_batches={latency_batches}"
        )
    options = {
        "top_k": top_k,
        "calibration_bins": calibration_bins,
        "paths": None if paths is None else [str(p) for p in paths],
        "max_misclassified": max_misclassified,
    }
    if isinstance(getattr(model, "output_shape", None), (list, dict)):
        return _evaluate_heads(model, dataset, class_names, latency_batches, options)
    num_classes = _num_classes(model)
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if num_classes is not None and len(class_names) != num_classes:
            raise ValueError(
                f"`class_names` must have one name per class ({num_classes} for this "
                f"model). Received: {len(class_names)} names: {class_names}"
            )
        num_classes = len(class_names)

    all_labels, all_outputs, first_images = [], [], None
    for element in dataset:
        if not isinstance(element, tuple) or len(element) != 2:
            raise ValueError(
                "`dataset` must yield (images, labels) pairs. "
                f"Received: an element of type {type(element).__name__}"
            )
        images, batch_labels = element
        if first_images is None:
            first_images = images
        outputs = _predict_on_batch(model, images)
        output_classes = _output_classes(outputs.shape[-1] if outputs.ndim > 1 else 1)
        if num_classes is None:
            num_classes = output_classes
        if output_classes != num_classes:
            raise ValueError(
                f"`class_names` must have one name per class ({output_classes} for this "
                f"model). Received: {num_classes} names: {class_names}"
            )
        all_outputs.append(outputs.reshape(len(outputs), -1).astype(np.float64))
        all_labels.append(_true_classes(batch_labels.numpy(), num_classes))
    if first_images is None:
        raise ValueError("`dataset` must contain at least one batch. Received: an empty dataset")
    labels = np.concatenate(all_labels)
    if labels.size == 0:
        raise ValueError("`dataset` must contain at least one example. Received: 0 examples")
    if paths is not None and len(paths) != labels.size:
        raise ValueError(
            f"`paths` must name every example of the dataset, in order ({labels.size}). "
            f"Received: {len(paths)} paths"
        )
    latency = _measure_latency(model, first_images, latency_batches) if latency_batches else None
    names = class_names or [str(i) for i in range(num_classes)]
    return _report(np.concatenate(all_outputs), labels, names, latency, **options)


def _report(
    outputs, labels, class_names, latency, *, top_k, calibration_bins, paths, max_misclassified
):
    """The report of `evaluate_classifier` from outputs `[n, units]` and classes `[n]`."""
    num_classes = len(class_names)
    predictions = _predicted_classes(outputs)
    matrix = confusion_matrix(labels, predictions, num_classes)
    per_class, macro = _per_class(matrix, class_names)
    ece, bins = expected_calibration_error(outputs, labels, calibration_bins)
    return {
        "accuracy": float(np.trace(matrix) / labels.size),
        "num_examples": int(labels.size),
        "class_names": list(class_names),
        "per_class": per_class,
        "macro_avg": macro,
        "confusion_matrix": matrix.tolist(),
        "latency": latency,
        "top_k_accuracy": (
            {"k": min(top_k, num_classes), "accuracy": top_k_accuracy(outputs, labels, top_k)}
            if outputs.shape[-1] > 1
            else None
        ),
        "calibration": {"ece": ece, "bins": bins},
        **_misclassified(outputs, labels, predictions, class_names, paths, max_misclassified),
    }


def _evaluate_heads(model, dataset, class_names, latency_batches, options):
    """`{head: report}` for each classification head of a model with several heads."""
    heads = {}
    for name, layer in output_heads(model).items():
        kind = head_kind(layer)
        if kind == "softmax" or (kind == "multi_label" and layer.units == 1):
            heads[name] = _output_classes(layer.units)
    class_names = {} if class_names is None else class_names
    if not isinstance(class_names, Mapping) or set(class_names) - set(heads):
        raise ValueError(
            f"`class_names` of a model with several heads must be a dict keyed by the "
            f"classification heads {list(heads)}. Received: {class_names!r:.200}"
        )
    names = {
        head: [str(c) for c in class_names.get(head, range(count))] for head, count in heads.items()
    }
    bad = {head: len(names[head]) for head in heads if len(names[head]) != heads[head]}
    if bad:
        raise ValueError(
            f"`class_names` must have one name per class ({heads} for this model). "
            f"Received: {bad} names"
        )
    outputs, labels, first_images = {head: [] for head in heads}, {head: [] for head in heads}, None
    for images, targets in dataset:
        missing = [
            head for head in heads if not isinstance(targets, Mapping) or head not in targets
        ]
        if missing:
            raise ValueError(
                f"`dataset` must yield (images, {{head: labels}}) with labels for the heads "
                f"{list(heads)}. Received: none for {missing}"
            )
        first_images = images if first_images is None else first_images
        predicted = _predict_on_batch(model, images)
        for head, count in heads.items():
            outputs[head].append(predicted[head].reshape(len(predicted[head]), -1))
            labels[head].append(_true_classes(targets[head].numpy(), count))
    if first_images is None:
        raise ValueError("`dataset` must contain at least one batch. Received: an empty dataset")
    latency = _measure_latency(model, first_images, latency_batches) if latency_batches else None
    reports = {}
    for head in heads:
        head_labels = np.concatenate(labels[head])
        paths = options["paths"]
        if paths is not None and len(paths) != head_labels.size:
            raise ValueError(
                f"`paths` must name every example of the dataset, in order "
                f"({head_labels.size}). Received: {len(paths)} paths"
            )
        labelled = ~np.isnan(head_labels.astype(np.float64)) & (head_labels != MISSING_CLASS)
        if not labelled.any():
            raise ValueError(f"Head {head!r} has no labelled example. Received: all missing")
        reports[head] = _report(
            np.concatenate(outputs[head]).astype(np.float64)[labelled],
            head_labels[labelled].astype(np.int64),
            names[head],
            latency,
            **{**options, "paths": None if paths is None else list(np.array(paths)[labelled])},
        )
    return reports


def _misclassified(outputs, labels, predictions, class_names, paths, limit):
    """The wrong predictions, most confident first."""
    wrong = np.flatnonzero(predictions != labels)
    if outputs.shape[-1] == 1:  # a sigmoid: confidence in the predicted class
        confidence = np.where(predictions == 1, outputs[:, 0], 1.0 - outputs[:, 0])
    else:
        confidence = outputs[np.arange(len(outputs)), predictions]
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    rows = []
    for i in order:
        row = {
            "index": int(i),
            "true": class_names[labels[i]],
            "predicted": class_names[predictions[i]],
            "confidence": float(confidence[i]),
        }
        if paths is not None:
            row["path"] = paths[i]
        rows.append(row)
    return {"misclassified_count": int(wrong.size), "misclassified": rows}


def format_report(report: dict) -> str:
    """Formats an `evaluate_classifier` report as a plain-text table.

    Args:
        report: the dict returned by `evaluate_classifier`.

    Returns:
        A multi-line string: accuracy, one row per class (precision, recall,
        F1, support), the macro average and the latency.

    Example:
    >>> from keras_transfer.evaluation import format_report
    >>> text = format_report({
    ...     "accuracy": 0.5, "num_examples": 2, "latency": None,
    ...     "per_class": [
    ...         {"class": "cat", "precision": 1.0, "recall": 0.5, "f1": 0.667,
    ...          "support": 2}]})
    >>> text.splitlines()[0]
    'accuracy: 0.5000 (2 examples)'
    """
    for key in ("accuracy", "num_examples", "per_class"):
        if key not in report:
            raise ValueError(
                f"`report` must be a dict from `evaluate_classifier` with key {key!r}. "
                f"Received keys: {sorted(report)}"
            )
    rows = report["per_class"]
    width = max([len("class"), len("macro avg")] + [len(str(row["class"])) for row in rows])
    header = f"{'class':<{width}}  precision  recall      f1  support"
    split = f", {report['split']} split" if report.get("split") else ""
    lines = [
        f"accuracy: {report['accuracy']:.4f} ({report['num_examples']} examples{split})",
        "",
        header,
        "-" * len(header),
    ]
    for row in rows:
        lines.append(
            f"{row['class']:<{width}}  {row['precision']:>9.3f}  {row['recall']:>6.3f}"
            f"  {row['f1']:>6.3f}  {row['support']:>7d}"
        )
    macro = report.get("macro_avg")
    if macro:
        lines.append("-" * len(header))
        lines.append(
            f"{'macro avg':<{width}}  {macro['precision']:>9.3f}  {macro['recall']:>6.3f}"
            f"  {macro['f1']:>6.3f}  {report['num_examples']:>7d}"
        )
    top_k = report.get("top_k_accuracy")
    if top_k:
        lines += ["", f"top-{top_k['k']} accuracy: {top_k['accuracy']:.4f}"]
    if report.get("calibration"):
        lines.append(f"expected calibration error: {report['calibration']['ece']:.4f}")
    if report.get("misclassified"):
        lines.append(f"misclassified: {report['misclassified_count']}; most confident:")
        for row in report["misclassified"][:5]:
            where = row.get("path", f"#{row['index']}")
            lines.append(
                f"  {where}: {row['true']} taken for {row['predicted']} ({row['confidence']:.2f})"
            )
    latency = report.get("latency")
    if latency:
        lines += [
            "",
            f"latency (batch {latency['batch_size']}): "
            f"mean {latency['mean_ms_per_image']:.3f} ms/image, "
            f"p95 {latency['p95_ms_per_image']:.3f} ms/image",
        ]
    return "\n".join(lines)
