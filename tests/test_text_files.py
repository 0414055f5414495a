"""Users' own text: CSV, TSV, JSONL and .txt folders, bad rows by line, and a CLI run."""

import json
import os
import re

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image

from keras_transfer.backbones.kerashub import text_preprocessor
from keras_transfer.data import load_dataset, load_text_files
from keras_transfer.data.text_files import is_text_folder
from keras_transfer.runs import RunConfig

SEQUENCE_LENGTH = 16
# Two classes of simple, distinct sentences for the loaders and the CLI run.
GOOD = ("a wonderful film", "great acting", "I loved every minute", "superb and moving")
BAD = ("a dull film", "terrible acting", "I hated every minute", "boring and slow")


@pytest.fixture(scope="module")
def preprocessor():
    return text_preprocessor("minilm", SEQUENCE_LENGTH)


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def reviews_csv(path, rows=3):
    """`review,sentiment` rows, all distinct: GOOD texts are "pos", BAD texts "neg"."""
    lines = [
        f"{good} ({i}),pos\n{bad} ({i}),neg\n"
        for i in range(rows)
        for good, bad in zip(GOOD, BAD, strict=True)
    ]
    return write(path, "review,sentiment\n" + "".join(lines))


def test_csv_with_quoted_commas_quotes_and_newlines(tmp_path):
    path = write(
        tmp_path / "reviews.csv",
        b"\xef\xbb\xbf"  # Excel's byte order mark
        b'id,review,sentiment\r\n1,"Long, but good.",pos\r\n'
        b'2,"Two lines:\r\nstill bad",neg\r\n3,"He said ""wow""",pos\r\n',
    )
    texts, labels, names, problems = load_text_files(
        path, text_column="review", label_column="sentiment"
    )
    assert texts == ["Long, but good.", "Two lines:\r\nstill bad", 'He said "wow"']
    assert labels.dtype == np.int32 and labels.tolist() == [1, 0, 1]
    assert names == ["neg", "pos"] and problems == []


def test_tsv_and_given_class_order(tmp_path):
    path = write(tmp_path / "reviews.tsv", 'label\ttext\nyes\ta, b, c\nno\tit\'s "fine"\n')
    texts, labels, names, _ = load_text_files(path, class_names=["yes", "no"])
    assert texts == ["a, b, c", 'it\'s "fine"'] and labels.tolist() == [0, 1]
    assert names == ["yes", "no"]


def test_jsonl_with_integer_labels(tmp_path):
    records = [{"body": "café au lait", "stars": 5}, {"body": "line\u2028sep", "stars": 1}]
    path = write(tmp_path / "r.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    texts, labels, names, _ = load_text_files(path, text_column="body", label_column="stars")
    assert texts == ["café au lait", "line\u2028sep"]
    assert names == ["1", "5"] and labels.tolist() == [1, 0]


def test_txt_folder_classes_are_sorted_subfolders(tmp_path):
    for label, name, text in [("pos", "a.txt", "Good.\nVery good."), ("neg", "b.txt", "Bad.")]:
        (tmp_path / "data" / label / "more").mkdir(parents=True)
        write(tmp_path / "data" / label / name, text)
    write(tmp_path / "data" / "pos" / "more" / "c.TXT", "Nested.")
    write(tmp_path / "data" / "pos" / ".hidden.txt", "")  # metadata, not a text
    texts, labels, names, problems = load_text_files(tmp_path / "data")
    assert names == ["neg", "pos"] and problems == []
    assert texts == ["Bad.", "Good.\nVery good.", "Nested."] and labels.tolist() == [0, 1, 1]
    assert is_text_folder(tmp_path / "data")


def test_max_per_class_is_a_seeded_choice_in_file_order(tmp_path):
    path = reviews_csv(tmp_path / "r.csv")
    texts, labels, _, _ = load_text_files(path, text_column="review", label_column="sentiment")
    first = load_text_files(
        path, text_column="review", label_column="sentiment", max_per_class=2, seed=1
    )
    assert np.bincount(first[1]).tolist() == [2, 2]
    assert first[0] == [t for t in texts if t in first[0]]  # file order kept
    again = load_text_files(
        path, text_column="review", label_column="sentiment", max_per_class=2, seed=1
    )
    assert again[0] == first[0]


# (file name, content, extra arguments, the problem reported). The good rows
# around each bad one leave two classes; a multi-line field before a bad row
# checks that lines are counted in the file, not in records.
BAD_ROWS = {
    "empty text": (
        "r.csv",
        'text,label\n"multi\nline",a\n  ,b\nok,b\n',
        {},
        "r.csv line 4: empty text",
    ),
    "missing value": (
        "r.csv",
        "text,label\nok,a\nshort\nfine,b\n",
        {},
        "r.csv line 3: missing label",
    ),
    "extra field": (
        "r.csv",
        "text,label\nok,a\nhello, world,b\nfine,b\n",
        {},
        "r.csv line 3: 3 fields but the header has 2",
    ),
    "unclosed quote": (
        "r.csv",
        'text,label\nok,a\nfine,b\n"open,a\nmore,b\n',
        {},
        "r.csv line 4: cannot be parsed",
    ),
    "unknown label": (
        "r.tsv",
        "text\tlabel\nok\ta\nfine\tb\nhm\tc\n",
        {"class_names": ["a", "b"]},
        "r.tsv line 4: unknown label 'c'",
    ),
    "not utf-8": (
        "r.csv",
        b'text,label\n"x\ny",a\nbad \xff,b\nfine,b\n',
        {},
        "r.csv line 4: not valid UTF-8",
    ),
    "malformed json": (
        "r.jsonl",
        '{"text": "ok", "label": "a"}\n{"text": "x", "label": \n{"text": "fine", "label": "b"}\n',
        {},
        "r.jsonl line 2: not valid JSON",
    ),
    "not utf-8 in a .txt file": (
        "data",
        None,
        {},
        os.path.join("b", "2.txt") + " line 2: not valid UTF-8",
    ),
}


def bad_data(tmp_path, name, content):
    if content is not None:
        return write(tmp_path / name, content)
    for label, i, data in [("a", 1, b"ok"), ("b", 1, b"fine"), ("b", 2, b"one\ntw\xc3o")]:
        (tmp_path / name / label).mkdir(parents=True, exist_ok=True)
        write(tmp_path / name / label / f"{i}.txt", data)
    return tmp_path / name


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_row_is_skipped_with_its_line_or_raised(tmp_path, kind):
    name, content, kwargs, problem = BAD_ROWS[kind]
    path = bad_data(tmp_path, name, content)
    with pytest.warns(UserWarning, match=f"Skipped 1 bad row.*{re.escape(problem)}"):
        texts, labels, names, problems = load_text_files(path, **kwargs)
    assert len(problems) == 1 and problems[0].startswith(problem)
    assert names == ["a", "b"] and len(texts) == len(labels) >= 2
    with pytest.raises(ValueError, match=f"bad row: {re.escape(problem)}.*on_error='skip'"):
        load_text_files(path, on_error="raise", **kwargs)


def test_file_errors(tmp_path):
    path = reviews_csv(tmp_path / "r.csv")
    with pytest.raises(ValueError, match=r"`label_column`.*\['review', 'sentiment'\].*'sentimnt'"):
        load_text_files(path, text_column="review", label_column="sentimnt")
    jsonl = write(tmp_path / "r.jsonl", '{"text": "a", "tag": "x"}\n')
    with pytest.raises(ValueError, match=r"one of \['tag', 'text'\]. Received: label_column"):
        load_text_files(jsonl)
    with pytest.raises(ValueError, match=r"one of \('.csv', '.jsonl', '.tsv'\).*r.xlsx"):
        load_text_files(write(tmp_path / "r.xlsx", b"PK"))
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        load_text_files(tmp_path / "nowhere.csv")
    one_class = write(tmp_path / "one.csv", "text,label\na,x\nb,x\n")
    with pytest.raises(ValueError, match=r"at least 2 classes; .* has 1: \['x'\]"):
        load_text_files(one_class)
    empty = write(tmp_path / "empty.csv", "text,label\n,x\n")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no valid rows"):
        load_text_files(empty)
    with pytest.raises(ValueError, match="Received: on_error='ignore'"):
        load_text_files(path, on_error="ignore")


def test_load_dataset_tokenises_text_files(tmp_path, preprocessor):
    path = reviews_csv(tmp_path / "r.csv")
    splits = load_dataset(
        path,
        preprocessor=preprocessor,
        text_column="review",
        label_column="sentiment",
        batch_size=4,
        validation_split=0.25,
        test_split=0.25,
    )
    x, y = next(iter(splits.train))
    assert sorted(x) == ["padding_mask", "segment_ids", "token_ids"]
    assert x["token_ids"].shape == (4, SEQUENCE_LENGTH) and y.dtype.name == "int32"
    assert splits.class_names == ["neg", "pos"]
    assert splits.info["counts"] == {"train": 12, "validation": 6, "test": 6}
    assert splits.info["source"] == str(path) and splits.info["skipped"] == []
    folder = bad_data(tmp_path, "folder", None)
    with pytest.warns(UserWarning, match="Skipped 1"):
        splits = load_dataset(folder, preprocessor=preprocessor, validation_split=0.0)
    assert splits.class_names == ["a", "b"] and len(splits.info["skipped"]) == 1


def test_load_dataset_needs_a_preprocessor_for_text_only(tmp_path, preprocessor):
    path = reviews_csv(tmp_path / "r.csv")
    with pytest.raises(ValueError, match="is text data: pass `preprocessor=`"):
        load_dataset(path)
    with pytest.raises(ValueError, match="is text data: pass `preprocessor=`"):
        load_dataset("wordnet_nouns")
    with pytest.raises(ValueError, match="Received: 'digits', which is image data"):
        load_dataset("digits", preprocessor=preprocessor)
    with pytest.raises(ValueError, match="Did you mean 'wordnet_nouns'"):
        load_dataset("wordnet_noun", preprocessor=preprocessor)
    with pytest.raises(ValueError, match="must be text, ending with one of"):
        load_dataset(write(tmp_path / "r.xlsx", b"PK"))
    # A folder of images with a stray .txt file is still images.
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "cat" / "a.png")
    write(tmp_path / "images" / "cat" / "notes.txt", "not a text example")
    assert not is_text_folder(tmp_path / "images")


def test_run_config_checks_the_columns():
    with pytest.raises(ValueError, match="Received: text_column=''"):
        RunConfig(task="text", text_column="")


def _train_flags(data, tmp_path):
    return [
        "train",
        "--task=text",
        f"--data={data}",
        "--text_column=review",
        "--label_column=sentiment",
        "--backbone=minilm",
        "--weights=none",
        "--recipe=feature_extraction",
        "--epochs=1",
        f"--sequence_length={SEQUENCE_LENGTH}",
        "--batch_size=8",
        f"--output_dir={tmp_path / 'run'}",
    ]


def test_cli_reports_a_wrong_column_in_one_line(tmp_path):
    data = reviews_csv(tmp_path / "r.csv")
    flags = [f for f in _train_flags(data, tmp_path) if not f.startswith("--label_column")]
    result = run_cli(*flags, cwd=tmp_path)
    assert_user_error(result, "`label_column`", "'sentiment'", "Received: label_column='label'")
    assert sorted(os.listdir(tmp_path)) == ["r.csv"]


def test_cli_trains_and_exports_a_csv_text_classifier(tmp_path):
    data = reviews_csv(tmp_path / "reviews.csv")
    trained = run_cli(*_train_flags(data, tmp_path), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "labels.txt").read_text() == "neg\npos\n"
    assert json.loads((run / "config.json").read_text())["label_column"] == "sentiment"
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["calibration"]["bins"] and "misclassified" in evaluation
    assert (run / "reliability.png").is_file() and not (run / "mistakes.png").exists()
    exported = run_cli(
        "export", f"--model={run}", f"--output={tmp_path / 'served'}", "--format=saved_model"
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (tmp_path / "served" / "1" / "saved_model.pb").exists()
