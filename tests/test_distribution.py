"""The `strategy=` seam: every recipe trains under MirroredStrategy over 2 logical CPUs.

Logical devices can be set only before TensorFlow initialises, so the check
runs in its own process, made with `KERAS_TRANSFER_CPU_DEVICES=2` (the
documented test-only way). The command line is checked there too. With the same global batch, data order and seed (no
dropout, no augmentation, BatchNorm frozen), the final weights match a
one-device run.
"""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
import keras
import keras_transfer as kt  # KERAS_TRANSFER_CPU_DEVICES=2: two logical CPUs

RECIPES = {"feature_extraction": 2, "two_stage": (1, 1), "full": 2, "progressive": 2}
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
y = np.arange(16) % 3
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def train(recipe, strategy):
    keras.utils.set_random_seed(0)
    model = kt.build_image_classifier(
        "mobilenet_v3_small", 3, weights=None, input_shape=(32, 32, 3), alpha=0.75,
        minimalistic=True, dropout=0.0, strategy=strategy,
    )
    initial = [w.numpy() for w in model.weights]
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    kt.fine_tune(model, data, recipe=recipe, epochs=RECIPES[recipe], strategy=strategy,
                 batch_size=8, verbose=0)
    return model, initial, [w.numpy() for w in model.weights]


def max_diff(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b))


result = {"replicas": mirrored.num_replicas_in_sync}
for recipe in RECIPES:
    _, initial, one = train(recipe, None)
    model, initial_two, two = train(recipe, mirrored)
    assert model.distribute_strategy is mirrored
    result[recipe] = {
        "max_abs_diff": max_diff(one, two),
        "same_start": max_diff(initial, initial_two),
        "trained": max_diff(initial, one),
    }
# batch_size is the global batch: it must divide over the replicas.
try:
    kt.fine_tune(model, (x, y), epochs=(1, 1), batch_size=7, strategy=mirrored, verbose=0)
except ValueError as error:
    result["odd_batch"] = str(error)
# A model built outside the scope is refused, naming the fix.
try:
    plain = kt.build_image_classifier("mobilenet_v3_small", 3, weights=None,
                                      input_shape=(32, 32, 3), alpha=0.75)
    kt.fine_tune(plain, (x, y), epochs=(1, 1), strategy=mirrored, verbose=0)
except ValueError as error:
    result["outside_scope"] = str(error)
print("RESULT " + json.dumps(result))
"""

_CLI = r"""
import json, os, sys
import numpy as np
import keras
import keras_transfer as kt  # KERAS_TRANSFER_CPU_DEVICES=2: two logical CPUs
from absl import flags
from keras_transfer import cli

result = {}
# The command line: --strategy=mirrored against --strategy=one_device, same settings.
args = ["train", "--data=digits", "--backbone=mobilenet_v3_small", "--weights=none",
        "--image_size=32", "--max_per_class=8", "--max_test_per_class=2", "--batch_size=8",
        "--epochs=1,1", "--dropout=0", f"--output_dir={sys.argv[1]}/"]
runs = {}
for name in ("mirrored", "one_device"):
    flags.FLAGS.unparse_flags()
    argv = ["keras-transfer", *args[:-1], args[-1] + name, f"--strategy={name}"]
    result[name + "_exit"] = cli.main(cli.parse_flags(argv))
    runs[name] = keras.models.load_model(f"{sys.argv[1]}/{name}/model.keras")
    result[name + "_files"] = sorted(os.listdir(f"{sys.argv[1]}/{name}"))
result["cli_max_abs_diff"] = max(
    float(np.abs(a.numpy() - b.numpy()).max())
    for a, b in zip(runs["mirrored"].weights, runs["one_device"].weights)
)
print("RESULT " + json.dumps(result))
"""


def _run(script, tmp_path):
    # One process per strategy: two MirroredStrategy objects in one process
    # share collective keys and mix up each other's all-reduces.
    env = {**os.environ, "KERAS_TRANSFER_CPU_DEVICES": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.slow
def test_every_recipe_trains_under_mirrored_and_matches_one_device(tmp_path):
    result = _run(_SCRIPT, tmp_path)
    print(result)
    assert result["replicas"] == 2
    for recipe in ("feature_extraction", "two_stage", "full", "progressive"):
        # Same sums, split over 2 replicas and reduced: float32 round-off only.
        assert result[recipe]["max_abs_diff"] <= 1e-4, (recipe, result[recipe])
        assert result[recipe]["same_start"] == 0.0, (recipe, result[recipe])
        assert result[recipe]["trained"] > 1e-4, (recipe, result[recipe])
    assert "Received: batch_size=7" in result["odd_batch"]
    assert "build it with `strategy=`" in result["outside_scope"]


@pytest.mark.slow
def test_command_line_trains_under_mirrored(tmp_path):
    result = _run(_CLI, tmp_path)
    # keras-transfer train --strategy=mirrored: the one-device weights, a complete run.
    assert result["mirrored_exit"] == result["one_device_exit"] == 0
    assert result["cli_max_abs_diff"] <= 1e-4
    assert "run_complete.json" in result["mirrored_files"]
    assert result["mirrored_files"] == result["one_device_files"]
