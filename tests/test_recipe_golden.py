"""Every named recipe gives the weights it gave before recipes became plans of stages,
marks its stages, and round-trips through `.keras` with its optimizer state.

The golden values were recorded with the one-function `fine_tune` of commit
00c7f94 (tf.data input, fixed seed): `python tests/test_recipe_golden.py`
rewrites them, and is only for a deliberate change of a recipe's behaviour.
"""

import json
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

sys.path.insert(0, os.path.dirname(__file__))
from conftest import assert_round_trip, image_batch, labels, tiny_classifier  # noqa: E402

import keras_transfer as kt  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "recipe_golden.json")
CASES = {
    "feature_extraction": 2,
    "two_stage": (1, 1),
    "full": 2,
    "progressive": 2,
}
# Values kept per variable: enough to catch any change, small enough for git.
_HEAD_VALUES = 6


def train(recipe):
    keras.utils.set_random_seed(0)
    model = tiny_classifier(dropout=0.0)
    x, y = image_batch(24, seed=1), labels(24)
    train_data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    validation = tf.data.Dataset.from_tensor_slices((x[:8], y[:8])).batch(8)
    history = kt.fine_tune(
        model, train_data, validation, recipe=recipe, epochs=CASES[recipe], verbose=0
    )
    return model, history


def weight_stats(model):
    return {
        v.path: {
            "sum": float(np.sum(v.numpy(), dtype=np.float64)),
            "abs_sum": float(np.abs(v.numpy()).sum(dtype=np.float64)),
            "head": np.asarray(v.numpy()).reshape(-1)[:_HEAD_VALUES].tolist(),
        }
        for v in model.weights
    }


@pytest.mark.parametrize(
    "recipe, stages",
    [
        ("feature_extraction", [1, 1]),
        ("two_stage", [1, 2]),
        ("full", [1, 1]),
        ("progressive", [1, 1]),
    ],
)
def test_recipe_matches_golden_weights_and_round_trips(recipe, stages, tmp_path):
    with open(GOLDEN) as f:
        golden = json.load(f)[recipe]
    model, history = train(recipe)
    got = weight_stats(model)
    assert sorted(got) == sorted(golden)
    for path, values in golden.items():
        scale = max(1.0, abs(values["abs_sum"]))
        assert abs(got[path]["sum"] - values["sum"]) <= 1e-6 * scale, path
        assert abs(got[path]["abs_sum"] - values["abs_sum"]) <= 1e-6 * scale, path
        np.testing.assert_allclose(got[path]["head"], values["head"], atol=1e-6, err_msg=path)
    assert history.history["stage"] == stages
    assert "val_loss" in history.history and "accuracy" in history.history
    x = image_batch(8, seed=1)
    loaded = assert_round_trip(model, x, tmp_path)
    saved = {v.path: v.numpy() for v in model.optimizer.variables}
    assert len(loaded.optimizer.variables) >= 2
    for v in loaded.optimizer.variables:
        np.testing.assert_array_equal(v.numpy(), saved[v.path], err_msg=v.path)
    assert loaded.optimizer.get_config()["lr_multipliers"] == model.optimizer.lr_multipliers
    # The reloaded model carries on training where it stopped.
    loaded.fit(x, labels(8), batch_size=8, epochs=1, verbose=0)


if __name__ == "__main__":
    with open(GOLDEN, "w") as f:
        golden = {recipe: weight_stats(train(recipe)[0]) for recipe in CASES}
        json.dump(golden, f, indent=1, sort_keys=True)
    print(f"wrote {GOLDEN}")
