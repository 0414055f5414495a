"""`tf.distribute` strategies by name, data sharding, and the Keras 3 multi-worker fix.

`get_strategy(name)` makes the strategy a run trains under: `"auto"`
(several GPUs: Mirrored; one: OneDevice; none: TensorFlow's default),
`"one_device"`, `"mirrored"`, `"multi_worker"` (MultiWorkerMirrored, from
`TF_CONFIG` or explicit `worker_hosts` / `task_index`) and `"tpu"`. Build the
model with `strategy=` and pass the same strategy to `fine_tune`.

Multi-worker training with Keras 3.15 `fit` fails upstream
(keras-team/keras#20585): the train step reduces its scalar logs with
`strategy.reduce("MEAN", value, axis=0)`, which a collective all-reduce
refuses for a 0-d tensor (tensorflow/tensorflow#72388), and `fit` first
all-reduces a whole data batch only to learn its shapes (which fails for
`(x, y)` tuples and dict inputs, keras-team/keras#20329). Importing
keras_transfer installs `install_multi_worker_fix()`: two replacements that act
only when the strategy really is multi-worker (every other strategy runs
Keras's own code) and only on the Keras versions known to need them
(`AFFECTED_KERAS`). Remove them once upstream is fixed: raise nothing else,
the version gate then turns them off.

`KERAS_TRANSFER_CPU_DEVICES=N` (read when keras_transfer is imported, before
TensorFlow starts) splits the CPU into N logical devices, so that
`"mirrored"` can be tried on a machine without GPUs (tests do this).
"""

from __future__ import annotations

import difflib
import json
import os

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import trainer as _tf_trainer

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")
COMMUNICATIONS = ("auto", "ring", "nccl")
CPU_DEVICES_ENV = "KERAS_TRANSFER_CPU_DEVICES"
# Keras versions whose TensorFlow trainer fails under MultiWorkerMirroredStrategy.
AFFECTED_KERAS = ((3, 0), (3, 15))


def configure_cpu_devices(count: int | None = None) -> int | None:
    """Splits the CPU into `count` logical devices (default: `$KERAS_TRANSFER_CPU_DEVICES`).

    Must run before TensorFlow makes its first tensor; keras_transfer calls it
    at import. Meant for trying `"mirrored"` on a machine without GPUs.

    Args:
        count: number of logical CPU devices, or None to read the variable
            (unset: nothing changes).

    Returns:
        The number of logical CPU devices set, or None when nothing was asked
        (TensorFlow's runtime is then left unstarted, as multi-worker needs).

    Raises:
        ValueError: `count` is not an integer >= 1.
        RuntimeError: TensorFlow has already started its devices.

    Example:

    >>> configure_cpu_devices() is None  # KERAS_TRANSFER_CPU_DEVICES unset
    True
    """
    if count is None:
        value = os.environ.get(CPU_DEVICES_ENV)
        if not value:
            return None
        if not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"{CPU_DEVICES_ENV} must be an integer >= 1. Received: {CPU_DEVICES_ENV}={value!r}"
            )
        count = int(value)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"`count` must be an integer >= 1. Received: count={count!r}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current is not None and len(current) == count:
        return count
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
    )
    return count


def get_strategy(
    name: str = "auto",
    *,
    devices: list[str] | None = None,
    worker_hosts: list[str] | str | None = None,
    task_index: int | None = None,
    communication: str = "auto",
    tpu: str | None = None,
) -> tf.distribute.Strategy:
    """The `tf.distribute.Strategy` to build and train under, by name.

    Args:
        name: `"auto"` (several GPUs: Mirrored, one GPU: OneDevice, no GPU:
            the default strategy), `"one_device"`, `"mirrored"`,
            `"multi_worker"` or `"tpu"`.
        devices: devices for `"one_device"` (the first) and `"mirrored"`;
            None: every GPU, else every logical CPU device.
        worker_hosts: for `"multi_worker"` without `TF_CONFIG`: the workers'
            `host:port` addresses (a list, or one comma-separated string);
            the first is the chief.
        task_index: this process's index in `worker_hosts`.
        communication: collective implementation for `"multi_worker"`:
            `"auto"`, `"ring"` (gRPC, any device) or `"nccl"` (GPUs).
        tpu: the TPU's name or address for `"tpu"` (None: the local TPU or
            the one the environment names).

    Returns:
        A `tf.distribute.Strategy`.

    Raises:
        ValueError: an unknown name (with a suggestion), `"multi_worker"`
            without a cluster, a bad `task_index`, NCCL without GPUs, or no
            TPU to resolve.

    Example:

    >>> get_strategy("one_device", devices=["/cpu:0"]).num_replicas_in_sync
    1
    >>> get_strategy("mirored")
    Traceback (most recent call last):
    ...
    ValueError: Unknown strategy 'mirored' (did you mean 'mirrored'?). Allowed: auto, one_device, mirrored, multi_worker, tpu
    """
    if name not in STRATEGIES:
        close = difflib.get_close_matches(str(name), STRATEGIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown strategy {name!r}{hint}. Allowed: {', '.join(STRATEGIES)}")
    if communication not in COMMUNICATIONS:
        raise ValueError(
            f"`communication` must be one of {COMMUNICATIONS}. "
            f"Received: communication={communication!r}"
        )
    if name != "multi_worker" and (worker_hosts or task_index is not None):
        raise ValueError(
            "`worker_hosts` and `task_index` are for strategy 'multi_worker'. "
            f"Received: strategy={name!r}"
        )
    if name == "multi_worker":
        # Physical devices only: listing logical ones would start the runtime,
        # and collective ops must be configured before it starts.
        return _multi_worker(
            worker_hosts, task_index, communication, tf.config.list_physical_devices("GPU")
        )
    if name == "tpu":
        return _tpu(tpu)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "auto":
        if len(gpus) > 1:
            return tf.distribute.MirroredStrategy()
        if len(gpus) == 1:
            return tf.distribute.OneDeviceStrategy(gpus[0].name)
        return tf.distribute.get_strategy()
    if name == "one_device":
        device = devices[0] if devices else (gpus[0].name if gpus else "/cpu:0")
        return tf.distribute.OneDeviceStrategy(device)
    if devices is None:
        cpus = tf.config.list_logical_devices("CPU")
        devices = [d.name for d in gpus] or [d.name for d in cpus]
    return tf.distribute.MirroredStrategy(devices)


def _multi_worker(worker_hosts, task_index, communication, gpus):
    if communication == "nccl" and not gpus:
        raise ValueError(
            "communication='nccl' needs GPUs and this machine has none; use 'ring' or 'auto'."
        )
    implementation = {
        "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
        "ring": tf.distribute.experimental.CommunicationImplementation.RING,
        "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
    }[communication]
    options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
    resolver = None
    if task_index is not None and not worker_hosts:
        raise ValueError(
            "`task_index` (--task_index) goes with `worker_hosts` (--worker_hosts); with "
            f"TF_CONFIG the task comes from TF_CONFIG. Received: task_index={task_index!r}"
        )
    if worker_hosts:
        hosts = worker_hosts.split(",") if isinstance(worker_hosts, str) else list(worker_hosts)
        hosts = [host.strip() for host in hosts if host.strip()]
        if (
            isinstance(task_index, bool)
            or not isinstance(task_index, int)
            or not 0 <= task_index < len(hosts)
        ):
            raise ValueError(
                f"`task_index` must be this worker's index in worker_hosts (0 to "
                f"{len(hosts) - 1}). Received: task_index={task_index!r}"
            )
        resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
            tf.train.ClusterSpec({"worker": hosts}),
            task_type="worker",
            task_id=task_index,
            rpc_layer="grpc",
        )
    elif not _tf_config_cluster():
        raise ValueError(
            "Strategy 'multi_worker' needs a cluster: set TF_CONFIG (see BUILD.md, "
            "'Training on GPUs and clusters') or pass worker_hosts= and task_index= "
            "(--worker_hosts=host1:port,host2:port --task_index=N)."
        )
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=options
        )
    except RuntimeError as error:
        raise RuntimeError(
            f"{error}: make the 'multi_worker' strategy first, before any TensorFlow "
            "operation runs (before building models or datasets)."
        ) from None


def _tf_config_cluster() -> dict:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON ({error}). Received: {raw!r}") from None
    cluster = config.get("cluster") if isinstance(config, dict) else None
    if not isinstance(cluster, dict) or not cluster:
        raise ValueError(f"TF_CONFIG has no 'cluster'. Received: TF_CONFIG={raw!r}")
    return cluster


def _tpu(tpu):
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, tf.errors.OpError, RuntimeError) as error:
        raise ValueError(
            f"No TPU could be resolved (tpu={tpu!r}): {error}. Run on a TPU VM, or pass the "
            "TPU's name or grpc:// address."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def is_multi_worker(strategy: tf.distribute.Strategy | None) -> bool:
    """Whether `strategy` trains over several worker processes.

    Args:
        strategy: a strategy, or None.

    Returns:
        True for a MultiWorkerMirroredStrategy in multi-worker mode.

    Example:

    >>> is_multi_worker(tf.distribute.get_strategy())
    False
    """
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes checkpoints and run files (always, on one worker).

    The chief is the `"chief"` task, or worker 0 when the cluster has none.

    Args:
        strategy: the strategy; None: the current one.

    Returns:
        True on the chief, and in every single-worker program.

    Example:

    >>> is_chief()
    True
    """
    strategy = strategy or tf.distribute.get_strategy()
    if not is_multi_worker(strategy):
        return True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type in (None, "worker") and not has_chief and (task_id or 0) == 0


def shard_by_data(dataset: tf.data.Dataset, by_files: bool = False) -> tf.data.Dataset:
    """Sets the dataset's auto-shard policy explicitly (DATA, or FILE for file-based input).

    Under a multi-worker strategy each worker reads its own part: DATA
    splits the elements (right for in-memory and file-list pipelines, whose
    "files" are single images); FILE gives each worker whole files (only
    for input that really is several record files). A policy already set by
    the caller is kept.

    Args:
        dataset: a `tf.data.Dataset`.
        by_files: use FILE instead of DATA.

    Returns:
        The dataset with the policy set.

    Example:

    >>> data = shard_by_data(tf.data.Dataset.range(4))
    >>> data.options().experimental_distribute.auto_shard_policy.name
    'DATA'
    """
    policy = tf.data.experimental.AutoShardPolicy
    current = dataset.options().experimental_distribute.auto_shard_policy
    if current != policy.AUTO:
        return dataset
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy.FILE if by_files else policy.DATA
    return dataset.with_options(options)


# The multi-worker fix (keras-team/keras#20585). Both replacements call Keras's
# own code unless the strategy is multi-worker.
_ORIGINAL = {}


def _first_local(strategy, value):
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def _reduce_per_replica(values, strategy, reduction):
    if reduction not in ("auto", "mean") or not is_multi_worker(strategy):
        return _ORIGINAL["reduce_per_replica"](values, strategy, reduction)

    def mean(value):
        rank = _first_local(strategy, value).shape.rank
        # A 0-d log value (the loss, a metric) is averaged over replicas only.
        return strategy.reduce("MEAN", value, axis=None if rank == 0 else 0)

    return tree.map_structure(mean, values)


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    strategy = self._distribute_strategy
    if strategy is None or not is_multi_worker(strategy) or iterator is None:
        return _ORIGINAL["_maybe_symbolic_build"](self, iterator=iterator, data_batch=data_batch)
    for _, _, batches in iterator:
        # The build needs shapes only: this worker's first replica batch has them.
        data_batch = tree.map_structure(lambda v: _first_local(strategy, v), next(batches))
        break
    with strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def multi_worker_fix_needed() -> bool:
    """Whether the installed Keras is one `install_multi_worker_fix` patches.

    Returns:
        True for Keras versions in `AFFECTED_KERAS`.

    Example:

    >>> isinstance(multi_worker_fix_needed(), bool)
    True
    """
    version = tuple(int(part) for part in keras.__version__.split(".")[:2])
    return AFFECTED_KERAS[0] <= version <= AFFECTED_KERAS[1]


def install_multi_worker_fix() -> bool:
    """Makes `model.fit` work under MultiWorkerMirroredStrategy on affected Keras versions.

    Idempotent; keras_transfer calls it at import. Single-worker strategies
    keep Keras's own code paths.

    Returns:
        True when the fix is in place.

    Example:

    >>> install_multi_worker_fix() == multi_worker_fix_needed()
    True
    """
    if not multi_worker_fix_needed():
        return False
    if not _ORIGINAL:
        _ORIGINAL["reduce_per_replica"] = _tf_trainer.reduce_per_replica
        _ORIGINAL["_maybe_symbolic_build"] = _tf_trainer.TensorFlowTrainer._maybe_symbolic_build
        _tf_trainer.reduce_per_replica = _reduce_per_replica
        _tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    return True


def remove_multi_worker_fix() -> None:
    """Restores Keras's own functions (undoes `install_multi_worker_fix`).

    Returns:
        None.

    Example:

    >>> remove_multi_worker_fix(); install_multi_worker_fix() == multi_worker_fix_needed()
    True
    """
    if _ORIGINAL:
        _tf_trainer.reduce_per_replica = _ORIGINAL.pop("reduce_per_replica")
        _tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _ORIGINAL.pop("_maybe_symbolic_build")


# At import: logical CPU devices must exist before TensorFlow starts its
# runtime, and `fit` needs the fix before any model trains.
configure_cpu_devices()
install_multi_worker_fix()
