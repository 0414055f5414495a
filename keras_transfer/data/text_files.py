"""Users' own labelled text: CSV, TSV and JSONL files, or a folder of `.txt` files.

Every row is checked here, by file and line, so a bad row (empty text, an
unknown label, bytes that are not UTF-8, a broken JSON line) is reported
before training and never fails an epoch deep inside `tf.data`.
"""

from __future__ import annotations

import csv
import json
import os
import warnings
from collections.abc import Sequence

import numpy as np

from keras_transfer.data.images import IMAGE_EXTENSIONS, ON_ERROR_MODES, class_files
from keras_transfer.data.splits import cap_per_class, suggest, validate_max

TEXT_FILE_EXTENSIONS = (".csv", ".jsonl", ".tsv")
TEXT_FOLDER_EXTENSION = ".txt"
# Excel and pandas quote fields that hold the delimiter, a quote or a newline
# ("excel" and "excel-tab" dialects of the csv module).
_DIALECTS = {".csv": "excel", ".tsv": "excel-tab"}
# Excel writes a UTF-8 byte order mark before the header.
_BOM = b"\xef\xbb\xbf"
# How many bad rows a warning spells out (as for image folders).
_MAX_LISTED = 5


class _Rows:
    """Collects `(text, label)` rows, and the problems of the bad ones in file order."""

    def __init__(self, class_names):
        self.known = None if class_names is None else set(class_names)
        self.texts, self.labels, self.problems = [], [], []

    def add(self, where, text, label):
        """Keeps a row, or records why it is bad; `None` marks a missing value."""
        if text is None:
            self.problems.append(f"{where}: missing text")
        elif not isinstance(text, str):
            self.problems.append(f"{where}: text must be a string, not {type(text).__name__}")
        elif not text.strip():
            self.problems.append(f"{where}: empty text")
        elif label is None:
            self.problems.append(f"{where}: missing label")
        elif isinstance(label, bool) or not isinstance(label, (str, int)):
            self.problems.append(
                f"{where}: label must be a string or an integer, not {type(label).__name__}"
            )
        elif not (label := str(label).strip()):
            self.problems.append(f"{where}: empty label")
        elif self.known is not None and label not in self.known:
            self.problems.append(f"{where}: unknown label {label!r}")
        else:
            self.texts.append(text)
            self.labels.append(label)


def _missing_column(source, column_arg, column, columns):
    return ValueError(
        f"`{column_arg}` must be a column of '{source}': one of {list(columns)}. "
        f"Received: {column_arg}={column!r}.{suggest(column, list(columns))}"
    )


def _decoded(lines, bad_lines):
    """Decodes byte lines one by one; a line that is not UTF-8 is noted and replaced."""
    for number, line in enumerate(lines, 1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.add(number)
            yield line.decode("utf-8", errors="replace")


def _read_delimited(path, name, extension, text_column, label_column, rows):
    with open(path, "rb") as file:
        lines = file.read().removeprefix(_BOM).splitlines(keepends=True)
    bad_lines = set()
    # strict: a stray quote or an unclosed quoted field is an error, not a guess.
    reader = csv.reader(_decoded(lines, bad_lines), dialect=_DIALECTS[extension], strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise ValueError(f"'{path}' line 1: the header row cannot be parsed ({error})") from None
    if header is None or 1 in bad_lines:
        raise ValueError(
            f"'{path}' must start with a UTF-8 header row naming its columns (e.g. "
            f"{text_column},{label_column}). Received: "
            + ("an empty file" if header is None else "a header that is not UTF-8")
        )
    header = [column.strip() for column in header]
    for column_arg, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in header:
            raise _missing_column(name, column_arg, column, header)
    text_at, label_at = header.index(text_column), header.index(label_column)
    end = reader.line_num
    while True:
        start = end + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            end = reader.line_num
            hint = ": a quoted field is not closed" if "end of data" in str(error) else ""
            rows.problems.append(f"{name} line {start}: cannot be parsed ({error}{hint})")
            continue
        end = reader.line_num
        bad = sorted(n for n in bad_lines if start <= n <= end)
        if bad:
            rows.problems.append(f"{name} line {bad[0]}: not valid UTF-8")
        elif len(row) > len(header):
            rows.problems.append(
                f"{name} line {start}: {len(row)} fields but the header has {len(header)} "
                "(quote a field that holds the delimiter)"
            )
        elif row:  # a blank line is no row
            rows.add(
                f"{name} line {start}",
                row[text_at] if text_at < len(row) else None,
                row[label_at] if label_at < len(row) else None,
            )


def _read_jsonl(path, name, text_column, label_column, rows):
    with open(path, "rb") as file:
        lines = file.read().removeprefix(_BOM).splitlines()
    keys = set()
    for number, line in enumerate(lines, 1):
        where = f"{name} line {number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            rows.problems.append(f"{where}: not valid UTF-8")
            continue
        except json.JSONDecodeError as error:
            rows.problems.append(f"{where}: not valid JSON ({error.msg})")
            continue
        if not isinstance(record, dict):
            rows.problems.append(f"{where}: not a JSON object")
            continue
        keys.update(record)
        rows.add(where, record.get(text_column), record.get(label_column))
    # JSONL has no header: a key that no object has is a wrong column name.
    for column_arg, column in (("text_column", text_column), ("label_column", label_column)):
        if keys and column not in keys:
            raise _missing_column(name, column_arg, column, sorted(keys))


def _read_folder(directory, rows):
    classes = sorted(
        entry.name for entry in os.scandir(directory) if entry.is_dir() and entry.name[0] != "."
    )
    if not classes:
        raise ValueError(
            f"A text folder must hold one subfolder of {TEXT_FOLDER_EXTENSION} files per class. "
            f"Received: '{directory}' has no subfolders"
        )
    for label in classes:
        files = class_files(directory, label, (TEXT_FOLDER_EXTENSION,))
        if not files:
            raise ValueError(
                f"class folder '{label}' has no {TEXT_FOLDER_EXTENSION} files in '{directory}'"
            )
        for path in files:
            where = os.path.relpath(path, directory)
            with open(path, "rb") as file:
                data = file.read().removeprefix(_BOM)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as error:
                line = data.count(b"\n", 0, error.start) + 1
                rows.problems.append(f"{where} line {line}: not valid UTF-8")
                continue
            rows.add(where, text, label)


def is_text_folder(directory: str | os.PathLike) -> bool:
    """Whether a folder's class subfolders hold `.txt` files and no images.

    Args:
        directory: a folder.

    Returns:
        True for a folder of per-class `.txt` files (text data), False for
        anything else (an image folder, an empty folder, a missing path).

    Example:
    >>> import os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> os.makedirs(f"{folder}/pos")
    >>> _ = open(f"{folder}/pos/1.txt", "w").write("A fine film.")
    >>> is_text_folder(folder), is_text_folder(f"{folder}/missing")
    (True, False)
    """
    if not os.path.isdir(directory):
        return False
    found_text = False
    for entry in os.scandir(directory):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        for _, _, names in os.walk(entry.path, followlinks=True):
            for name in names:
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    return False
                found_text = found_text or name.lower().endswith(TEXT_FOLDER_EXTENSION)
    return found_text


def _report(problems, path, on_error):
    """Raises on the first bad row, or warns about the skipped ones."""
    if not problems:
        return
    if on_error == "raise":
        more = f" (and {len(problems) - 1} more bad rows)" if len(problems) > 1 else ""
        raise ValueError(
            f"'{path}' has a bad row: {problems[0]}{more}. Fix or remove it, or pass "
            "on_error='skip'."
        )
    listed = "; ".join(problems[:_MAX_LISTED])
    more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    warnings.warn(f"Skipped {len(problems)} bad row(s) in '{path}': {listed}{more}.", stacklevel=3)


def load_text_files(
    path: str | os.PathLike,
    *,
    text_column: str = "text",
    label_column: str = "label",
    on_error: str = "skip",
    class_names: Sequence[str] | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> tuple[list[str], np.ndarray, list[str], list[str]]:
    """Reads labelled texts from a CSV, TSV or JSONL file or a folder of `.txt` files.

    - `.csv` / `.tsv`: a header row names the columns; fields holding the
      delimiter, quotes or newlines are quoted as Excel and pandas write
      them.
    - `.jsonl`: one JSON object per line; labels may be strings or integers.
    - a folder: one subfolder per class (its name is the label) holding
      `.txt` files, each file's whole content one text (as for
      `keras.utils.text_dataset_from_directory`).

    Labels are strings (surrounding spaces removed); the classes are the
    sorted labels unless `class_names` is given. Every row is checked: empty text, a missing
    value, an unknown label (with `class_names`), bytes that are not UTF-8,
    a line that is not a JSON object, a row with more fields than the
    header. Each is a problem, named by file and line
    (`"reviews.csv line 7: empty text"`).

    Args:
        path: a `.csv`, `.tsv` or `.jsonl` file, or a folder of class
            subfolders of `.txt` files.
        text_column: the column (JSON key) holding the text.
        label_column: the column (JSON key) holding the label.
        on_error: `"skip"` leaves bad rows out, with a warning listing the
            first ones; `"raise"` raises on the first.
        class_names: the classes, in label order; a label not among them
            is a bad row. None: the sorted labels found.
        max_per_class: keep at most this many texts per class (a seeded
            choice); None keeps all.
        seed: seed of the choice under `max_per_class`.

    Returns:
        `(texts, labels, class_names, problems)`: a list of str in file
        order, an int32 array (label `i` is `class_names[i]`), the class
        names, and one string per bad row.

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: an unknown extension, a column not in the header, a bad
            row with `on_error="raise"`, no valid rows, or fewer than two
            classes.

    Example:
    >>> import os, tempfile
    >>> from keras_transfer.data import load_text_files
    >>> path = os.path.join(tempfile.mkdtemp(), "reviews.csv")
    >>> with open(path, "w", newline="") as f:
    ...     _ = f.write('review,stars\\n"Long, but good.",good\\nDull.,bad\\n')
    >>> texts, labels, names, problems = load_text_files(
    ...     path, text_column="review", label_column="stars")
    >>> texts, labels.tolist(), names, problems
    (['Long, but good.', 'Dull.'], [1, 0], ['bad', 'good'], [])
    """
    if on_error not in ON_ERROR_MODES:
        raise ValueError(
            f"`on_error` must be one of {ON_ERROR_MODES}. Received: on_error={on_error!r}"
        )
    for column_arg, column in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(column, str) or not column:
            raise ValueError(
                f"`{column_arg}` must be a non-empty string. Received: {column_arg}={column!r}"
            )
    if text_column == label_column:
        raise ValueError(
            "`text_column` and `label_column` must differ. Received: "
            f"text_column={text_column!r}, label_column={label_column!r}"
        )
    if class_names is not None:
        class_names = [str(name) for name in class_names]
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise ValueError(
                "`class_names` must be at least 2 distinct names. "
                f"Received: class_names={class_names!r}"
            )
    validate_max("max_per_class", max_per_class)
    path = os.fspath(path)
    extension = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise FileNotFoundError(f"Text data not found. Received: path='{path}'")
    rows = _Rows(class_names)
    if os.path.isdir(path):
        _read_folder(path, rows)
    elif extension in _DIALECTS:
        _read_delimited(path, os.path.basename(path), extension, text_column, label_column, rows)
    elif extension == ".jsonl":
        _read_jsonl(path, os.path.basename(path), text_column, label_column, rows)
    else:
        raise ValueError(
            f"Text files must end with one of {TEXT_FILE_EXTENSIONS} (or give a folder of "
            f"class subfolders of {TEXT_FOLDER_EXTENSION} files). Received: path='{path}'"
        )
    texts, problems = rows.texts, rows.problems
    _report(problems, path, on_error)
    if not texts:
        raise ValueError(f"'{path}' has no valid rows ({len(problems)} bad).")
    found = sorted(set(rows.labels))
    if len(found) < 2:
        raise ValueError(
            f"A classifier needs at least 2 classes; '{path}' has {len(found)}: {found}."
        )
    names = found if class_names is None else class_names
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[label] for label in rows.labels], np.int32)
    keep = np.sort(cap_per_class(labels, max_per_class, seed))
    return [texts[i] for i in keep], labels[keep], names, problems
