import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

TINY_TRAIN = [
    "--backbone=mobilenet_v3_small",
    "--weights=none",
    "--image_size=32",
    "--epochs=1,1",
    "--batch_size=4",
]


def cli(*args, tmp_path, timeout=600):
    env = dict(os.environ, KERAS_TRANSFER_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, "-m", "keras_transfer.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def image_folder(root, classes=("cats", "dogs"), per_class=4):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


def test_predict_chelsea_is_a_cat(tmp_path):
    import skimage.data

    path = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    result = cli(
        "predict", "--model=imagenet:efficientnet_lite0", f"--images={path}", tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first = next(line for line in result.stdout.splitlines() if "chelsea.png" in line)
    assert "cat" in first.lower(), result.stdout


def test_predict_refuses_a_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    result = cli(
        "predict", "--model=imagenet:efficientnet_lite0", f"--images={bad}", tmp_path=tmp_path
    )
    assert_user_error(result, "Not a readable image file", "notes.jpg")


def test_train_refuses_empty_class_folder(tmp_path):
    data = image_folder(tmp_path / "data")
    os.makedirs(data / "birds")
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = cli("train", f"--data={data}", "--output_dir=run", *TINY_TRAIN, tmp_path=tmp_path)
    assert_user_error(result, "birds")
    assert not (tmp_path / "run").exists()


def test_train_skips_corrupt_jpeg_and_writes_run(tmp_path):
    data = image_folder(tmp_path / "data")
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = cli("train", f"--data={data}", "--output_dir=run", *TINY_TRAIN, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "broken.jpg" in result.stderr
    run = tmp_path / "run"
    for name in (
        "config.json",
        "model.keras",
        "history.json",
        "curves.png",
        "confusion.png",
        "report.md",
        "labels.txt",
        "logs",
    ):
        assert (run / name).exists(), name
    assert "![Training curves](curves.png)" in (run / "report.md").read_text()
    evaluated = cli("evaluate", "--model=run", f"--data={data}", tmp_path=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "accuracy" in evaluated.stdout.lower()


def test_missing_folder_and_unknown_dataset(tmp_path):
    # Flags can come from a file.
    flagfile = tmp_path / "train.flags"
    flagfile.write_text("\n".join([f"--data={tmp_path / 'nowhere'}", *TINY_TRAIN]) + "\n")
    missing = cli("train", f"--flagfile={flagfile}", tmp_path=tmp_path)
    assert_user_error(missing, "nowhere")
    unknown = cli("train", "--data=fashion_mnst", *TINY_TRAIN, tmp_path=tmp_path)
    assert_user_error(unknown, "fashion_mnist")


def test_export_run_directory(tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    train = cli(
        "train",
        "--data=digits",
        "--output_dir=run",
        "--max_per_class=4",
        *TINY_TRAIN,
        tmp_path=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    args = ["export", "--model=run", "--output=saved_models/digits", "--quantization=none,int8"]
    result = cli(*args, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "top-1 agree" in result.stdout and "int8" in result.stdout
    version = tmp_path / "saved_models" / "digits" / "1"
    assert (version / "saved_model.pb").exists()
    assert (version / "assets" / "labels.txt").read_text().split() == [str(i) for i in range(10)]
    litert = tmp_path / "saved_models" / "digits" / "litert"
    for name in ("digits_none.tflite", "digits_int8.tflite", "digits_int8.labels.txt"):
        assert (litert / name).exists(), name
    config = model_server_config_pb2.ModelServerConfig()
    text_format.Parse((tmp_path / "saved_models" / "models.config").read_text(), config)
    assert [c.name for c in config.model_config_list.config] == ["digits"]
    # Same version again: refused without --overwrite, one line, exit 2.
    again = cli(*args, "--format=saved_model", "--version=1", tmp_path=tmp_path)
    assert_user_error(again, "Version 1 already exists")
    bad = cli(*args, "--quantization=int9", tmp_path=tmp_path)
    assert_user_error(bad, "int9")


def test_unknown_command(tmp_path):
    result = cli("fly", tmp_path=tmp_path)
    assert result.returncode == 2 and "give one command" in result.stderr


@pytest.mark.slow
def test_demo_quick(tmp_path):
    result = cli("demo", "--quick", "--output_dir=demo", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ImageNet pretrained" in result.stdout and "random init" in result.stdout
    for run in ("pretrained", "random_init"):
        assert (tmp_path / "demo" / run / "report.md").exists()
    export = tmp_path / "saved_models" / "fashion_mnist_lite0"
    assert (export / "1" / "saved_model.pb").exists()
    for name in ("fashion_mnist_lite0_none.tflite", "fashion_mnist_lite0_int8.tflite"):
        assert (export / "litert" / name).exists(), name
    assert "top-1 agree" in result.stdout
