"""`kt.distribute`: strategies by name, their errors, sharding, and the multi-worker fix.

Multi-worker and Mirrored training run in their own processes
(test_multi_worker.py, test_distribution.py); these checks need none.
"""

import pytest
import tensorflow as tf
from conftest import assert_user_error, run_cli
from keras.src.backend.tensorflow import trainer

import keras_transfer as kt
from keras_transfer import distribute


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "mirored"}, "Unknown strategy 'mirored' (did you mean 'mirrored'?)"),
        ({"name": "gpu"}, "Allowed: auto, one_device, mirrored, multi_worker, tpu"),
        ({"name": "multi_worker"}, "needs a cluster: set TF_CONFIG"),
        ({"name": "multi_worker", "task_index": 1}, "goes with `worker_hosts`"),
        (
            {"name": "multi_worker", "worker_hosts": "a:1,b:2", "task_index": 2},
            "Received: task_index=2",
        ),
        ({"name": "multi_worker", "communication": "nccl"}, "needs GPUs"),
        ({"name": "multi_worker", "communication": "mpi"}, "Received: communication='mpi'"),
        ({"name": "mirrored", "worker_hosts": "a:1"}, "are for strategy 'multi_worker'"),
    ],
)
def test_strategy_errors_name_the_value(monkeypatch, kwargs, message):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError) as error:
        distribute.get_strategy(**kwargs)
    assert message in str(error.value)


def test_bad_tf_config_is_named(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", '{"task": {"type": "worker", "index": 0}}')
    with pytest.raises(ValueError, match="TF_CONFIG has no 'cluster'"):
        distribute.get_strategy("multi_worker")


def test_cpu_strategies():
    assert distribute.get_strategy("auto") is tf.distribute.get_strategy()
    one = distribute.get_strategy("one_device")
    assert isinstance(one, tf.distribute.OneDeviceStrategy)
    assert distribute.is_chief(one) and not distribute.is_multi_worker(one)


def test_command_line_strategy_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    base = ("train", "--data=digits", "--max_per_class=2", "--output_dir=run")
    assert_user_error(run_cli(*base, "--strategy=mirored", cwd=tmp_path), "'mirrored'")
    assert_user_error(
        run_cli(*base, "--strategy=multi_worker", cwd=tmp_path), "--worker_hosts", "TF_CONFIG"
    )
    assert not (tmp_path / "run").exists() and not (tmp_path / ".partial-run").exists()


def test_sharding_policy_is_explicit():
    policy = tf.data.experimental.AutoShardPolicy
    data = distribute.shard_by_data(tf.data.Dataset.range(4))
    assert data.options().experimental_distribute.auto_shard_policy == policy.DATA
    files = distribute.shard_by_data(tf.data.Dataset.range(4), by_files=True)
    assert files.options().experimental_distribute.auto_shard_policy == policy.FILE
    # A policy the caller chose is kept.
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy.OFF
    kept = distribute.shard_by_data(tf.data.Dataset.range(4).with_options(options))
    assert kept.options().experimental_distribute.auto_shard_policy == policy.OFF
    # fine_tune's pipeline gets DATA.
    model = kt.build_image_classifier(
        "mobilenet_v3_small", 2, weights=None, input_shape=(32, 32, 3)
    )
    inputs = kt.training.prepare_training(model, (tf.zeros((4, 32, 32, 3)), tf.zeros(4, "int32")))
    assert inputs.train.options().experimental_distribute.auto_shard_policy == policy.DATA


def test_multi_worker_fix_is_version_gated_and_removable():
    assert distribute.multi_worker_fix_needed()  # Keras 3.15: keras-team/keras#20585 is open
    assert trainer.reduce_per_replica is distribute._reduce_per_replica
    distribute.remove_multi_worker_fix()
    try:
        assert trainer.reduce_per_replica is not distribute._reduce_per_replica
        assert trainer.TensorFlowTrainer._maybe_symbolic_build is not (
            distribute._maybe_symbolic_build
        )
    finally:
        assert distribute.install_multi_worker_fix()
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is distribute._maybe_symbolic_build
