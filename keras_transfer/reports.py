"""Run reports: a Markdown summary of a training run and its history as JSON.

`write_run_report` gathers what a run produced (the flags it ran with, the
per-epoch history, the `evaluate_classifier` report and the PNG figures from
`kt.plots`) into one `report.md` that renders on GitHub or in any Markdown
viewer, with the figures linked by relative path so the run folder can be
moved or archived whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

from keras_transfer.plots import STAGE_NAMES, history_dict

REPORT_FILENAME = "report.md"


def _json_number(value):
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    # NaN and infinity are not JSON; a diverged loss is written as null.
    return value if math.isfinite(value) else None


def save_history_json(history, path: str) -> str:
    """Writes a training history as JSON: `{key: [value per epoch]}`.

    Values become plain floats (integers such as `"stage"` stay integers);
    NaN or infinite values, e.g. from a diverged loss, are written as `null`
    so that the file is strict JSON.

    Args:
        history: a `keras.callbacks.History` or its `history` dict.
        path: output path (parent folders are created).

    Returns:
        `path`.

    Example:
    >>> import json, os, tempfile
    >>> import numpy as np
    >>> from keras_transfer.reports import save_history_json
    >>> out = os.path.join(tempfile.mkdtemp(), "history.json")
    >>> _ = save_history_json({"loss": [np.float32(0.5)], "stage": [1]}, out)
    >>> json.load(open(out))
    {'loss': [0.5], 'stage': [1]}
    """
    values = history_dict(history)
    serialisable = {
        str(key): [_json_number(value) for value in series] for key, series in values.items()
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(serialisable, file, indent=2)
        file.write("\n")
    return path


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        text = f"{float(value):.4g}"
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def _image_link(run_dir, name, image_path):
    in_run_dir = os.path.join(run_dir, image_path)
    if not os.path.isabs(image_path) and os.path.exists(in_run_dir):
        resolved = in_run_dir
    else:
        resolved = os.path.abspath(image_path)
    if not os.path.exists(resolved):
        raise FileNotFoundError(
            f"`images` must name existing files. Received: images[{name!r}]={image_path!r}"
        )
    relative = os.path.relpath(resolved, os.path.abspath(run_dir)).replace(os.sep, "/")
    return f"![{name}]({relative})"


def _stage_rows(history):
    # Loss first, then the other metrics; training before validation.
    metrics = sorted(
        (key for key in history if key != "stage"),
        key=lambda key: (key.startswith("val_"), key.removeprefix("val_") != "loss"),
    )
    num_epochs = max((len(series) for series in history.values()), default=0)
    if not metrics or num_epochs == 0:
        return metrics, []
    stages = list(history.get("stage", [])) or ["all"] * num_epochs
    if len(stages) != num_epochs:
        raise ValueError(
            f"`history['stage']` must have one value per epoch ({num_epochs}). "
            f"Received: {len(stages)} values"
        )
    # Only `"two_stage"` has two stages; a one-stage recipe ("full" trains the
    # backbone from its first epoch) gets no stage name.
    named = len(set(stages)) > 1
    rows = []
    start = 0
    for index in range(1, num_epochs + 1):
        if index < num_epochs and stages[index] == stages[start]:
            continue
        stage = stages[start]
        name = STAGE_NAMES.get(stage) if named else None
        label = f"{stage} ({name})" if name else str(stage)
        epochs = f"{start + 1}-{index}" if index - start > 1 else str(index)
        last = index - 1
        rows.append(
            [label, epochs]
            + [history[key][last] if last < len(history[key]) else "" for key in metrics]
        )
        start = index
    return metrics, rows


def _evaluation_lines(evaluation):
    split = f" of the {evaluation['split']} split" if evaluation.get("split") else ""
    lines = [
        f"Accuracy: **{evaluation['accuracy']:.4f}** on {evaluation['num_examples']} "
        f"examples{split}.",
        "",
    ]
    if evaluation.get("split_note"):
        lines += [f"_{evaluation['split_note']}_", ""]
    per_class = evaluation.get("per_class") or []
    if per_class:
        rows = [
            [row["class"], row["precision"], row["recall"], row["f1"], row["support"]]
            for row in per_class
        ]
        macro = evaluation.get("macro_avg")
        if macro:
            rows.append(
                [
                    "**macro avg**",
                    macro["precision"],
                    macro["recall"],
                    macro["f1"],
                    evaluation["num_examples"],
                ]
            )
        lines += _table(["class", "precision", "recall", "f1", "support"], rows) + [""]
    top_k = evaluation.get("top_k_accuracy")
    if top_k:
        lines += [f"Top-{top_k['k']} accuracy: {top_k['accuracy']:.4f}.", ""]
    calibration = evaluation.get("calibration")
    if calibration:
        lines += [
            f"Expected calibration error: {calibration['ece']:.4f} (0 is perfect: confidence "
            "equals accuracy).",
            "",
        ]
    mistakes = evaluation.get("misclassified")
    if mistakes:
        rows = [
            [row.get("path", f"#{row['index']}"), row["true"], row["predicted"], row["confidence"]]
            for row in mistakes[:10]
        ]
        lines += [
            f"Misclassified: {evaluation['misclassified_count']}. The most confident mistakes:",
            "",
            *_table(["example", "true", "predicted", "confidence"], rows),
            "",
        ]
    latency = evaluation.get("latency")
    if latency:
        lines += [
            f"Latency (batch size {latency['batch_size']}): "
            f"mean {latency['mean_ms_per_image']:.3f} ms/image, "
            f"p95 {latency['p95_ms_per_image']:.3f} ms/image.",
            "",
        ]
    return lines


def write_run_report(
    run_dir: str,
    *,
    config: dict,
    history,
    evaluation: dict | None,
    images: dict[str, str],
    title: str,
) -> str:
    """Writes `report.md` summarising a training run.

    The report has the figures (linked by paths relative to `run_dir`), a
    table of the configuration the run used, the metrics of the last epoch
    of each recipe stage, and the evaluation summary (accuracy, per-class
    precision / recall / F1, latency).

    Args:
        run_dir: folder the report is written to (created if needed).
        config: the run's flags or settings, `{name: value}`.
        history: a `keras.callbacks.History` or its `history` dict, as
            `kt.fine_tune` returns it (with a `"stage"` list).
        evaluation: the dict from `kt.evaluation.evaluate_classifier`, or
            None when the run was not evaluated.
        images: `{caption: PNG path}`; a relative path is looked up in
            `run_dir` first, then in the current folder.
        title: the report's heading.

    Returns:
        The path of the written `report.md`.

    Raises:
        FileNotFoundError: if an image in `images` does not exist.

    Example:
    >>> import os, tempfile
    >>> from keras_transfer.reports import write_run_report
    >>> run_dir = tempfile.mkdtemp()
    >>> path = write_run_report(
    ...     run_dir, config={"recipe": "two_stage"},
    ...     history={"loss": [0.9, 0.5], "stage": [1, 2]}, evaluation=None,
    ...     images={}, title="Demo run")
    >>> open(path).readline().strip()
    '# Demo run'
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"`config` must be a dict. Received: {type(config).__name__}")
    if not isinstance(images, Mapping):
        raise TypeError(
            f"`images` must be a dict of {{caption: path}}. Received: {type(images).__name__}"
        )
    values = history_dict(history)
    os.makedirs(run_dir, exist_ok=True)
    links = [_image_link(run_dir, name, path) for name, path in images.items()]

    lines = [f"# {title}", ""]
    if links:
        lines += ["## Figures", ""]
        for link in links:
            lines += [link, ""]
    lines += ["## Configuration", ""]
    if config:
        lines += _table(["setting", "value"], sorted(config.items())) + [""]
    else:
        lines += ["_No configuration recorded._", ""]
    lines += ["## Final metrics per stage", ""]
    metrics, rows = _stage_rows(values)
    if rows:
        lines += [
            "Metrics of the last epoch of each stage.",
            "",
            *_table(["stage", "epochs", *metrics], rows),
            "",
        ]
    else:
        lines += ["_No epochs recorded._", ""]
    lines += ["## Evaluation", ""]
    if evaluation is None:
        lines += ["_Not evaluated._", ""]
    else:
        lines += _evaluation_lines(evaluation)

    path = os.path.join(run_dir, REPORT_FILENAME)
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines).rstrip() + "\n")
    return path
