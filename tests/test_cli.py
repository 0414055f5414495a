"""The command line: in process through absl `main` (flags reset per call), and the demo."""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import assert_user_error, run_cli
from PIL import Image

from keras_transfer.data import FASHION_MNIST_CLASSES
from keras_transfer.export.metadata import read_metadata

TINY_TRAIN = [
    "--backbone=mobilenet_v3_small",
    "--weights=none",
    "--image_size=32",
    "--epochs=1,1",
    "--batch_size=4",
]


def image_folder(root, classes=("cats", "dogs"), per_class=4):
    rng = np.random.default_rng(0)
    for name in classes:
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_predict_chelsea_is_a_cat(tmp_path):
    import skimage.data

    path = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    result = run_cli("predict", "--model=imagenet:efficientnet_lite0", f"--images={path}")
    assert result.returncode == 0, result.stderr[-2000:]
    first = next(line for line in result.stdout.splitlines() if "chelsea.png" in line)
    assert "cat" in first.lower(), result.stdout


def test_predict_refuses_a_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    result = run_cli("predict", "--model=imagenet:efficientnet_lite0", f"--images={bad}")
    assert_user_error(result, "Not a readable image file", "notes.jpg")


def test_train_refuses_empty_class_folder(tmp_path):
    data = image_folder(tmp_path / "data")
    os.makedirs(data / "birds")
    (data / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    result = run_cli("train", f"--data={data}", "--output_dir=run", *TINY_TRAIN, cwd=tmp_path)
    assert_user_error(result, "birds")
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_missing_folder_and_unknown_dataset(tmp_path):
    # Flags can come from a file.
    flagfile = tmp_path / "train.flags"
    flagfile.write_text("\n".join([f"--data={tmp_path / 'nowhere'}", *TINY_TRAIN]) + "\n")
    missing = run_cli("train", f"--flagfile={flagfile}", cwd=tmp_path)
    assert_user_error(missing, "Image folder not found", "nowhere")
    unknown = run_cli("train", "--data=fashion_mnst", *TINY_TRAIN, cwd=tmp_path)
    assert_user_error(unknown, "fashion_mnist")


def test_unknown_command():
    result = run_cli("fly")
    assert result.returncode == 2 and "give one command" in result.stderr


@pytest.mark.slow
def test_demo_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_transfer.cli", "demo", "--quick", "--output_dir=demo"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ImageNet pretrained" in result.stdout and "random init" in result.stdout
    for run in ("pretrained", "random_init"):
        assert (tmp_path / "demo" / run / "report.md").exists()
    export = tmp_path / "saved_models" / "fashion_mnist_lite0"
    assert (export / "1" / "saved_model.pb").exists()
    for name in ("fashion_mnist_lite0_none.tflite", "fashion_mnist_lite0_int8.tflite"):
        # The demo's phone files carry the standard metadata MediaPipe Tasks reads.
        info = read_metadata((export / "litert" / name).read_bytes())
        assert info["labels"] == list(FASHION_MNIST_CLASSES), name
        assert info["inputs"][0]["normalization"] == {"mean": [0.0], "std": [1.0]}
    assert "top-1 agree" in result.stdout
