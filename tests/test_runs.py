"""Run directories through the command line, in process: train, evaluate, predict, export.

One tiny model is trained once for the module (MobileNetV3-Small, alpha 0.75,
32 px, random init) on a folder of real digit images saved as PNGs; every
test reads or copies that run.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image

import keras_transfer as kt
from keras_transfer.export.metadata import read_metadata

CLASSES = ("cat", "object", "person")
PER_CLASS = 10
TINY_TRAIN = (
    "--backbone=mobilenet_v3_small",
    "--weights=none",
    "--image_size=32",
    "--epochs=1,1",
    "--batch_size=8",
)


def photo_folder(root, classes=CLASSES, per_class=PER_CLASS, digits=(0, 1, 2)):
    """One subfolder per class of real 8x8 digit images upscaled to 24x24 PNGs."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for name, digit in zip(classes, digits, strict=False):
        os.makedirs(root / name, exist_ok=True)
        images = data.images[data.target == digit][:per_class]
        for i, image in enumerate(images):
            pixels = (image * 255 / 16).astype("uint8")
            Image.fromarray(pixels).resize((24, 24)).convert("RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained through `keras-transfer train` on a folder with one corrupt JPEG."""
    root = tmp_path_factory.mktemp("runs")
    data = photo_folder(root / "photos")
    (data / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = run_cli("train", f"--data={data}", "--output_dir=run", *TINY_TRAIN, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, data, root / "run", result


def copy_run(run, destination):
    shutil.copytree(run, destination)
    return destination


def test_train_writes_the_run_and_tests_on_a_held_out_split(trained):
    root, data, run, result = trained
    for name in (
        "config.json",
        "model.keras",
        "history.json",
        "curves.png",
        "confusion.png",
        "reliability.png",
        "mistakes.png",
        "report.md",
        "labels.txt",
        "evaluation.json",
        "logs",
    ):
        assert (run / name).exists(), name
    assert (run / "labels.txt").read_text().split() == list(CLASSES)
    evaluation = json.loads((run / "evaluation.json").read_text())
    # FOLDER_TEST_SPLIT of each class is held out: 2 of 10 per class, never trained on.
    assert evaluation["split"] == "test" and evaluation["num_examples"] == 2 * len(CLASSES)
    assert "test accuracy" in result.stdout
    report = (run / "report.md").read_text()
    assert "of the test split" in report and "![Training curves](curves.png)" in report
    assert json.loads((run / "config.json").read_text())["test_split"] is None
    # Top-k, calibration, and the mistakes named by their real files.
    assert evaluation["top_k_accuracy"]["k"] == len(CLASSES)
    assert 0.0 <= evaluation["calibration"]["ece"] <= 1.0
    assert len(evaluation["misclassified"]) == evaluation["misclassified_count"]
    for row in evaluation["misclassified"]:
        assert os.path.isfile(row["path"]) and row["path"].startswith(str(data))
        assert os.path.basename(os.path.dirname(row["path"])) == row["true"]
    assert "Expected calibration error" in report and "![Reliability](reliability.png)" in report


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_too_small_folder_reports_the_validation_split(tmp_path):
    data = photo_folder(tmp_path / "small", per_class=2)
    result = run_cli(
        "train",
        f"--data={data}",
        "--output_dir=run",
        "--test_split=0.3",
        *TINY_TRAIN,
        "--epochs=1,0",  # the head stage is enough here
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "validation accuracy" in result.stdout and "test accuracy" not in result.stdout
    assert "No test split" in result.stdout
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert evaluation["split"] == "validation"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "of the validation split" in report and "No test split" in report
    assert "test split" not in report.replace("No test split", "")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["test_split"] == 0.3


def test_evaluate_matches_classes_by_name(trained, tmp_path):
    root, data, run, _ = trained
    subset = tmp_path / "subset"
    for name in ("cat", "person"):  # no "object": a subset, in another order of indices
        shutil.copytree(data / name, subset / name, ignore=shutil.ignore_patterns("*.jpg"))
    out = tmp_path / "reports"
    out.mkdir()
    result = run_cli("evaluate", f"--model={run}", f"--data={subset}", f"--output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    model = keras.saving.load_model(run / "model.keras")
    expected, predicted = [], []
    for label, name in ((0, "cat"), (2, "person")):
        files = sorted(str(p) for p in (subset / name).iterdir())
        rows = kt.predict.predict_files(model, files, list(CLASSES))
        predicted += [CLASSES.index(row["labels"][0][0]) for row in rows]
        expected += [label] * len(files)
    assert report["accuracy"] == pytest.approx(np.mean(np.array(predicted) == expected))
    supports = {row["class"]: row["support"] for row in report["per_class"]}
    assert supports == {"cat": PER_CLASS, "object": 0, "person": PER_CLASS}
    assert report["split"] == "all" and report["class_names"] == list(CLASSES)
    wrong = [p for p, e in zip(predicted, expected, strict=True) if p != e]
    assert report["misclassified_count"] == len(wrong)
    assert all(os.path.isfile(row["path"]) for row in report["misclassified"])
    assert (out / "reliability.png").is_file()
    assert (out / "mistakes.png").is_file() == bool(wrong)
    # The report is never overwritten, and --output_dir is a folder.
    again = run_cli("evaluate", f"--model={run}", f"--data={subset}", f"--output_dir={out}")
    assert_user_error(again, "evaluation.json", "already exists")
    blocker = tmp_path / "file.json"
    blocker.write_text("{}")
    into_file = run_cli("evaluate", f"--model={run}", f"--data={subset}", f"--output_dir={blocker}")
    assert_user_error(into_file, "must be a folder")
    assert blocker.read_text() == "{}"


def test_evaluate_refuses_an_unknown_class(trained, tmp_path):
    root, data, run, _ = trained
    other = photo_folder(tmp_path / "other", classes=("cat", "dog"), per_class=2)
    result = run_cli("evaluate", f"--model={run}", f"--data={other}")
    assert_user_error(result, "['dog']", "not classes of the model", "'object'")


def test_export_of_a_moved_run_loads_data_only_when_needed(trained, tmp_path):
    root, data, run, _ = trained
    moved = copy_run(run, tmp_path / "moved")
    config = json.loads((moved / "config.json").read_text())
    config["data"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(config))
    saved = run_cli(
        "export", "--model=moved", "--output=out/m", "--format=saved_model", cwd=tmp_path
    )
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert (tmp_path / "out" / "m" / "1" / "saved_model.pb").exists()
    lite = run_cli("export", "--model=moved", "--output=out/m", "--format=tflite", cwd=tmp_path)
    assert_user_error(lite, "--data=", "gone")
    assert not (tmp_path / "out" / "m" / "litert").exists()
    with pytest.warns(UserWarning, match="broken.jpg"):
        with_data = run_cli(
            "export",
            "--model=moved",
            "--output=out/m",
            "--format=tflite",
            f"--data={data}",
            cwd=tmp_path,
        )
    assert with_data.returncode == 0, with_data.stderr[-3000:]
    assert "top-1 agree" in with_data.stdout
    assert (tmp_path / "out" / "m" / "litert" / "m_none.tflite").exists()


def test_bare_keras_file_needs_data_for_int8(trained, tmp_path):
    root, data, run, _ = trained
    shutil.copy(run / "model.keras", tmp_path / "model.keras")
    result = run_cli(
        "export", "--model=model.keras", "--output=out/m", "--quantization=int8", cwd=tmp_path
    )
    assert_user_error(result, "int8 needs training images", "--data=")


def test_run_directories_are_never_confused(trained, tmp_path):
    root, data, run, _ = trained
    assert (run / "run_complete.json").is_file()
    # A finished run is replaced only on request.
    shutil.copytree(run, tmp_path / "run")
    result = run_cli("train", f"--data={data}", "--output_dir=run", *TINY_TRAIN, cwd=tmp_path)
    assert_user_error(result, "holds a finished run", "--overwrite")
    # A folder this tool did not finish is never overwritten.
    (tmp_path / "other").mkdir()
    result = run_cli(
        "train", f"--data={data}", "--output_dir=other", "--overwrite", *TINY_TRAIN, cwd=tmp_path
    )
    assert_user_error(result, "is not a finished run", "'other'")
    # An unfinished run started with other settings is named, with the way out.
    partial = tmp_path / ".partial-new"
    partial.mkdir()
    settings = json.loads((run / "config.json").read_text())
    (partial / "config.json").write_text(json.dumps({**settings, "learning_rate": 0.5}))
    result = run_cli("train", f"--data={data}", "--output_dir=new", *TINY_TRAIN, cwd=tmp_path)
    assert_user_error(result, "with other settings (", "learning_rate", str(partial), "--overwrite")
    assert sorted(os.listdir(tmp_path)) == [".partial-new", "other", "run"]


def test_a_failed_run_removes_the_folders_it_created(tmp_path):
    one_class = photo_folder(tmp_path / "one", classes=("cats",), per_class=3)
    result = run_cli(
        "train", f"--data={one_class}", "--output_dir=deep/er/run", *TINY_TRAIN, cwd=tmp_path
    )
    assert_user_error(result, "at least 2 classes", "'cats'", "one subfolder per class")
    assert "head=" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["one"]


def test_read_only_outputs_are_clear_errors(trained, read_only_dir):
    root, data, run, _ = trained
    train = run_cli("train", f"--data={data}", f"--output_dir={read_only_dir}/run", *TINY_TRAIN)
    assert_user_error(train, "Cannot write a run directory", str(read_only_dir))
    export = run_cli("export", f"--model={run}", f"--output={read_only_dir}/m", "--format=tflite")
    assert_user_error(export, "Cannot write an export", str(read_only_dir))
    assert os.listdir(read_only_dir) == []


def test_broken_run_files_are_clear_errors(trained, tmp_path):
    root, data, run, _ = trained
    short = copy_run(run, tmp_path / "short")
    (short / "labels.txt").write_text("cat\nobject\n")
    image = next((data / "cat").glob("*.png"))
    result = run_cli("predict", f"--model={short}", f"--images={image}")
    assert_user_error(result, "2 class names but the model has 3 outputs")
    truncated = copy_run(run, tmp_path / "truncated")
    model_file = truncated / "model.keras"
    model_file.write_bytes(model_file.read_bytes()[:5000])
    result = run_cli("predict", f"--model={truncated}", f"--images={image}")
    assert_user_error(result, "not a complete .keras file", "truncated")
    assert "File not found" not in result.stderr


def test_predict_skips_and_lists_unreadable_files_in_a_folder(trained):
    root, data, run, _ = trained
    result = run_cli("predict", f"--model={run}", f"--images={data / 'cat'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 unreadable file" in result.stderr and "broken.jpg" in result.stderr
    assert sum(".png" in line for line in result.stdout.splitlines()) == PER_CLASS
    assert "broken.jpg" not in result.stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("train", "--epochs=abc"), ("--epochs", "abc")),
        (("train", "--unfreeze_blocks=some"), ("--unfreeze_blocks", "some")),
        (("train", "--recipe=bogus"), ("recipe", "bogus")),
        (("train", "--data=/no/such/photos"), ("Image folder not found", "/no/such/photos")),
        (("train", "--data=fashion_mnst"), ("Unknown dataset", "fashion_mnist")),
        (("export", "--model=nowhere"), ("--output is required",)),
        (("evaluate", "--model=imagenet:resnet"), ("imagenet:efficientnet_lite0",)),
    ],
)
def test_user_errors_name_the_flag(args, fragments, tmp_path):
    # The flag under test comes last, so it wins over the tiny defaults.
    base = (*TINY_TRAIN, "--max_per_class=2") if args[0] == "train" else ()
    result = run_cli(args[0], *base, *args[1:], cwd=tmp_path)
    assert_user_error(result, *fragments)
    assert "`name`" not in result.stderr


def test_existing_version_and_bad_quantization_name_the_flag(trained, tmp_path):
    root, data, run, _ = trained
    args = ("export", f"--model={run}", "--output=out/m", "--format=saved_model", "--version=1")
    assert run_cli(*args, cwd=tmp_path).returncode == 0
    # Run and version folders get the user's umask, readable by TF Serving as another user.
    for folder in (run, tmp_path / "out" / "m" / "1"):
        assert os.stat(folder).st_mode & 0o777 == 0o777 & ~_umask(), folder
    assert_user_error(run_cli(*args, cwd=tmp_path), "Version 1 already exists", "--overwrite")
    bad = run_cli("export", f"--model={run}", "--output=out/m", "--quantization=int9")
    assert_user_error(bad, "int9")


# keras.applications' own notice for ImageNet weights at a non-224 size.
@pytest.mark.filterwarnings("ignore:`input_shape` is undefined or non-square:UserWarning")
def test_imagenet_weights_offline_is_a_clear_error(monkeypatch, tmp_path):
    import urllib.error

    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    with pytest.raises(
        ConnectionError, match="Could not download.*weights=None.*efficientnet_lite0"
    ):
        kt.build_image_classifier("mobilenet_v3_small", 2, input_shape=(32, 32, 3))
    data = photo_folder(tmp_path / "photos", per_class=2)
    result = run_cli(
        "train",
        f"--data={data}",
        "--backbone=mobilenet_v3_small",
        "--weights=imagenet",
        "--image_size=32",
        cwd=tmp_path,
    )
    assert_user_error(result, "Could not download", "--weights=none", "efficientnet_lite0")
    assert not (tmp_path / "runs").exists()


def test_saved_model_reloads_in_a_fresh_process(trained):
    """`import keras_transfer` first, then plain keras.models.load_model (safe mode on)."""
    root, data, run, _ = trained
    code = (
        "import sys, numpy as np\n"
        "import keras_transfer, keras\n"
        "model = keras.models.load_model(sys.argv[1])\n"
        "print(model.predict(np.zeros((1, 32, 32, 3)), verbose=0).shape)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(run / "model.keras")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1, 3)" in result.stdout


def test_console_script_keeps_the_terminal_quiet(trained, tmp_path):
    """The real `keras-transfer` script exports SavedModel, float and int8 LiteRT, quietly."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    root, data, run, _ = trained
    script = os.path.join(os.path.dirname(sys.executable), "keras-transfer")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run(
        [script, "export", f"--model={run}", "--output=out/m", "--quantization=none,int8"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1 agree" in result.stdout and "int8" in result.stdout
    export = tmp_path / "out" / "m"
    assert (export / "1" / "saved_model.pb").exists()
    assert (export / "1" / "assets" / "labels.txt").read_text().split() == list(CLASSES)
    for name in ("m_none.tflite", "m_int8.tflite", "m_int8.labels.txt", "parity.json"):
        assert (export / "litert" / name).exists(), name
    for name in ("m_none.tflite", "m_int8.tflite"):  # standard metadata from the CLI too
        assert read_metadata((export / "litert" / name).read_bytes())["labels"] == list(CLASSES)
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((tmp_path / "out" / "models.config").read_text(), config)
    assert [c.name for c in config.model_config_list.config] == ["m"]
    # TF C++ lines (I0000/E0000 ...), absl INFO lines (I1129 ...), LiteRT's "INFO:" and
    # the converter's "fully_quantize: ..." stay off the terminal.
    noise = re.compile(r"^([IWE]\d{4} |INFO: |fully_quantize)|cuInit|oneDNN")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if noise.search(line)]
    assert lines == [], lines
