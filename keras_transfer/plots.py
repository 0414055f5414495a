"""PNG figures (matplotlib, Agg backend): LR finder, training curves, confusion."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

# Names drawn at a stage boundary; the recipes' stage 1 trains the head alone
# and stage 2 trains (part of) the backbone too (see `kt.fine_tune`).
STAGE_NAMES = {1: "train head", 2: "fine-tune"}
# Keys in a Keras history that are not per-epoch metrics worth a panel.
_NON_METRIC_KEYS = ("stage", "learning_rate", "lr")
# Inches per class for the confusion matrix, plus room for labels, so 10 long
# class names ("T-shirt/top") stay readable.
_INCHES_PER_CLASS = 0.75
_CONFUSION_MARGIN_INCHES = 3.0
_MIN_CONFUSION_INCHES = 5.0
# Cells show the count under the percentage up to this many classes.
_MAX_CLASSES_WITH_COUNTS = 12


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lr_find(result, path: str) -> str:
    """Plots smoothed loss vs learning rate (log x) and marks the suggestion.

    Args:
        result: an `LRFinderResult` from `kt.lr_find`.
        path: output PNG path (parent folders are created).

    Returns:
        `path`.

    Example:
    >>> from keras_transfer.callbacks import LRFinderResult
    >>> from keras_transfer.plots import plot_lr_find
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "lr.png")
    >>> plot_lr_find(LRFinderResult([1e-4, 1e-3, 1e-2], [1.0, 0.5, 2.0], 1e-3),
    ...              out) == out
    True
    """
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.learning_rates, result.losses, label="smoothed loss")
    ax.axvline(
        result.suggestion,
        color="tab:red",
        linestyle="--",
        label=f"suggested LR {result.suggestion:.2g}",
    )
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title("Learning-rate range test")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def history_dict(history) -> dict:
    """The per-epoch metrics of a `keras.callbacks.History` (or a dict) as a dict."""
    values = getattr(history, "history", history)
    if not isinstance(values, Mapping):
        raise TypeError(
            "`history` must be a keras.callbacks.History or a dict of per-epoch "
            f"lists. Received: {type(history).__name__}"
        )
    return dict(values)


def _first_metric(history):
    if "accuracy" in history:
        return "accuracy"
    for key in history:
        if key != "loss" and not key.startswith("val_") and key not in _NON_METRIC_KEYS:
            return key
    return None


def _stage_changes(stages):
    """(x position between two epochs, new stage) for each change of stage."""
    return [
        (index + 0.5, stages[index])
        for index in range(1, len(stages))
        if stages[index] != stages[index - 1]
    ]


def plot_training_curves(history, path: str, title: str | None = None) -> str:
    """Plots loss and accuracy (or the first other metric) per epoch.

    Training and validation curves share a panel; a dashed vertical line marks
    each epoch where the `"stage"` entry (from `kt.fine_tune`) changes, e.g.
    from training the head to fine-tuning the backbone.

    Args:
        history: a `keras.callbacks.History` or its `history` dict: per-epoch
            lists under `"loss"`, optionally `"val_loss"`, metrics, their
            `"val_"` versions and `"stage"`.
        path: output PNG path (parent folders are created).
        title: figure title; defaults to `"Training curves"`.

    Returns:
        `path`.

    Raises:
        ValueError: if `"loss"` is missing or empty, or the lists differ in
            length.

    Example:
    >>> from keras_transfer.plots import plot_training_curves
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "curves.png")
    >>> history = {"loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.8, 0.7],
    ...            "accuracy": [0.4, 0.6, 0.8], "stage": [1, 1, 2]}
    >>> plot_training_curves(history, out) == out
    True
    """
    values = history_dict(history)
    losses = values.get("loss")
    if not losses:
        raise ValueError(
            f"`history` must hold a non-empty 'loss' list. Received keys: {sorted(values)}"
        )
    num_epochs = len(losses)
    for key, series in values.items():
        if len(series) != num_epochs:
            raise ValueError(
                f"Every `history` list must have one value per epoch ({num_epochs}). "
                f"Received: len(history[{key!r}])={len(series)}"
            )
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    metric = _first_metric(values)
    panels = ["loss"] + ([metric] if metric else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    epochs = list(range(1, num_epochs + 1))
    changes = _stage_changes(list(values.get("stage", [])))
    for ax, key in zip(axes[0], panels, strict=True):
        ax.plot(epochs, values[key], marker="o", markersize=3, label=f"train {key}")
        if f"val_{key}" in values:
            ax.plot(
                epochs, values[f"val_{key}"], marker="o", markersize=3, label=f"validation {key}"
            )
        for x, stage in changes:
            name = STAGE_NAMES.get(stage)
            label = f"stage {stage}: {name}" if name else f"stage {stage}"
            ax.axvline(x, color="tab:gray", linestyle="--", linewidth=1)
            # Written along the line, where `legend(loc="best")` does not go.
            ax.annotate(
                label,
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -4),
                textcoords="offset points",
                rotation=90,
                ha="left",
                va="top",
                fontsize=8,
                color="dimgray",
            )
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key.replace("_", " "))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or "Training curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion_matrix(
    matrix,
    class_names,
    path: str,
    title: str = "Confusion matrix",
    normalize: bool = True,
) -> str:
    """Draws a confusion matrix as a labelled heatmap.

    Args:
        matrix: square array of counts, rows true classes and columns
            predicted classes (as `kt.evaluation.confusion_matrix` returns).
        class_names: one name per row.
        path: output PNG path (parent folders are created).
        title: figure title.
        normalize: colour each row by the fraction of its true class and
            print percentages (with the counts for up to 12 classes);
            otherwise colour and print raw counts.

    Returns:
        `path`.

    Raises:
        ValueError: if `matrix` is not square or `class_names` has a
            different length.

    Example:
    >>> from keras_transfer.plots import plot_confusion_matrix
    >>> import tempfile, os
    >>> out = os.path.join(tempfile.mkdtemp(), "confusion.png")
    >>> plot_confusion_matrix([[3, 1], [0, 4]], ["cat", "dog"], out) == out
    True
    """
    counts = np.asarray(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] < 1:
        raise ValueError(
            f"`matrix` must be a non-empty square 2-D array. Received: shape={counts.shape}"
        )
    class_names = [str(name) for name in class_names]
    if len(class_names) != counts.shape[0]:
        raise ValueError(
            f"`class_names` must have one name per row of `matrix` ({counts.shape[0]}). "
            f"Received: {len(class_names)} names"
        )
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    num_classes = counts.shape[0]
    if normalize:
        totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
        shown = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    else:
        shown = counts.astype(np.float64)
    side = max(_MIN_CONFUSION_INCHES, _INCHES_PER_CLASS * num_classes + _CONFUSION_MARGIN_INCHES)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1.0 if normalize else max(shown.max(), 1))
    colorbar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    colorbar.set_label("fraction of true class" if normalize else "count")
    with_counts = normalize and num_classes <= _MAX_CLASSES_WITH_COUNTS
    threshold = (1.0 if normalize else max(shown.max(), 1)) / 2
    font_size = 9 if num_classes <= 10 else 7
    for row in range(num_classes):
        for col in range(num_classes):
            if normalize:
                text = f"{shown[row, col]:.0%}"
                if with_counts:
                    text += f"\n({int(counts[row, col])})"
            else:
                text = f"{int(counts[row, col])}"
            ax.text(
                col,
                row,
                text,
                ha="center",
                va="center",
                fontsize=font_size,
                color="white" if shown[row, col] > threshold else "black",
            )
    ticks = np.arange(num_classes)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(class_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability_diagram(calibration: Mapping, path: str, title: str = "Reliability") -> str:
    """Draws accuracy against confidence per bin, with the diagonal of perfect calibration.

    Args:
        calibration: `report["calibration"]` from `evaluate_classifier`
            (`ece` and `bins`).
        path: output PNG path (parent folders are created).
        title: figure title (the ECE is added to it).

    Returns:
        `path`.

    Example:
    >>> import tempfile, os
    >>> from keras_transfer.evaluation import expected_calibration_error
    >>> ece, bins = expected_calibration_error([[0.9, 0.1], [0.3, 0.7]], [0, 0], 5)
    >>> out = os.path.join(tempfile.mkdtemp(), "reliability.png")
    >>> plot_reliability_diagram({"ece": ece, "bins": bins}, out) == out
    True
    """
    bins = list(calibration["bins"])
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, (ax, ax_count) = plt.subplots(
        2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    lower = np.array([b["lower"] for b in bins])
    width = np.array([b["upper"] - b["lower"] for b in bins])
    filled = [i for i, b in enumerate(bins) if b["count"]]
    accuracy = np.array([bins[i]["accuracy"] for i in filled])
    confidence = np.array([bins[i]["confidence"] for i in filled])
    ax.bar(
        lower[filled],
        accuracy,
        width=width[filled],
        align="edge",
        color="#4c72b0",
        edgecolor="white",
        label="accuracy in bin",
    )
    ax.bar(
        lower[filled],
        confidence - accuracy,
        bottom=accuracy,
        width=width[filled],
        align="edge",
        color="#dd8452",
        alpha=0.45,
        edgecolor="white",
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title} (ECE {calibration['ece']:.3f})")
    ax_count.bar(lower, [b["count"] for b in bins], width=width, align="edge", color="grey")
    ax_count.set_xlabel("confidence (top probability)")
    ax_count.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_misclassified(
    dataset, misclassified, path: str, title: str = "Most confident mistakes", columns: int = 4
) -> str:
    """A grid of the misclassified images listed in a report (true, predicted, confidence).

    The dataset is read again to fetch the images by index, so it must yield
    the same order as when it was evaluated (a test split: not reshuffled).
    Without a dataset the images are read from the rows' `path`s.

    Args:
        dataset: the batched `(images, labels)` dataset that was evaluated,
            or None (then each row needs a `path`).
        misclassified: `report["misclassified"]` (rows with `index`, `true`,
            `predicted`, `confidence` and maybe `path`).
        path: output PNG path.
        title: figure title.
        columns: images per row.

    Returns:
        `path`.

    Example:
    >>> import tempfile, os, numpy as np, tensorflow as tf
    >>> data = tf.data.Dataset.from_tensor_slices(
    ...     (np.full((3, 8, 8, 3), 200.0, "float32"), np.arange(3))).batch(2)
    >>> rows = [{"index": 2, "true": "a", "predicted": "b", "confidence": 0.9}]
    >>> out = os.path.join(tempfile.mkdtemp(), "mistakes.png")
    >>> plot_misclassified(data, rows, out) == out
    True
    """
    wanted = {row["index"]: row for row in misclassified}
    images, position = {}, 0
    if dataset is None:
        from PIL import Image

        for row in misclassified:
            with Image.open(row["path"]) as image:
                images[row["index"]] = np.asarray(image.convert("RGB"))
        dataset = ()
    for batch, _ in dataset:
        if isinstance(batch, dict):
            raise TypeError(
                "`plot_misclassified` draws images; this dataset yields a dict of inputs "
                f"({sorted(batch)}), e.g. tokens. List a text model's mistakes instead."
            )
        batch = np.asarray(batch)
        for i in range(len(batch)):
            if position + i in wanted:
                images[position + i] = batch[i]
        position += len(batch)
        if len(images) == len(wanted):
            break
    plt = _pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    count = max(len(misclassified), 1)
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(2.8 * columns, 3.3 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, misclassified, strict=False):
        image = images.get(row["index"])
        if image is not None:
            image = np.clip(image, 0, 255).astype("uint8")
            ax.imshow(
                image[..., 0] if image.shape[-1] == 1 else image,
                cmap="gray" if image.shape[-1] == 1 else None,
            )
        # The class folder and the file: file names repeat across classes.
        name = (
            os.path.join(*row["path"].split(os.sep)[-2:]) if row.get("path") else f"#{row['index']}"
        )
        ax.set_title(
            f"{name}\ntrue: {row['true']}\npredicted: {row['predicted']} ({row['confidence']:.2f})",
            fontsize=8,
        )
    if not misclassified:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
